import numpy as np
import pytest
import torch

from hstu_opt.model.scoring import to_tensors
from tests.conftest import MODEL_TOLERANCES
from tests.model.helpers import jagged_from_padded, random_requests, tiny_model

CONFIGS = [dict(C=0), dict(C=2), dict(C=0, window=5), dict(C=1, window=3, D=64, H=4, dqk=16, dv=8)]


@pytest.mark.parametrize("kw", CONFIGS)
def test_padded_engine_contract_equals_jagged_forward(kw):
    model = tiny_model(**kw)
    C = model.cfg.contextual_len
    batch = random_requests(5, C, np.random.default_rng(1))
    with torch.no_grad():
        probs = model.rank(**to_tensors(batch.ranking_feed()))  # [B, Nc, T]
        ids, ratings, ts, offsets, nt, qt = jagged_from_padded(batch, C)
        states, layout = model.forward_jagged(ids, ratings, ts, offsets, nt, qt)
        want = torch.sigmoid(model.ranking_logits(states[layout.is_target], ids[layout.is_target]))
    got = torch.cat([probs[b, : int(batch.num_candidates[b])] for b in range(5)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", CONFIGS[:2])
def test_retrieval_uses_last_history_row(kw):
    model = tiny_model(**kw)
    C = model.cfg.contextual_len
    batch = random_requests(4, C, np.random.default_rng(2))
    batch.num_candidates[:] = 0
    batch.cand_ids = batch.cand_ids[:, :0]
    with torch.no_grad():
        q = model.retrieve(**to_tensors(batch.retrieval_feed()))
        ids, ratings, ts, offsets, nt, qt = jagged_from_padded(batch, C)
        states, layout = model.forward_jagged(ids, ratings, ts, offsets, nt, qt)
        want = torch.nn.functional.normalize(states[layout.last_history_rows()], dim=-1)
    torch.testing.assert_close(q, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(4))


def test_batched_forward_equals_each_user_alone():
    model = tiny_model(C=1)
    batch = random_requests(6, 1, np.random.default_rng(3))
    with torch.no_grad():
        together = model.rank(**to_tensors(batch.ranking_feed()))
        for b in range(6):
            one = {k: v[b : b + 1] for k, v in batch.ranking_feed().items()}
            h, c = int(one["hist_lengths"][0]), int(one["num_candidates"][0])
            one["hist_ids"], one["hist_ratings"], one["hist_timestamps"] = (
                one[k][:, :h] for k in ("hist_ids", "hist_ratings", "hist_timestamps"))
            one["cand_ids"] = one["cand_ids"][:, :c]
            alone = model.rank(**to_tensors(one))
            torch.testing.assert_close(together[b, :c], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(C=0), dict(C=2, window=4)])
def test_cached_scoring_equals_full_forward(kw):
    model = tiny_model(**kw)
    C = model.cfg.contextual_len
    batch = random_requests(4, C, np.random.default_rng(4))
    with torch.no_grad():
        full = model.rank(**to_tensors(batch.ranking_feed()))
        # prefill over [contextual][history] only, at the request's query time
        saved_nc, saved_c = batch.num_candidates.copy(), batch.cand_ids
        batch.num_candidates[:] = 0
        ids, ratings, ts, offsets, _, qt = jagged_from_padded(batch, C)
        cache = model.prefill(ids, ratings, ts, offsets, qt)
        cands = torch.cat([torch.from_numpy(saved_c[b, : saved_nc[b]]) for b in range(4)])
        delta_offsets = torch.tensor(np.r_[0, np.cumsum(saved_nc)], dtype=torch.int64)
        got = model.score_cached(cache, cands, delta_offsets)
    want = torch.cat([full[b, : saved_nc[b]] for b in range(4)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_model_tracks_float32(dtype):
    ref = tiny_model(C=1)
    low = tiny_model(C=1, dtype=dtype)
    batch = random_requests(3, 1, np.random.default_rng(5))
    with torch.no_grad():
        want = ref.rank(**to_tensors(batch.ranking_feed()))
        got = low.rank(**to_tensors(batch.ranking_feed()))
    atol, rtol = MODEL_TOLERANCES[getattr(torch, dtype)]
    assert got.dtype == torch.float32  # probabilities come out in float32
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
