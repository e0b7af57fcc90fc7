"""The plugin's attention kernel (Triton), on the engine contract's padded layout: q/k/v [B, n, H, d]
with n = C + Nh + Nc rows per user ([contextual][history padded to Nh][candidates padded to Nc]). It
builds HSTU.md's mask from the lengths (no [B, n, n] mask tensor) and writes padding rows as 0.

compile.py compiles this source to cubins ahead of time; tests run it in Triton's interpreter. Imported
only there (it needs triton and hstu-opt's shared Triton pieces): the plugin's run time does not.

Row r of a user maps to its position in the unpadded sequence: r itself for contextual and history slots,
C + hl + (r - C - Nh) for candidate slots. Keys are only ever the C + hl contextual and valid history
rows (contiguous from row 0): targets see history and themselves, never each other, so a target's own
(diagonal) term is added apart, as a row-wise dot.
"""

import triton
import triton.language as tl

from hstu_opt.ops._triton import mma, silu

from . import spec


@triton.jit
def _ids(pos, hist_end, C):
    """reference.row_ids: contextual 0, history 1.., every target the first target's id."""
    return tl.where(pos < C, 0, tl.minimum(pos, hist_end) - C + 1)


@triton.jit
def _sees(pos_m, id_m, offs_n, hist_end, C, window, min_full):
    """HSTU.md's mask in its order for query rows (positions pos_m, ids id_m) and key rows offs_n (all
    contextual or history, position = row): itself or an earlier id; with a window only ids at most
    `window` back unless id_m >= hi - min_full; then contextual rows see contextual + history."""
    id_n = _ids(offs_n, hist_end, C)
    d = id_m[:, None] - id_n[None, :]
    sees = (pos_m[:, None] == offs_n[None, :]) | (d > 0)
    if window > 0:
        hi = hist_end - C + 1
        sees = sees & ((d <= window) | ((min_full > 0) & (id_m >= hi - min_full))[:, None])
    sees = sees | ((pos_m < C)[:, None] & (offs_n < hist_end)[None, :])
    return sees & (offs_n < hist_end)[None, :]


@triton.jit
def _tile(X, base, rows, row_ok, stride_r, D: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(X + base + rows[:, None] * stride_r + offs_d[None, :],
                   mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _scores(s, alpha, inv_n, FAST: tl.constexpr):
    return silu(s * alpha, FAST) * inv_n  # 1/N before P is rounded (fp16's P could overflow without it)


@triton.jit
def hstu_attention_padded(Q, K, V, Out, HistLen, NumCand, HistWidth, alpha, inv_n, n, H, C, window, min_full,
                          has_targets, len_step, DQK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                          IEEE: tl.constexpr, FAST: tl.constexpr):
    """Program (m, b*H + h): query rows [m*BLOCK_M, (m+1)*BLOCK_M) of user b, head h, into Out."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (latest) query blocks first
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hl = tl.load(HistLen + b * len_step)
    nc = tl.load(NumCand + b * len_step)
    nc = tl.where(has_targets != 0, nc, 0)
    nh = tl.load(HistWidth)
    hist_end = C + hl  # also the number of key rows (contextual + valid history)
    cand_slot = C + nh  # first candidate slot
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    is_cand = offs_m >= cand_slot
    pos_m = tl.where(is_cand, offs_m - nh + hl, offs_m)
    valid = (offs_m < C) | (~is_cand & (offs_m < hist_end)) | (is_cand & (offs_m - cand_slot < nc))
    valid = valid & (offs_m < n)
    id_m = _ids(pos_m, hist_end, C)
    sq, sk, sv = H * DQK, H * DQK, H * DV  # row strides of contiguous [B, n, H, d]
    q_base = b.to(tl.int64) * n * sq + h * DQK
    v_base = b.to(tl.int64) * n * sv + h * DV
    q = _tile(Q, q_base, offs_m, valid, sq, DQK, BLOCK_DQK)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    start_m = pid_m * BLOCK_M
    any_valid = tl.max(valid.to(tl.int32), axis=0) > 0
    wide = (start_m < C) | (start_m + BLOCK_M > cand_slot)  # contextual or candidate rows: all keys
    end_n = tl.where(wide, hist_end, tl.minimum(start_m + BLOCK_M, hist_end))
    end_n = tl.where(any_valid, end_n, 0)
    # keys below free_n are seen by every valid row of the block (no window): no mask work there
    free_n = tl.where(window > 0, 0, (tl.minimum(start_m, hist_end) // BLOCK_N) * BLOCK_N)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hist_end
        k = _tile(K, q_base, offs_n, n_ok, sk, DQK, BLOCK_DQK)
        p = _scores(mma(q, tl.trans(k), IEEE), alpha, inv_n, FAST)
        if start_n + BLOCK_N > free_n:
            p = tl.where(_sees(pos_m, id_m, offs_n, hist_end, C, window, min_full), p, 0.0)
        v = _tile(V, v_base, offs_n, n_ok, sv, DV, BLOCK_DV)
        acc += mma(p.to(v.dtype), v, IEEE)
    if start_m + BLOCK_M > cand_slot:  # targets' own term
        own = valid & is_cand
        k_self = _tile(K, q_base, offs_m, own, sk, DQK, BLOCK_DQK)
        v_self = _tile(V, v_base, offs_m, own, sv, DV, BLOCK_DV)
        p_self = _scores(tl.sum(q.to(tl.float32) * k_self.to(tl.float32), axis=1), alpha, inv_n, FAST)
        acc += p_self[:, None] * v_self.to(tl.float32)
    acc = tl.where(valid[:, None], acc, 0.0)
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(Out + v_base + offs_m[:, None] * sv + offs_dv[None, :], acc.to(Out.dtype.element_ty),
             mask=(offs_m < n)[:, None] & (offs_dv[None, :] < DV))


def launch(q, k, v, out, hist_lengths, num_candidates, history_width, attrs, interpret: bool = False):
    """Launch through Triton's own launcher (torch tensors; the tests run it in the interpreter) with the
    same arguments runtime.py passes to the cubin."""
    import torch

    B, n, H, d = q.shape
    dtype = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}[str(q.dtype)]
    step = 2 if hist_lengths.element_size() == 8 else 1
    i32 = [t.view(-1).view(dtype=torch.int32) for t in (hist_lengths, num_candidates, history_width)]
    c = spec.constexprs(dtype, d, interpret)
    t = spec.tiles(dtype)
    hstu_attention_padded[spec.grid(B, n, H, c["BLOCK_M"])](
        q, k, v, out, *i32, *spec.scalar_args(attrs, n, H, step), **c, num_warps=t["num_warps"],
        num_stages=t["num_stages"])
    return out
