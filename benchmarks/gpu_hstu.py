"""H200 checks and benchmarks for the Triton HSTU kernels, in one run (device time is scarce).

    python benchmarks/gpu_hstu.py --out DIR [--skip-check] [--skip-bench] [--skip-sweep] [--skip-model]

1. ceilings measured in the same run: dense bf16 8192^3 matmul, device-to-device copy;
2. correctness of the fused uvqk / hstu_output in bf16 / fp16 / fp32 against float64 math, outputs poisoned
   (NaN) before each launch so unwritten elements show (the attention kernels and whole models:
   benchmarks/gpu_check.py, which sweeps every shape the router admits);
3. attention kernel speed (bf16 forward): TFLOP/s counting 2*H*(dqk+dv)*sum(len^2)/2, and its ratio
   to the matmul ceiling; tile sweeps for the attention and the fused projection;
4. end to end at recipes/dlrm-v3-ranking.yaml sizes (5 layers, D=512, 4 heads, d=128, 4 contextual
   rows), 4096 history + 256 candidates, batch 1 and 16: eager reference, eager Triton ops, the serving
   graph (rank_jagged) eager and CUDA-graphed, torch.compile of the reference, and the bundle's
   `compiled` engine built by hstu_opt.backends.compiled (cold / warm start in fresh processes) and
   served from a fresh process; wall time next to GPU-busy time from the profiler;
5. cached scoring: 256 candidates against a 4096-row history whose K/V were cached once, vs recomputing
   the whole sequence (same outputs).
Prints a table and writes gpu_hstu.json (date, GPU, versions) to DIR.
Needs pydantic/safetensors/pyyaml/filelock on the GPU machine (carried as wheels, see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
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
import triton
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hstu_opt import ops  # noqa: E402
from hstu_opt.backends import compiled  # noqa: E402
from hstu_opt.backends.eager import example_feed  # noqa: E402
from hstu_opt.model import HstuConfig, HstuModel  # noqa: E402
from hstu_opt.ops import Impl  # noqa: E402
from hstu_opt.ops.hstu_attention.triton import (  # noqa: E402
    _blocks, fwd_splits, launch_fwd, takes_ws, tma_ok)
from hstu_opt.ops._triton import tma_ready  # noqa: E402
from hstu_opt.ops.embedding_rows.triton import launch as embedding_rows_launch  # noqa: E402
from hstu_opt.ops.hstu_output.triton import launch as output_launch  # noqa: E402
from hstu_opt.ops.uvqk.triton import launch as uvqk_launch  # noqa: E402

DEV = "cuda"
BARS = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-3}


def env() -> dict:
    return {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gpu": torch.cuda.get_device_name(),
            "capability": ".".join(map(str, torch.cuda.get_device_capability())), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}


def ceilings() -> dict:
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300)
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    ms_copy = do_bench(lambda: y.copy_(x), warmup=20, rep=200)
    return {"matmul_bf16_tflops": 2 * 8192**3 / ms / 1e9, "copy_tb_s": 2 * x.numel() / ms_copy / 1e9}


def jagged(B, N, H, dqk, dv, dtype, gen, max_targets=20, C=0, low=0.9, lengths=None):
    if lengths is None:
        lengths = torch.randint(max(int(low * N), C + max_targets + 1), N, (B,), generator=gen)
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    nt = torch.minimum(torch.randint(1, max_targets + 1, (len(lengths),), generator=gen), lengths - C - 1).clamp(min=0)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    L = int(offsets[-1])
    q, k = (torch.randn(L, H, dqk, generator=gen) for _ in range(2))
    v = torch.randn(L, H, dv, generator=gen)
    return [t.to(DEV) for t in (q.to(dtype), k.to(dtype), v.to(dtype), offsets, nt)], lengths


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30))


def check_row(kernel: str, case: str, dtype: torch.dtype, got: torch.Tensor, want: torch.Tensor) -> dict:
    """One check: relative error against float64 math, and no element left unwritten (outputs are NaN-poisoned)."""
    err = rel_err(got, want)
    unwritten = int((~torch.isfinite(got)).sum())
    return {"kernel": kernel, "case": case, "dtype": str(dtype).split(".")[-1], "rel_err": err, "bar": BARS[dtype],
            "unwritten": unwritten, "ok": unwritten == 0 and err <= BARS[dtype]}


BENCH = [  # B, N, H, d
    (512, 256, 4, 128), (512, 512, 4, 128), (512, 1024, 4, 128), (512, 2048, 4, 128), (128, 4096, 4, 128),
    (1024, 200, 2, 64), (512, 1024, 4, 50), (128, 4096, 4, 50),
    (1, 4352, 4, 128), (16, 4352, 4, 128),  # the dlrm-v3 serving shapes (batch 1: the key-split case)
]


def bench_attention(gen, matmul_tflops: float) -> list[dict]:
    rows = []
    for B, N, H, d in BENCH:
        (q, k, v, offsets, nt), lengths = jagged(B, N, H, d, d, torch.bfloat16, gen, low=0.9 if B > 16 else 0.99)
        flops = 2 * H * (d + d) * float((lengths.double() ** 2).sum()) / 2
        # Every case is timed as a CUDA-graph replay: called from Python, a launch costs 0.15-0.4 ms of host
        # time (the op's dispatch, TMA descriptors), and short launches timed that way measured the host (B=512
        # N=256 read 0.19-0.40 ms and B=1024 N=200 0.15-0.39 ms across runs 9-50, while the N=512 case,
        # four times the work of N=256, read 0.41 ms)
        fn = graphed(lambda: ops.hstu_attention(q, k, v, offsets, nt, max_seq_len=N, alpha=d ** -0.5,  # noqa: B023
                                                impl=Impl.TRITON))[0]
        ms = do_bench(fn, warmup=10, rep=100)
        tflops = flops / ms / 1e9
        splits = fwd_splits(B * H, N, *(_blocks(d, d, q.dtype)[b] for b in ("BLOCK_M", "BLOCK_N")))
        loads = "tma" if tma_ok(q.dtype, q, k, v) else "pointers"
        out = torch.empty_like(v)
        ws = splits == 1 and takes_ws(q, k, v, out, N, 0)  # (what the op ran: the Gluon kernel or Triton's)
        rows.append({"B": B, "N": N, "H": H, "d": d, "kernel": "gluon-ws" if ws else "triton", "loads": loads,
                     "ms": ms, "tflops": tflops, "ratio_to_matmul": tflops / matmul_tflops, "key_splits": splits})
        if loads == "tma" and splits == 1 and (B, N) in ((512, 512), (128, 4096), (16, 4352)):
            # the Triton kernel with TMA loads (config={}: not routed to Gluon), and with pointers: what the
            # compiled engine's traced launches run
            for cfg in ({}, {"TMA": False}) if ws else ({"TMA": False},):
                fn = lambda cfg=cfg: launch_fwd(q, k, v, offsets, nt, out, N, d ** -0.5, 0, 0, config=cfg)  # noqa: E731
                ms = do_bench(graphed(fn)[0], warmup=10, rep=100)
                rows.append({"B": B, "N": N, "H": H, "d": d, "kernel": "triton", "loads": "tma" if not cfg else "pointers",
                             "ms": ms, "tflops": flops / ms / 1e9, "ratio_to_matmul": flops / ms / 1e9 / matmul_tflops,
                             "key_splits": splits})
    return rows


# The sweep behind the defaults in triton._blocks. Also tried on 2026-11-29 (run5 JSON), no gain: an EVEN_D
# switch dropping head-dim masks, and tl.range(warp_specialize=True) for the unmasked key loop.
CONFIGS = [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3), dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
           dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3), dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
           dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=4), dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2)]


def sweep(gen, matmul_tflops: float) -> list[dict]:
    rows = []
    for B, N in ((128, 4096), (512, 512)):
        (q, k, v, offsets, nt), lengths = jagged(B, N, 4, 128, 128, torch.bfloat16, gen)
        flops = 2 * 4 * 256 * float((lengths.double() ** 2).sum()) / 2
        out = torch.empty_like(v)
        for cfg in CONFIGS:
            try:
                ms = do_bench(lambda: launch_fwd(q, k, v, offsets, nt, out, N, 128 ** -0.5, 0, 0, config=cfg), warmup=5, rep=50)
            except Exception as exc:  # a config that does not fit (shared memory, registers)
                rows.append({"B": B, "N": N, **cfg, "error": str(exc)[:120]})
                continue
            rows.append({"B": B, "N": N, **cfg, "ms": ms, "tflops": flops / ms / 1e9,
                         "ratio_to_matmul": flops / ms / 1e9 / matmul_tflops})
    return rows


PROJ_CHECKS = [  # M rows, D, H, dqk, dv
    (2 * 4352, 512, 4, 128, 128), (16 * 4352, 512, 4, 128, 128), (37, 50, 2, 24, 16), (1, 64, 1, 100, 100),
]


def check_projections(gen) -> list[dict]:
    """Fused uvqk / hstu_output against float64 math, outputs NaN-poisoned before each launch."""
    import torch.nn.functional as F

    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for M, D, H, dqk, dv in PROJ_CHECKS:
            hv, width = H * dv, H * (2 * dv + 2 * dqk)
            r = lambda *shape, scale=1.0, shift=0.0: (torch.randn(*shape, generator=gen) * scale + shift).to(DEV)  # noqa: E731
            x = r(M, D, scale=2.0, shift=1.0).to(dtype)
            nw, nb = r(D, scale=0.3, shift=1.0), r(D, scale=0.3)
            w, b = r(D, width, scale=D ** -0.5).to(dtype), r(width, scale=0.1).to(dtype)
            proj = F.layer_norm(x.double(), (D,), nw.double(), nb.double(), 1e-6) @ w.double() + b.double()
            want = torch.cat([F.silu(proj[:, :hv]), proj[:, hv:]], dim=1)
            u, a, xr = r(M, hv).to(dtype), r(M, hv, scale=0.1, shift=0.02).to(dtype), r(M, D).to(dtype)
            onw, onb, wo = r(hv, scale=0.3, shift=1.0), r(hv, scale=0.3), r(3 * hv, D, scale=(3 * hv) ** -0.5).to(dtype)
            ln = F.layer_norm(a.double(), (hv,), onw.double(), onb.double(), 1e-6)
            want_o = xr.double() + torch.cat([u.double(), a.double(), u.double() * ln], dim=1) @ wo.double()
            # the default GEMM, and the persistent TMA one (_gemm_tma_kernel) and the pointer one explicitly
            for tag, cfg in (("", None), ("/tma", {"TMA": True}), ("/pointers", {"TMA": False})):
                if tag == "/tma" and not (tma_ready(x, w) and tma_ready(u, a, xr, wo)):
                    continue  # (rows not 16-byte aligned: every launch takes the pointer kernel)
                out = torch.full((M, width), float("nan"), dtype=dtype, device=DEV)
                uvqk_launch(x, nw, nb, w, b, out, hv, 1e-6, config=cfg)
                out_o = torch.full((M, D), float("nan"), dtype=dtype, device=DEV)
                output_launch(u, a, xr, onw, onb, wo, out_o, 1e-6, config=cfg)
                # rows gathered by the norm's loads (the last layer's k/v of the history rows): shuffled, repeated
                idx = torch.randint(0, M, (M // 2 + 3,), generator=gen).to(DEV)
                out_g = torch.full((idx.numel(), width), float("nan"), dtype=dtype, device=DEV)
                uvqk_launch(x, nw, nb, w, b, out_g, hv, 1e-6, config=cfg, rows=idx)
                for kernel, got, ref in (("uvqk", out, want), ("hstu_output", out_o, want_o),
                                         ("uvqk/gather", out_g, want[idx])):
                    rows.append(check_row(kernel + tag, f"M{M}-D{D}-H{H}-{dqk}/{dv}", dtype, got, ref))
        # the encoders' gather-and-sum at dlrm-v3 batch 16 size: 100k-row item table, zero weights skipped
        L, D = 16 * 4352, 512
        tables = [r(n, D, scale=0.05).to(dtype) for n in (100_001, 6, 4353, 2048, 1001)]
        idx = torch.stack([torch.randint(0, t.shape[0], (L,), generator=gen) for t in tables], 1).to(DEV)
        scales = (torch.randn(L, 5, generator=gen) * (torch.rand(L, 5, generator=gen) > 0.2)).to(DEV)
        want_e = sum(scales[:, t, None].double() * tables[t].double()[idx[:, t]] for t in range(5))
        out_e = torch.full((L, D), float("nan"), dtype=dtype, device=DEV)
        embedding_rows_launch(idx, scales, tables, out_e)
        rows.append(check_row("embedding_rows", f"L{L}-D{D}-5 tables", dtype, out_e, want_e))
    return rows


def gemm_sweep() -> list[dict]:
    """Tiles for the fused projections (LayerNorm pass included) at dlrm-v3 size (16 users x 4352 rows, D=512
    -> 2048) and at batch 1's 4352 rows, each timed as a CUDA-graph replay: without one, the batch-1 rows
    timed Python's launches (the same config read 0.037 to 0.115 ms across runs 24-31)."""
    M, D, width = 16 * 4352, 512, 2048
    x = torch.randn(M, D, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(D, width, device=DEV, dtype=torch.bfloat16) * D ** -0.5
    ones, zeros = torch.ones(D, device=DEV), torch.zeros(D, device=DEV)
    b = torch.zeros(width, device=DEV, dtype=torch.bfloat16)
    out = torch.empty(M, width, device=DEV, dtype=torch.bfloat16)
    rows = []

    def timed(name: str, fn, flops: float) -> None:
        try:
            ms = do_bench(graphed(fn)[0], warmup=10, rep=100)
        except Exception as exc:  # a config that does not fit
            rows.append({"variant": name, "error": str(exc)[:120]})
            return
        rows.append({"variant": name, "ms": ms, "tflops": flops / ms / 1e9})

    timed("cuBLAS x @ W (no LayerNorm, bias, SiLU)", lambda: x @ w, 2 * M * D * width)
    for rows_m, cfg in [(M, c) for c in GEMM_CONFIGS] + [(4352, c) for c in ({}, dict(TMA=False), dict(TMA=True))]:
        timed(f"uvqk M={rows_m} {cfg}", lambda: uvqk_launch(x[:rows_m], ones, zeros, w, b, out[:rows_m], 512, 1e-6,  # noqa: B023
                                                             config=cfg), 2 * rows_m * D * width)  # noqa: B023
    # hstu_output: [u | a | u*LN(a)] (3 x 512) -> 512 plus the residual
    u, a = (torch.randn(M, D, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    wo = torch.randn(3 * D, D, device=DEV, dtype=torch.bfloat16) * (3 * D) ** -0.5
    out_o = torch.empty(M, D, device=DEV, dtype=torch.bfloat16)
    cat = torch.cat([u, a, a], dim=1)
    timed("cuBLAS x + [u|a|g] @ Wo (no gated LayerNorm)", lambda: torch.addmm(x, cat, wo), 2 * M * 3 * D * D)
    for rows_m, cfg in [(M, c) for c in OUTPUT_CONFIGS] + [(4352, c) for c in ({}, dict(TMA=False), dict(TMA=True))]:
        args = (u[:rows_m], a[:rows_m], x[:rows_m], ones, zeros, wo, out_o[:rows_m], 1e-6)
        timed(f"hstu_output M={rows_m} {cfg}", lambda: output_launch(*args, config=cfg),  # noqa: B023
              2 * rows_m * 3 * D * D)
    return rows


GEMM_CONFIGS = [{}, dict(TMA=False), dict(TMA=True, SUBTILE=False), dict(TMA=True, SUBTILE=True),
                dict(TMA=True, SUBTILE=True, num_stages=4), dict(TMA=True, FLATTEN=False),
                dict(TMA=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
                dict(TMA=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
                dict(TMA=True, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3, PROGRAMS=264)]
# Pointer-kernel tiles of the earlier sweeps (runs 11, 24), all slower than 128x256x64 / 8 warps / 3 stages:
# 128x256 4 stages, 256x128, 128x128 (4 warps, BLOCK_K 64 or 32), 64x128.
OUTPUT_CONFIGS = [{}, dict(TMA=False), dict(TMA=True), dict(TMA=True, SUBTILE=True),
                  dict(TMA=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)]


def dlrm_config() -> HstuConfig:
    from hstu_opt.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "dlrm-v3-ranking.yaml")
    return HstuConfig.from_recipe(recipe.model, num_items=recipe.data.synthetic.num_items, num_ratings=5,
                                  contextual_cardinality=recipe.data.synthetic.contextual_cardinality)


def dlrm_model(cfg: HstuConfig, impl: Impl | dict) -> HstuModel:
    torch.manual_seed(0)
    return HstuModel(cfg, impl=impl).eval().to(DEV, cfg.torch_dtype)


def dlrm_feed(model: HstuModel, B: int) -> dict:
    """B users, each 4096 history rows and 256 candidates (plus the recipe's contextual rows)."""
    return example_feed(model, "ranking", np.random.default_rng(B), B, 4096, 256, exact=True)


def device_rows(cfg: HstuConfig, feed: dict) -> dict[str, torch.Tensor]:
    rows, _ = compiled.jagged_feed(feed, cfg.contextual_len)
    return {k: torch.from_numpy(v).to(DEV) for k, v in rows.items()}


def full_forward(model: HstuModel, t: dict) -> torch.Tensor:
    """Every layer over every row (what training's forward_jagged does), then the head on the candidates."""
    states, _ = model.forward_jagged(t["ids"], t["ratings"], t["timestamps"], t["offsets"], t["num_targets"],
                                     t["query_time"])
    tgt = t["target_rows"]
    return torch.sigmoid(model.ranking_logits(states.index_select(0, tgt), t["ids"].index_select(0, tgt)))


def graphed(fn):
    """Capture fn in a CUDA graph (no host syncs inside); returns (replay, output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def gpu_busy(fn, iters: int = 10, top: int | None = 8) -> tuple[float, list]:
    """GPU-busy ms per call from the profiler (sum of kernel and copy times) and the `top` kernels by time
    (None: every one), each with its ms and launches per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / iters / 1e3
    ranked = sorted(events, key=lambda e: -e.self_device_time_total)[:top]
    return total, [{"kernel": e.key[:80], "ms": e.self_device_time_total / iters / 1e3, "calls": e.count // iters}
                   for e in ranked]


def timeline(fn, iters: int = 3) -> dict:
    """One call's GPU timeline from the profiler's trace (the median call of `iters`): kernels and copies,
    the span from the first start to the last end, the busy time, the idle time between them, and the
    largest idle gaps with the kernels on each side."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    calls = []
    for _ in range(iters):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            prof.export_chrome_trace(f.name)
            trace = json.loads(Path(f.name).read_text())
        ev = sorted((e for e in trace["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                    key=lambda e: e["ts"])
        if not ev:
            continue
        gaps, end = [], ev[0]["ts"] + ev[0]["dur"]
        for prev, e in zip(ev, ev[1:]):
            if e["ts"] > end:
                gaps.append((e["ts"] - end, prev["name"][:60], e["name"][:60]))
            end = max(end, e["ts"] + e["dur"])
        span = end - ev[0]["ts"]
        calls.append({"events": len(ev), "span_ms": span / 1e3, "busy_ms": sum(e["dur"] for e in ev) / 1e3,
                      "idle_ms": sum(g[0] for g in gaps) / 1e3, "gaps": len(gaps),
                      "gap_p50_us": float(np.median([g[0] for g in gaps])) if gaps else 0.0,
                      "top_gaps_us": [{"us": round(g[0], 1), "after": g[1], "before": g[2]}
                                      for g in sorted(gaps, reverse=True)[:8]]})
    return sorted(calls, key=lambda c: c["span_ms"])[len(calls) // 2] if calls else {}


def timed_calls(fn, reps: int) -> tuple[list[float], list[float]]:
    """ms per call of fn followed by a device synchronize (wall), and of the call alone (call)."""
    wall, call = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t0) * 1e3)
        call.append((t1 - t0) * 1e3)
    return wall, call


def wall_ms(fn, reps: int = 30) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times, _ = timed_calls(fn, reps)
    return {"wall_p50_ms": float(np.percentile(times, 50)), "wall_p90_ms": float(np.percentile(times, 90))}


@torch.no_grad()
def cached_scoring(tri: HstuModel, cfg: HstuConfig, t: dict, B: int) -> tuple[dict, list]:
    """Prefill [contextual][history] once, then score the 256 candidates against the cache, vs recomputing
    every row (both CUDA-graph replays): the timing row and the cached path's top kernels."""
    C = cfg.contextual_len
    hist_rows, tgt_rows = t["history_rows"], t["target_rows"]
    h_off = torch.arange(B + 1, device=DEV) * (C + 4096)
    d_off = torch.arange(B + 1, device=DEV) * 256
    cache = tri.prefill(t["ids"][hist_rows], t["ratings"][hist_rows], t["timestamps"][hist_rows], h_off, t["query_time"])
    cand_ids = t["ids"][tgt_rows]
    replay_full, full = graphed(lambda: full_forward(tri, t))
    replay_cached, scored = graphed(lambda: tri.score_cached(cache, cand_ids, d_off))
    replay_full()
    replay_cached()
    torch.cuda.synchronize()
    full_c, scored_c = full.float().clone(), scored.float().clone()
    ms_full, ms_cached = do_bench(replay_full, warmup=3, rep=50), do_bench(replay_cached, warmup=3, rep=50)
    busy_c, top_c = gpu_busy(replay_cached)
    return ({"B": B, "full_ms": ms_full, "cached_ms": ms_cached, "cached_gpu_busy_ms": busy_c,
             "speedup": ms_full / ms_cached, "max_abs_diff": float((full_c - scored_c).abs().max()),
             "graphs": "both CUDA-graph replays, outputs cloned"}, top_c)


@torch.no_grad()
def bench_model(out_dir: Path, quick: bool = False) -> dict:
    cfg = dlrm_config()
    tri, ref = dlrm_model(cfg, Impl.TRITON), dlrm_model(cfg, Impl.REFERENCE)
    mix = dlrm_model(cfg, {"hstu_attention": Impl.TRITON})  # Inductor fuses the norms/pointwise around cuBLAS
    result = {"config": cfg.to_dict(), "end_to_end": [], "cached": [], "profiles": {}}
    build_engine(tri, out_dir, result)
    for B in (1, 16):
        feed = dlrm_feed(tri, B)
        t = device_rows(cfg, feed)
        variants = {
            "eager reference (all rows, every layer)": lambda: full_forward(ref, t),
            "eager Triton ops (all rows, every layer)": lambda: full_forward(tri, t),
            "eager Triton ops, rank_jagged": lambda: tri.rank_jagged(**t),
        }
        outs = {}
        for name, fn in variants.items():
            outs[name] = fn().float().clone()
            result["end_to_end"].append({"B": B, "variant": name, "ms": do_bench(fn, warmup=3, rep=30), **wall_ms(fn, 10)})
        if B == 1:  # trunk states (the probabilities of random weights sit near 0.5 and say little)
            args = [t[k] for k in ("ids", "ratings", "timestamps", "offsets", "num_targets", "query_time")]
            st_t, st_r = tri.forward_jagged(*args)[0], ref.forward_jagged(*args)[0]
            result["end_to_end"].append({"B": B, "variant": "check: trunk states, eager Triton ops vs eager reference",
                                         "rel_err": rel_err(st_t, st_r.double()), "bar": BARS[torch.bfloat16],
                                         "max_abs_ref": float(st_r.float().abs().max())})
        replay, graph_out = graphed(lambda: tri.rank_jagged(**t))
        busy, top = gpu_busy(replay)
        result["profiles"][f"cudagraph B={B}"] = top
        result["end_to_end"].append({"B": B, "variant": "Triton rank_jagged + manual CUDA graph",
                                     "ms": do_bench(replay, warmup=3, rep=50), "gpu_busy_ms": busy, **wall_ms(replay)})
        outs["graph"] = graph_out.float().clone()
        t1 = time.time()
        if not quick:  # (--quick: measured in run 9, 7.3 ms at batch 1 and 95 ms at batch 16)
            ref_c = torch.compile(ref.rank_jagged, mode="reduce-overhead", dynamic=False)
            for _ in range(3):
                got = ref_c(**t).float().clone()
            result["end_to_end"].append({
                "B": B, "variant": "torch.compile(reference rank_jagged, reduce-overhead)", "compile_s": time.time() - t1,
                "ms": do_bench(lambda: ref_c(**t), warmup=3, rep=30),
                "max_abs_diff_vs_eager_reference": float((got - outs[next(iter(variants))]).abs().max())})
        t1 = time.time()
        mix_c = torch.compile(mix.rank_jagged, mode="reduce-overhead", dynamic=False)
        for _ in range(3):
            outs["mix"] = mix_c(**t).float().clone()
        busy_m, top_m = gpu_busy(lambda: mix_c(**t))
        result["profiles"][f"triton attention + inductor projections B={B}"] = top_m
        result["end_to_end"].append({"B": B, "variant": "torch.compile(Triton attention + reference projections, "
                                     "reduce-overhead)", "compile_s": time.time() - t1, "gpu_busy_ms": busy_m,
                                     "ms": do_bench(lambda: mix_c(**t), warmup=3, rep=30), **wall_ms(lambda: mix_c(**t))})
        for name in list(variants)[1:] + ["graph", "mix"]:
            result["end_to_end"].append({"B": B, "variant": f"check: {name} vs eager reference",
                                         "max_abs_diff": float((outs[name] - outs[next(iter(variants))]).abs().max())})
        np.save(out_dir / f"graph_out_B{B}.npy", outs["graph"].cpu().numpy())
        row, result["profiles"][f"cached B={B}"] = cached_scoring(tri, cfg, t, B)
        result["cached"].append(row)
    serve_fresh(out_dir, result)
    return result


def build_engine(tri: HstuModel, out_dir: Path, result: dict) -> None:
    """The bundle's `compiled` engine for the dlrm-v3 shapes (cold compile, then warm start, in fresh
    processes), into result["engine_build"] or result["engine_build_error"]."""
    t0 = time.time()
    try:
        result["engine_build"] = compiled.build(tri, out_dir / "engine", max_batch=16,
                                                shapes=[(1, 4096, 256), (16, 4096, 256)])
        result["engine_build"]["build_s"] = time.time() - t0
        print("engine build:", {k: result["engine_build"][k] for k in ("cold_start", "warm_start")}, flush=True)
    except Exception as exc:  # e.g. the build's own refusal of non-finite outputs: record it, measure the rest
        result["engine_build_error"] = str(exc)[-3000:]
        print("engine build failed:", str(exc)[-3000:], flush=True)


def serve_fresh(out_dir: Path, result: dict) -> None:
    """The engine served by a fresh process (warm start), its rows into result["end_to_end"], its outputs
    against graph_out_B*.npy (eager Triton ops in this process: replayed from a CUDA graph in the full
    run, plain in --engine-only)."""
    if "engine_build" not in result:
        return
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(out_dir / "serve-cache" / "inductor"),
                        "TRITON_CACHE_DIR": str(out_dir / "serve-cache" / "triton")}
    proc = subprocess.run([sys.executable, __file__, "--serve-engine", str(out_dir / "engine"), "--out", str(out_dir)],
                          env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        result["engine_serve_error"] = proc.stderr[-3000:]
        print("engine serve failed:", proc.stderr[-3000:], flush=True)
        return
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    for row in served["rows"]:
        ref_out = np.load(out_dir / f"graph_out_B{row['B']}.npy")
        row["max_abs_diff_vs_in_process_graph"] = float(np.abs(np.load(out_dir / f"engine_out_B{row['B']}.npy")
                                                               - ref_out).max())
        result["end_to_end"].append(row)
    result["engine_serve"] = {k: v for k, v in served.items() if k != "rows"}


def bench_engine_only(out_dir: Path) -> dict:
    """--engine-only: build the engine, then serve it in a fresh process against eager Triton ops."""
    cfg = dlrm_config()
    tri = dlrm_model(cfg, Impl.TRITON)
    result = {"config": cfg.to_dict(), "end_to_end": [], "cached": [], "profiles": {}}
    ref = dlrm_model(cfg, Impl.REFERENCE)  # (same seed, same weights)
    result["triton_vs_reference"] = {}
    with torch.no_grad():
        for B in (1, 16):
            rows = device_rows(cfg, dlrm_feed(tri, B))
            out = tri.rank_jagged(**rows).float()
            np.save(out_dir / f"graph_out_B{B}.npy", out.cpu().numpy())
            # the Triton ops' serving path (encoder rows, kernels) against the reference ops, same bf16 weights
            want = ref.rank_jagged(**rows).float()
            result["triton_vs_reference"][B] = {"max_abs_diff": float((out - want).abs().max()),
                                                "mean_abs_diff": float((out - want).abs().mean()),
                                                "nonfinite": int((~torch.isfinite(out)).sum())}
            print(f"B={B} Triton ops vs reference ops:", result["triton_vs_reference"][B], flush=True)
    del ref
    build_engine(tri, out_dir, result)
    serve_fresh(out_dir, result)
    return result


def serve_engine(engine_dir: Path, out_dir: Path) -> dict:
    """In a fresh process: load the engine (warm start from its artifacts) and time run(feed), numpy in,
    numpy out, as a server would call it: with a feed of its own arrays (copied into the runner's staging
    buffer) and with the runner's feed_buffers filled in place (nothing copied on the host). Wall times
    per call, followed by a device synchronize (wall_*) and without one (call_*: run() returns host
    arrays, so it is synchronous itself)."""
    from clock_probe import Sampler  # (imported here: clock_probe imports this module)

    t0 = time.perf_counter()
    runner = compiled.load(engine_dir)
    load_s = time.perf_counter() - t0
    rows, first = [], {}
    for B in (1, 16):
        feed = dlrm_feed(runner.model, B)
        t1 = time.perf_counter()
        got = runner.run(feed)["probs"]
        first[B] = time.perf_counter() - t1
        m = np.arange(feed["cand_ids"].shape[1])[None] < feed["num_candidates"][:, None]
        np.save(out_dir / f"engine_out_B{B}.npy", got[m])

        def request(variant: str, feed=feed, B=B) -> dict:
            if "zero-copy" not in variant:
                return feed
            # (valid until a run of another feed: filled right before use, as a server parsing requests
            # into the engine's buffers would)
            bufs = runner.feed_buffers(B, *feed["hist_ids"].shape[1:], feed["cand_ids"].shape[1])
            for name, a in bufs.items():
                a[...] = feed[name]
            return bufs

        variants = ("run(feed) numpy in/out", "run(feed_buffers) zero-copy in")
        by_variant = {}
        for variant in variants:  # profiles: GPU-busy time and the per-call timeline
            req = request(variant)
            in_place = runner.run(req)["probs"]
            fn = lambda: runner.run(req)  # noqa: E731,B023
            busy, top = gpu_busy(fn)
            by_variant[variant] = {"gpu_busy_ms": busy, "top_kernels": top, "timeline": timeline(fn),
                                   "max_abs_diff_vs_copied_feed": float(np.abs(in_place - got).max()),
                                   "phase_s": dict.fromkeys(runner.phase_s, 0.0), "requests": 0, "zero_copy": 0,
                                   "wall": [], "call": [], "sm_mhz_p50_by_round": [], "power_w_p50_by_round": []}
        # wall times in alternating rounds (A B A B ...): the GPU's clock drifts as it warms up, and timing
        # one variant after the other showed it (the second profiled slower in runs 41 and 44)
        for _ in range(5):
            for variant in variants:
                req, v = request(variant), by_variant[variant]
                runner.run(req)
                torch.cuda.synchronize()
                runner.phase_s = dict.fromkeys(runner.phase_s, 0.0)
                before, staged_before = runner.stats["replays"] + runner.stats["direct"], runner.stats["in_place"]
                wall, call = timed_calls(lambda: runner.run(req), 10)  # noqa: B023
                v["wall"] += wall
                v["call"] += call
                v["requests"] += runner.stats["replays"] + runner.stats["direct"] - before
                v["zero_copy"] += runner.stats["in_place"] - staged_before
                for k, x in runner.phase_s.items():
                    v["phase_s"][k] += x
        # Requests after 50 ms of idle each (the card is then not power-limited, but the host thread has
        # slept), then the SM clock and power during more back-to-back rounds: nvidia-smi polling runs only
        # there, since it slowed the timed calls (run 51: batch 1 1.00 ms with it, 0.85-0.95 in runs 41-45).
        for variant in variants:
            req, spaced = request(variant), []
            for _ in range(15):
                time.sleep(0.05)
                spaced += timed_calls(lambda: runner.run(req), 1)[0]  # noqa: B023
            by_variant[variant]["spaced_50ms_wall_p50_ms"] = float(np.percentile(spaced, 50))
        sampler = Sampler()
        for _ in range(3):
            for variant in variants:
                req, v = request(variant), by_variant[variant]
                t_round = time.perf_counter()
                timed_calls(lambda: runner.run(req), 20)  # noqa: B023
                gpu = sampler.window(t_round, time.perf_counter())
                v["sm_mhz_p50_by_round"].append((gpu.get("sm_mhz") or {}).get("p50"))
                v["power_w_p50_by_round"].append((gpu.get("power_w") or {}).get("p50"))
        sampler.stop()
        for variant in variants:
            v = by_variant[variant]
            wall, call = v.pop("wall"), v.pop("call")
            rows.append({"B": B, "variant": f"bundle engine `compiled` (fresh process, {variant})",
                         "wall_p50_ms": float(np.percentile(wall, 50)), "wall_p90_ms": float(np.percentile(wall, 90)),
                         "call_p50_ms": float(np.percentile(call, 50)), "call_p90_ms": float(np.percentile(call, 90)),
                         "phases_ms": {k: 1e3 * x / max(v["requests"], 1) for k, x in v.pop("phase_s").items()},
                         "zero_copy_requests": v.pop("zero_copy"), **v})
    from torch._dynamo.utils import counters

    return {"rows": rows, "load_s": load_s, "first_call_s": first, "runner_stats": runner.stats,
            "inductor_cache": {k: v for k, v in counters["inductor"].items() if "cache" in k}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--quick", action="store_true", help="model part without torch.compile of the reference")
    ap.add_argument("--cached-only", action="store_true",
                    help="model part: only cached scoring vs full recompute (no engine, no other variants)")
    ap.add_argument("--engine-only", action="store_true", help="model part: only the bundle engine (build, serve)")
    ap.add_argument("--serve-engine", type=Path, help="(internal) serve this engine dir in this fresh process")
    args = ap.parse_args()
    if args.serve_engine:
        print(json.dumps(serve_engine(args.serve_engine, args.out)))
        return
    gen = torch.Generator().manual_seed(2026)
    result = {"env": env()}
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        result["seconds"] = time.time() - t0
        (args.out / "gpu_hstu.json").write_text(json.dumps(result, indent=2))

    print(json.dumps(result["env"]), flush=True)
    result["ceilings"] = ceilings()
    print(f"ceilings: {result['ceilings']}", flush=True)
    save()
    if not args.skip_check:
        # (attention correctness: benchmarks/gpu_check.py sweeps every head dim, dtype, kernel and mask option)
        result["check"] = check_projections(gen)
        for r in result["check"]:
            print(f"check {r['kernel']:11} {r['case']:20} {r['dtype']:8} rel_err {r['rel_err']:.2e} "
                  f"unwritten {r['unwritten']} {'ok' if r['ok'] else 'FAIL'}")
        save()
    if not args.skip_bench:
        result["sweep"] = [] if args.skip_sweep else sweep(gen, result["ceilings"]["matmul_bf16_tflops"])
        result["gemm_sweep"] = gemm_sweep()
        for r in result["sweep"] + result["gemm_sweep"]:
            print("sweep", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        save()
        result["attention"] = bench_attention(gen, result["ceilings"]["matmul_bf16_tflops"])
        for r in result["attention"]:
            print(f"attn B={r['B']:4} N={r['N']:4} H={r['H']} d={r['d']:3} {r['kernel']:8} {r['loads']:8}: {r['ms']:.3f} ms "
                  f"{r['tflops']:.1f} TFLOP/s "
                  f"ratio {r['ratio_to_matmul']:.3f}", flush=True)
        save()
    if not args.skip_model:
        if args.cached_only:
            cfg = dlrm_config()
            tri = dlrm_model(cfg, Impl.TRITON)
            result["model"] = {"cached": [], "profiles": {}, "end_to_end": []}
            for B in (1, 16):
                row, top = cached_scoring(tri, cfg, device_rows(cfg, dlrm_feed(tri, B)), B)
                result["model"]["cached"].append(row)
                result["model"]["profiles"][f"cached B={B}"] = top
        elif args.engine_only:
            result["model"] = bench_engine_only(args.out)
        else:
            result["model"] = bench_model(args.out, args.quick)
        save()
        for r in result["model"]["end_to_end"]:
            clocks = [c for c in r.get("sm_mhz_p50_by_round", []) if c is not None]
            print(f"e2e B={r['B']:2} {r['variant'][:60]:60} " + " ".join(
                f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float))
                + (f" sm_mhz {min(clocks):.0f}-{max(clocks):.0f}" if clocks else ""))
        for r in result["model"]["cached"]:
            print(f"cached B={r['B']:2} full {r['full_ms']:.3f} ms cached {r['cached_ms']:.3f} ms speedup "
                  f"{r['speedup']:.1f}x max|diff| {r['max_abs_diff']:.2e} ({r['graphs']})")
    fails = [r for r in result.get("check", []) if not r["ok"]]
    print(f"{len(result.get('check', [])) - len(fails)} passed, {len(fails)} failed")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
