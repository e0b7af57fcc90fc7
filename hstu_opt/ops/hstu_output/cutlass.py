"""hstu_output on a CUTLASS sm_90a GEMM (cutlass_kernels/hstu_output_bf16.cu): the Triton gated
LayerNorm pass writes g = u * LN(a), then one CUTLASS GEMM reads u, a and g through three TMA
descriptors (the concat [u, a, g] is never materialized) and adds the residual in its epilogue.

A torch.library custom op with a fake implementation. Inference only (dropout > 0 runs the
reference); calls the GPU check does not cover (_cutlass.output_uncovered) run the Triton op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hstu_opt.ops import _cutlass
from hstu_opt.ops._registry import Impl
from hstu_opt.ops._triton import launch_gemm, launch_layer_norm, unit_stride_rows
from hstu_opt.ops.hstu_output import TABLE


def launch(u: Tensor, a: Tensor, gated: Tensor, x: Tensor, weight: Tensor, out: Tensor, lib=None,
           symbol: str = "hstu_output_bf16") -> Tensor:
    """out [M, D] = [u | a | gated] @ weight [3*HV, D] + x; u, a, gated [M, HV] (row strides free), all bf16.
    lib: a library from _cutlass.load (default: $HSTU_CUTLASS_LIB's); symbol: the instance (another one
    than the shipped kernel: cutlass_kernels/sweep.py's)."""
    (M, hv), D = u.shape, weight.shape[1]
    if M == 0:
        return out
    code = getattr(lib or _cutlass.library(), symbol)(
        u.data_ptr(), u.stride(0), a.data_ptr(), a.stride(0), gated.data_ptr(), gated.stride(0),
        weight.data_ptr(), weight.stride(0), x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0),
        M, D, hv, _cutlass.stream(out))
    if code == _cutlass.CANNOT_IMPLEMENT:  # strides or alignment (the shape was checked before)
        _cutlass.warn_fallback("hstu_output", f"strides {u.stride()}, {a.stride()}")
        return launch_gemm([u, a, gated], weight, out, lambda kernel: kernel, residual=x)
    _cutlass.check(code, "hstu_output")
    return out


@torch.library.custom_op("hstu_opt::hstu_output_cutlass", mutates_args=())
def hstu_output_cutlass(u: Tensor, a: Tensor, x: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor,
                        eps: float) -> Tensor:
    gated = launch_layer_norm(a, norm_weight, norm_bias, eps, lambda kernel: kernel, gate=u)  # u * LN(a)
    return launch(u, a, gated, x, weight, x.new_empty(x.shape))


@hstu_output_cutlass.register_fake
def _(u, a, x, norm_weight, norm_bias, weight, eps):
    return x.new_empty(x.shape)


def route(u, a, x, norm_weight, norm_bias, output_weight, eps, dropout, label: str, uncovered, run):
    """Both CUTLASS hstu_output entries: training (dropout) runs the fallback op silently, an uncovered call
    (uncovered() says why) with a warning; a covered one runs run(u, a, x) on unit-stride rows."""
    args = (u, a, x, norm_weight, norm_bias, output_weight, eps, dropout)
    if dropout > 0:
        return TABLE.get(_cutlass.fallback(u), "hstu_output")(*args)
    if reason := uncovered():
        return _cutlass.run_fallback(TABLE, "hstu_output", label, reason, *args)
    u2, a2, x2 = map(unit_stride_rows, (u, a, x))
    return run(u2, a2, x2.contiguous()).reshape(x.shape)


@TABLE.register(Impl.CUTLASS, "hstu_output")
def _hstu_output(u, a, x, norm_weight, norm_bias, output_weight, eps, dropout):
    return route(u, a, x, norm_weight, norm_bias, output_weight, eps, dropout, "hstu_output",
                 lambda: _cutlass.output_uncovered(u, output_weight),
                 lambda u2, a2, x2: hstu_output_cutlass(u2, a2, x2, norm_weight, norm_bias,
                                                        output_weight.to(u.dtype).contiguous(), eps))
