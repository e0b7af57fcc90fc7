"""Triton HSTU attention over jagged q/k/v (values + offsets): full (causal + targets + contextual +
window) and cached (delta rows against a user's K/V cache plus themselves).

Both are torch.library.triton_op custom ops (kernels launched through wrap_triton) with fake
implementations, so torch.export sees one node and AOTInductor compiles the kernels into its package.

Work is scheduled by actual length: the grid covers the recipe's static N (no data-dependent launch
size, so the op exports), and programs past their own sequence's end exit at once; within a sequence a
query block only visits the key blocks its mask can reach. Head dims need not be powers of two (50,
100, ...): the kernel pads to the next power of two with masked loads; callers never pad.

Two ways to read q/k/v (FWD_FLAGS, benchmarks/variants_ab.py; H200 results in
benchmarks/results/variants_ab_h200_2026-11-29_run14..16.json):
- TMA: host-side tensor descriptors over the [L, H*d] matrices, one key loop that masks only past the
  keys every row sees. For real (eager) launches of 16-bit power-of-two heads up to 128 (tma_ok).
  Against the pointer kernel (run 16, bf16, ratio to the same run's 8192^3 matmul): N=512 0.275 ->
  0.345, N=1024 0.406 -> 0.466, dlrm-v3 batch 16 0.740 -> 0.682 ms per call, N=4096 0.625 -> 0.615,
  batch 1 (key splits) 0.083 -> 0.084 ms.
- pointers: masked loads, an unmasked key loop then a masked one. Every other launch: odd head dims,
  fp32, GPUs before Hopper and, above all, traced launches (torch.export, torch.compile): Inductor in
  torch 2.11 takes host TMA descriptors only from kernels Dynamo traces, not from a triton_op's body
  ("'<=' not supported between instances of 'TensorDescriptor' and 'int'", run 15), and running the
  attention eagerly between compiled graphs cost more than it gained (dlrm-v3 batch 16: 6.39 vs 6.01
  ms GPU-busy, run 16). Descriptors the kernel makes itself (tl.make_tensor_descriptor), which Inductor
  does take, ran correctly under torch.compile but cost what TMA saves (run 23: batch 16 5.86 vs 5.88 ms
  GPU-busy, N=512 0.27 vs 0.36 of matmul; branch wip/device-tma). So the `compiled` engine runs this path.
The cached kernel reads the same two ways.
Real bf16 launches of head dim 128 in one key split (takes_ws) go to the warp-specialized Gluon kernel of
gluon_ws.py instead, which measured faster at every such shape (FWD_FLAGS["WS"]).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from hstu_opt.ops._registry import Impl
from hstu_opt.ops._triton import fast_math, interpreting, mma, silu, tanh_approx, tma_ready, unit_stride
from hstu_opt.ops.hstu_attention import TABLE, reference


@triton.jit
def _row_ids(pos, hist_end, C: tl.constexpr):
    """Same definition as reference.row_ids: contextual 0, history 1.., every target the first target's id."""
    return tl.where(pos < C, 0, tl.minimum(pos, hist_end) - C + 1)


@triton.jit
def _pointwise(s, alpha, inv_n, FAST: tl.constexpr, POST: tl.constexpr):
    """SiLU(alpha * s) / N (FAST: the one-tanh.approx SiLU of ops/_triton.py): the pointwise part, not the
    tensor cores, bounds this kernel. POST: without the 1/N, which the caller then applies to its
    accumulator once (one multiply less per score: +1-3% of matmul rate with TMA loads, neutral with
    pointers, variants_ab runs 20-21)."""
    alpha = tl.cast(alpha, tl.float32)  # Inductor passes Python floats as fp64 (eager Triton as fp32): fp64
    inv_n = tl.cast(inv_n, tl.float32)  # here turned the inline asm's input and the bf16 casts into NaN
    if FAST:
        h = s * (0.5 * alpha)
        t = tanh_approx(h)
        if POST:
            return h + h * t
        hn = h * inv_n
        return hn + hn * t
    if POST:
        return silu(s * alpha, False)
    return silu(s * alpha, False) * inv_n


@triton.jit
def _rows(X, seq_start, start, stride_l, col, valid, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
          TMA: tl.constexpr, ROW_MASK: tl.constexpr):
    """Rows [start, start + BLOCK) of a sequence, one head's columns [col, col + D), padded to BLOCK_D.
    TMA: one tensor-descriptor load of the [L, H*D] matrix (no address or mask registers; rows past the
    sequence's end are the next user's or TMA's zero fill, and every caller masks what they feed);
    else a masked pointer load (ROW_MASK: zeros past the sequence's end)."""
    if TMA:
        tile = X.load([(seq_start + start).to(tl.int32), col.to(tl.int32)])
    else:
        offs = start + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        mask = offs_d[None, :] < D
        if ROW_MASK:
            mask = mask & valid[:, None]
        # 64-bit only in the scalar base; the tile's offsets are int32 (a sequence's rows x row stride)
        tile = tl.load(X + seq_start * stride_l + (offs[:, None] * stride_l + col + offs_d[None, :]), mask=mask,
                       other=0.0)
    return tile


@triton.jit
def _masked(p, offs_m, offs_n, id_m, ctx_m, m_valid, n_valid, hist_end, C: tl.constexpr, WINDOW: tl.constexpr,
            MIN_FULL: tl.constexpr):
    """p where query row m sees key row n, else 0: HSTU.md's mask in its order (reference.py): itself or an
    earlier id; with a window only ids at most WINDOW back (contextual ones too) unless the row is one of
    the last MIN_FULL before the targets (or a target); then contextual rows see contextual + history."""
    id_n = _row_ids(offs_n, hist_end, C)
    d = id_m[:, None] - id_n[None, :]
    sees = (offs_m[:, None] == offs_n[None, :]) | (d > 0)
    if WINDOW > 0:
        within = d <= WINDOW
        if MIN_FULL > 0:
            within = within | (id_m >= hist_end - C + 1 - MIN_FULL)[:, None]
        sees = sees & within
    sees = sees | (ctx_m[:, None] & (offs_n[None, :] < hist_end))
    return tl.where(sees & m_valid[:, None] & n_valid[None, :], p, 0.0)


