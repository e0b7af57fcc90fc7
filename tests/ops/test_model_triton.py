"""The whole model with every Triton op (Triton's CPU interpreter) against the reference ops on the same
weights, and against float64: the full forward, the serving forward (rank_jagged; also with a padding user
after the real ones, as the compiled engine buckets rows) and cached scoring (a prefill, then candidates
against it, contiguous and through page tables: what a cache hit runs). fp32:
the interpreter computes bf16 tl.dot wrongly (triton-lang/triton#11584); benchmarks/gpu_check.py's model
rows run the same comparison in bf16/fp16 on the GPU."""

import copy

import pytest
import torch

from tests.ops.triton_interpreter import interpret_without_gpu, needs_triton  # noqa: E402,F401 (before the kernels)

pytestmark = needs_triton

from hstu_opt.ops import Impl  # noqa: E402
from tests.serve.test_paged_cache import model as make_model  # noqa: E402
from tests.serve.test_paged_cache import paged_cache, prefill_inputs  # noqa: E402

FP32 = dict(atol=2e-5, rtol=2e-4)  # a few layers of float32 rounding (the per-op table's fp32 row, compounded)


def outputs(m, C: int, hist: list[int], cands: torch.Tensor, counts: list[int]) -> dict[str, torch.Tensor]:
    """Full forward over [contextual][history][candidates] per user, its serving form, and the cached path."""
    ids, ratings, ts, offsets, qt = prefill_inputs(C, hist)
    lengths, starts = offsets.diff().tolist(), offsets[:-1].tolist()
    rows, full_ids, full_r, full_t, at = [], [], [], [], 0
    for b, (lo, n, k) in enumerate(zip(starts, lengths, counts)):
        full_ids += [ids[lo:lo + n], cands[at:at + k]]
        full_r += [ratings[lo:lo + n], torch.zeros(k, dtype=torch.int64)]
        full_t += [ts[lo:lo + n], qt[b].repeat(k)]  # candidates at the query time, as the engine contract builds them
        at += k
    f_ids, f_r, f_t = torch.cat(full_ids), torch.cat(full_r), torch.cat(full_t)
    nt = torch.tensor(counts)
    f_off = torch.cat([torch.zeros(1, dtype=torch.int64), (offsets.diff() + nt).cumsum(0)])
    target = torch.cat([torch.arange(int(f_off[b + 1]) - k, int(f_off[b + 1])) for b, k in enumerate(counts)])
    other = torch.tensor(sorted(set(range(int(f_off[-1]))) - set(target.tolist())))
    delta = torch.cat([torch.zeros(1, dtype=torch.int64), nt.cumsum(0)])
    # the same rows then a padding user of 7 rows (as the compiled engine buckets rows: item 0, no targets)
    L, pad = int(f_off[-1]), 7
    zeros = torch.zeros(pad, dtype=torch.int64)
    padded = (torch.cat([f_ids, zeros]), torch.cat([f_r, zeros]), torch.cat([f_t, qt[:1].repeat(pad)]),
              torch.cat([f_off, torch.tensor([L + pad])]), torch.cat([nt, zeros[:1]]), torch.cat([qt, qt[:1]]),
              target, torch.cat([other, torch.arange(L, L + pad)]))
    with torch.no_grad():
        states, _ = m.forward_jagged(f_ids, f_r, f_t, f_off, nt, qt)
        kv, paged = paged_cache(m, ids, ratings, ts, offsets, qt, page_rows=64)
        return {"states": states,
                "probs": torch.sigmoid(m.ranking_logits(states[target], f_ids[target])),
                "rank_jagged": m.rank_jagged(f_ids, f_r, f_t, f_off, nt, qt, target, other),
                "rank_jagged_padding_user": m.rank_jagged(*padded),
                "score_cached": m.score_cached(kv, cands, delta),
                "score_cached_paged": m.score_cached(paged, cands, delta)}


def as_float64(m):
    """The same weights in a float64 model (its config's dtype too: the encoder casts its rows to it)."""
    from dataclasses import replace

    from hstu_opt.model import HstuModel

    m64 = HstuModel(replace(m.cfg, dtype="float64")).eval()
    m64.load_state_dict(m.state_dict())
    return m64.double()


@pytest.mark.parametrize("C,window,min_full", [(0, 0, 0), (2, 5, 3)])
def test_whole_model_triton_ops_equal_reference_ops(C, window, min_full):
    """Every output of the Triton stack equals the reference stack's (fp32) and float64's within a few layers'
    rounding, and the cached path's probabilities equal the full forward's target rows: an op that is right
    alone but wrong in the stack (its layout, its strides, the encoder's candidate rows) shows here."""
    base = make_model(C, window, min_full)
    hist, counts = [30, 64 - C, 40], [2, 1, 4]
    cands = torch.tensor([3, 4, 5, 6, 7, 8, 9])
    ref = outputs(base, C, hist, cands, counts)
    f64 = outputs(as_float64(base), C, hist, cands, counts)
    fast = copy.deepcopy(base)
    fast.impl = Impl.TRITON
    got = outputs(fast, C, hist, cands, counts)
    for name, want in ref.items():
        torch.testing.assert_close(got[name], want, **FP32, msg=lambda m: f"{name} (Triton vs reference): {m}")
        torch.testing.assert_close(got[name].double(), f64[name].double(), **FP32, msg=lambda m: f"{name} (vs float64): {m}")
    for path in ("score_cached", "score_cached_paged", "rank_jagged", "rank_jagged_padding_user"):  # all score alike
        torch.testing.assert_close(got[path], got["probs"], **FP32, msg=lambda m: f"{path} vs the full forward: {m}")
