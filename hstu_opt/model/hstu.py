"""The HSTU model: input encoders -> STU stack -> ranking and retrieval heads.

Two ways in, one set of weights:
  * `forward_jagged` on a JaggedBatch (training, evaluation, fast kernels);
  * `rank` / `retrieve` on the padded engine contract (what export-onnx and the engines serve);
and cached candidate scoring (`prefill` then `score_cached`, HSTU.md "M-FALCON").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hstu_opt.model.config import HstuConfig
from hstu_opt.model.encoders import InputEncoder
from hstu_opt.model.heads import RankingHead, l2_normalize
from hstu_opt.model.layout import Jagged, JaggedSeqs, Padded
from hstu_opt.model.stu import STULayer
from hstu_opt.ops import Impl


@dataclass
class KVCache:
    """Per layer K and V of each user's [contextual][history] rows, jagged by `offsets`."""

    keys: list[Tensor]  # each [Lc, H, dqk]
    values: list[Tensor]  # each [Lc, H, dv]
    offsets: Tensor  # [B+1]
    query_time: Tensor  # [B]: the request time the cache was built for (time buckets depend on it)


@dataclass
class PagedKVCache:
    """The same K/V held in a page pool (serve/kv_cache/paged.py) and read in place: user b's cache row r is
    row r % page_rows of page page_table[b, r // page_rows], in every layer."""

    k_pages: Tensor  # [layers, pages, page_rows, H, dqk]
    v_pages: Tensor  # [layers, pages, page_rows, H, dv]
    page_table: Tensor  # [B, max_pages] int32
    lengths: Tensor  # [B]: cached rows per user


