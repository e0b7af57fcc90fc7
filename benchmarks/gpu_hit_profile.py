"""Where a served request's engine time goes on the GPU machine (issues 17 and 18), in about a minute.

Served at concurrency 1, the route's `batch` phase ran 0.90 ms against the engine's 0.79 ms timed back to
back, and a cache hit's `score` phase 0.37 ms against 0.26 ms of graph replay (run 82). This script splits
those into GPU time and host time, and spaced calls (as served: the GPU idles between requests) from
back-to-back ones, at recipes/dlrm-v3-ranking.yaml sizes (5 layers, D=512, H=4, d=128, bf16):

1. ceilings in the same run (bf16 8192^3 matmul, device copy: benchmarks/gpu_paged.ceilings);
2. a cache hit: serve/graphs.PagedScoreGraphs (the served hit path) over a page pool holding one user's
   4100 cached rows (128-row pages), 256 candidates: run() wall time back to back and spaced by idle gaps
   of 0.5 / 2 / 10 ms, with the GPU's own span of each call (CUDA events) and run()'s host pieces (stage,
   replay call, wait, split); the replay's kernels (profiler) and timeline (idle gaps between kernels);
   then the same with the projections forced onto each route (hit_triton_gemms, hit_cublas_projections:
   ops/_triton.cublas_rows' few-rows route off / on), a same-process A/B;
3. a lone full request: the ranking graph (rank_jagged, Triton ops, one CUDA graph as the compiled engine
   replays it), batch 1, 4096 + 256 rows, the same spaced / back-to-back split and its kernels;
4. a lone miss's prefill (4100 rows): eager against serve/graphs.PrefillGraphs' replay, K/V compared, timed;
   and a batch of n such misses: one eager prefill of all against n replays (engines.GRAPH_PREFILL_USERS' rule);
5. the hit's projections at its 256 rows (uvqk 512 -> 2048 with the LayerNorm pass, hstu_output 3 x 512 ->
   512 with the gated LayerNorm pass and the residual) for tile / kernel variants: gemm_config gives this
   small M 64x128 tiles, 16 programs for hstu_output on 132 SMs. Each variant is checked against float64
   (NaN-poisoned output) and timed as a CUDA-graph replay beside cuBLAS's bare matmul of the same shape,
   and the two ops as the model calls them with the few-rows route on (the LayerNorm kernel + cuBLAS).

    python benchmarks/gpu_hit_profile.py --out DIR      (writes DIR/gpu_hit_profile.json)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_check import paged_pool, with_cublas_rows  # noqa: E402
from gpu_hstu import (check_row, device_rows, dlrm_config, dlrm_feed, dlrm_model, gpu_busy, graphed,  # noqa: E402
                      output_launch, timeline, uvqk_launch)
from triton.testing import do_bench  # noqa: E402
from gpu_paged import ceilings, env  # noqa: E402
from hstu_opt import ops  # noqa: E402
from hstu_opt.ops import Impl  # noqa: E402
from hstu_opt.serve.graphs import PagedScoreGraphs  # noqa: E402

GAPS_MS = (0.0, 0.5, 2.0, 10.0)
REPS = 200
PAGE_ROWS = 128


def spin(ms: float) -> None:
    """Idle the GPU for ms (a spin, not a sleep: sleep overshoots by tens of microseconds)."""
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def spaced(fn, gap_ms: float, reps: int = REPS) -> dict:
    """fn() then a wait for the GPU, reps times with gap_ms of idle before each: p50/p90 of the wall time and
    of the GPU's span of the call (events recorded before and after it on the current stream)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    wall, gpu = [], []
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    for _ in range(reps):
        spin(gap_ms)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        end.synchronize()
        wall.append((time.perf_counter() - t0) * 1e3)
        gpu.append(start.elapsed_time(end))
    return {"gap_ms": gap_ms, "wall_p50_ms": float(np.percentile(wall, 50)), "wall_p90_ms": float(np.percentile(wall, 90)),
            "gpu_span_p50_ms": float(np.percentile(gpu, 50)), "gpu_span_p90_ms": float(np.percentile(gpu, 90))}


