"""Experimental: the full HSTU attention as a warp-specialized Gluon kernel for Hopper (sm_90).

Why: Nsight Compute (run 40) shows the Triton kernel bound by the L2 -> SM traffic of its K/V tiles
(L2 85-87% busy at N=512 and N=4096): every 64-row query block reads its keys again. Here one CTA
takes 128-row query blocks whose two 64-row halves are two consumer warpgroups in their own
partitions, sharing each K/V tile (half the traffic per flop) without barriers between them; a
one-warp producer partition issues the TMA loads into a ring of shared-memory stages, running ahead
across work items, so a short item's loads are in flight while the previous one computes. The
CTAs are persistent (one per SM), walking the items (query block, user, head) round-robin, each
user's blocks longest first.

Same math as triton._hstu_fwd (POST_SCALE, FAST tanh SiLU, the mask of HSTU.md); real launches only
(bf16, head dim 128, one key split, no window), never traced: triton.launch_fwd picks them (takes_ws).
H200 (benchmarks/ws_probe.py, runs 53-54): correct against float64 with 32- and 64-key tiles (128-key
tiles were not, and are refused); faster than the Triton kernel at dlrm-v3 batch 16 only (triton.FWD_FLAGS
has the numbers). Open: per-item scalar loads in both consumers, no overlap of the next Q K^T with P V.
"""

from __future__ import annotations

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
def _item(item, offsets, NB, H, C: gl.constexpr, BLOCK_M: gl.constexpr):
    """(user, head, the user's first row and length, the query block's first row) of work item `item`:
    each (user, head)'s blocks adjacent (their K/V stay in L2), longest first, blocks holding contextual
    rows before those. Producer and consumers walk the same items."""
    bh = item // NB
    r = item % NB
    m = NB - 1 - r
    if C > 0:
        n_ctx: gl.constexpr = (C + BLOCK_M - 1) // BLOCK_M
        m = gl.where(r < n_ctx, r, NB - 1 - r + n_ctx)
    b = bh // H
    seq_start = gl.load(offsets + b).to(gl.int32)
    return b, bh % H, seq_start, gl.load(offsets + b + 1).to(gl.int32) - seq_start, m * BLOCK_M


@gluon.jit
def _history(num_targets, b, start_m, seq_len, BLOCK_M: gl.constexpr, C: gl.constexpr):
    """(end of the user's history, end of the keys the item's query block sees)."""
    hist_end = seq_len - gl.load(num_targets + b).to(gl.int32)
    return hist_end, _key_end(start_m, seq_len, hist_end, BLOCK_M, C)


@gluon.jit
def _key_end(start_m, seq_len, hist_end, rows, C: gl.constexpr):
    """End of the keys rows [start_m, start_m + rows) see (contextual rows see the whole history)."""
    end = gl.minimum(seq_len, start_m + rows)
    if C > 0:
        end = gl.where(start_m < C, gl.maximum(end, hist_end), end)
    return end


