"""Input encoders (HSTU.md "Around the layers"): item (+ rating) embeddings scaled by sqrt(D),
a backward-counting positional embedding and a time-bucket embedding; contextual rows get their
own feature embedding and positions 0..C-1."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hstu_opt import ops
from hstu_opt.model.config import HstuConfig
from hstu_opt.ops import Impl
from hstu_opt.ops.embedding_rows import TABLE as EMBEDDING_ROWS


def position_index(pos: Tensor, hist_end: Tensor, contextual_len: int, num_buckets: int) -> Tensor:
    """Most recent history row -> 1 + C, every target -> C, contextual rows -> 0..C-1."""
    back = hist_end - torch.minimum(pos, hist_end) + contextual_len
    return torch.where(pos < contextual_len, pos, back).clamp(max=num_buckets - 1)


def time_bucket(query_time: Tensor, timestamps: Tensor, fn: str, num_buckets: int) -> Tensor:
    """floor(sqrt(max(qt - t, 1e-6) / 60)) (or the log variant), clamped to the table."""
    delta = (query_time - timestamps).to(torch.float32).clamp(min=1e-6)
    raw = torch.sqrt(delta / 60.0) if fn == "sqrt" else torch.log(delta)
    return raw.clamp(min=0).floor().to(torch.int64).clamp(max=num_buckets - 1)


class InputEncoder(nn.Module):
    def __init__(self, cfg: HstuConfig):
        super().__init__()
        D = cfg.embedding_dim
        self.cfg = cfg
        self.scale = math.sqrt(D)
        self.item_emb = nn.Embedding(cfg.num_items + 1, D, padding_idx=0)
        self.rating_emb = nn.Embedding(cfg.num_ratings + 1, D)
        self.pos_emb = nn.Embedding(cfg.num_position_buckets, D)
        self.time_emb = nn.Embedding(cfg.num_time_buckets, D)
        self.ctx_emb = nn.Embedding(cfg.contextual_cardinality + 1, D) if cfg.contextual_len > 0 else None
        for emb in (self.item_emb, self.rating_emb, self.pos_emb, self.time_emb):
            nn.init.normal_(emb.weight, std=0.02)
        # A candidate row's embedding_rows indices and weights past its item id (_candidate_rows): rating 0,
        # position C, time bucket 0 (and no contextual feature). The float32 weights are kept as their int32
        # bits, so model.to(bfloat16) leaves them exact. Not in the state dict.
        pos_c = min(cfg.contextual_len, cfg.num_position_buckets - 1)
        n = 5 if self.ctx_emb is not None else 4
        self.register_buffer("cand_index", torch.tensor([0, 0, pos_c, 0, 0][:n]), persistent=False)
        weights = torch.tensor([self.scale, self.scale, 1.0, 1.0, 0.0][:n], dtype=torch.float32)
        self.register_buffer("cand_weight_bits", weights.view(torch.int32), persistent=False)

    def forward(self, ids: Tensor, ratings: Tensor, timestamps: Tensor, query_time: Tensor, layout,
                impl: Impl | dict = Impl.REFERENCE) -> Tensor:
        """ids/ratings/timestamps: per row ([L] or [B, n]); contextual rows carry their feature id in `ids`.
        impl: where it names a fast embedding_rows (Triton), jagged rows take ops.embedding_rows (inference:
        it has no backward)."""
        cfg = self.cfg
        is_ctx = layout.pos < cfg.contextual_len
        zero = torch.zeros_like(ids)
        fast = EMBEDDING_ROWS.resolve(impl) != Impl.REFERENCE
        if ids.dim() == 1 and fast and not (torch.is_grad_enabled() and self.item_emb.weight.requires_grad):
            return self._rows(ids, ratings, timestamps, query_time, layout, is_ctx, zero, impl)
        x = self.item_emb(torch.where(is_ctx, zero, ids)) + self.rating_emb(torch.where(is_ctx, zero, ratings))
        if self.ctx_emb is not None:
            x = torch.where(is_ctx[..., None], self.ctx_emb(torch.where(is_ctx, ids, zero)), x)
        pos = position_index(layout.pos, layout.hist_end, cfg.contextual_len, cfg.num_position_buckets)
        bucket = time_bucket(layout.per_row(query_time), timestamps, cfg.time_bucket_fn, cfg.num_time_buckets)
        t = self.time_emb(bucket) * (~is_ctx)[..., None].to(x.dtype)
        return x * self.scale + self.pos_emb(pos) + t

    def _rows(self, ids, ratings, timestamps, query_time, layout, is_ctx, zero, impl) -> Tensor:
        """forward's sum as one gather-and-sum per row (ops.embedding_rows, float32 sums): the row indices
        and weights here are [L]-sized, so a compiled graph no longer redoes them for each of a row's D
        outputs. Same terms as forward: (item + rating) * sqrt(D) for history and candidate rows, the
        contextual feature * sqrt(D) for contextual rows, the position, and the time bucket outside the
        contextual rows."""
        cfg = self.cfg
        hist = (~is_ctx).to(torch.float32)
        pos = position_index(layout.pos, layout.hist_end, cfg.contextual_len, cfg.num_position_buckets)
        bucket = time_bucket(layout.per_row(query_time), timestamps, cfg.time_bucket_fn, cfg.num_time_buckets)
        tables = [self.item_emb.weight, self.rating_emb.weight, self.pos_emb.weight, self.time_emb.weight]
        indices = [torch.where(is_ctx, zero, ids), torch.where(is_ctx, zero, ratings), pos, bucket]
        scales = [hist * self.scale, hist * self.scale, torch.ones_like(hist), hist]
        if self.ctx_emb is not None:
            tables.append(self.ctx_emb.weight)
            indices.append(torch.where(is_ctx, ids, zero))
            scales.append((1.0 - hist) * self.scale)
        return ops.embedding_rows(torch.stack(indices, 1), torch.stack(scales, 1), tables, impl=impl)

    def candidates(self, cand_ids: Tensor, impl: Impl | dict = Impl.REFERENCE) -> Tensor:
        """Rows of candidates scored later against a KV cache: rating unknown, position C, time bucket 0.
        With a fast embedding_rows (impl), the very sum forward's row path computes for a candidate row (same
        tables, indices, weights and float32 order: a cache hit's candidate rows equal a full forward's bit
        for bit), in 4 kernels where the torch sum below takes 10."""
        cfg = self.cfg
        if (cand_ids.dim() == 1 and EMBEDDING_ROWS.resolve(impl) != Impl.REFERENCE
                and not (torch.is_grad_enabled() and self.item_emb.weight.requires_grad)):
            return self._candidate_rows(cand_ids, impl)
        zero = torch.zeros_like(cand_ids)
        x = (self.item_emb(cand_ids) + self.rating_emb(zero)) * self.scale
        return x + self.pos_emb(zero + min(cfg.contextual_len, cfg.num_position_buckets - 1)) + self.time_emb(zero)

    def _candidate_rows(self, cand_ids: Tensor, impl: Impl | dict) -> Tensor:
        """_rows' terms for candidate rows only: indices (id, 0, C, 0[, 0]), weights (sqrt(D), sqrt(D), 1, 1[, 0])."""
        tables = [self.item_emb.weight, self.rating_emb.weight, self.pos_emb.weight, self.time_emb.weight]
        if self.ctx_emb is not None:
            tables.append(self.ctx_emb.weight)
        L = cand_ids.shape[0]
        indices = self.cand_index.repeat(L, 1)  # [L, T]
        indices[:, 0] = cand_ids
        weights = self.cand_weight_bits.view(torch.float32).expand(L, -1)
        return ops.embedding_rows(indices, weights, tables, impl=impl)