def kernels(fn, iters: int = 20) -> dict:
    """Every kernel and copy of one call (profiler): name, ms and launches per call; and their sum."""
    busy, rows = gpu_busy(fn, iters, top=None)
    return {"busy_ms": busy, "launches": sum(r["calls"] for r in rows), "kernels": rows}


def pieces(graphs: PagedScoreGraphs, pages, rows, cands, gap_ms: float, reps: int = REPS) -> dict:
    """PagedScoreGraphs.run's host pieces, spaced as served: stage, the replay call, the wait, the split (p50 ms)."""
    cap = graphs._graphs[len(cands)]
    t = {"stage": [], "replay_call": [], "wait": [], "split": []}
    for _ in range(reps):
        spin(gap_ms)
        t0 = time.perf_counter()
        cap.stage(pages, rows, cands)
        t1 = time.perf_counter()
        cap.graph.replay()
        t2 = time.perf_counter()
        torch.cuda.current_stream().synchronize()
        t3 = time.perf_counter()
        cap.split(cap.host_out, cands)
        t4 = time.perf_counter()
        for k, a, b in (("stage", t0, t1), ("replay_call", t1, t2), ("wait", t2, t3), ("split", t3, t4)):
            t[k].append((b - a) * 1e3)
    return {"gap_ms": gap_ms, **{k: round(float(np.percentile(v, 50)), 4) for k, v in t.items()}}


@torch.no_grad()
def hit(model, cfg, t: dict) -> dict:
    C = cfg.contextual_len
    c_len = C + 4096
    hist_rows, tgt_rows = t["history_rows"], t["target_rows"]
    cache = model.prefill(t["ids"][hist_rows], t["ratings"][hist_rows], t["timestamps"][hist_rows],
                          torch.tensor([0, c_len], device="cuda"), t["query_time"])
    pools = [paged_pool(k, v, [c_len], PAGE_ROWS, seed=0, junk=False, spare=8) for k, v in zip(cache.keys, cache.values)]
    k_pages, v_pages = torch.stack([p[0] for p in pools]), torch.stack([p[1] for p in pools])
    table = pools[0][2][0].tolist()
    cand_ids = t["ids"][tgt_rows]
    cands = [cand_ids.cpu().numpy()]
    graphs = PagedScoreGraphs(model, k_pages, v_pages, max_pages=len(table))
    got = graphs.run([table], [c_len], cands)[0]
    want = model.score_cached(cache, cand_ids, torch.tensor([0, len(cand_ids)], device="cuda")).float().cpu().numpy()
    cap = graphs._graphs[1]

    def served():
        graphs.run([table], [c_len], cands)

    out = {"rows_cached": c_len, "candidates": len(cands[0]), "page_rows": PAGE_ROWS,
           "max_abs_vs_contiguous_eager": float(np.abs(got - want).max()),
           "run": [spaced(served, g) for g in GAPS_MS],
           "replay_only": [spaced(cap.graph.replay, g) for g in GAPS_MS],
           "pieces": [pieces(graphs, [table], [c_len], cands, g) for g in (0.0, 2.0)],
           "profile": kernels(cap.graph.replay), "timeline": timeline(cap.graph.replay)}
    return out


@torch.no_grad()
def lone_full(model, t: dict) -> dict:
    replay, _ = graphed(lambda: model.rank_jagged(**t))
    return {"B": 1, "rows": "4096 history + 256 candidates (+ contextual)",
            "replay": [spaced(replay, g) for g in GAPS_MS], "profile": kernels(replay), "timeline": timeline(replay)}


