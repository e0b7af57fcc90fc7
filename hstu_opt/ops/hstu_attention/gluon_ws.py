"""The HSTU attention, full and cached, as a warp-specialized Gluon kernel for Hopper (sm_90).

Why: Nsight Compute (run 40) shows the Triton kernel bound by the L2 -> SM traffic of its K/V tiles
(L2 85-87% busy at N=512 and N=4096): every 64-row query block reads its keys again. Here one CTA
takes 128-row query blocks whose two 64-row halves are two consumer warpgroups in their own
partitions, sharing each K/V tile (half the traffic per flop) without barriers between them; a
one-warp producer partition issues the TMA loads into a ring of shared-memory stages, running ahead
across work items, so a short item's loads are in flight while the previous one computes. The
CTAs are persistent (at most one per SM; `programs` picks how many), walking the items (query block,
user, head) round-robin, each user's blocks longest first.

Same math as triton._hstu_fwd (POST_SCALE, FAST tanh SiLU, the mask of HSTU.md) and, with CACHED, as
triton._hstu_cached_fwd (each new row against its user's cache, then against itself: the block's own
rows come as two more key tiles, masked to the diagonal). Real launches only (bf16, head dim 128, one
key split, no window), never traced: triton.launch_fwd / launch_cached pick them (takes_ws,
takes_cached_ws).

H200 (benchmarks/ws_probe.py; results/ws_probe_h200_2026-11-30_run59..65): correct against float64
(bf16 rel. error <= 4.0e-3, nothing unwritten) with 32- and 64-key tiles (128-key tiles were not, run
53, and are refused); faster than the Triton kernel at every shape measured, N=256 to 4096 and
dlrm-v3 batch 16 and its cached scoring (triton.FWD_FLAGS has the numbers). What made it so, each an
A/B of run 61 at N=512 B=512 (ms): the CTA count (0.550 with 132 CTAs -> 0.370 with 131), the
output stored through shared memory (COALESCE: 0.455 -> 0.370), 4 stages (0.376 -> 0.370) and the
overlap of the next Q K^T with this tile's SiLU (OVERLAP: 0.394 -> 0.370; at dlrm-v3 batch 16 0.648
-> 0.550).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from hstu_opt.ops._triton import sm_count

HALF = gl.constexpr(64)  # rows per consumer warpgroup
# The TMA load's name: async_copy_global_to_shared in Triton 3.6 (the H200 image), async_load from 3.7 on
# (the CPU machines' 3.9, where the compile-only test builds this kernel for sm_90)
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared


@gluon.jit
def _tanh(x):  # (ops/_triton.tanh_approx is a triton.jit function, which a Gluon kernel cannot call)
    return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True,
                                     pack=1)


@gluon.jit
def _clock(dep):
    """The SM's cycle counter (for TRACE), read where `dep` is defined (not hoisted: not pure)."""
    return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [dep], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _fetch(item, offsets, aux, NB, H, C: gl.constexpr, BLOCK_M: gl.constexpr, CACHED: gl.constexpr):
    """Work item `item`: (head, its query block's first row) and its user's (first row, end row, and
    targets twice, or with CACHED its cache's first and end row), the last four loads issued here (the
    consumers fetch the next item's during this one, so they do not wait on global memory between items).
    Each (user, head)'s blocks adjacent (their K/V stay in L2), longest first, blocks holding contextual
    rows before those. Producer and consumers walk the same items."""
    bh = item // NB
    r = item % NB
    m = NB - 1 - r
    if C > 0:
        n_ctx: gl.constexpr = (C + BLOCK_M - 1) // BLOCK_M
        m = gl.where(r < n_ctx, r, NB - 1 - r + n_ctx)
    # the low words of the int64 offsets (rows < 2**31): half the registers the prefetched values hold
    b2 = (bh // H) * 2
    o32 = offsets.to(gl.pointer_type(gl.int32))
    a32 = aux.to(gl.pointer_type(gl.int32))
    x0 = gl.load(a32 + b2)
    if CACHED:
        x1 = gl.load(a32 + b2 + 2)
    else:
        x1 = x0
    return bh % H, m * BLOCK_M, gl.load(o32 + b2), gl.load(o32 + b2 + 2), x0, x1


@gluon.jit
def _key_end(start_m, seq_len, hist_end, rows, C: gl.constexpr):
    """End of the keys rows [start_m, start_m + rows) see (contextual rows see the whole history)."""
    end = gl.minimum(seq_len, start_m + rows)
    if C > 0:
        end = gl.where(start_m < C, gl.maximum(end, hist_end), end)
    return end


@gluon.jit
def _load_kv(k_desc, v_desc, row, col, k_smem, v_smem, kv_ready, kv_empty, kv_i, STAGES: gl.constexpr):
    """K and V rows [row, row + BLOCK_N) into the ring's next stage, once both consumers released it."""
    s = kv_i % STAGES
    mbarrier.wait(kv_empty.index(s), (kv_i // STAGES) & 1)
    mbarrier.expect(kv_ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    _tma_load(k_desc, [row, col], kv_ready.index(s), k_smem.index(s))
    _tma_load(v_desc, [row, col], kv_ready.index(s), v_smem.index(s))
    return kv_i + 1


@gluon.jit
def _producer(q_desc, k_desc, v_desc, kc_desc, vc_desc, offsets, aux, q_smem, k_smem, v_smem, q_ready, q_empty,
              kv_ready, kv_empty, n_items, NB, H, PageTable, stride_pt, C: gl.constexpr, D: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CACHED: gl.constexpr,
              PAGE: gl.constexpr):
    kv_i = 0
    q_i = 0
    for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
        # (no prefetch here: the producer runs ahead of the consumers, and at 24 registers it has none to spare)
        h, start_m, seq_start, seq_end, x0, x1 = _fetch(item, offsets, aux, NB, H, C, BLOCK_M, CACHED)
        seq_len = seq_end - seq_start
        if start_m < seq_len:
            qb = q_i % 2
            mbarrier.wait(q_empty.index(qb), (q_i // 2) & 1)
            mbarrier.expect(q_ready.index(qb), 2 * q_desc.block_type.nbytes)
            _tma_load(q_desc, [seq_start + start_m, h * D], q_ready.index(qb), q_smem.index(2 * qb))
            _tma_load(q_desc, [seq_start + start_m + HALF, h * D], q_ready.index(qb), q_smem.index(2 * qb + 1))
            q_i += 1
            if CACHED:  # the user's cache (x0: its first row, x1: its end), then the block's own two 64-row tiles
                for start_n in range(0, x1 - x0, BLOCK_N):
                    if PAGE > 0:  # paged: the tile's page (PAGE is a multiple of BLOCK_N: one page per tile)
                        page = gl.load(PageTable + (item // NB // H) * stride_pt + start_n // PAGE)
                        row = page * PAGE + start_n % PAGE
                    else:
                        row = x0 + start_n
                    kv_i = _load_kv(kc_desc, vc_desc, row, h * D, k_smem, v_smem, kv_ready, kv_empty, kv_i, STAGES)
                for half in gl.static_range(2):
                    kv_i = _load_kv(k_desc, v_desc, seq_start + start_m + half * HALF, h * D, k_smem, v_smem, kv_ready,
                                    kv_empty, kv_i, STAGES)
            else:  # (x0: the user's targets)
                for start_n in range(0, _key_end(start_m, seq_len, seq_len - x0, BLOCK_M, C), BLOCK_N):
                    kv_i = _load_kv(k_desc, v_desc, seq_start + start_n, h * D, k_smem, v_smem, kv_ready, kv_empty,
                                    kv_i, STAGES)


@gluon.jit
def _scores(sc, j, free_n, half_alpha, offs_m, id_m, ctx_m, m_ok, hist_end, seq_len, n_cache, c_len, start_m,
            dtype: gl.constexpr, C: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr,
            p_layout: gl.constexpr, CACHED: gl.constexpr):
    """P = SiLU(alpha S) for key tile j (1/N comes after P V), as the P V product's register operand. Masked
    from free_n on (the diagonal, targets' own block, contextual look-ahead); CACHED: past the cache's end,
    and in the block's own tiles (j >= n_cache) everything but each row's own key."""
    hh = sc * half_alpha
    p = hh + hh * _tanh(hh)
    start_n = j * BLOCK_N
    if CACHED:
        if j >= n_cache:
            offs_n = start_m + (j - n_cache) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            p = gl.where(offs_m[:, None] == offs_n[None, :], p, 0.0)
        elif start_n + BLOCK_N > c_len:
            offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            p = gl.where((offs_n < c_len)[None, :], p, 0.0)
    elif start_n + BLOCK_N > free_n:
        offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        id_n = gl.where(offs_n < C, 0, gl.minimum(offs_n, hist_end) - C + 1)
        sees = ((offs_m[:, None] == offs_n[None, :]) | (id_m[:, None] > id_n[None, :])
                | (ctx_m[:, None] & (offs_n[None, :] < hist_end)))
        sees = sees & m_ok[:, None] & (offs_n < seq_len)[None, :]
        p = gl.where(sees, p, 0.0)
    return gl.convert_layout(p.to(dtype), p_layout)


@gluon.jit
def _consumer(Out, offsets, aux, q_smem, k_smem, v_smem, q_ready, q_empty, kv_ready, kv_empty, n_items, NB, H,
              alpha, inv_n, stride_ol, stride_oh, Trace, WG: gl.constexpr, C: gl.constexpr, D: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr,
              COALESCE: gl.constexpr, TRACE: gl.constexpr, CACHED: gl.constexpr):
    """Rows [WG*64, WG*64 + 64) of every 128-row query block: S = Q K^T (Q in registers), SiLU, mask,
    acc += P V over the keys these rows see, each K/V stage released once this warpgroup is done with
    it (and the stages only the other half's rows see released at once). CACHED: the rows are a user's new
    rows (all targets), the keys its cache's rows, then the block's own rows (each row sees itself).
    OVERLAP (FA3's intra-warpgroup pipelining): the next tile's Q K^T is issued before this tile's
    SiLU, so the tensor cores run it while this warpgroup computes P; without it each tile's
    S -> P -> P V chain runs alone (the other warpgroup's work fills the gaps).
    TRACE > 0 (benchmarks/ws_probe.py --trace): each warpgroup writes the cycle counter at five points of
    its first TRACE items, and its tile count, into Trace [CTAs, 2, TRACE, 8] (int64)."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    q_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    st_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    dtype: gl.constexpr = q_smem.dtype
    half_alpha = alpha * 0.5
    kv_i = 0
    q_i = 0
    n_traced = 0
    step = gl.num_programs(0)
    h_n, m_n, s_n, e_n, x_n, y_n = _fetch(gl.program_id(0), offsets, aux, NB, H, C, BLOCK_M, CACHED)
    for item in range(gl.program_id(0), n_items, step):
        h, start_m, seq_start, x0, x1 = h_n, m_n, s_n, x_n, y_n
        seq_len = e_n - seq_start
        h_n, m_n, s_n, e_n, x_n, y_n = _fetch(gl.minimum(item + step, n_items - 1), offsets, aux, NB, H, C, BLOCK_M,
                                              CACHED)
        if start_m < seq_len:
            if TRACE > 0:
                c_a = _clock(start_m)
                c_c = c_a
                c_d = c_a
            my_m = start_m + WG * HALF
            if CACHED:  # (both halves run every tile: the other half's own tile masks to zeros, 1 of n_cache + 2)
                hist_end = seq_len
                c_len = x1 - x0
                n_cache = gl.cdiv(c_len, BLOCK_N)
                n_all = n_cache + 2
                n_mine = n_all
                free_n = 0
            else:
                hist_end = seq_len - x0
                c_len = 0
                n_cache = 0
                n_all = gl.cdiv(_key_end(start_m, seq_len, hist_end, BLOCK_M, C), BLOCK_N)
                n_mine = gl.cdiv(gl.where(my_m < seq_len, _key_end(my_m, seq_len, hist_end, HALF, C), 0), BLOCK_N)
                free_n = (gl.minimum(my_m, hist_end) // BLOCK_N) * BLOCK_N  # keys every row of this half sees
            qb = q_i % 2
            mbarrier.wait(q_ready.index(qb), (q_i // 2) & 1)
            q = q_smem.index(2 * qb + WG).load(q_layout)
            mbarrier.arrive(q_empty.index(qb), count=1)
            if TRACE > 0:
                c_b = _clock(q_i)
            q_i += 1
            offs_m = my_m + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))
            id_m = gl.where(offs_m < C, 0, gl.minimum(offs_m, hist_end) - C + 1)
            ctx_m = offs_m < C
            m_ok = offs_m < seq_len
            acc = gl.zeros([HALF, D], gl.float32, o_layout)
            if OVERLAP:
                if n_mine > 0:
                    mbarrier.wait(kv_ready.index(kv_i % STAGES), (kv_i // STAGES) & 1)
                    s_0 = warpgroup_mma(q, k_smem.index(kv_i % STAGES).permute((1, 0)),
                                        gl.zeros([HALF, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
                    p = _scores(warpgroup_mma_wait(num_outstanding=0, deps=(s_0,)), 0, free_n, half_alpha, offs_m,
                                id_m, ctx_m, m_ok, hist_end, seq_len, n_cache, c_len, start_m, dtype, C, BLOCK_N,
                                s_layout, p_layout, CACHED)
                    if TRACE > 0:
                        c_c = _clock(n_mine)
                    for j in range(1, n_mine):  # FA3's order: S of tile j, then P V of tile j - 1, in flight together
                        t = kv_i + j
                        mbarrier.wait(kv_ready.index(t % STAGES), (t // STAGES) & 1)
                        s_j = warpgroup_mma(q, k_smem.index(t % STAGES).permute((1, 0)),
                                            gl.zeros([HALF, BLOCK_N], gl.float32, s_layout), use_acc=False,
                                            is_async=True)
                        pv = warpgroup_mma(p, v_smem.index((t - 1) % STAGES), acc, is_async=True)
                        s_j = warpgroup_mma_wait(num_outstanding=1, deps=(s_j,))  # (the oldest: S done, P V running)
                        p_next = _scores(s_j, j, free_n, half_alpha, offs_m, id_m, ctx_m, m_ok, hist_end, seq_len,
                                         n_cache, c_len, start_m, dtype, C, BLOCK_N, s_layout, p_layout, CACHED)
                        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(pv, p))  # (P's registers live till here)
                        mbarrier.arrive(kv_empty.index((t - 1) % STAGES), count=1)
                        p = p_next
                    t = kv_i + n_mine - 1
                    if TRACE > 0:
                        c_d = _clock(t)
                    pv = warpgroup_mma(p, v_smem.index(t % STAGES), acc, is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(pv,))
                    mbarrier.arrive(kv_empty.index(t % STAGES), count=1)
            else:
                for j in range(0, n_mine):
                    t = kv_i + j
                    s = t % STAGES
                    mbarrier.wait(kv_ready.index(s), (t // STAGES) & 1)
                    sc = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), gl.zeros([HALF, BLOCK_N], gl.float32, s_layout),
                                       use_acc=False, is_async=True)
                    sc = warpgroup_mma_wait(num_outstanding=0, deps=(sc,))
                    p = _scores(sc, j, free_n, half_alpha, offs_m, id_m, ctx_m, m_ok, hist_end, seq_len, n_cache,
                                c_len, start_m, dtype, C, BLOCK_N, s_layout, p_layout, CACHED)
                    acc = warpgroup_mma(p, v_smem.index(s), acc, is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                    mbarrier.arrive(kv_empty.index(s), count=1)
            for t in range(kv_i + n_mine, kv_i + n_all):  # the tiles only the other half's rows see
                mbarrier.wait(kv_ready.index(t % STAGES), (t // STAGES) & 1)
                mbarrier.arrive(kv_empty.index(t % STAGES), count=1)
            kv_i += n_all
            if COALESCE:  # (through shared memory: 16-byte stores, a warp's two rows whole)
                o = gl.convert_layout((acc * inv_n).to(Out.dtype.element_ty), st_layout)
            else:
                o = (acc * inv_n).to(Out.dtype.element_ty)
            rows = my_m + gl.arange(0, HALF, layout=gl.SliceLayout(1, o.type.layout))
            cols = gl.arange(0, D, layout=gl.SliceLayout(0, o.type.layout))
            ptrs = Out + (seq_start + rows)[:, None].to(gl.int64) * stride_ol + h * stride_oh + cols[None, :]
            gl.store(ptrs, o, mask=(rows < seq_len)[:, None])
            if TRACE > 0:
                if n_traced < TRACE:
                    c_e = _clock(n_traced)
                    at = Trace + ((gl.program_id(0) * 2 + WG) * TRACE + n_traced) * 8
                    gl.store(at, c_a)
                    gl.store(at + 1, c_b)
                    gl.store(at + 2, c_c)
                    gl.store(at + 3, c_d)
                    gl.store(at + 4, c_e)
                    gl.store(at + 5, n_mine)
                    gl.store(at + 6, item)
                n_traced += 1


@gluon.jit
def _hstu_fwd_ws(q_desc, k_desc, v_desc, kc_desc, vc_desc, Out, offsets, aux, alpha, inv_n, n_items, NB, H, stride_ol,
                 stride_oh, Trace, PageTable, stride_pt, C: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                 OVERLAP: gl.constexpr, COALESCE: gl.constexpr, TRACE: gl.constexpr, CACHED: gl.constexpr,
                 PAGE: gl.constexpr = 0):
    """The full attention (aux: each user's targets), or with CACHED the cached one (offsets: the new rows',
    aux: the caches', kc/vc: the cache's K and V, k/v: the new rows'). PAGE > 0 (cached, paged): kc/vc are one
    layer's page pool [pages * PAGE, H, D], user b's cache tile at row r is read from page PageTable[b, r // PAGE]
    (only the producer changes), and aux holds cumulative cache lengths (only their differences are read)."""
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [4, HALF, D], q_desc.layout)  # 2 items x 2 halves
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # both consumer warpgroups release it
        mbarrier.arrive(q_empty.index(i), count=2)  # (free to start with)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)
        mbarrier.arrive(kv_empty.index(i), count=2)
    gl.warp_specialize([
        (_consumer, (Out, offsets, aux, q_smem, k_smem, v_smem, q_ready, q_empty, kv_ready, kv_empty, n_items, NB, H,
                     alpha, inv_n, stride_ol, stride_oh, Trace, 0, C, D, BLOCK_M, BLOCK_N, STAGES, OVERLAP,
                     COALESCE, TRACE, CACHED)),
        (_consumer, (Out, offsets, aux, q_smem, k_smem, v_smem, q_ready, q_empty, kv_ready, kv_empty, n_items, NB, H,
                     alpha, inv_n, stride_ol, stride_oh, Trace, 1, C, D, BLOCK_M, BLOCK_N, STAGES, OVERLAP,
                     COALESCE, TRACE, CACHED)),
        (_producer, (q_desc, k_desc, v_desc, kc_desc, vc_desc, offsets, aux, q_smem, k_smem, v_smem, q_ready, q_empty,
                     kv_ready, kv_empty, n_items, NB, H, PageTable, stride_pt, C, D, BLOCK_M, BLOCK_N, STAGES, CACHED,
                     PAGE)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# CONSUMER_REGS: the second consumer warpgroup's registers (setmaxnreg); the first takes what the launch's
# 168 x 384 leave after it and the producer's PRODUCER_REGS (x 128: a warpgroup's worth): 240 each at 240/24.
# (At 232 the consumers spilled 32 bytes under Triton 3.9's ptxas with contextual rows; 3.6's did not.)
WS_TILES = {"BLOCK_N": 64, "STAGES": 4, "CONSUMER_REGS": 240, "PRODUCER_REGS": 24, "OVERLAP": True, "COPRIME": True,
            "COALESCE": True}


@functools.lru_cache(maxsize=256)
def programs(n_items: int, NB: int, sms: int, contextual_len: int = 0, block_n: int = 64, coprime: bool = True) -> int:
    """Persistent CTAs (at most one per SM). CTA i takes items i, i + P, i + 2P, ...: with P a multiple of NB
    (the query blocks per (user, head)) it would take the same block of every user (N=512: NB=4 and P=132,
    a quarter of the CTAs every 8-tile block, another quarter every 2-tile one). `coprime`: P among the
    SM count and the 8 below it, the one whose most loaded CTA has the least work, counting each item's
    key tiles at full length plus 3 tiles for its prologue and store (ws_probe run 61's per-item trace).
    H200 (run 61), ms: N=512 0.370 (P=131) vs 0.550 (P=132); dlrm-v3 batch 16 (NB=34) 0.508 at P=132 vs
    0.550 at 131, which this model also ranks first. Cached per shape (a serving graph's are fixed)."""
    if n_items <= sms or not coprime:
        return min(sms, n_items)
    idx = torch.arange(n_items)
    r = idx % NB
    m = NB - 1 - r
    n_ctx = triton.cdiv(contextual_len, 128)
    if contextual_len:
        m = torch.where(r < n_ctx, r, NB - 1 - r + n_ctx)
    ends = torch.where(m < n_ctx, NB * 128, (m + 1) * 128)  # (contextual blocks see the whole history)
    work = (ends + block_n - 1) // block_n + 3
    best, best_load = sms, None
    for p in range(sms, max(1, sms - 8), -1):
        load = int(torch.bincount(idx % p, weights=work.double()).max())
        if best_load is None or load < best_load:
            best, best_load = p, load
    return best


def _launch(q, k, v, kc, vc, offsets, aux, out, max_seq_len, n_blocks, alpha, contextual_len, cached, config, trace,
            page_table=None, page=0):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    cfg = WS_TILES | (config or {})
    if cfg["BLOCK_N"] not in (32, 64) or (cached and cfg["BLOCK_N"] != HALF.value):
        # 128-key tiles gave wrong results on the H200 (run 53), not yet found why; the cached form's own-row
        # tiles are the query block's halves
        raise ValueError(f"gluon_ws: BLOCK_N {cfg['BLOCK_N']} is not a key tile checked on the GPU for this kernel "
                         f"(full: 32 or 64, cached: 64)")
    H, D = q.shape[1], q.shape[2]
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    descs = []
    for t, rows in ((q, HALF.value), (k, cfg["BLOCK_N"]), (v, cfg["BLOCK_N"]), (kc, cfg["BLOCK_N"]), (vc, cfg["BLOCK_N"])):
        layout = gl.NVMMASharedLayout.get_default_for([rows, D], gdt)
        descs.append(TensorDescriptor.from_tensor(t.view(t.shape[0], H * D), [rows, D], layout))
    n_items = n_blocks * (offsets.shape[0] - 1) * H
    grid = (programs(n_items, n_blocks, sm_count(q.device), contextual_len, cfg["BLOCK_N"], cfg["COPRIME"]),)
    _hstu_fwd_ws[grid](
        *descs, out, offsets, aux, alpha, 1.0 / max_seq_len, n_items, n_blocks, H, out.stride(0), out.stride(1),
        out if trace is None else trace, aux if page_table is None else page_table,
        0 if page_table is None else page_table.stride(0), C=0 if cached else contextual_len, D=D, BLOCK_M=128,
        BLOCK_N=cfg["BLOCK_N"], STAGES=cfg["STAGES"], CONSUMER_REGS=cfg["CONSUMER_REGS"],
        PRODUCER_REGS=cfg["PRODUCER_REGS"], OVERLAP=cfg["OVERLAP"], COALESCE=cfg["COALESCE"],
        TRACE=0 if trace is None else trace.shape[2], CACHED=cached, PAGE=page, num_warps=4)
    return out


def launch_ws(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, num_targets: torch.Tensor,
              out: torch.Tensor, max_seq_len: int, alpha: float, contextual_len: int, config: dict | None = None,
              trace: torch.Tensor | None = None):
    """out [L, H, 128] = the full attention (no window), one persistent CTA per SM. For the launches
    triton.takes_ws picks (bf16: its 1/N comes after P @ V, which could overflow fp16's P; head dim 128;
    one key split; a Hopper GPU). `trace`: int64 [CTAs, 2, items, 8], filled as _consumer's TRACE says."""
    return _launch(q, k, v, k, v, offsets, num_targets, out, max_seq_len, triton.cdiv(max_seq_len, 128), alpha,
                   contextual_len, False, config, trace)


def launch_cached_ws(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta_offsets: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, cache_offsets: torch.Tensor, out: torch.Tensor,
                     max_seq_len: int, alpha: float, max_delta_len: int, config: dict | None = None,
                     trace: torch.Tensor | None = None):
    """out [Ld, H, 128] = the cached attention (no window): each new row (q/k/v) against its user's cache and
    itself, 128 new rows per work item (triton.takes_cached_ws picks the launches)."""
    return _launch(q, k, v, k_cache, v_cache, delta_offsets, cache_offsets, out, max_seq_len,
                   triton.cdiv(max_delta_len, 128), alpha, 0, True, config, trace)


def launch_cached_paged_ws(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta_offsets: torch.Tensor,
                           k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor,
                           cache_lens: torch.Tensor, out: torch.Tensor, max_seq_len: int, alpha: float,
                           max_delta_len: int, config: dict | None = None):
    """launch_cached_ws with each user's cache read through its page table: k_pages / v_pages one layer's pool
    [pages, page_rows, H, 128] (page_rows a multiple of the 64-row key tile), page_table [B, max_pages] int32."""
    page = k_pages.shape[1]
    assert page % HALF.value == 0, f"page_rows {page} must be a multiple of the key tile {HALF.value}"
    cum = torch.nn.functional.pad(cache_lens.to(torch.int64).cumsum(0), (1, 0))  # (the kernel reads differences)
    return _launch(q, k, v, k_pages.flatten(0, 1), v_pages.flatten(0, 1), delta_offsets, cum, out, max_seq_len,
                   triton.cdiv(max_delta_len, 128), alpha, 0, True, config, None, page_table, page)


def compile_sm90(contextual_len: int = 4, config: dict | None = None, cached: bool = False, page: int = 0):
    """Build the kernel for sm_90 without a GPU (ptxas from Triton's wheel): the CPU-side check that it
    compiles, fits shared memory and keeps its registers (tests/ops/test_hstu_attention_triton.py)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    cfg = WS_TILES | (config or {})
    D = 128
    x = torch.empty(256, 4 * D, dtype=torch.bfloat16)
    sig = {name: mangle_type(TensorDescriptor.from_tensor(x, [rows, D], gl.NVMMASharedLayout.get_default_for(
        [rows, D], gl.bfloat16))) for name, rows in (("q_desc", HALF.value), ("k_desc", cfg["BLOCK_N"]),
                                                      ("v_desc", cfg["BLOCK_N"]), ("kc_desc", cfg["BLOCK_N"]),
                                                      ("vc_desc", cfg["BLOCK_N"]))}
    sig |= {"Out": "*bf16", "offsets": "*i64", "aux": "*i64", "alpha": "fp32", "inv_n": "fp32", "n_items": "i32",
            "NB": "i32", "H": "i32", "stride_ol": "i32", "stride_oh": "i32", "Trace": "*i64", "PageTable": "*i32",
            "stride_pt": "i32"}
    const = {"C": contextual_len, "D": D, "BLOCK_M": 128, "BLOCK_N": cfg["BLOCK_N"], "STAGES": cfg["STAGES"],
             "CONSUMER_REGS": cfg["CONSUMER_REGS"], "PRODUCER_REGS": cfg["PRODUCER_REGS"], "OVERLAP": cfg["OVERLAP"], "COALESCE": cfg["COALESCE"],
             "TRACE": cfg.get("TRACE", 0), "CACHED": cached, "PAGE": page}
    names = _hstu_fwd_ws.arg_names
    sig |= dict.fromkeys(const, "constexpr")
    src = GluonASTSource(_hstu_fwd_ws, signature={n: sig[n] for n in names},
                         constexprs={(names.index(k),): v for k, v in const.items()},
                         attrs={(names.index(n),): [["tt.divisibility", 16]]
                                for n in ("Out", "offsets", "aux", "stride_ol", "stride_oh")})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
