"""Triton pieces shared by the fused projections (uvqk, hstu_output): a row-wise LayerNorm (optionally
gated: u * LN(a)) and a GEMM over up to three A operands (the K dimension concatenated, never
materialized) with a bias / SiLU / residual epilogue.

Why LayerNorm is its own small kernel and not folded into the GEMM's A tiles: normalizing A in
registers keeps the GEMM off the shared-memory wgmma path. Measured on the H200 at dlrm-v3 size
(69,632 x 512 -> 2048, bf16): folded 200-280 TFLOP/s, against 644 for cuBLAS on the bare matmul
(benchmarks/results/gpu_hstu_2026-11-29_run6.json). A memory-bound normalize pass costs a few percent.
Folding it algebraically instead (a pass for the rows' statistics only, the GEMM over the raw rows with
diag(gamma) W, rstd * (acc - mean * colsum) in its epilogue: no normalized copy written or read) passed
the GPU checks but was slower: uvqk 0.299 vs 0.293 ms at dlrm-v3 batch 16, 0.0366 vs 0.0363 at batch 1
(benchmarks/results/variants_ab_h200_2026-11-29_run43_fold.json; code on branch wip/folded-norm).

Two GEMM kernels, one epilogue: _gemm_kernel (one program per tile, masked pointer loads) and
_gemm_tma_kernel (persistent, TMA loads and stores through descriptors it makes itself, the only TMA
form Inductor takes from a triton_op). GEMM_FLAGS says which runs where and what each measured.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any row (and head) strides but need unit stride along the last dim: strided
    views such as the fused uvqk's q/k/v pass as they are, anything else is copied."""
    return t if t.stride(-1) == 1 else t.contiguous()


def unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """t as the [rows, last dim] matrix the GEMM kernels read (Triton and CUTLASS alike), unit_stride."""
    return unit_stride(t.reshape(-1, t.shape[-1]))


