"""Fused hstu_output in Triton: x + [u, a, u * LN(a)] @ W_out as one GEMM over three A operands
(the concat is never materialized: the K loop walks W_out's three row blocks) with the residual added
in its epilogue; u * LN(a) comes from a memory-bound gated LayerNorm pass (ops/_triton.py says why).

Inference only: with dropout > 0 (training) the reference runs.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from hstu_opt.ops._registry import Impl
from hstu_opt.ops._triton import cublas_rows, launch_gemm, launch_layer_norm, unit_stride_rows
from hstu_opt.ops.hstu_output import TABLE
from hstu_opt.ops.hstu_output import reference


def launch(u: Tensor, a: Tensor, x: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor, out: Tensor,
           eps: float, launcher=lambda kernel: kernel, config: dict | None = None) -> Tensor:
    """u, a: [M, HV] (row strides free, unit column stride); x, out: [M, D]; weight: [3*HV, D]."""
    gated = launch_layer_norm(a, norm_weight, norm_bias, eps, launcher, gate=u)  # u * LN(a)
    return launch_gemm([u, a, gated], weight, out, launcher, residual=x, config=config)


@triton_op("hstu_opt::hstu_output_triton", mutates_args=())
def hstu_output_triton(u: Tensor, a: Tensor, x: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor,
                       eps: float) -> Tensor:
    out = x.new_empty(x.shape)
    return launch(u, a, x, norm_weight, norm_bias, weight, out, eps, wrap_triton)


@hstu_output_triton.register_fake
def _(u, a, x, norm_weight, norm_bias, weight, eps):
    return x.new_empty(x.shape)


@TABLE.register(Impl.TRITON, "hstu_output")
def _hstu_output(u, a, x, norm_weight, norm_bias, output_weight, eps, dropout):
    if dropout > 0:
        return reference.hstu_output(u, a, x, norm_weight, norm_bias, output_weight, eps, dropout)
    u2, a2, x2 = map(unit_stride_rows, (u, a, x))
    if cublas_rows(u2):  # a few rows: the gated LayerNorm kernel, then x + [u | a | u*LN(a)] @ W_out in cuBLAS
        gated = launch_layer_norm(a2, norm_weight, norm_bias, eps, lambda k: k, gate=u2)
        out = torch.addmm(x2, torch.cat([u2, a2, gated], dim=1), output_weight.to(u.dtype))
        return out.reshape(x.shape)
    out = hstu_output_triton(u2, a2, x2, norm_weight, norm_bias,
                             output_weight.to(u.dtype).contiguous(), eps)
    return out.reshape(x.shape)