class HstuModel(nn.Module):
    def __init__(self, cfg: HstuConfig, impl: Impl = Impl.REFERENCE, dropout: float = 0.0):
        super().__init__()
        self.cfg, self.impl, self.dropout = cfg, impl, dropout
        self.eager_layers = None  # use_eager_layers()
        self.encoder = InputEncoder(cfg)
        self.layers = nn.ModuleList(STULayer(cfg) for _ in range(cfg.num_layers))
        self.ranking = RankingHead(cfg.embedding_dim, cfg.ranking_hidden_dim, len(cfg.ranking_tasks))

    # ---- the trunk -------------------------------------------------------------------------
    def trunk(self, x: Tensor, layout) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        p = self.dropout if self.training else 0.0
        x = nn.functional.dropout(x, p=p, training=self.training)
        keys, values = [], []
        for layer in self.layers:
            x, k, v = layer(x, layout, dropout=p, impl=self.impl)
            keys.append(k)
            values.append(v)
        return x, keys, values

    def item_embedding(self, ids: Tensor) -> Tensor:
        return self.encoder.item_emb(ids)

    def item_table(self) -> Tensor:
        """L2-normalized embeddings of items 1..num_items: [num_items, D] (row i is item i+1)."""
        return l2_normalize(self.encoder.item_emb.weight[1:])

    # ---- jagged ----------------------------------------------------------------------------
    def forward_jagged(self, ids: Tensor, ratings: Tensor, timestamps: Tensor, offsets: Tensor, num_targets: Tensor,
                       query_time: Tensor) -> tuple[Tensor, Jagged]:
        """-> (states [L, D], layout). Target rows' states feed the ranking head."""
        layout = Jagged(offsets, num_targets, self.cfg.contextual_len, num_rows=ids.shape[0])
        x = self.encoder(ids, ratings, timestamps, query_time, layout, self.impl).to(self.cfg.torch_dtype)
        states, _, _ = self.trunk(x, layout)
        return states, layout

    @torch.no_grad()
    def rank_jagged(self, ids: Tensor, ratings: Tensor, timestamps: Tensor, offsets: Tensor, num_targets: Tensor,
                    query_time: Tensor, target_rows: Tensor, history_rows: Tensor) -> Tensor:
        """Serving form of ranking: probabilities [Lt, T] of the target rows (`target_rows`, in order;
        `history_rows` are the others, contextual rows included). Equals the ranking head over
        forward_jagged's target rows, but the last layer runs for the target rows only: nothing reads
        its other rows. Those attend to the history's K/V as cached scoring does, so the last layer
        costs the k/v half of the projection for the history rows plus Lt (not L) rows of the full
        projection, attention and output projection.
        The row index lists come from the caller (the host knows them) so nothing here syncs."""
        layout = Jagged(offsets, num_targets, self.cfg.contextual_len, num_rows=ids.shape[0])
        x = self.encoder(ids, ratings, timestamps, query_time, layout, self.impl).to(self.cfg.torch_dtype)
        x = (self.eager_layers or _layers)(self, x, offsets, num_targets, len(self.layers) - 1)
        delta_offsets = torch.nn.functional.pad(num_targets.cumsum(0), (1, 0))
        cache_offsets = offsets - delta_offsets
        last = self.layers[-1]
        k, v = last.project_kv(x, self.impl, rows=history_rows)  # (their u and q are never read)
        x = last.forward_cached(x.index_select(0, target_rows), delta_offsets, k, v, cache_offsets, self.impl)
        return torch.sigmoid(self.ranking_logits(x, ids.index_select(0, target_rows)))

    def use_eager_layers(self, on: bool = True) -> None:
        """Under torch.compile, run rank_jagged's every layer but the last outside the compiled graph (one
        graph break): with the Triton ops those layers are nothing but the ops' own kernels, so Inductor
        fuses nothing there, while eager launches of the attention read through host-made TMA descriptors,
        which Inductor does not take from a triton_op (ops/hstu_attention/triton.py). The `compiled` engine
        sets this for its Triton plan on CUDA and captures the compiled graphs and these launches in one
        CUDA graph. (torch.compiler.disable is called here, not at import: it imports Dynamo.)"""
        self.eager_layers = torch.compiler.disable(_layers) if on else None

    def ranking_logits(self, target_states: Tensor, cand_ids: Tensor) -> Tensor:
        # The head runs in its own parameters' dtype (float32 when training a bf16 trunk); logits in float32.
        dt = self.ranking.mlp[0].weight.dtype
        return self.ranking(target_states.to(dt), self.item_embedding(cand_ids).to(dt)).float()

    # ---- padded: the engine contract --------------------------------------------------------
    def _padded_states(self, hist_ids, hist_ratings, hist_timestamps, hist_lengths, cand_ids, num_candidates,
                       query_time, contextual_ids) -> tuple[Tensor, Padded]:
        C = self.cfg.contextual_len
        B = hist_ids.shape[0]
        ctx = contextual_ids if C > 0 else hist_ids[:, :0]
        layout = Padded(hist_lengths, num_candidates, hist_ids.shape[1], cand_ids.shape[1], self.cfg)
        ids = torch.cat([ctx, hist_ids, cand_ids], dim=1)
        ratings = torch.cat([torch.zeros_like(ctx), hist_ratings, torch.zeros_like(cand_ids)], dim=1)
        qt = query_time[:, None]
        ts = torch.cat([qt.expand(B, C), hist_timestamps, qt.expand_as(cand_ids)], dim=1)
        x = self.encoder(ids, ratings, ts, query_time, layout, self.impl).to(self.cfg.torch_dtype)
        states, _, _ = self.trunk(x, layout)
        return states, layout

    def rank(self, hist_ids: Tensor, hist_ratings: Tensor, hist_timestamps: Tensor, hist_lengths: Tensor,
             cand_ids: Tensor, num_candidates: Tensor, query_time: Tensor, contextual_ids: Tensor | None = None) -> Tensor:
        """Padded inputs ([B, Nh] history, [B, Nc] candidates) -> task probabilities [B, Nc, T]."""
        states, layout = self._padded_states(hist_ids, hist_ratings, hist_timestamps, hist_lengths, cand_ids,
                                             num_candidates, query_time, contextual_ids)
        cand_states = states[:, layout.n_cand_start:]  # [B, Nc, D]
        return torch.sigmoid(self.ranking_logits(cand_states, cand_ids))

    def retrieve(self, hist_ids: Tensor, hist_ratings: Tensor, hist_timestamps: Tensor, hist_lengths: Tensor,
                 query_time: Tensor, contextual_ids: Tensor | None = None) -> Tensor:
        """Padded history -> L2-normalized next-item query embedding [B, D] (from the last history row)."""
        none = hist_ids[:, :0]
        states, layout = self._padded_states(hist_ids, hist_ratings, hist_timestamps, hist_lengths, none,
                                             torch.zeros_like(hist_lengths), query_time, contextual_ids)
        last = (self.cfg.contextual_len + hist_lengths - 1).clamp(min=0)  # [B]
        idx = last[:, None, None].expand(-1, 1, states.shape[-1])
        return l2_normalize(torch.gather(states, 1, idx)[:, 0].float())

    # ---- cached candidate scoring (M-FALCON) -------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: Tensor, ratings: Tensor, timestamps: Tensor, offsets: Tensor, query_time: Tensor) -> KVCache:
        """Run [contextual][history] once (no targets) and keep every layer's K and V."""
        layout = Jagged(offsets, torch.zeros_like(query_time), self.cfg.contextual_len, num_rows=ids.shape[0])
        x = self.encoder(ids, ratings, timestamps, query_time, layout, self.impl).to(self.cfg.torch_dtype)
        _, keys, values = self.trunk(x, layout)
        return KVCache(keys, values, offsets, query_time)

    @torch.no_grad()
    def score_cached(self, cache: KVCache | PagedKVCache, cand_ids: Tensor, delta_offsets: Tensor) -> Tensor:
        """Candidates jagged by delta_offsets -> probabilities [Ld, T]; equals the target rows of a full
        forward over [contextual][history][candidates] at the cache's query time. A PagedKVCache is read
        in place (no copy of the cached rows)."""
        x = self.encoder.candidates(cand_ids, self.impl).to(self.cfg.torch_dtype)
        if isinstance(cache, PagedKVCache):
            for layer, k, v in zip(self.layers, cache.k_pages, cache.v_pages):
                x = layer.forward_cached(x, delta_offsets, k, v, cache.lengths, self.impl, cache.page_table)
        else:
            for layer, k, v in zip(self.layers, cache.keys, cache.values):
                x = layer.forward_cached(x, delta_offsets, k, v, cache.offsets, self.impl)
        return torch.sigmoid(self.ranking_logits(x, cand_ids))


def _layers(model: HstuModel, x: Tensor, offsets: Tensor, num_targets: Tensor, n: int) -> Tensor:
    """x through model.layers[:n] on jagged rows (rank_jagged's trunk)."""
    layout = JaggedSeqs(offsets, num_targets)
    for layer in model.layers[:n]:
        x, _, _ = layer(x, layout, impl=model.impl)
    return x
