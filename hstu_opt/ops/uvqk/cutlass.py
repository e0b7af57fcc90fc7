"""uvqk on a CUTLASS sm_90a GEMM (cutlass_kernels/uvqk_bf16.cu): the Triton LayerNorm pass writes the
normalized rows in bf16, then one CUTLASS GEMM with bias and SiLU(u columns) in its epilogue writes
[u | v | q | k] row-major; u, v, q, k are strided views of it, as with the Triton op.

A torch.library custom op with a fake implementation, so torch.compile / export see one node. Calls
the GPU check does not cover (_cutlass.uvqk_uncovered) run the Triton op, with a warning.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from hstu_opt.ops import _cutlass
from hstu_opt.ops._registry import Impl
from hstu_opt.ops._triton import launch_gemm, launch_layer_norm
from hstu_opt.ops.uvqk import TABLE, kv_columns, split_kv, split_uvqk


@functools.cache
def _gate(n: int, silu_cols: int, device: torch.device) -> Tensor:
    """The epilogue's per-column SiLU flag: 1 on the first silu_cols columns (u), 0 elsewhere."""
    gate = torch.zeros(n, dtype=torch.bfloat16, device=device)
    gate[:silu_cols] = 1
    return gate


def _out_rows(x: Tensor, rows: Tensor | None) -> int:
    return x.shape[0] if rows is None else rows.shape[0]


def launch(normed: Tensor, weight: Tensor, bias: Tensor, out: Tensor, silu_cols: int, lib=None,
           config: str | None = None) -> Tensor:
    """out [M, N] = [SiLU on the first silu_cols columns](normed [M, K] @ weight [K, N] + bias), all bf16.
    lib: a library from _cutlass.load (default: $HSTU_CUTLASS_LIB's); config: one of _cutlass.UVQK_CONFIGS
    (default _cutlass.UVQK_CONFIG)."""
    (M, K), N = normed.shape, weight.shape[1]
    if M == 0:
        return out
    bias = bias.to(torch.bfloat16).contiguous()
    kernel = getattr(lib or _cutlass.library(), f"hstu_uvqk_bf16_{config or _cutlass.UVQK_CONFIG}")
    code = kernel(
        normed.data_ptr(), normed.stride(0), weight.data_ptr(), weight.stride(0), bias.data_ptr(),
        _gate(N, silu_cols, out.device).data_ptr(), out.data_ptr(), out.stride(0), M, N, K, _cutlass.stream(out))
    if code == _cutlass.CANNOT_IMPLEMENT:  # strides or alignment (the shape was checked before)
        _cutlass.warn_fallback("uvqk", f"strides {normed.stride()}, {weight.stride()}")
        return launch_gemm([normed], weight, out, lambda kernel: kernel, bias=bias, silu_cols=silu_cols)
    _cutlass.check(code, "uvqk")
    return out


@torch.library.custom_op("hstu_opt::uvqk_cutlass", mutates_args=())
def uvqk_cutlass(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor, bias: Tensor, silu_cols: int,
                 eps: float, rows: Tensor | None = None) -> Tensor:
    normed = launch_layer_norm(x, norm_weight, norm_bias, eps, lambda kernel: kernel, rows=rows)  # [M, K] bf16
    out = x.new_empty(_out_rows(x, rows), weight.shape[1])
    return launch(normed, weight, bias, out, silu_cols)


@uvqk_cutlass.register_fake
def _(x, norm_weight, norm_bias, weight, bias, silu_cols, eps, rows=None):
    return x.new_empty(_out_rows(x, rows), weight.shape[1])


def _project(x2d: Tensor, norm_weight, norm_bias, weight: Tensor, bias, silu_cols: int, eps: float,
             rows: Tensor | None) -> Tensor:
    return uvqk_cutlass(x2d, norm_weight, norm_bias, weight.to(x2d.dtype).contiguous(), bias, silu_cols, eps, rows)


@TABLE.register(Impl.CUTLASS, "uvqk")
def _uvqk(x, norm_weight, norm_bias, uvqk_weight, uvqk_bias, num_heads, attention_dim, linear_dim, eps):
    hv = num_heads * linear_dim
    reason = _cutlass.uvqk_uncovered(x, uvqk_weight, hv)
    if reason:
        return _cutlass.run_fallback(TABLE, "uvqk", "uvqk", reason, x, norm_weight, norm_bias, uvqk_weight, uvqk_bias,
                                     num_heads, attention_dim, linear_dim, eps)
    proj = _project(x.reshape(-1, x.shape[-1]).contiguous(), norm_weight, norm_bias, uvqk_weight, uvqk_bias, hv,
                    eps, None)
    return split_uvqk(proj, x.shape[:-1], num_heads, attention_dim, linear_dim)


@TABLE.register(Impl.CUTLASS, "uvqk_kv")
def _uvqk_kv(x, norm_weight, norm_bias, uvqk_weight, uvqk_bias, num_heads, attention_dim, linear_dim, eps, rows):
    w, b = kv_columns(uvqk_weight, uvqk_bias, num_heads, attention_dim, linear_dim)
    reason = _cutlass.uvqk_uncovered(x, w, 0)
    if reason:
        return _cutlass.run_fallback(TABLE, "uvqk_kv", "uvqk_kv", reason, x, norm_weight, norm_bias, uvqk_weight,
                                     uvqk_bias, num_heads, attention_dim, linear_dim, eps, rows)
    lead = x.shape[:-1] if rows is None else rows.shape
    proj = _project(x.reshape(-1, x.shape[-1]).contiguous(), norm_weight, norm_bias, w, b, 0, eps,
                    None if rows is None else rows.to(torch.int64))
    return split_kv(proj, lead, num_heads, attention_dim, linear_dim)