@torch.no_grad()
def miss_prefill(model, cfg, t: dict) -> dict:
    """A lone miss's prefill of one user's 4100 rows: eager (the model's ops launched from Python) against
    serve/graphs.PrefillGraphs' replay (what the server runs on a GPU), with their K/V compared (the padding
    user must change nothing: bit for bit expected, the same kernels on the same rows) and both timed spaced."""
    from hstu_opt.serve.graphs import PrefillGraphs

    hist_rows = t["history_rows"]
    ids, ratings, ts = (t[k][hist_rows] for k in ("ids", "ratings", "timestamps"))
    n, qt = ids.shape[0], int(t["query_time"][0])
    offsets = torch.tensor([0, n], device="cuda")

    def eager():
        return model.prefill(ids, ratings, ts, offsets, t["query_time"])

    graphs = PrefillGraphs(model, cfg.contextual_len + cfg.max_history_len)
    t0 = time.perf_counter()
    ready = graphs.capture()
    capture_s = time.perf_counter() - t0
    host = [x.cpu().numpy() for x in (ids, ratings, ts)]

    def replayed():
        return graphs.run(*host, qt)

    want, got = eager(), replayed()
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in
               zip([*got.keys, *got.values], [*want.keys, *want.values]))
    return {"rows": n, "bucket": graphs.bucket_for(n), "buckets": graphs.buckets, "captured": ready,
            "capture_s": capture_s, "max_abs_kv_vs_eager": diff,
            "eager": [spaced(eager, g, 50) for g in (0.0, 2.0)], "graph": [spaced(replayed, g, 50) for g in (0.0, 2.0)],
            "miss_batches": miss_batches(model, graphs, (ids, ratings, ts), host, t["query_time"], qt)}


def miss_batches(model, graphs, rows, host, query_time, qt: int) -> list[dict]:
    """A batch of n misses (n copies of the user's rows): one eager prefill of all n (the server's way beyond
    engines.GRAPH_PREFILL_USERS) against n graph replays one after another (its way up to it), back to back."""
    out = []
    for b in (2, 4, 7, 8, 16):
        ids, ratings, ts = (x.repeat(b) for x in rows)
        offsets = torch.arange(b + 1, device="cuda") * rows[0].shape[0]
        qts = query_time.repeat(b)

        def eager_all():
            return model.prefill(ids, ratings, ts, offsets, qts)

        def one_by_one():
            for _ in range(b):
                graphs.run(*host, qt)

        e, g = spaced(eager_all, 0.0, 20), spaced(one_by_one, 0.0, 20)
        out.append({"misses": b, "eager_ms": e["wall_p50_ms"], "replays_ms": g["wall_p50_ms"],
                    "replays_over_eager": g["wall_p50_ms"] / e["wall_p50_ms"]})
    return out


# Variants for the hit's 256-row projections (gemm_config's keys; {} is what it picks today: 64x128x64,
# 4 warps, 4 stages, pointer kernel). Smaller tiles put more of the 132 SMs to work on a short K loop.
SMALL_M_CONFIGS = [{},
                   dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
                   dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
                   dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
                   dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=5),
                   dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
                   dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
                   dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4, TMA=True),
                   dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4, TMA=True)]