@gluon.jit
def _producer(q_desc, k_desc, v_desc, offsets, num_targets, q_smem, k_smem, v_smem, q_ready, q_empty, kv_ready,
              kv_empty, n_items, NB, H, C: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    kv_i = 0
    q_i = 0
    for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
        b, h, seq_start, seq_len, start_m = _item(item, offsets, NB, H, C, BLOCK_M)
        if start_m < seq_len:
            hist_end, end_n = _history(num_targets, b, start_m, seq_len, BLOCK_M, C)
            qb = q_i % 2
            mbarrier.wait(q_empty.index(qb), (q_i // 2) & 1)
            mbarrier.expect(q_ready.index(qb), 2 * q_desc.block_type.nbytes)
            _tma_load(q_desc, [seq_start + start_m, h * D], q_ready.index(qb),
                                            q_smem.index(2 * qb))
            _tma_load(q_desc, [seq_start + start_m + HALF, h * D], q_ready.index(qb),
                                            q_smem.index(2 * qb + 1))
            q_i += 1
            for start_n in range(0, end_n, BLOCK_N):
                s = kv_i % STAGES
                mbarrier.wait(kv_empty.index(s), (kv_i // STAGES) & 1)
                mbarrier.expect(kv_ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
                _tma_load(k_desc, [seq_start + start_n, h * D], kv_ready.index(s), k_smem.index(s))
                _tma_load(v_desc, [seq_start + start_n, h * D], kv_ready.index(s), v_smem.index(s))
                kv_i += 1


@gluon.jit
def _consumer(Out, offsets, num_targets, q_smem, k_smem, v_smem, q_ready, q_empty, kv_ready, kv_empty, n_items, NB,
              H, alpha, inv_n, stride_ol, stride_oh, WG: gl.constexpr, C: gl.constexpr, D: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Rows [WG*64, WG*64 + 64) of every 128-row query block: S = Q K^T (Q in registers), SiLU, mask,
    acc += P V, each K/V stage released once this warpgroup is done with it."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    q_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    half_alpha = alpha * 0.5
    kv_i = 0
    q_i = 0
    for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
        b, h, seq_start, seq_len, start_m = _item(item, offsets, NB, H, C, BLOCK_M)
        if start_m < seq_len:
            hist_end, end_n = _history(num_targets, b, start_m, seq_len, BLOCK_M, C)
            my_m = start_m + WG * HALF
            my_end = gl.where(my_m < seq_len, _key_end(my_m, seq_len, hist_end, HALF, C), 0)
            free_n = (gl.minimum(my_m, hist_end) // BLOCK_N) * BLOCK_N  # keys every row of this half sees
            qb = q_i % 2
            mbarrier.wait(q_ready.index(qb), (q_i // 2) & 1)
            q = q_smem.index(2 * qb + WG).load(q_layout)
            mbarrier.arrive(q_empty.index(qb), count=1)
            q_i += 1
            offs_m = my_m + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))
            id_m = gl.where(offs_m < C, 0, gl.minimum(offs_m, hist_end) - C + 1)
            ctx_m = offs_m < C
            m_ok = offs_m < seq_len
            acc = gl.zeros([HALF, D], gl.float32, o_layout)
            for start_n in range(0, end_n, BLOCK_N):
                s = kv_i % STAGES
                mbarrier.wait(kv_ready.index(s), (kv_i // STAGES) & 1)
                if start_n < my_end:
                    sc = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), gl.zeros([HALF, BLOCK_N], gl.float32, s_layout),
                                       use_acc=False, is_async=True)
                    sc = warpgroup_mma_wait(num_outstanding=0, deps=(sc,))
                    hh = sc * half_alpha
                    p = hh + hh * _tanh(hh)
                    if start_n + BLOCK_N > free_n:  # the diagonal, targets' own block, contextual look-ahead
                        offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
                        id_n = gl.where(offs_n < C, 0, gl.minimum(offs_n, hist_end) - C + 1)
                        sees = ((offs_m[:, None] == offs_n[None, :]) | (id_m[:, None] > id_n[None, :])
                                | (ctx_m[:, None] & (offs_n[None, :] < hist_end)))
                        sees = sees & m_ok[:, None] & (offs_n < seq_len)[None, :]
                        p = gl.where(sees, p, 0.0)
                    pv = gl.convert_layout(p.to(q_smem.dtype), p_layout)
                    acc = warpgroup_mma(pv, v_smem.index(s), acc, is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(kv_empty.index(s), count=1)
                kv_i += 1
            acc = acc * inv_n
            rows = my_m + gl.arange(0, HALF, layout=gl.SliceLayout(1, o_layout))
            cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
            ptrs = Out + (seq_start + rows)[:, None].to(gl.int64) * stride_ol + h * stride_oh + cols[None, :]
            gl.store(ptrs, acc.to(Out.dtype.element_ty), mask=(rows < seq_len)[:, None])


@gluon.jit
def _hstu_fwd_ws(q_desc, k_desc, v_desc, Out, offsets, num_targets, alpha, inv_n, n_items, NB, H, stride_ol, stride_oh,
                 C: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr):
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
        (_consumer, (Out, offsets, num_targets, q_smem, k_smem, v_smem, q_ready, q_empty, kv_ready, kv_empty, n_items,
                     NB, H, alpha, inv_n, stride_ol, stride_oh, 0, C, D, BLOCK_M, BLOCK_N, STAGES)),
        (_consumer, (Out, offsets, num_targets, q_smem, k_smem, v_smem, q_ready, q_empty, kv_ready, kv_empty, n_items,
                     NB, H, alpha, inv_n, stride_ol, stride_oh, 1, C, D, BLOCK_M, BLOCK_N, STAGES)),
        (_producer, (q_desc, k_desc, v_desc, offsets, num_targets, q_smem, k_smem, v_smem, q_ready, q_empty, kv_ready,
                     kv_empty, n_items, NB, H, C, D, BLOCK_M, BLOCK_N, STAGES)),
    ], [4, 1], [CONSUMER_REGS, 24])


WS_TILES = {"BLOCK_N": 64, "STAGES": 3, "CONSUMER_REGS": 232}


def launch_ws(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, num_targets: torch.Tensor,
              out: torch.Tensor, max_seq_len: int, alpha: float, contextual_len: int, config: dict | None = None):
    """out [L, H, 128] = the full attention (no window), one persistent CTA per SM. For the launches
    triton.takes_ws picks (bf16: its 1/N comes after P @ V, which could overflow fp16's P; head dim 128;
    one key split; a Hopper GPU)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    cfg = WS_TILES | (config or {})
    if cfg["BLOCK_N"] not in (32, 64):  # 128-key tiles gave wrong results on the H200 (run 53), not yet found why
        raise ValueError(f"gluon_ws: BLOCK_N {cfg['BLOCK_N']} is not one of the key tiles checked on the GPU (32, 64)")
    L, H, D = q.shape
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    descs = []
    for t, rows in ((q, HALF.value), (k, cfg["BLOCK_N"]), (v, cfg["BLOCK_N"])):
        layout = gl.NVMMASharedLayout.get_default_for([rows, D], gdt)
        descs.append(TensorDescriptor.from_tensor(t.view(L, H * D), [rows, D], layout))
    NB = triton.cdiv(max_seq_len, 128)
    n_items = NB * (offsets.shape[0] - 1) * H
    _hstu_fwd_ws[(min(sm_count(q.device), n_items),)](
        *descs, out, offsets, num_targets, alpha, 1.0 / max_seq_len, n_items, NB, H, out.stride(0), out.stride(1),
        C=contextual_len, D=D, BLOCK_M=128, BLOCK_N=cfg["BLOCK_N"], STAGES=cfg["STAGES"],
        CONSUMER_REGS=cfg["CONSUMER_REGS"], num_warps=4)
    return out


def compile_sm90(contextual_len: int = 4, config: dict | None = None):
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
                                                      ("v_desc", cfg["BLOCK_N"]))}
    sig |= {"Out": "*bf16", "offsets": "*i64", "num_targets": "*i64", "alpha": "fp32", "inv_n": "fp32", "n_items": "i32",
            "NB": "i32", "H": "i32", "stride_ol": "i32", "stride_oh": "i32"}
    const = {"C": contextual_len, "D": D, "BLOCK_M": 128, "BLOCK_N": cfg["BLOCK_N"], "STAGES": cfg["STAGES"],
             "CONSUMER_REGS": cfg["CONSUMER_REGS"]}
    names = _hstu_fwd_ws.arg_names
    sig |= dict.fromkeys(const, "constexpr")
    src = GluonASTSource(_hstu_fwd_ws, signature={n: sig[n] for n in names},
                         constexprs={(names.index(k),): v for k, v in const.items()},
                         attrs={(names.index(n),): [["tt.divisibility", 16]]
                                for n in ("Out", "offsets", "num_targets", "stride_ol", "stride_oh")})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
