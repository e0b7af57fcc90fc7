"""GPU correctness sweep of the HSTU attention kernels and of whole models, against float64 (H200 or any CUDA GPU).

    python benchmarks/gpu_check.py --out DIR [--jobs 6] [--quick]

1. Kernels: every head-dim pair the router admits (ops/hstu_attention/triton.py CHECKED_HEAD_DIMS,
   CHECKED_MIXED_DIMS) x every dtype (CHECKED_DTYPES) x every mask option (no targets; targets + contextual
   rows; + a window; + min_full_attn_seq_len) x every kernel and load kind the router can pick: the routed
   full launch (Gluon, TMA or pointers), the pointer kernel (what traced launches run), the TMA kernel, key
   splits (float32 partials), the cached kernel (routed, TMA, pointers), the paged cached kernel at every page
   size the router admits (CHECKED_PAGE_ROWS; bit for bit the contiguous launch of the same load kind), and the
   op itself on strided views of one uvqk-like buffer (as the model calls it). Each against float64 math written from HSTU.md's pseudo-code
   (tests/ops/oracle.py's mask), outputs NaN-poisoned before each launch so unwritten elements show.
   Variants that only a benchmark can pick (QREG off, the unmerged key loop) run too, reported as `diag`.
2. Whole models: encoder, every layer and the ranking head with the Triton ops against the reference ops in
   the same dtype, and both against the reference in float64, at several small configs (D 64/128, H 1/2/4,
   d 32/50/64/128), with and without contextual rows + window + min_full: per-op checks once passed while a
   stack was wrong.
Shards run in parallel processes (compiling the kernels is the slow part; the GPU work is small).
Writes gpu_check.json (date, GPU, versions, every row) to DIR; prints failures and a summary; exits 1 on any.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hstu_opt import ops  # noqa: E402
from hstu_opt.ops import Impl  # noqa: E402
from hstu_opt.ops.hstu_attention.triton import (  # noqa: E402
    CHECKED_DTYPES, CHECKED_HEAD_DIMS, CHECKED_MIXED_DIMS)
from tests.ops.oracle import user_mask  # noqa: E402

DEV = os.environ.get("HSTU_CHECK_DEVICE", "cuda")  # cpu: a smoke run in Triton's interpreter (tests do this)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BARS = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-3}
# name, contextual rows, window, min_full_attn_seq_len, targets
MASKS = [("causal", 0, 0, 0, False), ("targets+ctx", 2, 0, 0, True), ("window", 2, 24, 0, True),
         ("window+min_full", 2, 24, 9, True), ("many users", 2, 0, 0, True)]
LENGTHS = [300, 7, 129, 64, 1, 200, 33]  # N = 300: bf16 head dim 128 without a window routes to the Gluon kernel
# "many users": 160 users, so cached scoring needs no key split and routes bf16 head dim 128 to the Gluon kernel
MANY = [20 + (37 * i) % 280 for i in range(160)]


def sweep_cases() -> list[tuple[int, int, str]]:
    """(dqk, dv, dtype name) of every kernel sweep: exactly what the router admits."""
    pairs = [(d, d) for d in CHECKED_HEAD_DIMS] + list(CHECKED_MIXED_DIMS)
    names = {v: k for k, v in DTYPES.items()}
    return [(dqk, dv, names[dt]) for dqk, dv in pairs for dt in CHECKED_DTYPES]


def env() -> dict:
    import triton

    gpu = torch.cuda.is_available() and DEV == "cuda"
    return {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name() if gpu else "none (Triton interpreter)",
            "capability": ".".join(map(str, torch.cuda.get_device_capability())) if gpu else None, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}


@functools.lru_cache(maxsize=None)
def _mask(n: int, nt: int, C: int, window: int, full: int) -> torch.Tensor:
    return user_mask(n, nt, C, window, full)


def float64_attention(q, k, v, offsets, nt, N, alpha, C, window, full) -> torch.Tensor:
    """HSTU.md in float64 on the GPU: per user, SiLU(alpha q k^T) / N under the pseudo-code's mask, times v."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64, device=q.device)
    off, nts = offsets.tolist(), nt.tolist()
    for b in range(len(off) - 1):
        s, e = off[b], off[b + 1]
        m = _mask(e - s, nts[b], C, window, full).to(q.device, torch.float64)
        dots = torch.einsum("ihd,jhd->hij", q[s:e], k[s:e]) * alpha
        out[s:e] = torch.einsum("hij,jhd->ihd", dots * torch.sigmoid(dots) / N * m, v[s:e])
    return out


