"""Where each row sits in its sequence, for the two layouts the model runs on.

Row-wise ops (norms, projections, heads) do not care about the layout; only the input encoders
(positions, time buckets, contextual rows) and attention do, and they ask the layout.

  Jagged: values [L, ...] + offsets [B+1] (training, evaluation, fast kernels).
  Padded: [B, C + Nh + Nc, ...] = [contextual][history padded to Nh][candidates padded to Nc]
          (the engine input contract: dense dims for optimization profiles, no data-dependent shapes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hstu_opt import ops
from hstu_opt.model.config import HstuConfig
from hstu_opt.ops import Impl
from hstu_opt.ops.hstu_attention.reference import attention_mask, row_ids


def row_owner(ends: Tensor, index: Tensor) -> Tensor:
    """For each index, the sequence whose range holds it, given the sequences' cumulative ends: how many
    end at or before it (empty sequences are skipped). A binary search (torch.bucketize), a pointwise
    kernel under Inductor: as a compare-and-count over [len(index), B] it became reduction kernels
    fused with the gathers (0.049 ms of dlrm-v3 batch 16's GPU time, run 41), and repeat_interleave
    stayed an ATen kernel (0.010 ms, run 44). `ends` must be a buffer of its own, such as a cumsum's
    output: Inductor in torch 2.11 could not lower the search over a slice such as offsets[1:] on the
    H200 ("NotImplementedError: SliceView", run 25)."""
    return torch.bucketize(index, ends, right=True)


ROW_BUCKET = 512  # jagged rows are padded up to a multiple of this (compiled graph_key / pack_jagged; prefill graphs)


def bucket_rows(rows: int, contextual_len: int, max_seq_len: int, most: int | None = None,
                step: int = ROW_BUCKET) -> int:
    """The jagged row count a graph of `rows` real rows runs at (a compiled full forward; a lone miss's prefill,
    serve/graphs.PrefillGraphs): room for a padding user of at least
    max(1, C) rows (a sequence like any other: its contextual rows first), rounded up to a multiple of the
    step, which is capped so the padding user is never longer than max_seq_len (no sequence may be); at
    most `most` (the padded request's rows, every user full) + that least, so full-width requests pad by
    the least alone. Requests whose lengths differ within a step share one compiled shape and CUDA graph."""
    least = max(1, contextual_len)
    step = max(1, min(step, max_seq_len + 1 - least))
    bucket = -(-(rows + least) // step) * step
    return bucket if most is None else min(bucket, most + least)


def row_buckets(most: int, contextual_len: int, max_seq_len: int, step: int = ROW_BUCKET) -> list[int]:
    """Every row count bucket_rows gives for 1..most real rows, smallest first."""
    return sorted({bucket_rows(n, contextual_len, max_seq_len, most, step) for n in range(1, most + 1)})


class JaggedSeqs:
    """Only where each sequence starts and how many targets it ends with: all the layers' attention asks
    for (no per-row tensors to build, so a trunk run outside a compiled graph launches nothing for it)."""

    def __init__(self, offsets: Tensor, num_targets: Tensor):
        self.offsets, self.num_targets = offsets, num_targets

    def attention(self, q: Tensor, k: Tensor, v: Tensor, cfg: HstuConfig, impl: Impl) -> Tensor:
        return ops.hstu_attention(
            q, k, v, self.offsets, self.num_targets, max_seq_len=cfg.max_seq_len, alpha=cfg.alpha,
            contextual_len=cfg.contextual_len, max_attn_len=cfg.max_attn_len,
            min_full_attn_seq_len=cfg.min_full_attn_seq_len, impl=impl,
        )


class Jagged(JaggedSeqs):
    """JaggedSeqs plus each row's user, position and mask ids (what the input encoders ask for)."""

    def __init__(self, offsets: Tensor, num_targets: Tensor, contextual_len: int, num_rows: int | None = None):
        super().__init__(offsets, num_targets)
        lengths = offsets[1:] - offsets[:-1]
        # num_rows (= L, known from the values) spares a device->host sync, so the forward can be graph-captured
        rows = torch.arange(int(offsets[-1]) if num_rows is None else num_rows, device=offsets.device)
        self.user = row_owner(lengths.cumsum(0), rows)  # [L]
        self.pos = rows - offsets[self.user]  # [L]
        self.seq_len = lengths[self.user]
        self.hist_end = self.seq_len - num_targets[self.user]
        self.ids, _ = row_ids(self.pos, self.seq_len, num_targets[self.user], contextual_len)
        self.is_target = self.pos >= self.hist_end

    def per_row(self, per_user: Tensor) -> Tensor:
        return per_user[self.user]

    def last_history_rows(self) -> Tensor:
        """Index of each user's most recent history row [B]."""
        return self.offsets[1:] - self.num_targets - 1


class Padded:
    def __init__(self, hist_lengths: Tensor, num_candidates: Tensor, n_hist: Tensor | int, n_cand: Tensor | int,
                 cfg: HstuConfig):
        C = cfg.contextual_len
        device = hist_lengths.device
        ctx = torch.arange(C, device=device)
        hist = torch.arange(n_hist, device=device)
        cand = torch.arange(n_cand, device=device)
        hl, nc = hist_lengths[:, None], num_candidates[:, None]  # [B, 1]
        B = hl.shape[0]
        self.pos = torch.cat(  # [B, n]: the row's index in its (unpadded) sequence
            [ctx[None].expand(B, C), (C + hist)[None].expand(B, -1), C + hl + cand[None]], dim=1
        )
        self.valid = torch.cat(
            [torch.ones(B, C, dtype=torch.bool, device=device), hist[None] < hl, cand[None] < nc], dim=1
        )
        self.seq_len = C + hl + nc
        self.hist_end = C + hl
        self.ids, hi = row_ids(self.pos, self.seq_len, nc, C)
        self.mask = attention_mask(self.ids, hi, self.valid, cfg.max_attn_len,  # [B, n, n], shared by all layers
                                   cfg.min_full_attn_seq_len)
        self.n_cand_start = C + n_hist

    def per_row(self, per_user: Tensor) -> Tensor:
        return per_user[:, None]

    def attention(self, q: Tensor, k: Tensor, v: Tensor, cfg: HstuConfig, impl: Impl) -> Tensor:
        return ops.hstu_attention_dense(q, k, v, self.mask, max_seq_len=cfg.max_seq_len, alpha=cfg.alpha, impl=impl)
