"""Fused uvqk in Triton: LayerNorm, then one GEMM with bias and SiLU(u) in its epilogue, writing
[u | v | q | k] row-major (ops/_triton.py says why the norm is its own memory-bound pass). u, v, q,
k are returned as strided views of that buffer, which is the layout the Triton attention reads (row
stride = the projection width, unit stride inside a head): no split copies.

A torch.library.triton_op with a fake implementation: torch.export sees one node and AOTInductor /
Inductor compile the two kernels (LayerNorm, GEMM) into their output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op, wrap_triton

from hstu_opt.ops._registry import Impl
from hstu_opt.ops._triton import cublas_rows, launch_gemm, launch_layer_norm, unit_stride_rows
from hstu_opt.ops.uvqk import TABLE, kv_columns, split_kv, split_uvqk


def launch(x2d: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor, bias: Tensor, out: Tensor,
           silu_cols: int, eps: float, launcher=lambda kernel: kernel, config: dict | None = None,
           rows: Tensor | None = None) -> Tensor:
    """out [M, N] = [SiLU on the first silu_cols columns](LN(x2d) @ weight + bias); rows given: of
    x2d.index_select(0, rows), gathered by the norm's loads."""
    normed = launch_layer_norm(x2d, norm_weight, norm_bias, eps, launcher, rows=rows)
    return launch_gemm([normed], weight, out, launcher, bias=bias, silu_cols=silu_cols, config=config)


def _out_rows(x: Tensor, rows: Tensor | None) -> int:
    return x.shape[0] if rows is None else rows.shape[0]


@triton_op("hstu_opt::uvqk_triton", mutates_args=())
def uvqk_triton(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor, bias: Tensor, silu_cols: int,
                eps: float, rows: Tensor | None = None) -> Tensor:
    out = x.new_empty(_out_rows(x, rows), weight.shape[1])
    return launch(x, norm_weight, norm_bias, weight, bias, out, silu_cols, eps, wrap_triton, rows=rows)


@uvqk_triton.register_fake
def _(x, norm_weight, norm_bias, weight, bias, silu_cols, eps, rows=None):
    return x.new_empty(_out_rows(x, rows), weight.shape[1])


@TABLE.register(Impl.TRITON, "uvqk")
def _uvqk(x, norm_weight, norm_bias, uvqk_weight, uvqk_bias, num_heads, attention_dim, linear_dim, eps):
    lead = x.shape[:-1]
    x2d = unit_stride_rows(x)
    if cublas_rows(x2d):  # a few rows: the same LayerNorm kernel, then cuBLAS with the bias, SiLU on u in place
        proj = torch.addmm(uvqk_bias.to(x.dtype), launch_layer_norm(x2d, norm_weight, norm_bias, eps, lambda k: k),
                           uvqk_weight.to(x.dtype))
        F.silu(proj[:, :num_heads * linear_dim], inplace=True)
        return split_uvqk(proj, lead, num_heads, attention_dim, linear_dim)
    proj = uvqk_triton(x2d, norm_weight, norm_bias, uvqk_weight.to(x.dtype).contiguous(), uvqk_bias,
                       num_heads * linear_dim, eps)
    return split_uvqk(proj, lead, num_heads, attention_dim, linear_dim)


@TABLE.register(Impl.TRITON, "uvqk_kv")
def _uvqk_kv(x, norm_weight, norm_bias, uvqk_weight, uvqk_bias, num_heads, attention_dim, linear_dim, eps, rows):
    lead = x.shape[:-1] if rows is None else rows.shape
    x2d = unit_stride_rows(x)
    w, b = kv_columns(uvqk_weight, uvqk_bias, num_heads, attention_dim, linear_dim)
    proj = uvqk_triton(x2d, norm_weight, norm_bias, w.to(x.dtype).contiguous(), b, 0, eps,
                       None if rows is None else rows.to(torch.int64))
    return split_kv(proj, lead, num_heads, attention_dim, linear_dim)