def jagged_case(dqk: int, dv: int, dtype: torch.dtype, C: int, targets: bool, H: int, seed: int, many: bool = False):
    """q, k, v as strided views of one [L, H*(2dv+2dqk)] buffer (the layout uvqk produces), offsets, targets."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([max(n, C + 1 + 8 * targets) for n in (MANY if many else LENGTHS)])
    nt = (torch.randint(1, 9, (len(lengths),), generator=g) if targets else torch.zeros(len(lengths), dtype=torch.long))
    nt = torch.minimum(nt, lengths - C - 1)
    offsets = torch.tensor([0, *lengths.cumsum(0).tolist()])
    L = int(offsets[-1])
    buf = torch.randn(L, H * (2 * dv + 2 * dqk), generator=g).to(dtype).to(DEV)
    u_end = 2 * H * dv  # [u | v | q | k]
    v_ = buf[:, H * dv:u_end].view(L, H, dv)
    q = buf[:, u_end:u_end + H * dqk].view(L, H, dqk)
    k = buf[:, u_end + H * dqk:].view(L, H, dqk)
    return q, k, v_, offsets.to(DEV), nt.to(DEV), int(lengths.max())


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30))


def row(kernel, dqk, dv, dtype, mask, got, want, routed=True) -> dict:
    err = rel_err(got, want) if got.numel() else 0.0
    unwritten = int((~torch.isfinite(got)).sum())
    return {"part": "kernel", "kernel": kernel, "dqk": dqk, "dv": dv, "dtype": str(dtype).split(".")[-1], "mask": mask,
            "rel_err": err, "bar": BARS[dtype], "unwritten": unwritten, "routed": routed,
            "ok": unwritten == 0 and err <= BARS[dtype]}


def full_variants(q, k, v, offsets, nt, N, alpha, C, window, full) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, output, routed) of every full-attention launch the router can pick, plus diagnostics."""
    from hstu_opt.ops.hstu_attention.triton import _use_tma, launch_fwd, sum_splits, takes_ws

    L, H, dv = v.shape
    outs = []

    def launch(config, splits=1):
        shape = (splits, L, H, dv) if splits > 1 else (L, H, dv)
        out = torch.full(shape, float("nan"), device=q.device, dtype=torch.float32 if splits > 1 else q.dtype)
        launch_fwd(q, k, v, offsets, nt, out, N, alpha, C, window, config=config, min_full_attn_seq_len=full)
        return sum_splits(out, q.dtype) if splits > 1 else out

    probe = torch.empty(L, H, dv, device=q.device, dtype=q.dtype)
    ws = takes_ws(q, k, v, probe, N, window)
    tma = _use_tma(True, q, k, v)
    outs.append(("full/" + ("gluon" if ws else "tma" if tma else "pointers"), launch(None), True))
    if ws or tma:
        outs.append(("full/pointers", launch({"TMA": False}), True))  # traced launches (the compiled engine)
    if ws and tma:
        outs.append(("full/tma", launch({}), True))  # Triton's TMA kernel (config set: not routed to Gluon)
    outs.append(("full/3 splits", launch(None, splits=3), True))
    if tma:
        outs.append(("full/3 splits pointers", launch({"TMA": False}, splits=3), True))
        outs.append(("diag/tma no-qreg", launch({"QREG": False}), False))
        outs.append(("diag/tma two loops", launch({"MERGED": False}), False))
    return outs