@torch.no_grad()
def small_m_gemms(M: int = 256, D: int = 512, width: int = 2048, eps: float = 1e-6) -> list[dict]:
    """The hit's projection ops at M rows per tile variant: check vs float64, time (CUDA-graph replay, ms)."""
    g = torch.Generator().manual_seed(5)
    bf = dict(device="cuda", dtype=torch.bfloat16)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(**bf)

    x, u, a = rnd(M, D), rnd(M, D), rnd(M, D)
    w, b, wo = rnd(D, width, scale=D ** -0.5), rnd(width, scale=0.1), rnd(3 * D, D, scale=(3 * D) ** -0.5)
    nw, nb = (1 + 0.1 * torch.randn(D, generator=g)).cuda(), (0.1 * torch.randn(D, generator=g)).cuda()
    ln = torch.nn.functional.layer_norm
    y = ln(x.double(), (D,), nw.double(), nb.double(), eps) @ w.double() + b.double()
    want_uvqk = torch.cat([torch.nn.functional.silu(y[:, :D]), y[:, D:]], 1)  # SiLU on u's 512 columns
    gated = u.double() * ln(a.double(), (D,), nw.double(), nb.double(), eps)
    want_out = x.double() + torch.cat([u.double(), a.double(), gated], 1) @ wo.double()
    rows = [{"gemm": "uvqk", "variant": "cuBLAS x @ W (bare)", "ms": do_bench(graphed(lambda: x @ w)[0], warmup=20, rep=200)},
            {"gemm": "hstu_output", "variant": "cuBLAS [u|a|a] @ Wo (bare)",
             "ms": do_bench(graphed(lambda c=torch.cat([u, a, a], 1): c @ wo)[0], warmup=20, rep=200)}]
    for cfg in SMALL_M_CONFIGS:
        for name, want, run in (
                ("uvqk", want_uvqk, lambda out, c=cfg: uvqk_launch(x, nw, nb, w, b, out, D, eps, config=c)),
                ("hstu_output", want_out, lambda out, c=cfg: output_launch(u, a, x, nw, nb, wo, out, eps, config=c))):
            row = {"gemm": name, "variant": json.dumps(cfg)}
            try:
                out = torch.full(want.shape, float("nan"), **bf)
                run(out)
                torch.cuda.synchronize()
                row.update(check_row(name, f"M{M}", torch.bfloat16, out, want))
                row["ms"] = do_bench(graphed(lambda o=out, r=run: r(o))[0], warmup=20, rep=200)
            except Exception as exc:  # noqa: BLE001 (a variant that does not compile or fit: recorded)
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
    # the ops as the model calls them (impl TRITON) with the few-rows route forced on: the LayerNorm kernel +
    # cuBLAS (ops/_triton.cublas_rows)
    H, d = 4, width // 16  # [u | v | q | k], H*d columns each (u's are the first D)

    def uvqk_op():
        return ops.uvqk(x, nw, nb, w, b, num_heads=H, attention_dim=d, linear_dim=d, eps=eps, impl=Impl.TRITON)

    def as_proj(uqkv):  # (u, q, k, v) -> [u | v | q | k] (only for the check: the op's views are not timed copying)
        u_, q_, k_, v_ = uqkv
        return torch.cat([t.reshape(M, -1) for t in (u_, v_, q_, k_)], 1)

    for name, want, run, as_out in (
            ("uvqk", want_uvqk, uvqk_op, as_proj),
            ("hstu_output", want_out, lambda: ops.hstu_output(u, a, x, nw, nb, wo, eps=eps, impl=Impl.TRITON), None)):
        row = {"gemm": name, "variant": "op with the few-rows route: LayerNorm kernel + cuBLAS"}
        try:
            out = with_cublas_rows(M, run)
            torch.cuda.synchronize()
            row.update(check_row(name, f"M{M}", torch.bfloat16, as_out(out) if as_out else out, want))
            row["ms"] = do_bench(with_cublas_rows(M, lambda: graphed(run))[0], warmup=20, rep=200)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result = {"env": env(), "ceilings": ceilings()}
    print("ceilings", result["ceilings"], flush=True)
    cfg = dlrm_config()
    model = dlrm_model(cfg, Impl.TRITON)
    t = device_rows(cfg, dlrm_feed(model, 1))
    for name, fn in (("hit", lambda: hit(model, cfg, t)),
                     ("hit_triton_gemms", lambda: with_cublas_rows(0, lambda: hit(model, cfg, t))),
                     ("hit_cublas_projections", lambda: with_cublas_rows(256, lambda: hit(model, cfg, t))),
                     ("lone_full", lambda: lone_full(model, t)),
                     ("miss_prefill", lambda: miss_prefill(model, cfg, t)),
                     ("small_m_gemms", lambda: {"variants": small_m_gemms()})):
        try:
            result[name] = fn()
        except Exception as exc:  # noqa: BLE001 (record it; the other part still runs)
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
        r = result[name]
        print(name, json.dumps({k: v for k, v in r.items() if k not in ("profile", "timeline", "variants")}), flush=True)
        for row in r.get("variants", []):
            ok = "error" if "error" in row else ("ok" if row.get("ok", True) else "FAIL")
            print(f"  {row['gemm']:<12} {row.get('ms', float('nan')):.5f} ms {ok:<5} {row['variant']}")
        if "profile" in r:
            p = r["profile"]
            print(f"  busy {p['busy_ms']:.4f} ms, {p['launches']:.0f} launches; timeline", json.dumps(r["timeline"])[:600])
            for k in p["kernels"][:14]:
                print(f"    {k['ms']:.5f} ms x{k['calls']:.0f}  {k['kernel']}")
    result["seconds"] = time.time() - t0
    (args.out / "gpu_hit_profile.json").write_text(json.dumps(result, indent=1))
    failed = [r for r in result["small_m_gemms"].get("variants", []) if r.get("ok") is False]
    parts = ("hit", "hit_triton_gemms", "hit_cublas_projections", "lone_full", "miss_prefill", "small_m_gemms")
    sys.exit(0 if all("error" not in result[k] for k in parts) and not failed else 1)


if __name__ == "__main__":
    main()