@triton.jit
def _key_block(acc, q, K, V, seq_start, start_n, free_n, seq_len, hist_end, h, offs_m, id_m, ctx_m, m_valid, alpha,
               inv_n, stride_kl, stride_kh, stride_vl, stride_vh, DQK: tl.constexpr, DV: tl.constexpr,
               C: tl.constexpr, WINDOW: tl.constexpr, MIN_FULL: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr,
               TMA: tl.constexpr, POST_SCALE: tl.constexpr, MASK: tl.constexpr):
    """acc + (pointwise(q @ k^T), masked) @ v for the key block at start_n. MASK 0: keys every row sees
    (unmasked loads, no mask work); 1: always masked (loads of rows past the sequence's end zeroed);
    2: masked only from free_n on (a scalar branch, for the one-loop form)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < seq_len
    k = _rows(K, seq_start, start_n, stride_kl, h * stride_kh, n_valid, BLOCK_N, BLOCK_DQK, DQK, TMA, MASK != 0)
    p = _pointwise(mma(q, tl.trans(k), IEEE), alpha, inv_n, FAST, POST_SCALE)
    if MASK == 1:
        p = _masked(p, offs_m, offs_n, id_m, ctx_m, m_valid, n_valid, hist_end, C, WINDOW, MIN_FULL)
    elif MASK == 2:
        if start_n >= free_n:
            p = _masked(p, offs_m, offs_n, id_m, ctx_m, m_valid, n_valid, hist_end, C, WINDOW, MIN_FULL)
    v = _rows(V, seq_start, start_n, stride_vl, h * stride_vh, n_valid, BLOCK_N, BLOCK_DV, DV, TMA, MASK != 0)
    return acc + mma(p.to(v.dtype), v, IEEE)


@triton.jit
def _hstu_fwd(Q, K, V, Out, offsets, num_targets, alpha, inv_n, split_len,
              stride_ql, stride_qh, stride_kl, stride_kh, stride_vl, stride_vh, stride_os, stride_ol, stride_oh,
              H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, WINDOW: tl.constexpr,
              MIN_FULL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
              IEEE: tl.constexpr, FAST: tl.constexpr, LONGEST_FIRST: tl.constexpr, MERGED: tl.constexpr,
              TMA: tl.constexpr, POST_SCALE: tl.constexpr, QREG: tl.constexpr, CTX_FIRST: tl.constexpr):
    """Program (m, b*H+h, s): query block m of user b, head h, over keys [s*split_len, (s+1)*split_len)
    into Out[s] (one split: Out is the output; more: float32 partials that add up, no softmax to rescale).
    Q/K/V are TMA descriptors (TMA) or pointers; MERGED: one key loop with a scalar branch for the mask,
    else an unmasked loop then a masked one (each loop its own software pipeline).
    LONGEST_FIRST (the default): query blocks run last-first, since causal blocks near a sequence's end
    carry the most keys and starting those first keeps them off the launch's tail; CTX_FIRST puts the
    blocks holding contextual rows (which see the whole history) before them. The A/B (run 14):
    N=4096 0.646 vs 0.607 in natural order, dlrm-v3 batch 16 0.727 vs 0.717 ms, batch 1 0.084 vs 0.082
    ms, N=512 the same; the N=4096 dip of runs 11-12 (460 TFLOP/s) was not the order.
    Tried and reverted (run 13): a contextual block 0 scheduled first, with a row-mask loop for its
    look-ahead over the history: no gain at C=4 (0.73 vs 0.74 ms at dlrm-v3 batch 16), 12% slower at C=0.
    Also tried and not kept (variants_ab runs 20-21; code on branch wip/paired-attention): query blocks
    p and nb-1-p of a user paired in one program (N=512 0.33 vs 0.35 of matmul, N=4096 0.55 vs 0.62),
    and a skewed key loop issuing block j+1's scores before block j's P @ V so the pointwise work could
    overlap the tensor cores (N=512 0.19: Triton 3.6 waits on every wgmma there and stops pipelining
    the loads). Persistent programs were slower (run 28, branch wip/persistent-attention); one loop over
    the items with tl.range(flatten=True), so the next item's K/V loads could overlap this item's last
    blocks (branch wip/flattened-persistent-attention), compiled for sm_90 by Triton 3.6 without the
    flattening (each item kept its cold prologue) and with a wait after every Q @ K^T wgmma step, so
    it was not run."""
    if LONGEST_FIRST:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        if CTX_FIRST and C > 0:  # the blocks holding contextual rows see the whole history: start them first
            n_ctx: tl.constexpr = (C + BLOCK_M - 1) // BLOCK_M
            pid = tl.program_id(0)
            pid_m = tl.where(pid < n_ctx, pid, tl.num_programs(0) - 1 - pid + n_ctx)
    else:
        pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    seq_start = tl.load(offsets + b)
    seq_len = tl.load(offsets + b + 1) - seq_start
    start_m = pid_m * BLOCK_M
    if start_m >= seq_len:
        return
    hist_end = seq_len - tl.load(num_targets + b)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_valid = offs_m < seq_len
    q = _rows(Q, seq_start, start_m, stride_ql, h * stride_qh, m_valid, BLOCK_M, BLOCK_DQK, DQK, TMA, True)
    if QREG:  # an opaque copy: Triton then feeds Q @ K^T's wgmma from registers, not shared memory
        q = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [q], dtype=q.dtype, is_pure=True, pack=2)
    id_m = _row_ids(offs_m, hist_end, C)
    ctx_m = offs_m < C
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # Keys below min(start_m, hist_end) are visible to every row of this block (history rows see earlier
    # rows, targets see all history, contextual rows see contextual + history): no mask work there.
    # The rest (the diagonal block, targets' own block, contextual rows' look-ahead) is masked.
    free_n = 0
    if WINDOW == 0:
        free_n = (tl.minimum(start_m, hist_end) // BLOCK_N) * BLOCK_N
    lo = pid_s * split_len
    hi = lo + split_len
    end_n = tl.minimum(seq_len, start_m + BLOCK_M)
    if start_m < C:
        end_n = tl.maximum(end_n, hist_end)
    if MERGED:  # one key loop, masking only past free_n (a scalar branch): one software pipeline per program
        for start_n in range(lo, tl.minimum(end_n, hi), BLOCK_N):
            acc = _key_block(acc, q, K, V, seq_start, start_n, free_n, seq_len, hist_end, h, offs_m, id_m, ctx_m,
                             m_valid, alpha, inv_n, stride_kl, stride_kh, stride_vl, stride_vh, DQK, DV, C, WINDOW,
                             MIN_FULL, BLOCK_N, BLOCK_DQK, BLOCK_DV, IEEE, FAST, TMA, POST_SCALE, 2)
    else:  # an unmasked loop up to free_n, then a masked one
        for start_n in range(lo, tl.minimum(free_n, hi), BLOCK_N):
            acc = _key_block(acc, q, K, V, seq_start, start_n, free_n, seq_len, hist_end, h, offs_m, id_m, ctx_m,
                             m_valid, alpha, inv_n, stride_kl, stride_kh, stride_vl, stride_vh, DQK, DV, C, WINDOW,
                             MIN_FULL, BLOCK_N, BLOCK_DQK, BLOCK_DV, IEEE, FAST, TMA, POST_SCALE, 0)
        for start_n in range(tl.maximum(free_n, lo), tl.minimum(end_n, hi), BLOCK_N):
            acc = _key_block(acc, q, K, V, seq_start, start_n, free_n, seq_len, hist_end, h, offs_m, id_m, ctx_m,
                             m_valid, alpha, inv_n, stride_kl, stride_kh, stride_vl, stride_vh, DQK, DV, C, WINDOW,
                             MIN_FULL, BLOCK_N, BLOCK_DQK, BLOCK_DV, IEEE, FAST, TMA, POST_SCALE, 1)
    if POST_SCALE:
        acc = acc * tl.cast(inv_n, tl.float32)
    out_base = Out + pid_s.to(tl.int64) * stride_os + seq_start * stride_ol
    tl.store(out_base + (offs_m[:, None] * stride_ol + h * stride_oh + offs_dv[None, :]),
             acc.to(Out.dtype.element_ty), mask=m_valid[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _hstu_cached_fwd(Q, K, V, KC, VC, Out, delta_offsets, cache_offsets, alpha, inv_n, split_len,
                     stride_ql, stride_qh, stride_kl, stride_kh, stride_vl, stride_vh,
                     stride_kcl, stride_kch, stride_vcl, stride_vch, stride_os, stride_ol, stride_oh,
                     PageTable, stride_pt,
                     H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, WINDOW: tl.constexpr,
                     MIN_FULL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                     IEEE: tl.constexpr, FAST: tl.constexpr, TMA: tl.constexpr, PAGE: tl.constexpr = 0):
    """Program (m, b*H+h, s) adds the contribution of cache keys [s*split_len, (s+1)*split_len) to a float32
    partial Out[s]; split 0 also adds each row's own (diagonal) term. No softmax: partials just add.
    Only a key block that crosses the split's end (or any block, with a window) is masked: rows past the
    user's new rows are never stored, so they need no mask. Every new row is a target (id hi): with a
    window it sees the cache rows at most WINDOW ids back, contextual ones too, and with MIN_FULL > 0
    every cache row (HSTU.md: a target's id hi is >= hi - MIN_FULL). TMA as in _hstu_fwd.
    PAGE > 0 (paged): KC/VC are one layer of a page pool, [pages * PAGE, H, d] rows, and user b's cache row r
    is row r % PAGE of page PageTable[b, r // PAGE]; cache_offsets holds each user's cache length [B]. PAGE is a
    multiple of BLOCK_N (and split_len of BLOCK_N), so a key block never straddles two pages: one page-id load
    per key block, then the same tile load as the contiguous form."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    d_start = tl.load(delta_offsets + b)
    d_len = tl.load(delta_offsets + b + 1) - d_start
    start_m = pid_m * BLOCK_M
    if start_m >= d_len:
        return
    if PAGE > 0:
        c_len = tl.load(cache_offsets + b)  # = hist_end: every new row is a target
    else:
        c_start = tl.load(cache_offsets + b)
        c_len = tl.load(cache_offsets + b + 1) - c_start  # = hist_end: every new row is a target
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_valid = offs_m < d_len
    q = _rows(Q, d_start, start_m, stride_ql, h * stride_qh, m_valid, BLOCK_M, BLOCK_DQK, DQK, TMA, True)
    # Its own row (the diagonal): a row-wise dot, no cache involved.
    k_self = _rows(K, d_start, start_m, stride_kl, h * stride_kh, m_valid, BLOCK_M, BLOCK_DQK, DQK, TMA, True)
    v_self = _rows(V, d_start, start_m, stride_vl, h * stride_vh, m_valid, BLOCK_M, BLOCK_DV, DV, TMA, True)
    p_self = _pointwise(tl.sum(q.to(tl.float32) * k_self.to(tl.float32), axis=1), alpha, inv_n, FAST, False)
    acc = tl.where(pid_s == 0, p_self[:, None] * v_self.to(tl.float32), 0.0)
    id_m = c_len - C + 1  # every target's id
    lo = pid_s * split_len
    hi = tl.minimum(c_len, lo + split_len)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        if PAGE > 0:  # the key block's page: its rows start at page * PAGE + start_n % PAGE of the pool
            page = tl.load(PageTable + b.to(tl.int64) * stride_pt + start_n // PAGE).to(tl.int64)
            base = page * PAGE + start_n % PAGE - start_n
        else:
            base = c_start
        k = _rows(KC, base, start_n, stride_kcl, h * stride_kch, n_valid, BLOCK_N, BLOCK_DQK, DQK, TMA, True)
        p = _pointwise(mma(q, tl.trans(k), IEEE), alpha, inv_n, FAST, False)
        if WINDOW > 0 and MIN_FULL == 0:
            id_n = tl.where(offs_n < C, 0, offs_n - C + 1)
            p = tl.where(n_valid[None, :] & (id_m - id_n[None, :] <= WINDOW), p, 0.0)
        elif start_n + BLOCK_N > hi:
            p = tl.where(n_valid[None, :], p, 0.0)
        v = _rows(VC, base, start_n, stride_vcl, h * stride_vch, n_valid, BLOCK_N, BLOCK_DV, DV, TMA, True)
        acc += mma(p.to(v.dtype), v, IEEE)
    out_base = Out + pid_s.to(tl.int64) * stride_os + d_start * stride_ol
    tl.store(out_base + (offs_m[:, None] * stride_ol + h * stride_oh + offs_dv[None, :]), acc.to(Out.dtype.element_ty),
             mask=m_valid[:, None] & (offs_dv[None, :] < DV))


def _blocks(dqk: int, dv: int, dtype: torch.dtype) -> dict:
    """Block sizes. 16-bit, head dim <= 128: 64x64 tiles, 4 warps, 3 stages measured best on the H200
    (benchmarks/results/gpu_hstu_2026-11-29_run6.json sweep, tanh SiLU: 0.675 of the matmul rate at
    N=4096 vs 0.666 for 128x64 / 8 warps; 0.296 vs 0.248 at N=512), and again with TMA loads and one key
    loop (variants_ab run 15: 2 or 4 stages, 64x128, 128x64 and 128x128 tiles all slower at every
    shape). Wider heads and fp32 (the checking path) take smaller tiles to fit. Full-kernel launches that
    read through TMA then take TMA_TILES' key tiles (run 30)."""
    bdqk, bdv = max(16, triton.next_power_of_2(dqk)), max(16, triton.next_power_of_2(dv))
    if max(bdqk, bdv) >= 256 or dtype == torch.float32:
        tiles = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    else:
        tiles = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {**tiles, "BLOCK_DQK": bdqk, "BLOCK_DV": bdv, "IEEE": dtype == torch.float32,
            "FAST": fast_math(dtype)}


# _hstu_fwd's switches (benchmarks/variants_ab.py flips them). TMA where tma_ok and the launch is real;
# MERGED None: one key loop with TMA, two with pointers (each measured best with its loads, run 16).
# POST_SCALE None: 1/N on the accumulator, except in fp16, where unscaled scores could overflow P's
# fp16 tiles (bf16 and fp32 have float32's range).
# QREG: Q held in registers for Q @ K^T (TMA launches, with TMA_TILES' register cap). Otherwise each of
# that product's wgmma steps reads its A tile (Q) from shared memory again: with 64x32 tiles 3 KB per 16
# cycles of math. Run 40 (benchmarks/results/variants_ab_h200_2026-11-29_run40.json), bf16, ms against
# Q in shared memory: N=4096 3.717 vs 4.023 (0.711 vs 0.657 of the same run's matmul), N=512 0.414 vs
# 0.422, N=1024 1.268 vs 1.265, dlrm-v3 batch 16 0.630 vs 0.645, batch 1 0.073 vs 0.076. Uncapped it
# took 202-234 registers (2 programs per SM) and was slower everywhere.
# Never with dv < 64 (QREG_MIN_DV): Triton 3.6 on the H200 miscompiles Q-in-registers with the merged key loop
# when P @ V's width (dv) is 32: relative error 0.6-1.2 in bf16 and fp16, while the same launch with Q in
# shared memory, or with two key loops, is right (benchmarks/results/gpu_check_h200_2026-12-04_run68_before_fix
# .json, issue 16). QREG was only ever measured (and worth having) at head dim 128.
# CTX_FIRST (with contextual rows, in longest-first order): the query blocks that hold contextual rows
# start first. Those rows see the whole history, so such a block runs as long as a sequence's last one,
# and in plain longest-first order it starts last, on the launch's tail. H200, 2026-11-30 (benchmarks/
# results/variants_ab_h200_2026-11-30_run47.json and sustained_ab_h200_2026-11-30_run48.json), bf16,
# dlrm-v3 (4 contextual rows): the kernel at batch 1 (key splits) 0.0711 vs 0.0734 ms; the serving graph
# under sustained load, median of 3 alternating rounds, batch 1 0.862 vs 0.872 ms, batch 16 5.439 vs 5.455
# ms. Also measured there and not kept: whole query blocks stored through a TMA descriptor (N=512 0.429 vs
# 0.420 ms, N=4096 4.007 vs 3.997, dlrm-v3 batch 16 0.645 vs 0.651: within the run's noise).
# WS: the warp-specialized Gluon kernel (gluon_ws.py: 128-row query blocks in two consumer warpgroups
# sharing each K/V tile, a TMA producer warp, persistent CTAs) for the launches takes_ws and
# takes_cached_ws pick. H200, 2026-11-30 (benchmarks/results/ws_probe_h200_2026-11-30_run65.json, the final
# kernel), bf16, ms against this kernel in the same run, medians of 3 alternating rounds: N=256 B=512
# 0.138 vs 0.169, N=512 B=512 0.374 vs 0.445, N=1024 1.135 vs 1.346, N=2048 4.008 vs 4.512, N=4096 B=128
# 3.549 vs 4.046, dlrm-v3 batch 16 (16 users x 4 heads x 4352 rows, 4 contextual rows) 0.521 vs 0.676, and
# its cached scoring (256 new rows per user, 4096 cached) 0.0606 vs 0.0727. Correct against float64
# (bf16 rel. error <= 4.0e-3, no unwritten rows; runs 65-66).
FWD_FLAGS = {"LONGEST_FIRST": True, "TMA": True, "MERGED": None, "POST_SCALE": None, "QREG": True,
             "CTX_FIRST": True, "WS": True}
# PAGED_WS: paged cached launches that takes_cached_ws picks go to the Gluon kernel's paged form (its producer
# reads the page table; gluon_ws.launch_cached_paged_ws) instead of the Triton kernel's PAGE mode. On since
# H200 run 72 (benchmarks/results/gpu_check_h200_2026-12-04_run72.json: for every case the router sends to the
# Gluon kernel and every page size, bit for bit the contiguous Gluon launch and within the float64 bar) and run
# 76 (gpu_paged_h200_2026-12-04_run76.json, CUDA-graph replays, dlrm-v3 batch 16: 0.065 ms against 0.0615 for
# the contiguous Gluon launch and 0.095 for the Triton kernel's PAGE mode).
PAGED_WS = True


def _gluon_takes(q: Tensor, *others: Tensor) -> bool:
    """What the Gluon kernel (both forms) asks of a launch's tensors: a real launch (not traced, not Triton's
    interpreter), bf16 (its 1/N comes after P @ V, which could overflow fp16's P), head dim 128,
    TMA-readable (tma_ok), a Hopper GPU (sm_90: its wgmma)."""
    return (not interpreting() and not is_fake(q) and q.dtype == torch.bfloat16
            and all(t.shape[-1] == 128 for t in (q, *others)) and tma_ok(q.dtype, q, *others)
            and torch.cuda.get_device_capability(q.device)[0] == 9)


def takes_ws(q: Tensor, k: Tensor, v: Tensor, out: Tensor, max_seq_len: int, max_attn_len: int,
             config: dict | None = None) -> bool:
    """Whether launch_fwd runs this launch with the warp-specialized Gluon kernel: FWD_FLAGS["WS"], no
    `config`, no window, a shape ws_wanted picks, one key split, and what _gluon_takes asks."""
    return (config is None and FWD_FLAGS["WS"] and not max_attn_len and ws_wanted(max_seq_len) and out.dim() == 3
            and _gluon_takes(q, k, v))


def takes_cached_ws(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, out: Tensor, max_attn_len: int,
                    tma: bool | None) -> bool:
    """Whether launch_cached runs this launch with the Gluon kernel's cached form: FWD_FLAGS["WS"], `tma` left
    to the flags, no window, one key split (`out` is the result, in q's dtype: enough users' new rows to
    fill the GPU without splitting the cache), and what _gluon_takes asks.
    H200 (benchmarks/results/ws_probe_h200_2026-11-30_run65.json): dlrm-v3 scoring at batch 16, 0.0606 vs
    0.0727 ms per layer; one key split is where it has enough work items (batch 1 splits the cache instead)."""
    return (FWD_FLAGS["WS"] and tma is None and not max_attn_len and out.shape[0] == 1 and out.dtype == q.dtype
            and _gluon_takes(q, k, v, k_cache, v_cache))


def ws_wanted(max_seq_len: int) -> bool:
    """Where the warp-specialized kernel measured faster (H200, benchmarks/results/ws_probe_h200_2026-11-30_run65):
    every shape from N=256 (B=512) to N=4096 (B=128) and dlrm-v3 batch 16. Below 256 rows it was not measured."""
    return max_seq_len >= 256

# Key tiles of the full kernel when it reads through TMA (unless `config` sets BLOCK_N): 64x32 tiles, 3
# stages take 137 registers and 64 KB of shared memory, so three programs fit an SM where 64x64 fit two.
# H200, run 30 (benchmarks/results/variants_ab_h200_2026-11-29_run30.json), bf16, ms against 64x64:
# N=512 0.433 vs 0.466, N=1024 1.330 vs 1.383, N=4096 4.120 vs 4.153, dlrm-v3 batch 1 (key splits)
# 0.077 vs 0.083, dlrm-v3 batch 16 0.672 vs 0.663 (the one case slower). Slower at every case: 64x32 with
# 2 stages (4 programs per SM, registers capped at 128: spills), 64x64 with 2 stages. Pointer loads keep
# 64x64 (not measured with 64x32; the compiled engine's traced launches run them).
# maxnreg 168: Q in registers (QREG) takes 155-164 registers under the cap, so three programs still fit an
# SM. Nsight Compute on these launches (run 40, benchmarks/results/attn_ncu_h200_2026-11-29_run40.csv):
# the L2 -> SM crossbar is 85-87% busy at N=4096, and issue stalls are mostly the pipeline's barriers
# and waits; 128-row query blocks in two warpgroups (capped at 128 registers, two programs per SM) halve
# that traffic (45% busy) but stall longer on the 8-warp barriers: N=4096 0.664, N=512 0.338, dlrm-v3
# batch 16 0.742 ms (run 40).
TMA_TILES = {"BLOCK_N": 32, "maxnreg": 168}
QREG_MIN_DV = 64  # (see QREG above: wrong results at dv = 32, a hard floor even when `config` asks for QREG)


@functools.cache
def _host_descriptors() -> bool:
    return importlib.util.find_spec("triton.tools.tensor_descriptor") is not None


def tma_ok(dtype: torch.dtype, *tensors: Tensor) -> bool:
    """Whether real q / k / v ([L, H, d] each) can be read through TMA descriptors of their [L, H*d] matrix:
    16-bit, power-of-two head dims up to 128 (a tile's columns are exactly one head's; a padded tile
    would read the next head's), heads adjacent within a row, 16-byte aligned rows and starts; a Hopper
    or newer GPU (or Triton's interpreter) and a Triton with host-side descriptors."""
    if dtype not in (torch.bfloat16, torch.float16) or not _host_descriptors():
        return False
    for t in tensors:
        d = t.shape[-1]
        if d < 16 or d > 128 or d & (d - 1) or t.stride(1) != d or t.stride(2) != 1:
            return False
    # the [L, H*d] matrices' alignment and the GPU: the check the projections' TMA GEMM makes
    return tma_ready(*(t.view(t.shape[0], -1) for t in tensors))


def _use_tma(flag, q: Tensor, *others: Tensor) -> bool:
    """The TMA switch as a launch takes it: asked for, a real launch (traced ones, whose tensors are fake,
    take pointers: Inductor cannot take host descriptors from a triton_op body), and tma_ok."""
    return bool(flag) and not is_fake(q) and tma_ok(q.dtype, q, *others)


def _descriptor(t: Tensor, rows: int):
    """The TMA descriptor of [rows, d] tiles (one head) over t's [L, H*d] view."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t.view(t.shape[0], t.shape[1] * t.shape[2]), [rows, t.shape[2]])


SLOTS = 264  # resident 64x64 attention programs on an H200 (132 SMs x 2); sizes the key splits


def fwd_splits(batch_heads: int, max_seq_len: int, block_m: int, block_n: int) -> int:
    """Key splits of the full kernel: one when the launch has many programs; more when a few users' long
    causal rows would leave most of the GPU idle behind the longest query blocks (batch 1 at N=4352:
    68 query blocks x 4 heads, the last one 68 key blocks long, the average 35). Chosen so the longest
    program is about as long as the average load of a slot, with at least 4 key blocks per split.
    Static in the shapes, so the op still exports."""
    nb = triton.cdiv(max_seq_len, block_m)
    work = batch_heads * nb * (nb + 1) // 2  # key blocks over all programs (causal, every row full length)
    return max(1, min(triton.cdiv(max_seq_len, 4 * block_n), triton.cdiv(SLOTS * nb, max(work, 1))))


def launch_fwd(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, num_targets: Tensor, out: Tensor, max_seq_len: int,
               alpha: float, contextual_len: int, max_attn_len: int, launcher=lambda kernel: kernel,
               config: dict | None = None, min_full_attn_seq_len: int = 0) -> Tensor:
    """Launch the full kernel into `out`: [L, H, dv] for one key split, float32 partials [S, L, H, dv]
    for S splits (their sum is the result). The GPU check passes a NaN-poisoned out; the benchmark
    sweeps `config` (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    L, H, dqk = q.shape
    dv = v.shape[-1]
    splits = out.shape[0] if out.dim() == 4 else 1
    if takes_ws(q, k, v, out, max_seq_len, max_attn_len, config):
        from hstu_opt.ops.hstu_attention import gluon_ws  # (Gluon: imported only where it runs)

        return gluon_ws.launch_ws(q, k, v, offsets, num_targets, out, max_seq_len, alpha, contextual_len)
    cfg = _blocks(dqk, dv, q.dtype) | FWD_FLAGS | (config or {})
    cfg.pop("WS")  # (launch_fwd's switch, not the kernel's)
    so, sl, sh = (out.stride(0), out.stride(1), out.stride(2)) if out.dim() == 4 else (0, out.stride(0), out.stride(1))
    grid = (triton.cdiv(max_seq_len, cfg["BLOCK_M"]), (offsets.shape[0] - 1) * H, splits)
    cfg["TMA"] = _use_tma(cfg["TMA"], q, k, v)
    if cfg["TMA"]:
        cfg |= {key: val for key, val in TMA_TILES.items() if key not in (config or {})}
    split_len = triton.cdiv(triton.cdiv(max_seq_len, splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    cfg["MERGED"] = cfg["TMA"] if cfg["MERGED"] is None else bool(cfg["MERGED"])
    cfg["POST_SCALE"] = q.dtype != torch.float16 if cfg["POST_SCALE"] is None else bool(cfg["POST_SCALE"])
    # (measured with TMA loads only; an inline-PTX copy, which Triton's interpreter cannot run)
    cfg["QREG"] = bool(cfg["QREG"]) and cfg["TMA"] and not interpreting() and dv >= QREG_MIN_DV
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    qa, ka, va = (_descriptor(q, bm), _descriptor(k, bn), _descriptor(v, bn)) if cfg["TMA"] else (q, k, v)
    launcher(_hstu_fwd)[grid](
        qa, ka, va, out, offsets, num_targets, alpha, 1.0 / max_seq_len, split_len,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), so, sl, sh,
        H=H, DQK=dqk, DV=dv, C=contextual_len, WINDOW=max_attn_len, MIN_FULL=min_full_attn_seq_len if max_attn_len else 0,
        **cfg,
    )
    return out


@triton.jit
def _sum_splits(P, OUT, N, S, stride_s, BLOCK: tl.constexpr):
    """OUT[n] = P[0, n] + P[1, n] + ... + P[S-1, n] in float32, in split order, then cast to OUT's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    p = P + offs
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(S):
        acc += tl.load(p, mask=mask, other=0.0)
        p += stride_s
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)  # (as torch rounds)


SUM_BLOCK = 512  # elements per program: a dlrm-v3 hit's [256, 4, 128] result is 256 programs, two per SM


def sum_splits(partials: Tensor, dtype: torch.dtype, launcher=lambda kernel: kernel) -> Tensor:
    """The key splits' float32 partials [S, ...] (contiguous) -> their sum [...] in `dtype`, one kernel (torch's
    sum(0) then .to(dtype) was two per layer: a reduction and a cast, 5.5 us of a cache hit's 49 us per layer on
    the H200, gpu_hit_profile_h200_2026-12-05_run83.json). The partials sum in split order."""
    out = partials.new_empty(partials.shape[1:], dtype=dtype)
    n = out.numel()
    launcher(_sum_splits)[(triton.cdiv(n, SUM_BLOCK),)](partials, out, n, partials.shape[0], partials.stride(0),
                                                          BLOCK=SUM_BLOCK, num_warps=4)
    return out


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, num_targets: Tensor, max_seq_len: int, alpha: float,
                  contextual_len: int, max_attn_len: int, launcher=lambda kernel: kernel,
                  splits: int | None = None, min_full_attn_seq_len: int = 0) -> Tensor:
    """The full attention: one launch straight into the output, or (`splits` > 1, by default
    fwd_splits) into float32 partials summed after."""
    cfg = _blocks(q.shape[-1], v.shape[-1], q.dtype)
    if splits is None:
        splits = fwd_splits((offsets.shape[0] - 1) * q.shape[1], max_seq_len, cfg["BLOCK_M"], cfg["BLOCK_N"])
    if splits == 1:
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        return launch_fwd(q, k, v, offsets, num_targets, out, max_seq_len, alpha, contextual_len, max_attn_len, launcher,
                          min_full_attn_seq_len=min_full_attn_seq_len)
    partials = q.new_empty(splits, q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float32)
    launch_fwd(q, k, v, offsets, num_targets, partials, max_seq_len, alpha, contextual_len, max_attn_len, launcher,
               min_full_attn_seq_len=min_full_attn_seq_len)
    return sum_splits(partials, q.dtype, launcher)


@triton_op("hstu_opt::hstu_attention_triton", mutates_args=())
def hstu_attention_triton(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, num_targets: Tensor, max_seq_len: int,
                          alpha: float, contextual_len: int, max_attn_len: int, min_full_attn_seq_len: int) -> Tensor:
    return attention_fwd(q, k, v, offsets, num_targets, max_seq_len, alpha, contextual_len, max_attn_len, wrap_triton,
                         min_full_attn_seq_len=min_full_attn_seq_len)


@hstu_attention_triton.register_fake
def _(q, k, v, offsets, num_targets, max_seq_len, alpha, contextual_len, max_attn_len, min_full_attn_seq_len):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


def cache_splits(max_seq_len: int, programs: int, block_n: int) -> tuple[int, int]:
    """(splits, keys per split): enough programs to fill a large GPU (~264) even for one user, never
    fewer than 4 key blocks per split. Rounded down: a launch of 132-263 programs already fills the
    slots in one wave, and split in two it would take two half-length waves, the same time, plus the
    sum of the partials (dlrm-v3 batch 16 scoring, 256 programs: 2 splits and 0.077 ms of sum and cast
    per layer in run 38). Static in the shapes, so the op still exports."""
    most = max(1, triton.cdiv(max_seq_len, 4 * block_n))
    splits = max(1, min(most, SLOTS // max(programs, 1)))
    return splits, triton.cdiv(triton.cdiv(max_seq_len, splits), block_n) * block_n


def launch_cached(q: Tensor, k: Tensor, v: Tensor, delta_offsets: Tensor, k_cache: Tensor, v_cache: Tensor,
                  cache_offsets: Tensor, out: Tensor, max_seq_len: int, alpha: float, contextual_len: int,
                  max_attn_len: int, max_delta_len: int, launcher=lambda kernel: kernel, tma: bool | None = None,
                  min_full_attn_seq_len: int = 0, page_table: Tensor | None = None) -> Tensor:
    """Launch into the float32 partials `out` [splits, Ld, H, dv] (see cached_partials_shape); sum(0) is the result.
    With one split `out` may be the result itself, [1, Ld, H, dv] in q's dtype (written once, nothing to sum).
    `tma` None: FWD_FLAGS["TMA"] (then TMA where tma_ok and the launch is real, as for the full kernel).
    Paged (`page_table` [B, max_pages] int32): k_cache / v_cache are one layer's page pool [pages, page_rows, H, d]
    and `cache_offsets` the users' cache lengths [B]; the Gluon kernel's paged form only with PAGED_WS."""
    L, H, dqk = q.shape
    dv = v.shape[-1]
    paged = page_table is not None
    # (a pool's [pages, page_rows, H, d] layer is checked as the [rows, H, d] matrix the kernels read: H200 run 77
    # found the 4-D view failing tma_ok's stride test, so paged launches never reached the Gluon kernel)
    kc_rows, vc_rows = (k_cache.flatten(0, 1), v_cache.flatten(0, 1)) if paged else (k_cache, v_cache)
    if (not paged or PAGED_WS) and takes_cached_ws(q, k, v, kc_rows, vc_rows, out, max_attn_len, tma):
        from hstu_opt.ops.hstu_attention import gluon_ws  # (Gluon: imported only where it runs)

        if paged:
            gluon_ws.launch_cached_paged_ws(q, k, v, delta_offsets, k_cache, v_cache, page_table, cache_offsets,
                                            out[0], max_seq_len, alpha, max_delta_len)
        else:
            gluon_ws.launch_cached_ws(q, k, v, delta_offsets, k_cache, v_cache, cache_offsets, out[0], max_seq_len,
                                      alpha, max_delta_len)
        return out
    cfg = _blocks(dqk, dv, q.dtype)
    page = 0
    if paged:
        page = k_cache.shape[1]
        assert page % cfg["BLOCK_N"] == 0, f"page_rows {page} must be a multiple of BLOCK_N {cfg['BLOCK_N']}"
        k_cache, v_cache = kc_rows, vc_rows  # [pages * page_rows, H, d]: views
    m_blocks = triton.cdiv(max_delta_len, cfg["BLOCK_M"])
    splits, split_len = cache_splits(max_seq_len, m_blocks * (delta_offsets.shape[0] - 1) * H, cfg["BLOCK_N"])
    assert out.shape[0] == splits, "allocate out with cached_partials_shape"
    use_tma = _use_tma(FWD_FLAGS["TMA"] if tma is None else tma, q, k, v, k_cache, v_cache)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]  # the new rows' own k / v come in [BLOCK_M] tiles, the cache's in [BLOCK_N]
    qa, ka, va, kca, vca = ((_descriptor(q, bm), _descriptor(k, bm), _descriptor(v, bm), _descriptor(k_cache, bn),
                             _descriptor(v_cache, bn)) if use_tma else (q, k, v, k_cache, v_cache))
    pt = page_table if paged else cache_offsets  # (unread when not paged)
    launcher(_hstu_cached_fwd)[(m_blocks, (delta_offsets.shape[0] - 1) * H, splits)](
        qa, ka, va, kca, vca, out, delta_offsets, cache_offsets, alpha, 1.0 / max_seq_len, split_len,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), out.stride(2), pt, pt.stride(0) if paged else 0,
        H=H, DQK=dqk, DV=dv, C=contextual_len, WINDOW=max_attn_len, MIN_FULL=min_full_attn_seq_len if max_attn_len else 0,
        TMA=use_tma, PAGE=page, **cfg,
    )
    return out


def cached_partials_shape(q: Tensor, v: Tensor, delta_offsets: Tensor, max_seq_len: int, max_delta_len: int) -> tuple:
    cfg = _blocks(q.shape[-1], v.shape[-1], q.dtype)
    programs = triton.cdiv(max_delta_len, cfg["BLOCK_M"]) * (delta_offsets.shape[0] - 1) * q.shape[1]
    return (cache_splits(max_seq_len, programs, cfg["BLOCK_N"])[0], q.shape[0], q.shape[1], v.shape[-1])


@triton_op("hstu_opt::cached_hstu_attention_triton", mutates_args=())
def cached_hstu_attention_triton(q: Tensor, k: Tensor, v: Tensor, delta_offsets: Tensor, k_cache: Tensor,
                                 v_cache: Tensor, cache_offsets: Tensor, max_seq_len: int, alpha: float,
                                 contextual_len: int, max_attn_len: int, max_delta_len: int,
                                 min_full_attn_seq_len: int) -> Tensor:
    shape = cached_partials_shape(q, v, delta_offsets, max_seq_len, max_delta_len)
    if shape[0] == 1:  # one split: the kernel writes the result in q's dtype
        out = q.new_empty(shape[1:])
        launch_cached(q, k, v, delta_offsets, k_cache, v_cache, cache_offsets, out.unsqueeze(0), max_seq_len, alpha,
                      contextual_len, max_attn_len, max_delta_len, wrap_triton,
                      min_full_attn_seq_len=min_full_attn_seq_len)
        return out
    partials = q.new_empty(shape, dtype=torch.float32)
    launch_cached(q, k, v, delta_offsets, k_cache, v_cache, cache_offsets, partials, max_seq_len, alpha,
                  contextual_len, max_attn_len, max_delta_len, wrap_triton, min_full_attn_seq_len=min_full_attn_seq_len)
    return sum_splits(partials, q.dtype, wrap_triton)


@cached_hstu_attention_triton.register_fake
def _(q, k, v, delta_offsets, k_cache, v_cache, cache_offsets, max_seq_len, alpha, contextual_len, max_attn_len,
      max_delta_len, min_full_attn_seq_len):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


@triton_op("hstu_opt::cached_hstu_attention_paged_triton", mutates_args=())
def cached_hstu_attention_paged_triton(q: Tensor, k: Tensor, v: Tensor, delta_offsets: Tensor, k_pages: Tensor,
                                       v_pages: Tensor, page_table: Tensor, cache_lens: Tensor, max_seq_len: int,
                                       alpha: float, contextual_len: int, max_attn_len: int, max_delta_len: int,
                                       min_full_attn_seq_len: int) -> Tensor:
    shape = cached_partials_shape(q, v, delta_offsets, max_seq_len, max_delta_len)
    one = shape[0] == 1  # one split: the kernel writes the result in q's dtype
    out = q.new_empty(shape) if one else q.new_empty(shape, dtype=torch.float32)
    launch_cached(q, k, v, delta_offsets, k_pages, v_pages, cache_lens, out, max_seq_len, alpha, contextual_len,
                  max_attn_len, max_delta_len, wrap_triton, min_full_attn_seq_len=min_full_attn_seq_len,
                  page_table=page_table)
    return out[0] if one else sum_splits(out, q.dtype, wrap_triton)


@cached_hstu_attention_paged_triton.register_fake
def _(q, k, v, delta_offsets, k_pages, v_pages, page_table, cache_lens, max_seq_len, alpha, contextual_len,
      max_attn_len, max_delta_len, min_full_attn_seq_len):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


# What benchmarks/gpu_check.py sweeps on the GPU against float64 (full, key-split and cached kernels, every
# load kind, every mask option), and so all the router sends to these kernels: head dims (dqk == dv, and the
# mixed pairs below) x dtypes. Anything else runs the reference op (checked on the CPU against the spec),
# with a warning: an unchecked shape never reaches a kernel. Issue 16: head dim 32 in 16-bit was wrong on
# the GPU for as long as no check covered it.
CHECKED_HEAD_DIMS = (16, 32, 48, 50, 64, 96, 100, 128, 192, 256)
CHECKED_MIXED_DIMS = ((32, 64), (64, 32), (128, 64))
CHECKED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Page sizes (rows per page) the GPU check sweeps for the paged cached kernel (benchmarks/gpu_check.py
# "cached_paged"): multiples of every BLOCK_N the cached kernel takes (_blocks: 64, or 32 for fp32 and heads
# of 256), so a key block never straddles two pages. Other page sizes run the reference (a gather).
CHECKED_PAGE_ROWS = (64, 128, 256)


def checked(dqk: int, dv: int, dtype: torch.dtype) -> bool:
    """Whether the GPU check sweeps this head-dim pair and dtype (so the router may launch it)."""
    dims_ok = (dqk == dv and dqk in CHECKED_HEAD_DIMS) or (dqk, dv) in CHECKED_MIXED_DIMS
    return dims_ok and dtype in CHECKED_DTYPES


@functools.cache
def _warn_unchecked(dqk: int, dv: int, dtype: torch.dtype) -> None:
    warnings.warn(f"hstu_attention: no GPU check covers head dims (dqk={dqk}, dv={dv}) in {dtype}; running the "
                  f"reference op instead of the Triton kernel (checked: {CHECKED_HEAD_DIMS}, pairs "
                  f"{CHECKED_MIXED_DIMS})", stacklevel=3)


def _unchecked(q: Tensor, v: Tensor) -> bool:
    if checked(q.shape[-1], v.shape[-1], q.dtype):
        return False
    _warn_unchecked(q.shape[-1], v.shape[-1], q.dtype)
    return True


@TABLE.register(Impl.TRITON, "hstu_attention")
def _hstu_attention(q, k, v, offsets, num_targets, max_seq_len, alpha, contextual_len, max_attn_len,
                    min_full_attn_seq_len=0):
    if _unchecked(q, v):
        return reference.hstu_attention(q, k, v, offsets, num_targets, max_seq_len, alpha, contextual_len, max_attn_len,
                                        min_full_attn_seq_len)
    if num_targets is None:
        num_targets = torch.zeros(offsets.shape[0] - 1, dtype=offsets.dtype, device=offsets.device)
    q, k, v = (unit_stride(t) for t in (q, k, v))
    return hstu_attention_triton(q, k, v, offsets, num_targets, max_seq_len, alpha, contextual_len, max_attn_len,
                                 min_full_attn_seq_len)


@TABLE.register(Impl.TRITON, "cached_hstu_attention")
def _cached(q, k, v, delta_offsets, k_cache, v_cache, cache_offsets, max_seq_len, alpha, contextual_len, max_attn_len,
            max_delta_len, min_full_attn_seq_len=0):
    if _unchecked(q, v):
        return reference.cached_hstu_attention(q, k, v, delta_offsets, k_cache, v_cache, cache_offsets, max_seq_len,
                                               alpha, contextual_len, max_attn_len, max_delta_len, min_full_attn_seq_len)
    q, k, v, k_cache, v_cache = (unit_stride(t) for t in (q, k, v, k_cache, v_cache))
    return cached_hstu_attention_triton(q, k, v, delta_offsets, k_cache, v_cache, cache_offsets, max_seq_len, alpha,
                                        contextual_len, max_attn_len, max_delta_len, min_full_attn_seq_len)


@functools.cache
def _warn_unchecked_page(page_rows: int) -> None:
    warnings.warn(f"cached_hstu_attention_paged: no GPU check covers pages of {page_rows} rows; running the "
                  f"reference op (a gather) instead of the Triton kernel (checked: {CHECKED_PAGE_ROWS})", stacklevel=3)


@TABLE.register(Impl.TRITON, "cached_hstu_attention_paged")
def _cached_paged(q, k, v, delta_offsets, k_pages, v_pages, page_table, cache_lens, max_seq_len, alpha,
                  contextual_len, max_attn_len, max_delta_len, min_full_attn_seq_len=0):
    page_rows = k_pages.shape[1]
    bad_page = page_rows not in CHECKED_PAGE_ROWS
    if bad_page:
        _warn_unchecked_page(page_rows)
    if bad_page or _unchecked(q, v) or not (k_pages.is_contiguous() and v_pages.is_contiguous()):
        return reference.cached_hstu_attention_paged(q, k, v, delta_offsets, k_pages, v_pages, page_table, cache_lens,
                                                     max_seq_len, alpha, contextual_len, max_attn_len, max_delta_len,
                                                     min_full_attn_seq_len)
    q, k, v = (unit_stride(t) for t in (q, k, v))
    return cached_hstu_attention_paged_triton(q, k, v, delta_offsets, k_pages, v_pages, page_table.int(), cache_lens,
                                              max_seq_len, alpha, contextual_len, max_attn_len, max_delta_len,
                                              min_full_attn_seq_len)