def cached_variants(q, k, v, offsets, nt, N, alpha, C, window, full) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, output, target-row index) of every cached launch: the op (routed), and each load kind."""
    from hstu_opt.ops.hstu_attention.triton import (_use_tma, cached_partials_shape, launch_cached, sum_splits,
                                                    takes_cached_ws)

    lengths = (offsets[1:] - offsets[:-1]).cpu()
    c_len = (lengths - nt.cpu()).tolist()
    off = offsets.cpu().tolist()
    rows_c = torch.cat([torch.arange(off[b], off[b] + c_len[b]) for b in range(len(c_len))]).to(DEV)
    rows_d = torch.cat([torch.arange(off[b] + c_len[b], off[b + 1]) for b in range(len(c_len))]).to(DEV)
    co = torch.tensor([0, *np.cumsum(c_len)], dtype=torch.int64, device=q.device)
    do = torch.tensor([0, *np.cumsum(nt.cpu().numpy())], dtype=torch.int64, device=q.device)
    args = (q[rows_d], k[rows_d], v[rows_d], do, k[rows_c], v[rows_c], co)
    max_delta = int(nt.max())
    outs = [("cached/op", ops.cached_hstu_attention(*args, max_seq_len=N, alpha=alpha, contextual_len=C,
                                                    max_attn_len=window, max_delta_len=max_delta,
                                                    min_full_attn_seq_len=full, impl=Impl.TRITON), rows_d)]
    contiguous = [t.contiguous() for t in args[:3]] + [args[3]] + [t.contiguous() for t in args[4:6]] + [co]
    shape = cached_partials_shape(contiguous[0], contiguous[2], do, N, max_delta)
    tma_possible = _use_tma(True, *contiguous[:3], *contiguous[4:6])
    for tma in ((None, True, False) if tma_possible else (False,)):
        one = shape[0] == 1
        parts = torch.full(shape[1:] if one else shape, float("nan"), device=q.device,
                           dtype=q.dtype if one else torch.float32)
        out_c = parts[None] if one else parts
        if tma is None and not takes_cached_ws(*contiguous[:3], *contiguous[4:6], out_c, window, None):
            continue  # (the same launch as tma=True)
        launch_cached(*contiguous, out_c, N, alpha, C, window, max_delta, tma=tma, min_full_attn_seq_len=full)
        name = {None: "cached/gluon", True: "cached/tma", False: "cached/pointers"}[tma]
        outs.append((name, parts if one else sum_splits(parts, q.dtype), rows_d))
    return outs + paged_variants(contiguous, c_len, shape, N, alpha, C, window, full, max_delta, tma_possible, rows_d,
                                 {name: got for name, got, _ in outs})


def paged_pool(kc: torch.Tensor, vc: torch.Tensor, c_len: list[int], page_rows: int, seed: int,
               junk: bool = True, spare: int = 2):
    """The users' cache rows scattered over shuffled pages of a pool (`spare` more pages than they need)
    holding finite junk elsewhere, as a served pool's stale pages do (junk=False: zeros, made on the device,
    for timings): (k_pages [P, page_rows, H, dqk], v_pages, page_table [B, max] int32, lens)."""
    g = torch.Generator().manual_seed(seed)
    n_pages = [-(-c // page_rows) for c in c_len]
    P = sum(n_pages) + spare
    perm = torch.randperm(P, generator=g).tolist()

    def pool(like: torch.Tensor) -> torch.Tensor:
        if junk:
            return torch.randn(P, page_rows, *like.shape[1:], generator=g).to(like.dtype).to(like.device)
        return torch.zeros(P, page_rows, *like.shape[1:], dtype=like.dtype, device=like.device)

    k_pages, v_pages = pool(kc), pool(vc)
    table = torch.zeros(len(c_len), max(n_pages), dtype=torch.int32)
    start, used = 0, 0
    for b, (c, n) in enumerate(zip(c_len, n_pages)):
        for j in range(n):
            p, r = perm[used], min(page_rows, c - j * page_rows)
            k_pages[p, :r], v_pages[p, :r] = kc[start:start + r], vc[start:start + r]
            table[b, j] = p
            start, used = start + r, used + 1
    return k_pages, v_pages, table.to(kc.device), torch.tensor(c_len, dtype=torch.int64, device=kc.device)


def paged_variants(contiguous, c_len, shape, N, alpha, C, window, full, max_delta, tma_possible, rows_d,
                   contiguous_outs: dict) -> list[tuple]:
    """The paged cached kernel for every page size the router admits (CHECKED_PAGE_ROWS): the routed op (TMA
    where possible, else pointers) and, where that is TMA, the pointer form at 128-row pages; where the
    contiguous launch takes the Gluon kernel, its paged form too (diagnostic rows until triton.PAGED_WS routes
    to it). Each must equal the contiguous launch of the same kernel and load kind bit for bit
    (paged_identical) besides float64."""
    from hstu_opt.ops.hstu_attention.triton import CHECKED_PAGE_ROWS, PAGED_WS, launch_cached, sum_splits

    q, k, v, do, kc, vc, _ = contiguous
    outs = []
    for page_rows in CHECKED_PAGE_ROWS:
        kp, vp, table, lens = paged_pool(kc, vc, c_len, page_rows, seed=page_rows + len(c_len))
        routed = ops.cached_hstu_attention_paged(q, k, v, do, kp, vp, table, lens, max_seq_len=N, alpha=alpha,
                                                 contextual_len=C, max_attn_len=window, max_delta_len=max_delta,
                                                 min_full_attn_seq_len=full, impl=Impl.TRITON)
        kind = "gluon" if "cached/gluon" in contiguous_outs and PAGED_WS else "tma" if tma_possible else "pointers"
        outs.append((f"paged{page_rows}/op ({kind})", routed, rows_d, contiguous_outs.get(f"cached/{kind}"), True))
        if "cached/gluon" in contiguous_outs:  # the Gluon kernel's paged form (routed only with PAGED_WS)
            from hstu_opt.ops.hstu_attention import gluon_ws

            out = torch.full(shape[1:], float("nan"), device=q.device, dtype=q.dtype)
            gluon_ws.launch_cached_paged_ws(q, k, v, do, kp, vp, table, lens, out, N, alpha, max_delta)
            outs.append((f"paged{page_rows}/gluon", out, rows_d, contiguous_outs["cached/gluon"], PAGED_WS))
        if tma_possible and page_rows == 128:
            one = shape[0] == 1
            parts = torch.full(shape[1:] if one else shape, float("nan"), device=q.device,
                               dtype=q.dtype if one else torch.float32)
            launch_cached(q, k, v, do, kp, vp, lens, parts[None] if one else parts, N, alpha, C, window, max_delta,
                          tma=False, min_full_attn_seq_len=full, page_table=table)
            outs.append((f"paged{page_rows}/pointers", parts if one else sum_splits(parts, q.dtype), rows_d,
                         contiguous_outs.get("cached/pointers"), True))
    return outs


def kernel_rows(dqk: int, dv: int, dtype: torch.dtype) -> list[dict]:
    rows = []
    H = 2 if max(dqk, dv) >= 192 else 4
    for i, (mask, C, window, full, targets) in enumerate(MASKS):
        q, k, v, offsets, nt, N = jagged_case(dqk, dv, dtype, C, targets, H, seed=1000 * dqk + dv + i,
                                              many=mask == "many users")
        alpha = dqk ** -0.5
        want = float64_attention(q, k, v, offsets, nt, N, alpha, C, window, full)
        op = ops.hstu_attention(q, k, v, offsets, nt, max_seq_len=N, alpha=alpha, contextual_len=C, max_attn_len=window,
                                min_full_attn_seq_len=full, impl=Impl.TRITON)
        rows.append(row("op/strided views", dqk, dv, dtype, mask, op, want))
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
        for name, got, routed in full_variants(qc, kc, vc, offsets, nt, N, alpha, C, window, full):
            rows.append(row(name, dqk, dv, dtype, mask, got, want, routed))
        if targets:
            for name, got, rows_d, *paged in cached_variants(q, k, v, offsets, nt, N, alpha, C, window, full):
                rows.append(row(name, dqk, dv, dtype, mask, got, want[rows_d], paged[1] if paged else True))
                if paged:  # a paged launch: bit for bit the contiguous launch of the same load kind
                    identical = paged[0] is not None and torch.equal(got, paged[0])
                    rows[-1] |= {"paged_identical": identical, "ok": rows[-1]["ok"] and identical}
    return rows


MODEL_CONFIGS = [  # D, H, d
    (64, 1, 32), (64, 2, 32), (128, 4, 32), (128, 2, 50), (64, 2, 64), (128, 4, 64), (128, 1, 128)]
MODEL_MASKS = [("targets", 0, 0, 0), ("ctx+window+min_full", 2, 12, 5)]


def model_rows(dtype_name: str) -> list[dict]:
    """Whole models: Triton ops vs reference ops (same dtype) vs reference in float64, on the same weights: the
    full forward, its serving form and cached scoring (a prefill, then the candidates against it)."""
    from hstu_opt.model import HstuConfig, HstuModel

    dtype = DTYPES[dtype_name]
    rows = []
    for D, H, d in MODEL_CONFIGS:
        for mask, C, window, full in MODEL_MASKS:
            cfg = HstuConfig(embedding_dim=D, num_layers=3, num_heads=H, attention_dim=d, linear_dim=d,
                             max_history_len=120, max_targets=8, num_items=500, contextual_len=C,
                             contextual_cardinality=9, max_attn_len=window, min_full_attn_seq_len=full, dtype="float32")
            torch.manual_seed(D + H + d + C)
            base = HstuModel(cfg).eval()
            with torch.no_grad():
                for p in base.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            inputs = model_inputs(cfg, seed=D + d)
            f64 = model_outputs(base, cfg, "float64", Impl.REFERENCE, inputs)
            ref = model_outputs(base, cfg, dtype_name, Impl.REFERENCE, inputs)
            # the projections' two routes (ops/_triton.cublas_rows: the Triton GEMM, or the LayerNorm kernel +
            # cuBLAS for a few 16-bit rows), each forced on every call: the default picks one per call
            for route, rows_max in (("triton_gemm", 0), ("cublas", 1 << 30)):
                rows += _model_route_rows(base, cfg, dtype_name, inputs, f64, ref, route, rows_max,
                                          f"D{D} H{H} d{d} {mask}", dtype)
    return rows


def with_cublas_rows(rows_max: int, fn):
    """fn() with ops/_triton.CUBLAS_ROWS set to rows_max (0: every projection on the Triton GEMM; 256: a
    hit's 256-row projections on the LayerNorm kernel + cuBLAS), whatever the shipped default."""
    from hstu_opt.ops import _triton

    saved = _triton.CUBLAS_ROWS
    _triton.CUBLAS_ROWS = rows_max
    try:
        return fn()
    finally:
        _triton.CUBLAS_ROWS = saved


def _model_route_rows(base, cfg, dtype_name, inputs, f64, ref, route, rows_max, config, dtype) -> list[dict]:
    tri = with_cublas_rows(rows_max, lambda: model_outputs(base, cfg, dtype_name, Impl.TRITON, inputs))
    rows = []
    for out in ("states", "probs", "rank_jagged", "score_cached"):
        e_tri, e_ref = rel_err(tri[out], f64[out]), rel_err(ref[out], f64[out])
        e_pair = rel_err(tri[out], ref[out].double())
        # The fast stack may not be worse than the reference stack in the same dtype by more than the
        # per-dtype rounding of a few layers (a wrong kernel lands at 1e-1 and beyond).
        bar = 2 * e_ref + BARS[dtype]
        rows.append({"part": "model", "config": config, "proj_route": route, "output": out, "dtype": dtype_name,
                     "rel_err_triton_vs_f64": e_tri, "rel_err_reference_vs_f64": e_ref,
                     "rel_err_triton_vs_reference": e_pair, "bar": bar, "ok": e_tri <= bar,
                     "unwritten": int((~torch.isfinite(tri[out])).sum())})
    return rows


def model_inputs(cfg, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    C = cfg.contextual_len
    hist = torch.tensor([120, 3, 57, 88])
    nt = torch.tensor([8, 1, 5, 0])
    lengths = C + hist + nt
    offsets = torch.tensor([0, *lengths.cumsum(0).tolist()])
    L = int(offsets[-1])
    ids = torch.randint(1, cfg.num_items + 1, (L,), generator=g)
    ratings = torch.randint(1, 6, (L,), generator=g)
    ts = torch.sort(torch.randint(0, 10**7, (L,), generator=g)).values
    qt = torch.full((4,), 10**7 + 5)
    ctx_rows = torch.cat([torch.arange(int(offsets[b]), int(offsets[b]) + C) for b in range(4)]) if C else None
    if ctx_rows is not None:
        ids[ctx_rows] = torch.randint(0, 9, (len(ctx_rows),), generator=g)  # contextual ids index their own table
    target = torch.cat([torch.arange(int(offsets[b + 1]) - int(nt[b]), int(offsets[b + 1])) for b in range(4)])
    other = torch.tensor(sorted(set(range(L)) - set(target.tolist())))
    return {"ids": ids, "ratings": ratings, "ts": ts, "offsets": offsets, "nt": nt, "qt": qt, "target": target,
            "other": other}


def model_outputs(base, cfg, dtype_name: str, impl: Impl, t: dict) -> dict:
    import copy
    from dataclasses import replace

    from hstu_opt.model import HstuModel

    name = {"float64": "float64", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype_name]
    model = HstuModel(replace(cfg, dtype=name), impl=impl).eval()
    model.load_state_dict(copy.deepcopy(base.state_dict()))
    model = model.to(DEV, model.cfg.torch_dtype)
    c = {k: v.to(DEV) for k, v in t.items()}
    with torch.no_grad():
        states, _ = model.forward_jagged(c["ids"], c["ratings"], c["ts"], c["offsets"], c["nt"], c["qt"])
        probs = torch.sigmoid(model.ranking_logits(states[c["target"]], c["ids"][c["target"]]))
        served = model.rank_jagged(c["ids"], c["ratings"], c["ts"], c["offsets"], c["nt"], c["qt"], c["target"],
                                   c["other"])
        # a cache hit's path: [contextual][history] prefilled, then the candidates scored against that K/V
        delta = torch.nn.functional.pad(c["nt"].cumsum(0), (1, 0))
        o = c["other"]
        kv = model.prefill(c["ids"][o], c["ratings"][o], c["ts"][o], c["offsets"] - delta, c["qt"])
        cached = model.score_cached(kv, c["ids"][c["target"]], delta)
    return {"states": states, "probs": probs, "rank_jagged": served, "score_cached": cached}


def run_shard(shard: int, jobs: int, quick: bool, only: str | None = None, models: bool = True) -> list[dict]:
    cases = sweep_cases()[shard::jobs]
    rows = []
    for dqk, dv, name in cases:
        if (quick and name == "fp32") or (only and f"{dqk},{dv},{name}" not in only.split(";")):
            continue
        rows += kernel_rows(dqk, dv, DTYPES[name])
        print(f"[shard {shard}] dqk={dqk} dv={dv} {name}: "
              f"{sum(not r['ok'] for r in rows if r['dqk'] == dqk and r['dv'] == dv and r['dtype'] == str(DTYPES[name]).split('.')[-1])} fails",
              flush=True)
    if models and shard < len(DTYPES):
        rows += model_rows(list(DTYPES)[shard])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--shard", type=int, help="(internal) run this shard only, print its rows as JSON")
    ap.add_argument("--quick", action="store_true", help="skip fp32 kernel cases")
    ap.add_argument("--only", help="kernel cases 'dqk,dv,dtype;...' (e.g. '32,32,bf16')")
    ap.add_argument("--no-models", action="store_true")
    args = ap.parse_args()
    if args.shard is not None:
        rows = run_shard(args.shard, args.jobs, args.quick, args.only, not args.no_models)
        (args.out / f"shard{args.shard}.json").write_text(json.dumps(rows))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    extra = (["--quick"] if args.quick else []) + (["--only", args.only] if args.only else []) + (
        ["--no-models"] if args.no_models else [])
    procs = [subprocess.Popen([sys.executable, __file__, "--out", str(args.out), "--jobs", str(args.jobs),
                               "--shard", str(i), *extra]) for i in range(args.jobs)]
    codes = [p.wait() for p in procs]
    rows = []
    for i in range(args.jobs):
        f = args.out / f"shard{i}.json"
        if f.exists():
            rows += json.loads(f.read_text())
            f.unlink()
    gated = [r for r in rows if r.get("routed", True)]
    fails = [r for r in gated if not r["ok"]]
    result = {"env": env(), "seconds": time.time() - t0, "shard_exit_codes": codes,
              "summary": {"checked": len(gated), "failed": len(fails), "diagnostic_rows": len(rows) - len(gated),
                          "diagnostic_failed": sum(not r["ok"] for r in rows if not r.get("routed", True))},
              "rows": rows}
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    for r in [r for r in rows if not r["ok"]][:80]:
        print("FAIL" if r.get("routed", True) else "diag-fail", json.dumps(r))
    worst = {}
    for r in gated:
        if r["part"] == "kernel":
            key = (r["dtype"], r["dqk"], r["dv"])
            worst[key] = max(worst.get(key, 0.0), r["rel_err"])
    for key, err in sorted(worst.items()):
        print(f"worst kernel rel_err {key}: {err:.2e}")
    print(f"shards exit {codes}; {time.time() - t0:.0f} s")
    print(f"{len(gated) - len(fails)} passed, {len(fails)} failed")
    sys.exit(1 if fails or any(codes) else 0)


if __name__ == "__main__":
    main()
