"""The STU layer of HSTU.md, written only in terms of hstu_opt.ops.

Parameter names and shapes follow Meta's generative-recommenders STULayer (without the leading
underscore) so its weights import one to one (see checkpoint.import_stu).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hstu_opt import ops
from hstu_opt.model.config import HstuConfig
from hstu_opt.ops import Impl


class Attention(nn.Module):
    """No parameters: a named scope, so exported graphs mark each layer's attention subgraph
    (`layers.<i>.attention`), which the fuse stage replaces with one HstuAttention node."""

    def __init__(self, cfg: HstuConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, q: Tensor, k: Tensor, v: Tensor, layout, impl: Impl) -> Tensor:
        return layout.attention(q, k, v, self.cfg, impl)


class STULayer(nn.Module):
    def __init__(self, cfg: HstuConfig):
        super().__init__()
        self.attention = Attention(cfg)
        D, H, dqk, dv = cfg.embedding_dim, cfg.num_heads, cfg.attention_dim, cfg.linear_dim
        self.cfg = cfg
        self.uvqk_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(D, H * (2 * dv + 2 * dqk))))
        self.uvqk_beta = nn.Parameter(torch.zeros(H * (2 * dv + 2 * dqk)))
        self.input_norm_weight = nn.Parameter(torch.ones(D))
        self.input_norm_bias = nn.Parameter(torch.zeros(D))
        self.output_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(3 * H * dv, D)))
        self.output_norm_weight = nn.Parameter(torch.ones(H * dv))
        self.output_norm_bias = nn.Parameter(torch.zeros(H * dv))

    def project(self, x: Tensor, impl: Impl) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cfg = self.cfg
        return ops.uvqk(
            x, self.input_norm_weight, self.input_norm_bias, self.uvqk_weight, self.uvqk_beta,
            num_heads=cfg.num_heads, attention_dim=cfg.attention_dim, linear_dim=cfg.linear_dim, impl=impl,
        )

    def project_kv(self, x: Tensor, impl: Impl, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """k and v only (what a KV cache keeps), half the projection's columns; rows given: of those rows
        of a [L, D] x only (ops.uvqk_kv)."""
        cfg = self.cfg
        return ops.uvqk_kv(
            x, self.input_norm_weight, self.input_norm_bias, self.uvqk_weight, self.uvqk_beta,
            num_heads=cfg.num_heads, attention_dim=cfg.attention_dim, linear_dim=cfg.linear_dim, rows=rows, impl=impl,
        )

    def finish(self, u: Tensor, a: Tensor, x: Tensor, dropout: float, impl: Impl) -> Tensor:
        a = a.reshape(*a.shape[:-2], -1)  # [..., H*dv]
        return ops.hstu_output(
            u, a, x, self.output_norm_weight, self.output_norm_bias, self.output_weight, dropout=dropout, impl=impl
        )

    def forward(self, x: Tensor, layout, dropout: float = 0.0, impl: Impl = Impl.REFERENCE) -> tuple[Tensor, Tensor, Tensor]:
        """x: [L, D] or [B, n, D] -> (x_next, k, v); k and v are what a KV cache keeps."""
        u, q, k, v = self.project(x, impl)
        a = self.attention(q, k, v, layout, impl)  # [..., H, dv]
        return self.finish(u, a, x, dropout, impl), k, v

    def forward_cached(
        self, x: Tensor, delta_offsets: Tensor, k_cache: Tensor, v_cache: Tensor, cache_offsets: Tensor, impl: Impl,
        page_table: Tensor | None = None,
    ) -> Tensor:
        """x: the new (candidate) rows [Ld, D]; attends to the cached K/V of its user plus itself.
        Contiguous: k_cache / v_cache [Lc, H, d] jagged by cache_offsets [B+1]. Paged (page_table [B, max_pages]):
        k_cache / v_cache are this layer's page pool [pages, page_rows, H, d], cache_offsets the lengths [B]."""
        cfg = self.cfg
        u, q, k, v = self.project(x, impl)
        attend = ops.cached_hstu_attention if page_table is None else ops.cached_hstu_attention_paged
        cache = (k_cache, v_cache, cache_offsets) if page_table is None else (k_cache, v_cache, page_table, cache_offsets)
        a = attend(
            q, k, v, delta_offsets, *cache, max_seq_len=cfg.max_seq_len, alpha=cfg.alpha,
            contextual_len=cfg.contextual_len, max_attn_len=cfg.max_attn_len, max_delta_len=cfg.max_targets,
            min_full_attn_seq_len=cfg.min_full_attn_seq_len, impl=impl,
        )
        return self.finish(u, a, x, 0.0, impl)
