"""Triton HSTU attention over jagged q/k/v (values + offsets): full (causal + targets + contextual +
window) and cached (delta rows against a user's K/V cache plus themselves).

Both are torch.library.triton_op custom ops (kernels launched through wrap_triton) with fake
implementations, so torch.export sees one node and AOTInductor compiles the kernels into its package.

Work is scheduled by actual length: the grid covers the recipe's static N (no data-dependent launch
size, so the op exports), and programs past their own sequence's end exit at once; within a sequence a
query block only visits the key blocks its mask can reach. Head dims need not be powers of two (50,
100, ...): the kernel pads to the next power of two with masked loads; callers never pad.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from hstu_opt.ops._registry import Impl
from hstu_opt.ops._triton import fast_math, mma, silu, tanh_approx, unit_stride
from hstu_opt.ops.hstu_attention import TABLE


@triton.jit
def _row_ids(pos, hist_end, C: tl.constexpr):
    """Same definition as reference.row_ids: contextual 0, history 1.., every target the first target's id."""
    return tl.where(pos < C, 0, tl.minimum(pos, hist_end) - C + 1)


@triton.jit
def _pointwise(s, alpha, inv_n, FAST: tl.constexpr):
    """SiLU(alpha * s) / N (FAST: the one-tanh.approx SiLU of ops/_triton.py, with 1/N folded in before
    the last multiply-add): the pointwise part, not the tensor cores, bounds this kernel."""
    alpha = tl.cast(alpha, tl.float32)  # Inductor passes Python floats as fp64 (eager Triton as fp32): fp64
    inv_n = tl.cast(inv_n, tl.float32)  # here turned the inline asm's input and the bf16 casts into NaN
    if FAST:
        h = s * (0.5 * alpha)
        t = tanh_approx(h)
        hn = h * inv_n
        return hn + hn * t
    return silu(s * alpha, False) * inv_n


