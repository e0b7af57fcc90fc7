"""Fused uvqk in Triton: LayerNorm (folded into the A tiles) + projection + bias + SiLU(u), one GEMM
writing [u | v | q | k] row-major. u, v, q, k are returned as strided views of that buffer, which is
the layout the Triton attention reads (row stride = the projection width, unit stride inside a head):
no split copies.

A torch.library.triton_op with a fake implementation: torch.export sees one node and AOTInductor /
Inductor compile the two kernels (row statistics, GEMM) into their output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from hstu_opt.ops._registry import Impl
from hstu_opt.ops._triton import gemm_config, gemm_grid, launch_row_stats, mma, tile_ids
from hstu_opt.ops.uvqk import TABLE


@triton.jit
def _uvqk_fwd(X, MEAN, RSTD, NW, NB, W, BIAS, OUT, M, K, N, SILU_N,
              stride_xm, stride_wk, stride_om,
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
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        nw = tl.load(NW + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        nb = tl.load(NB + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        # LayerNorm in float32, rounded to the GEMM's input dtype (as the reference rounds its output)
        a = ((x.to(tl.float32) - mean[:, None]) * rstd[:, None] * nw[None, :] + nb[None, :]).to(W.dtype.element_ty)
        w = tl.load(W + offs_k[:, None] * stride_wk + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += mma(a, w, IEEE)
    y = acc + tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = tl.where((offs_n < SILU_N)[None, :], y * tl.sigmoid(y), y)  # SiLU on the u columns only
    tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :], y.to(OUT.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def launch(x2d: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor, bias: Tensor, out: Tensor,
           silu_cols: int, eps: float, launcher=lambda kernel: kernel, config: dict | None = None) -> Tensor:
    """out [M, N] = [SiLU on the first silu_cols columns](LN(x2d) @ weight + bias)."""
    M, K = x2d.shape
    N = weight.shape[1]
    mean, rstd = launch_row_stats(x2d, eps, launcher)
    cfg = gemm_config(x2d.dtype, config)
    launcher(_uvqk_fwd)[gemm_grid(M, N, cfg)](
        x2d, mean, rstd, norm_weight, norm_bias, weight, bias, out, M, K, N, silu_cols,
        x2d.stride(0), weight.stride(0), out.stride(0), **cfg,
    )
    return out


@triton_op("hstu_opt::uvqk_triton", mutates_args=())
def uvqk_triton(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor, bias: Tensor, silu_cols: int,
                eps: float) -> Tensor:
    out = x.new_empty(x.shape[0], weight.shape[1])
    return launch(x, norm_weight, norm_bias, weight, bias, out, silu_cols, eps, wrap_triton)


@uvqk_triton.register_fake
def _(x, norm_weight, norm_bias, weight, bias, silu_cols, eps):
    return x.new_empty(x.shape[0], weight.shape[1])


@TABLE.register(Impl.TRITON, "uvqk")
def _uvqk(x, norm_weight, norm_bias, uvqk_weight, uvqk_bias, num_heads, attention_dim, linear_dim, eps):
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    hv, hqk = num_heads * linear_dim, num_heads * attention_dim
    proj = uvqk_triton(x2d, norm_weight, norm_bias, uvqk_weight.to(x.dtype).contiguous(), uvqk_bias, hv, eps)
    u, v, q, k = torch.split(proj, [hv, hv, hqk, hqk], dim=-1)
    return (u.reshape(*lead, hv), q.reshape(*lead, num_heads, attention_dim),
            k.reshape(*lead, num_heads, attention_dim), v.reshape(*lead, num_heads, linear_dim))
