"""HSTU ops. Each op lives in its own package with a reference implementation (the spec) and
optional fast ones that register themselves into the op's table.

    from hstu_opt import ops
    ops.hstu_attention(q, k, v, offsets, num_targets, ..., impl=Impl.REFERENCE)
"""

from hstu_opt.ops._registry import Impl, OpTable
from hstu_opt.ops.embedding_rows import embedding_rows
from hstu_opt.ops.hstu_attention import (
    cached_hstu_attention,
    cached_hstu_attention_paged,
    hstu_attention,
    hstu_attention_dense,
)
from hstu_opt.ops.hstu_output import hstu_output
from hstu_opt.ops.layer_norm import layer_norm
from hstu_opt.ops.uvqk import uvqk, uvqk_kv

__all__ = [
    "Impl",
    "OpTable",
    "cached_hstu_attention",
    "cached_hstu_attention_paged",
    "embedding_rows",
    "hstu_attention",
    "hstu_attention_dense",
    "hstu_output",
    "layer_norm",
    "uvqk",
    "uvqk_kv",
]
