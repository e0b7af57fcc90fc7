"""uvqk with FP8 (e4m3) projections on CUTLASS (cutlass_kernels/uvqk_fp8.hpp, instances uvqk_fp8_<config>.cu;
ops/_fp8.py has the scheme):
the quantizing LayerNorm pass writes e4m3 rows and their fp32 scales, one CUTLASS GEMM against the
per-channel-quantized weight dequantizes, adds the bias and applies SiLU to the u columns in its
epilogue, writing bf16 [u | v | q | k].

Calls the GPU check does not cover run the Triton (bf16) op instead, with a warning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hstu_opt.ops import _cutlass, _fp8
from hstu_opt.ops._registry import Impl
from hstu_opt.ops.uvqk import TABLE, split_kv, split_uvqk
from hstu_opt.ops.uvqk.cutlass import _gate, _out_rows


def launch(xq: Tensor, row_scale: Tensor, wq_t: Tensor, col_scale: Tensor, bias: Tensor, out: Tensor, silu_cols: int,
           lib=None, config: str | None = None) -> Tensor:
    """out [M, N] = [SiLU on silu_cols](xq [M, K] @ wq_t[N, K]^T * row_scale[m] * col_scale[n] + bias).
    config: one of _cutlass.UVQK_CONFIGS (default _cutlass.UVQK_FP8_CONFIG)."""
    (M, K), N = xq.shape, wq_t.shape[0]
    if M == 0:
        return out
    bias = bias.to(torch.bfloat16).contiguous()
    kernel = getattr(lib or _cutlass.library(), f"hstu_uvqk_fp8_{config or _cutlass.UVQK_FP8_CONFIG}")
    code = kernel(
        xq.data_ptr(), xq.stride(0), wq_t.data_ptr(), wq_t.stride(0), row_scale.data_ptr(), col_scale.data_ptr(),
        bias.data_ptr(), _gate(N, silu_cols, out.device).data_ptr(), out.data_ptr(), out.stride(0), M, N, K,
        _cutlass.stream(out))
    _cutlass.check(code, "uvqk_fp8")
    return out


@torch.library.custom_op("hstu_opt::uvqk_cutlass_fp8", mutates_args=())
def uvqk_cutlass_fp8(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor, bias: Tensor, silu_cols: int,
                     eps: float, num_heads: int, attention_dim: int, linear_dim: int, kv: bool,
                     rows: Tensor | None = None) -> Tensor:
    """weight: the model's bf16 [D, N] uvqk weight (kv: only its [v | k] columns are projected; bias is
    then already those columns'). Its e4m3 form is computed once and cached (_fp8.quantized_weight)."""
    cols = _fp8.kv_columns(num_heads, attention_dim, linear_dim) if kv else None
    wq_t, col_scale = _fp8.quantized_weight(weight, cols)
    xq, row_scale = _fp8.ln_quant(x, norm_weight, norm_bias, eps, rows=rows)
    out = x.new_empty(_out_rows(x, rows), wq_t.shape[0], dtype=torch.bfloat16)
    return launch(xq, row_scale, wq_t, col_scale, bias, out, silu_cols)


@uvqk_cutlass_fp8.register_fake
def _(x, norm_weight, norm_bias, weight, bias, silu_cols, eps, num_heads, attention_dim, linear_dim, kv, rows=None):
    n = num_heads * (linear_dim + attention_dim) if kv else weight.shape[1]
    return x.new_empty(_out_rows(x, rows), n, dtype=torch.bfloat16)


@TABLE.register(Impl.CUTLASS_FP8, "uvqk")
def _uvqk(x, norm_weight, norm_bias, uvqk_weight, uvqk_bias, num_heads, attention_dim, linear_dim, eps):
    hv = num_heads * linear_dim
    reason = _fp8.uvqk_uncovered(x, uvqk_weight, hv)
    if reason:
        return _cutlass.run_fallback(TABLE, "uvqk", "uvqk (fp8)", reason, x, norm_weight, norm_bias, uvqk_weight,
                                     uvqk_bias, num_heads, attention_dim, linear_dim, eps)
    lead = x.shape[:-1]
    proj = uvqk_cutlass_fp8(x.reshape(-1, x.shape[-1]).contiguous(), norm_weight, norm_bias, uvqk_weight, uvqk_bias,
                            hv, eps, num_heads, attention_dim, linear_dim, False, None)
    return split_uvqk(proj, lead, num_heads, attention_dim, linear_dim)


@TABLE.register(Impl.CUTLASS_FP8, "uvqk_kv")
def _uvqk_kv(x, norm_weight, norm_bias, uvqk_weight, uvqk_bias, num_heads, attention_dim, linear_dim, eps, rows):
    hv, hqk = num_heads * linear_dim, num_heads * attention_dim
    reason = _fp8.uvqk_uncovered(x, uvqk_weight[:, :hv + hqk], 0)
    if reason:
        return _cutlass.run_fallback(TABLE, "uvqk_kv", "uvqk_kv (fp8)", reason, x, norm_weight, norm_bias,
                                     uvqk_weight, uvqk_bias, num_heads, attention_dim, linear_dim, eps, rows)
    lead = x.shape[:-1] if rows is None else rows.shape
    bias = torch.cat([uvqk_bias[hv:2 * hv], uvqk_bias[2 * hv + hqk:]])
    proj = uvqk_cutlass_fp8(x.reshape(-1, x.shape[-1]).contiguous(), norm_weight, norm_bias, uvqk_weight, bias, 0,
                            eps, num_heads, attention_dim, linear_dim, True,
                            None if rows is None else rows.to(torch.int64))
    return split_kv(proj, lead, num_heads, attention_dim, linear_dim)