@triton.jit
def tanh_approx(x):
    """tanh.approx.f32: one MUFU op, max relative error ~2^-11 (below bf16/fp16 rounding). GPU only."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def silu(x, FAST: tl.constexpr):
    """SiLU of float32 x. FAST (16-bit outputs on a GPU): x/2 + x/2 * tanh(x/2), one tanh.approx instead of
    exp + a full division; the special-function unit, not the tensor cores, bounds the epilogues."""
    if FAST:
        h = x * 0.5
        return h + h * tanh_approx(h)
    return x * tl.sigmoid(x)


def fast_math(dtype: torch.dtype) -> bool:
    """Whether kernels take the approximate SiLU: 16-bit outputs on a GPU (not fp32, the checking path,
    and not Triton's interpreter, which cannot run inline PTX)."""
    return dtype != torch.float32 and not interpreting()


@triton.jit
def mma(a, b, IEEE: tl.constexpr):
    if IEEE:  # exact fp32 (the fp32 path is for checking, not speed); otherwise tensor cores
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _layer_norm_kernel(X, NW, NB, U, IDX, OUT, M, K, stride_xm, stride_um, stride_om, eps,
                       GATE: tl.constexpr, GATHER: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT = LN(X) (GATE: U * LN(X)) for rows [pid*ROWS, (pid+1)*ROWS): two-pass float32 statistics,
    rounded to the output dtype where the reference rounds (LN's output, then the product).
    GATHER: output row i normalizes X's row IDX[i] (an index_select fused into the norm's load)."""
    offs_m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    mask = (offs_m < M)[:, None] & k_ok[None, :]
    src = tl.load(IDX + offs_m, mask=offs_m < M, other=0).to(tl.int64) if GATHER else offs_m
    x = tl.load(X + src[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / K
    xc = tl.where(mask, x - mean[:, None], 0.0)
    # Inductor passes a Python float as fp64 (eager Triton: fp32); uncast, eps made the normalization fp64
    # under torch.compile: the compiled serving graph's 11 norms at dlrm-v3 batch 16 took 0.478 ms (run 22)
    # against 0.375 eagerly, and 0.380 with this cast (run 28)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / K + tl.cast(eps, tl.float32))
    nw = tl.load(NW + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    nb = tl.load(NB + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    y = (xc * rstd[:, None] * nw[None, :] + nb[None, :]).to(OUT.dtype.element_ty)
    if GATE:
        u = tl.load(U + offs_m[:, None] * stride_um + offs_k[None, :], mask=mask, other=0.0)
        y = (u.to(tl.float32) * y.to(tl.float32)).to(OUT.dtype.element_ty)
    tl.store(OUT + offs_m[:, None] * stride_om + offs_k[None, :], y, mask=mask)


def launch_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, launcher,
                      gate: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """LN(x) of a [M, K] x with unit column stride (gate given: gate * LN(x)), as a new [M, K] tensor;
    rows given (int64 [M'], no gate): LN(x.index_select(0, rows)) [M', K] without the gathered copy."""
    assert rows is None or gate is None, "a gathered norm has no gate (the kernel reads U by output row)"
    M, K = x.shape if rows is None else (rows.shape[0], x.shape[1])
    out = x.new_empty(M, K)
    block_k = triton.next_power_of_2(K)
    per_program = max(1, min(64, 4096 // block_k))
    u = gate if gate is not None else x
    launcher(_layer_norm_kernel)[(triton.cdiv(M, per_program),)](
        x, weight, bias, u, rows if rows is not None else x, out, M, K, x.stride(0), u.stride(0), out.stride(0), eps,
        GATE=gate is not None, GATHER=rows is not None, ROWS=per_program, BLOCK_K=block_k, num_warps=4)
    return out


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(m block, n block) of tile `pid`, GROUP_M row blocks at a time so neighbouring tiles share A rows
    and B columns in L2."""
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _accumulate(acc, A, stride_am, W, stride_wk, offs_m, offs_n, m_ok, n_ok, K,
                BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(A + offs_m[:, None] * stride_am + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + offs_k[:, None] * stride_wk + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += mma(a, w, IEEE)
    return acc


@triton.jit
def _bias_silu(acc, BIAS, off_n, offs_n, N, SILU_N, HAS_BIAS: tl.constexpr, FAST: tl.constexpr):
    """Both GEMMs' epilogue before the residual: + BIAS, then SiLU on columns < SILU_N, run only in tiles
    (starting at column off_n) that hold such columns (in uvqk a quarter of them, in hstu_output none)."""
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if off_n < SILU_N:
        acc = tl.where((offs_n < SILU_N)[None, :], silu(acc, FAST), acc)
    return acc


@triton.jit
def _gemm_kernel(A0, A1, A2, W, BIAS, RES, OUT, M, K, N, SILU_N,
                 stride_a0, stride_a1, stride_a2, stride_wk, stride_res, stride_om,
                 NUM_A: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 IEEE: tl.constexpr, FAST: tl.constexpr):
    """OUT = [A0 | A1 | A2] @ W (+ BIAS) (SiLU on columns < SILU_N) (+ RES); each A is [M, K], W [NUM_A*K, N]."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _accumulate(acc, A0, stride_a0, W, stride_wk, offs_m, offs_n, m_ok, n_ok, K, BLOCK_K, IEEE)
    if NUM_A > 1:
        acc = _accumulate(acc, A1, stride_a1, W + K * stride_wk, stride_wk, offs_m, offs_n, m_ok, n_ok, K, BLOCK_K, IEEE)
    if NUM_A > 2:
        acc = _accumulate(acc, A2, stride_a2, W + 2 * K * stride_wk, stride_wk, offs_m, offs_n, m_ok, n_ok, K,
                          BLOCK_K, IEEE)
    mn = m_ok[:, None] & n_ok[None, :]
    acc = _bias_silu(acc, BIAS, pid_n * BLOCK_N, offs_n, N, SILU_N, HAS_BIAS, FAST)
    if HAS_RES:
        acc += tl.load(RES + offs_m[:, None] * stride_res + offs_n[None, :], mask=mn, other=0.0).to(tl.float32)
    tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(OUT.dtype.element_ty), mask=mn)


@triton.jit
def _tma_epilogue(acc, out_d, res_d, BIAS, off_m, off_n, N, SILU_N, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                  EPI_N: tl.constexpr, FAST: tl.constexpr):
    """_bias_silu, residual, then one TMA store of [BLOCK_M, EPI_N] (rows past M are clipped by the
    descriptor, not written)."""
    acc = _bias_silu(acc, BIAS, off_n, off_n + tl.arange(0, EPI_N), N, SILU_N, HAS_BIAS, FAST)
    if HAS_RES:
        acc += res_d.load([off_m, off_n]).to(tl.float32)
    out_d.store([off_m, off_n], acc.to(out_d.dtype))


@triton.jit
def _gemm_tma_kernel(A0, A1, A2, W, BIAS, RES, OUT, M, K, N, SILU_N,
                     stride_a0, stride_a1, stride_a2, stride_wk, stride_res, stride_om,
                     NUM_A: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     IEEE: tl.constexpr, FAST: tl.constexpr, PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr,
                     EPI_N: tl.constexpr):
    """_gemm_kernel's product and epilogue, persistent (PROGRAMS programs walk the tiles) and read and
    written through TMA descriptors the kernel makes itself, once per program: Inductor takes those from
    a triton_op (host-made descriptors it does not, ops/hstu_attention/triton.py), and one program's
    descriptors serve all its tiles. Out-of-range rows and columns (M, K and N tails) are TMA's zero
    fill on loads and clipped on stores, so nothing here masks. FLATTEN: the tile and K loops as one
    software pipeline, so the next tile's loads are in flight during this tile's epilogue. EPI_N <
    BLOCK_N: the epilogue in column halves (half the store buffer in shared memory)."""
    a0 = tl.make_tensor_descriptor(A0, [M, K], [stride_a0, 1], [BLOCK_M, BLOCK_K])
    a1 = a0
    a2 = a0
    if NUM_A > 1:
        a1 = tl.make_tensor_descriptor(A1, [M, K], [stride_a1, 1], [BLOCK_M, BLOCK_K])
    if NUM_A > 2:
        a2 = tl.make_tensor_descriptor(A2, [M, K], [stride_a2, 1], [BLOCK_M, BLOCK_K])
    w = tl.make_tensor_descriptor(W, [NUM_A * K, N], [stride_wk, 1], [BLOCK_K, BLOCK_N])
    out_d = tl.make_tensor_descriptor(OUT, [M, N], [stride_om, 1], [BLOCK_M, EPI_N])
    res_d = out_d
    if HAS_RES:
        res_d = tl.make_tensor_descriptor(RES, [M, N], [stride_res, 1], [BLOCK_M, EPI_N])
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    tile_c = tl.program_id(0) - PROGRAMS  # the epilogue's own tile counter (Triton's persistent-matmul pattern)
    for tile in tl.range(tl.program_id(0), num_tiles, PROGRAMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_ids(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for ki in range(k_tiles):  # W's rows past an operand's K meet A's zero fill
            acc += mma(a0.load([off_m, ki * BLOCK_K]), w.load([ki * BLOCK_K, off_n]), IEEE)
        if NUM_A > 1:
            for ki in range(k_tiles):
                acc += mma(a1.load([off_m, ki * BLOCK_K]), w.load([K + ki * BLOCK_K, off_n]), IEEE)
        if NUM_A > 2:
            for ki in range(k_tiles):
                acc += mma(a2.load([off_m, ki * BLOCK_K]), w.load([2 * K + ki * BLOCK_K, off_n]), IEEE)
        tile_c += PROGRAMS
        pid_m, pid_n = _tile_ids(tile_c, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if EPI_N < BLOCK_N:
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, EPI_N)), (0, 2, 1)))
            _tma_epilogue(acc0, out_d, res_d, BIAS, off_m, off_n, N, SILU_N, HAS_BIAS, HAS_RES, EPI_N, FAST)
            _tma_epilogue(acc1, out_d, res_d, BIAS, off_m, off_n + EPI_N, N, SILU_N, HAS_BIAS, HAS_RES, EPI_N,
                          FAST)
        else:
            _tma_epilogue(acc, out_d, res_d, BIAS, off_m, off_n, N, SILU_N, HAS_BIAS, HAS_RES, EPI_N, FAST)


# The GEMM's switches (benchmarks/variants_ab.py flips them). TMA None: the persistent TMA kernel for the
# large 16-bit tiles (where tma_ready), the pointer kernel for the small ones and for fp32. Measured on
# the H200 (run 28, benchmarks/results/variants_ab_h200_2026-11-29_run28.json), dlrm-v3 batch 16 (69,632
# rows): uvqk 0.287 vs 0.359 ms, hstu_output 0.266 vs 0.280 ms; the compiled serving graph's 11 GEMMs
# 1.98 vs 2.34 ms. With batch 1's 4,352 rows (small tiles) it was slower: the graph's GEMMs 0.277 vs
# 0.246 ms; hstu_output alone 0.044 vs 0.037 ms (run 33, CUDA-graph replays; uvqk there has the large
# tiles: 0.0375 vs 0.0366, even). FLATTEN off: uvqk 0.314 ms; 128x128 tiles (4 or 8 warps): 0.315 /
# 0.327 ms; two programs per SM: 0.293 ms. SUBTILE (the epilogue in column halves) helps uvqk a little
# (0.281 vs 0.287, 0.288 vs 0.299, 0.285 vs 0.293 in runs 28, 31, 33; 0.289 vs 0.290 in run 37) and
# costs hstu_output about as much: None splits it for the projections with a bias and no residual (uvqk,
# uvqk_kv) only.
GEMM_FLAGS = {"TMA": None, "FLATTEN": True, "SUBTILE": None, "PROGRAMS": None}

# The large tiles, per GEMM: "projection" (uvqk, uvqk_kv: a bias, SiLU columns) and "output" (hstu_output:
# three operands and the residual). gemm_config's docstring has their measurements.
LARGE_TILES = {kind: {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
               for kind in ("projection", "output")}


# Projections of at most this many rows (a cache hit's candidate group: 256) may run as cuBLAS's matmul after
# the same LayerNorm kernel instead of the Triton GEMM (0: off). Measured alone, at 256 rows the Triton GEMM
# was 1.6-2.1x cuBLAS's bare matmul on the H100 (gpu_hit_profile_h100_2026-12-05_run86/run89.json,
# "small_m_gemms"). Inside the served hit's captured graph it was not (H100 run 91,
# gpu_hit_profile_h100_2026-12-05_run91.json): the ten Triton GEMMs take 8 us each (0.083 ms), and with the
# route on the kernels add up to the same 0.225 ms in 64 launches instead of 49, run() 0.304 vs 0.301 ms back
# to back; its 112 bf16/fp16 whole-model rows were all within their bars
# (gpu_check_h100_2026-12-05_run91_models_partial.json). So it is off. Set it where a GPU run shows a gain:
# gpu_check's model rows force each route, gpu_hit_profile's hit_triton_gemms / hit_cublas_projections time
# the hit both ways. Never under torch.compile (the compiled engine keeps its measured graph) nor in
# Triton's interpreter.
CUBLAS_ROWS = 0


def cublas_rows(x2d: torch.Tensor) -> bool:
    """Whether a projection over the rows of x2d [M, K] goes to cuBLAS (CUBLAS_ROWS, read at each call): 16-bit
    on a CUDA GPU, M a plain int of at most CUBLAS_ROWS, outside torch.compile's tracing."""
    M = x2d.shape[0]
    return (type(M) is int and M <= CUBLAS_ROWS and x2d.is_cuda and x2d.dtype in (torch.bfloat16, torch.float16)
            and not interpreting() and not torch.compiler.is_compiling())


def gemm_config(dtype: torch.dtype, M, N: int | None, config: dict | None, sms: int, kind: str = "projection") -> dict:
    """Tiles for 16-bit: 128x256x64, 8 warps, 3 stages (H200 sweep, benchmarks/results/gpu_hstu_2026-11-29_run11.json:
    uvqk 418 vs 388 TFLOP/s for 128x128, hstu_output 392 vs 327); when that gives under two waves of tiles
    (fewer than 2 x `sms`, the GPU's multiprocessors: a batch-1 output projection, cached scoring's few
    rows) 64x128 tiles, 4 warps, so more SMs work. M is only looked at when it is a plain int: under
    torch.compile's dynamic shapes it is symbolic and the large tiles stand. fp32, the exact checking
    path, takes small tiles. `config` overrides (the GPU benchmark sweeps it).
    TMA: the persistent TMA kernel (_gemm_tma_kernel) where tma_ready allows it, else the pointer kernel
    (GEMM_FLAGS: by default for the large tiles only); FLATTEN, SUBTILE (the epilogue in column halves) and
    PROGRAMS (None: one per SM) are its knobs."""
    large = False
    if dtype == torch.float32:
        base = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2}
    elif isinstance(M, int) and N is not None and triton.cdiv(M, 128) * triton.cdiv(N, 256) < 2 * sms:
        base = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    else:
        base = dict(LARGE_TILES[kind])
        large = True
    cfg = GEMM_FLAGS | base | (config or {})  # (a LARGE_TILES entry may set the kernel's flags too)
    if cfg["TMA"] is None:
        cfg["TMA"] = large
    return cfg | {"IEEE": dtype == torch.float32, "FAST": fast_math(dtype)}


def _start_byte(t: torch.Tensor) -> int | None:
    """t's first byte address (a traced tensor has none: its offset into its allocation, which Inductor
    aligns to 16 bytes, stands in), or None when it is symbolic."""
    if is_fake(t):
        try:
            return int(t.storage_offset()) * t.element_size()
        except Exception:  # noqa: BLE001 - a symbolic offset: not provably aligned
            return None
    return t.data_ptr()


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether kernel-made TMA descriptors can read / write these 2-D tensors: a Hopper or newer GPU (or
    Triton's interpreter), unit column stride, 16-byte aligned start and row stride."""
    dev = tensors[0].device
    if not interpreting() and (dev.type != "cuda" or torch.cuda.get_device_capability(dev)[0] < 9):
        return False
    for t in tensors:
        start = _start_byte(t)
        if (t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or start is None
                or start % 16):
            return False
    return True


def ensure_allocator(device: torch.device) -> None:
    """Kernels that make TMA descriptors need scratch memory at launch: Inductor provides it for the
    launches it makes; an eager launch gets this allocator unless the caller set their own."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def launch_gemm(a: list[torch.Tensor], weight: torch.Tensor, out: torch.Tensor, launcher, *, bias=None, residual=None,
                silu_cols: int = 0, config: dict | None = None) -> torch.Tensor:
    """out [M, N] = concat(a, dim=1) @ weight (+ bias) (SiLU on the first silu_cols columns) (+ residual)."""
    M, K = a[0].shape
    N = weight.shape[1]
    cfg = gemm_config(a[0].dtype, M, N, config, sm_count(out.device), "projection" if residual is None else "output")
    tma, flatten, subtile, programs = (cfg.pop(k) for k in ("TMA", "FLATTEN", "SUBTILE", "PROGRAMS"))
    per_sm = cfg.pop("PER_SM", 1)  # persistent programs per multiprocessor (when PROGRAMS is not set)
    if subtile is None:
        subtile = bias is not None and residual is None
    a3 = a + [a[0]] * (3 - len(a))
    res = residual if residual is not None else out
    args = (a3[0], a3[1], a3[2], weight, bias if bias is not None else weight, res, out, M, K, N, silu_cols,
            a3[0].stride(0), a3[1].stride(0), a3[2].stride(0), weight.stride(0), res.stride(0), out.stride(0))
    flags = dict(NUM_A=len(a), HAS_BIAS=bias is not None, HAS_RES=residual is not None)
    if tma and tma_ready(*a, weight, out, *([residual] if residual is not None else [])):
        programs = programs or per_sm * sm_count(out.device)
        if not is_fake(out):
            ensure_allocator(out.device)
        launcher(_gemm_tma_kernel)[(programs,)](
            *args, **flags, **cfg, PROGRAMS=programs, FLATTEN=bool(flatten),
            EPI_N=cfg["BLOCK_N"] // 2 if subtile else cfg["BLOCK_N"])
        return out
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    launcher(_gemm_kernel)[grid](*args, **flags, **cfg)
    return out
