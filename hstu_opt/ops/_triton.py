"""Triton pieces shared by the fused projection kernels (uvqk, hstu_output): per-row LayerNorm
statistics, and GEMM tiling with grouped program order.

LayerNorm is folded into the GEMMs that consume it: a small kernel writes each row's mean and 1/std
(float32, 8 bytes a row), and the GEMM normalizes its A tiles as it loads them. The statistics are
computed once per row, not once per output-column block.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def row_stats_kernel(X, MEAN, RSTD, M, K, stride_xm, eps, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Mean and 1/sqrt(var + eps) of rows [pid*ROWS, (pid+1)*ROWS) of X [M, K], two-pass in float32
    (the same numerics as F.layer_norm, no E[x^2] - E[x]^2 cancellation)."""
    offs_m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_k = tl.arange(0, BLOCK_K)
    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / K
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / K + eps)
    tl.store(MEAN + offs_m, mean, mask=offs_m < M)
    tl.store(RSTD + offs_m, rstd, mask=offs_m < M)


def launch_row_stats(x2d: torch.Tensor, eps: float, launcher) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x2d.shape
    mean = x2d.new_empty(M, dtype=torch.float32)
    rstd = x2d.new_empty(M, dtype=torch.float32)
    block_k = triton.next_power_of_2(K)
    rows = max(1, min(64, 4096 // block_k))
    launcher(row_stats_kernel)[(triton.cdiv(M, rows),)](x2d, mean, rstd, M, K, x2d.stride(0), eps, ROWS=rows,
                                                        BLOCK_K=block_k, num_warps=4)
    return mean, rstd


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(m block, n block) of this program, GROUP_M row blocks at a time so neighbouring programs share
    A rows and B columns in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def mma(a, b, IEEE: tl.constexpr):
    if IEEE:  # exact fp32 (the fp32 path is for checking, not speed); otherwise tensor cores
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


def gemm_config(dtype: torch.dtype, config: dict | None = None) -> dict:
    """Tiles for the fused projections: 128x128x64, 8 warps for 16-bit (a standard Hopper GEMM tile);
    smaller for fp32, the exact checking path. `config` overrides (the GPU benchmark sweeps it)."""
    if dtype == torch.float32:
        base = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2}
    else:
        base = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    return base | (config or {}) | {"IEEE": dtype == torch.float32}


def gemm_grid(M: int, N: int, cfg: dict) -> tuple[int]:
    return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
