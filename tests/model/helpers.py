import numpy as np
import torch

from hstu_opt.data.requests import random_requests as _random_requests
from hstu_opt.model import HstuConfig, HstuModel


def tiny_model(C=0, window=0, D=50, H=2, dqk=25, dv=25, dtype="float32", seed=0):
    torch.manual_seed(seed)
    cfg = HstuConfig(embedding_dim=D, num_layers=2, num_heads=H, attention_dim=dqk, linear_dim=dv, max_history_len=40,
                     max_targets=6, num_items=60, contextual_len=C, contextual_cardinality=9, max_attn_len=window,
                     dtype=dtype)
    model = HstuModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # move off the init so layers are not near-identity
    return model.to(cfg.torch_dtype)


def random_requests(B, C, rng, max_hist=30, max_cand=6, num_items=60):
    return _random_requests(rng, B, max_hist, max_cand, num_items=num_items, contextual_len=C, contextual_cardinality=9)


def jagged_from_padded(batch, C):
    """The same requests as one jagged batch: [contextual][history][candidates] per user."""
    ids, ratings, ts, lengths = [], [], [], []
    for b in range(len(batch.hist_lengths)):
        h, c = int(batch.hist_lengths[b]), int(batch.num_candidates[b])
        qt = batch.query_time[b]
        ids.append(np.r_[batch.contextual_ids[b], batch.hist_ids[b, :h], batch.cand_ids[b, :c]])
        ratings.append(np.r_[np.zeros(C, np.int64), batch.hist_ratings[b, :h], np.zeros(c, np.int64)])
        ts.append(np.r_[np.full(C, qt), batch.hist_timestamps[b, :h], np.full(c, qt)])
        lengths.append(C + h + c)
    t = lambda a: torch.from_numpy(np.concatenate(a).astype(np.int64))  # noqa: E731
    offsets = torch.tensor(np.r_[0, np.cumsum(lengths)], dtype=torch.int64)
    return t(ids), t(ratings), t(ts), offsets, torch.from_numpy(batch.num_candidates), torch.from_numpy(batch.query_time)
