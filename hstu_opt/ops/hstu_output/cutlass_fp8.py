"""hstu_output with an FP8 (e4m3) projection on CUTLASS (cutlass_kernels/hstu_output_fp8.cu; ops/_fp8.py
has the scheme): the quantizing gated-LayerNorm pass writes [uq | aq | gq] e4m3 with ONE fp32 scale per
row over the three blocks, one CUTLASS GEMM against the per-channel-quantized W_out dequantizes and adds
the residual in its epilogue.

Inference only (dropout > 0 runs the reference); calls the GPU check does not cover run the Triton op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hstu_opt.ops import _cutlass, _fp8
from hstu_opt.ops._registry import Impl
from hstu_opt.ops.hstu_output import TABLE
from hstu_opt.ops.hstu_output.cutlass import route


def launch(cq: Tensor, row_scale: Tensor, wq_t: Tensor, col_scale: Tensor, x: Tensor, out: Tensor, lib=None) -> Tensor:
    """out [M, D] = cq [M, K] @ wq_t[D, K]^T * row_scale[m] * col_scale[n] + x [M, D]."""
    (M, K), D = cq.shape, wq_t.shape[0]
    if M == 0:
        return out
    code = (lib or _cutlass.library()).hstu_output_fp8(
        cq.data_ptr(), cq.stride(0), wq_t.data_ptr(), wq_t.stride(0), row_scale.data_ptr(), col_scale.data_ptr(),
        x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), M, D, K, _cutlass.stream(out))
    _cutlass.check(code, "hstu_output_fp8")
    return out


@torch.library.custom_op("hstu_opt::hstu_output_cutlass_fp8", mutates_args=())
def hstu_output_cutlass_fp8(u: Tensor, a: Tensor, x: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor,
                            eps: float) -> Tensor:
    """weight: the model's bf16 [3*HV, D] W_out (its e4m3 form cached by _fp8.quantized_weight)."""
    wq_t, col_scale = _fp8.quantized_weight(weight)
    cq, row_scale = _fp8.ln_quant(a, norm_weight, norm_bias, eps, gate=u)
    return launch(cq, row_scale, wq_t, col_scale, x, x.new_empty(x.shape))


@hstu_output_cutlass_fp8.register_fake
def _(u, a, x, norm_weight, norm_bias, weight, eps):
    return x.new_empty(x.shape)


@TABLE.register(Impl.CUTLASS_FP8, "hstu_output")
def _hstu_output(u, a, x, norm_weight, norm_bias, output_weight, eps, dropout):
    return route(u, a, x, norm_weight, norm_bias, output_weight, eps, dropout, "hstu_output (fp8)",
                 lambda: _fp8.output_uncovered(u, output_weight),
                 lambda u2, a2, x2: hstu_output_cutlass_fp8(u2, a2, x2, norm_weight, norm_bias, output_weight, eps))
