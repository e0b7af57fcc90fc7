"""Fused hstu_output in Triton: x + [u, a, u * LN(a)] @ W_out in one GEMM. The concat is never
materialized: the K loop walks W_out's three row blocks and builds each A tile from u and a as it
goes (LN(a) from per-row statistics, see ops/_triton.py); the residual is added in the epilogue.

Inference only: with dropout > 0 (training) the reference runs.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from hstu_opt.ops._registry import Impl
from hstu_opt.ops._triton import gemm_config, gemm_grid, launch_row_stats, mma, tile_ids
from hstu_opt.ops.hstu_output import TABLE
from hstu_opt.ops.hstu_output import reference


@triton.jit
def _output_fwd(U, A, MEAN, RSTD, NW, NB, W, X, OUT, M, HV, N,
                stride_um, stride_am, stride_wk, stride_xm, stride_om,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                IEEE: tl.constexpr):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    mean = tl.load(MEAN + offs_m, mask=m_ok, other=0.0)
    rstd = tl.load(RSTD + offs_m, mask=m_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, HV, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < HV
        mk = m_ok[:, None] & k_ok[None, :]
        kn = k_ok[:, None] & n_ok[None, :]
        u = tl.load(U + offs_m[:, None] * stride_um + offs_k[None, :], mask=mk, other=0.0)
        a = tl.load(A + offs_m[:, None] * stride_am + offs_k[None, :], mask=mk, other=0.0)
        nw = tl.load(NW + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        nb = tl.load(NB + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        ln = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * nw[None, :] + nb[None, :]
        w_u = tl.load(W + offs_k[:, None] * stride_wk + offs_n[None, :], mask=kn, other=0.0)
        w_a = tl.load(W + (HV + offs_k)[:, None] * stride_wk + offs_n[None, :], mask=kn, other=0.0)
        w_g = tl.load(W + (2 * HV + offs_k)[:, None] * stride_wk + offs_n[None, :], mask=kn, other=0.0)
        acc += mma(u, w_u, IEEE)
        acc += mma(a, w_a, IEEE)
        acc += mma((u.to(tl.float32) * ln).to(u.dtype), w_g, IEEE)
    mn = m_ok[:, None] & n_ok[None, :]
    y = acc + tl.load(X + offs_m[:, None] * stride_xm + offs_n[None, :], mask=mn, other=0.0).to(tl.float32)
    tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :], y.to(OUT.dtype.element_ty), mask=mn)


def launch(u: Tensor, a: Tensor, x: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor, out: Tensor,
           eps: float, launcher=lambda kernel: kernel, config: dict | None = None) -> Tensor:
    """u, a: [M, HV] (row strides free, unit column stride); x, out: [M, D]; weight: [3*HV, D]."""
    M, HV = u.shape
    N = weight.shape[1]
    mean, rstd = launch_row_stats(a, eps, launcher)
    cfg = gemm_config(u.dtype, config)
    launcher(_output_fwd)[gemm_grid(M, N, cfg)](
        u, a, mean, rstd, norm_weight, norm_bias, weight, x, out, M, HV, N,
        u.stride(0), a.stride(0), weight.stride(0), x.stride(0), out.stride(0), **cfg,
    )
    return out


@triton_op("hstu_opt::hstu_output_triton", mutates_args=())
def hstu_output_triton(u: Tensor, a: Tensor, x: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor,
                       eps: float) -> Tensor:
    out = x.new_empty(x.shape)
    return launch(u, a, x, norm_weight, norm_bias, weight, out, eps, wrap_triton)


@hstu_output_triton.register_fake
def _(u, a, x, norm_weight, norm_bias, weight, eps):
    return x.new_empty(x.shape)


def _rows(t: Tensor) -> Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


@TABLE.register(Impl.TRITON, "hstu_output")
def _hstu_output(u, a, x, norm_weight, norm_bias, output_weight, eps, dropout):
    if dropout > 0:
        return reference.hstu_output(u, a, x, norm_weight, norm_bias, output_weight, eps, dropout)
    out = hstu_output_triton(_rows(u), _rows(a), _rows(x), norm_weight, norm_bias,
                             output_weight.to(u.dtype).contiguous(), eps)
    return out.reshape(x.shape)