@triton.jit
def _hstu_fwd(Q, K, V, Out, offsets, num_targets, alpha, inv_n, split_len,
              stride_ql, stride_qh, stride_kl, stride_kh, stride_vl, stride_vh, stride_os, stride_ol, stride_oh,
              H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, WINDOW: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
              IEEE: tl.constexpr, FAST: tl.constexpr, LONGEST_FIRST: tl.constexpr):
    """Program (m, b*H+h, s): query block m of user b, head h, over keys [s*split_len, (s+1)*split_len)
    into Out[s] (one split: Out is the output; more: float32 partials that add up, no softmax to rescale).
    LONGEST_FIRST (the default): query blocks run last-first, since causal blocks near a sequence's end
    carry the most keys and starting those first keeps them off the launch's tail (what a batch-1 launch
    with key splits needs). On the H200 (runs 11-12, this order and the split bounds) batch 1 went
    0.535 -> 0.32 ms for 4 layers, but N=4096 measured 460 TFLOP/s against 479-492 in runs 6-9 and
    batch 16 gained nothing; benchmarks/attention_order_ab.py is the A/B (False: natural order) that
    tells whether the order costs that, not yet run for lack of device time.
    Tried and reverted (run 13): a contextual block 0 scheduled first, with a row-mask loop for its
    look-ahead over the history: no gain at C=4 (0.73 vs 0.74 ms at dlrm-v3 batch 16), 12% slower at C=0."""
    if LONGEST_FIRST:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
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
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_valid = offs_m < seq_len
    q = tl.load(Q + (seq_start + offs_m)[:, None] * stride_ql + h * stride_qh + offs_dqk[None, :],
                mask=m_valid[:, None] & (offs_dqk[None, :] < DQK), other=0.0)
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
    for start_n in range(lo, tl.minimum(free_n, hi), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K + (seq_start + offs_n)[:, None] * stride_kl + h * stride_kh + offs_dqk[None, :],
                    mask=offs_dqk[None, :] < DQK, other=0.0)  # [BLOCK_N, BLOCK_DQK]
        p = _pointwise(mma(q, tl.trans(k), IEEE), alpha, inv_n, FAST)
        v = tl.load(V + (seq_start + offs_n)[:, None] * stride_vl + h * stride_vh + offs_dv[None, :],
                    mask=offs_dv[None, :] < DV, other=0.0)
        acc += mma(p.to(v.dtype), v, IEEE)
    end_n = tl.minimum(seq_len, start_m + BLOCK_M)
    if start_m < C:
        end_n = tl.maximum(end_n, hist_end)
    for start_n in range(tl.maximum(free_n, lo), tl.minimum(end_n, hi), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < seq_len
        k = tl.load(K + (seq_start + offs_n)[:, None] * stride_kl + h * stride_kh + offs_dqk[None, :],
                    mask=n_valid[:, None] & (offs_dqk[None, :] < DQK), other=0.0)
        p = _pointwise(mma(q, tl.trans(k), IEEE), alpha, inv_n, FAST)
        id_n = _row_ids(offs_n, hist_end, C)
        earlier = id_m[:, None] > id_n[None, :]
        if WINDOW > 0:
            earlier = earlier & ((id_m[:, None] - id_n[None, :] <= WINDOW) | (id_n[None, :] == 0))
        sees = (offs_m[:, None] == offs_n[None, :]) | earlier | (ctx_m[:, None] & (offs_n[None, :] < hist_end))
        p = tl.where(sees & m_valid[:, None] & n_valid[None, :], p, 0.0)
        v = tl.load(V + (seq_start + offs_n)[:, None] * stride_vl + h * stride_vh + offs_dv[None, :],
                    mask=n_valid[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc += mma(p.to(v.dtype), v, IEEE)
    tl.store(Out + pid_s * stride_os + (seq_start + offs_m)[:, None] * stride_ol + h * stride_oh + offs_dv[None, :],
             acc.to(Out.dtype.element_ty), mask=m_valid[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _hstu_cached_fwd(Q, K, V, KC, VC, Out, delta_offsets, cache_offsets, alpha, inv_n, split_len,
                     stride_ql, stride_qh, stride_kl, stride_kh, stride_vl, stride_vh,
                     stride_kcl, stride_kch, stride_vcl, stride_vch, stride_os, stride_ol, stride_oh,
                     H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, WINDOW: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                     IEEE: tl.constexpr, FAST: tl.constexpr):
    """Program (m, b*H+h, s) adds the contribution of cache keys [s*split_len, (s+1)*split_len) to a float32
    partial Out[s]; split 0 also adds each row's own (diagonal) term. No softmax: partials just add."""
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
    c_start = tl.load(cache_offsets + b)
    c_len = tl.load(cache_offsets + b + 1) - c_start  # = hist_end: every new row is a target
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_valid = offs_m < d_len
    qmask = m_valid[:, None] & (offs_dqk[None, :] < DQK)
    vmask = m_valid[:, None] & (offs_dv[None, :] < DV)
    q = tl.load(Q + (d_start + offs_m)[:, None] * stride_ql + h * stride_qh + offs_dqk[None, :], mask=qmask, other=0.0)
    # Its own row (the diagonal): a row-wise dot, no cache involved.
    k_self = tl.load(K + (d_start + offs_m)[:, None] * stride_kl + h * stride_kh + offs_dqk[None, :], mask=qmask, other=0.0)
    v_self = tl.load(V + (d_start + offs_m)[:, None] * stride_vl + h * stride_vh + offs_dv[None, :], mask=vmask, other=0.0)
    p_self = _pointwise(tl.sum(q.to(tl.float32) * k_self.to(tl.float32), axis=1), alpha, inv_n, FAST)
    acc = tl.where(pid_s == 0, p_self[:, None] * v_self.to(tl.float32), 0.0)
    id_m = c_len - C + 1  # every target's id
    lo = pid_s * split_len
    hi = tl.minimum(c_len, lo + split_len)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        k = tl.load(KC + (c_start + offs_n)[:, None] * stride_kcl + h * stride_kch + offs_dqk[None, :],
                    mask=n_valid[:, None] & (offs_dqk[None, :] < DQK), other=0.0)
        p = _pointwise(mma(q, tl.trans(k), IEEE), alpha, inv_n, FAST)
        sees = n_valid[None, :] & m_valid[:, None]
        if WINDOW > 0:
            id_n = tl.where(offs_n < C, 0, offs_n - C + 1)
            sees = sees & ((id_m - id_n[None, :] <= WINDOW) | (id_n[None, :] == 0))
        p = tl.where(sees, p, 0.0)
        v = tl.load(VC + (c_start + offs_n)[:, None] * stride_vcl + h * stride_vch + offs_dv[None, :],
                    mask=n_valid[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc += mma(p.to(v.dtype), v, IEEE)
    tl.store(Out + pid_s * stride_os + (d_start + offs_m)[:, None] * stride_ol + h * stride_oh + offs_dv[None, :],
             acc, mask=vmask)


def _blocks(dqk: int, dv: int, dtype: torch.dtype) -> dict:
    """Block sizes. 16-bit, head dim <= 128: 64x64 tiles, 4 warps, 3 stages measured best on the H200
    (benchmarks/results/gpu_hstu_2026-11-29_run6.json sweep, tanh SiLU: 0.675 of the matmul rate at
    N=4096 vs 0.666 for 128x64 / 8 warps; 0.296 vs 0.248 at N=512). Wider heads and fp32 (the checking
    path) take smaller tiles to fit."""
    bdqk, bdv = max(16, triton.next_power_of_2(dqk)), max(16, triton.next_power_of_2(dv))
    if max(bdqk, bdv) >= 256 or dtype == torch.float32:
        tiles = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    else:
        tiles = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {**tiles, "BLOCK_DQK": bdqk, "BLOCK_DV": bdv, "IEEE": dtype == torch.float32,
            "FAST": fast_math(dtype)}


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
               config: dict | None = None) -> Tensor:
    """Launch the full kernel into `out`: [L, H, dv] for one key split, float32 partials [S, L, H, dv]
    for S splits (their sum is the result). The GPU check passes a NaN-poisoned out; the benchmark
    sweeps `config` (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    L, H, dqk = q.shape
    dv = v.shape[-1]
    splits = out.shape[0] if out.dim() == 4 else 1
    cfg = _blocks(dqk, dv, q.dtype) | {"LONGEST_FIRST": True} | (config or {})
    split_len = triton.cdiv(triton.cdiv(max_seq_len, splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    so, sl, sh = (out.stride(0), out.stride(1), out.stride(2)) if out.dim() == 4 else (0, out.stride(0), out.stride(1))
    grid = (triton.cdiv(max_seq_len, cfg["BLOCK_M"]), (offsets.shape[0] - 1) * H, splits)
    launcher(_hstu_fwd)[grid](
        q, k, v, out, offsets, num_targets, alpha, 1.0 / max_seq_len, split_len,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), so, sl, sh,
        H=H, DQK=dqk, DV=dv, C=contextual_len, WINDOW=max_attn_len, **cfg,
    )
    return out


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, num_targets: Tensor, max_seq_len: int, alpha: float,
                  contextual_len: int, max_attn_len: int, launcher=lambda kernel: kernel,
                  splits: int | None = None) -> Tensor:
    """The full attention: one launch straight into the output, or (`splits` > 1, by default
    fwd_splits) into float32 partials summed after."""
    cfg = _blocks(q.shape[-1], v.shape[-1], q.dtype)
    if splits is None:
        splits = fwd_splits((offsets.shape[0] - 1) * q.shape[1], max_seq_len, cfg["BLOCK_M"], cfg["BLOCK_N"])
    if splits == 1:
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        return launch_fwd(q, k, v, offsets, num_targets, out, max_seq_len, alpha, contextual_len, max_attn_len, launcher)
    partials = q.new_empty(splits, q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float32)
    launch_fwd(q, k, v, offsets, num_targets, partials, max_seq_len, alpha, contextual_len, max_attn_len, launcher)
    return partials.sum(0).to(q.dtype)


@triton_op("hstu_opt::hstu_attention_triton", mutates_args=())
def hstu_attention_triton(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, num_targets: Tensor, max_seq_len: int,
                          alpha: float, contextual_len: int, max_attn_len: int) -> Tensor:
    return attention_fwd(q, k, v, offsets, num_targets, max_seq_len, alpha, contextual_len, max_attn_len, wrap_triton)


@hstu_attention_triton.register_fake
def _(q, k, v, offsets, num_targets, max_seq_len, alpha, contextual_len, max_attn_len):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


def cache_splits(max_seq_len: int, programs: int, block_n: int) -> tuple[int, int]:
    """(splits, keys per split): enough programs to fill a large GPU (~264) even for one user, never
    fewer than 4 key blocks per split. Static in the shapes, so the op still exports."""
    most = max(1, triton.cdiv(max_seq_len, 4 * block_n))
    splits = max(1, min(most, triton.cdiv(SLOTS, max(programs, 1))))
    return splits, triton.cdiv(triton.cdiv(max_seq_len, splits), block_n) * block_n


def launch_cached(q: Tensor, k: Tensor, v: Tensor, delta_offsets: Tensor, k_cache: Tensor, v_cache: Tensor,
                  cache_offsets: Tensor, out: Tensor, max_seq_len: int, alpha: float, contextual_len: int,
                  max_attn_len: int, max_delta_len: int, launcher=lambda kernel: kernel) -> Tensor:
    """Launch into the float32 partials `out` [splits, Ld, H, dv] (see cached_partials_shape); sum(0) is the result."""
    L, H, dqk = q.shape
    dv = v.shape[-1]
    cfg = _blocks(dqk, dv, q.dtype)
    m_blocks = triton.cdiv(max_delta_len, cfg["BLOCK_M"])
    splits, split_len = cache_splits(max_seq_len, m_blocks * (delta_offsets.shape[0] - 1) * H, cfg["BLOCK_N"])
    assert out.shape[0] == splits, "allocate out with cached_partials_shape"
    launcher(_hstu_cached_fwd)[(m_blocks, (delta_offsets.shape[0] - 1) * H, splits)](
        q, k, v, k_cache, v_cache, out, delta_offsets, cache_offsets, alpha, 1.0 / max_seq_len, split_len,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        H=H, DQK=dqk, DV=dv, C=contextual_len, WINDOW=max_attn_len, **cfg,
    )
    return out


def cached_partials_shape(q: Tensor, v: Tensor, delta_offsets: Tensor, max_seq_len: int, max_delta_len: int) -> tuple:
    cfg = _blocks(q.shape[-1], v.shape[-1], q.dtype)
    programs = triton.cdiv(max_delta_len, cfg["BLOCK_M"]) * (delta_offsets.shape[0] - 1) * q.shape[1]
    return (cache_splits(max_seq_len, programs, cfg["BLOCK_N"])[0], q.shape[0], q.shape[1], v.shape[-1])


@triton_op("hstu_opt::cached_hstu_attention_triton", mutates_args=())
def cached_hstu_attention_triton(q: Tensor, k: Tensor, v: Tensor, delta_offsets: Tensor, k_cache: Tensor,
                                 v_cache: Tensor, cache_offsets: Tensor, max_seq_len: int, alpha: float,
                                 contextual_len: int, max_attn_len: int, max_delta_len: int) -> Tensor:
    partials = q.new_empty(cached_partials_shape(q, v, delta_offsets, max_seq_len, max_delta_len), dtype=torch.float32)
    launch_cached(q, k, v, delta_offsets, k_cache, v_cache, cache_offsets, partials, max_seq_len, alpha,
                  contextual_len, max_attn_len, max_delta_len, wrap_triton)
    return partials.sum(0).to(q.dtype)


@cached_hstu_attention_triton.register_fake
def _(q, k, v, delta_offsets, k_cache, v_cache, cache_offsets, max_seq_len, alpha, contextual_len, max_attn_len,
      max_delta_len):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


@TABLE.register(Impl.TRITON, "hstu_attention")
def _hstu_attention(q, k, v, offsets, num_targets, max_seq_len, alpha, contextual_len, max_attn_len):
    if num_targets is None:
        num_targets = torch.zeros(offsets.shape[0] - 1, dtype=offsets.dtype, device=offsets.device)
    q, k, v = (unit_stride(t) for t in (q, k, v))
    return hstu_attention_triton(q, k, v, offsets, num_targets, max_seq_len, alpha, contextual_len, max_attn_len)


@TABLE.register(Impl.TRITON, "cached_hstu_attention")
def _cached(q, k, v, delta_offsets, k_cache, v_cache, cache_offsets, max_seq_len, alpha, contextual_len, max_attn_len,
            max_delta_len):
    q, k, v, k_cache, v_cache = (unit_stride(t) for t in (q, k, v, k_cache, v_cache))
    return cached_hstu_attention_triton(q, k, v, delta_offsets, k_cache, v_cache, cache_offsets, max_seq_len, alpha,
                                        contextual_len, max_attn_len, max_delta_len)
