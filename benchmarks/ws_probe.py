"""The warp-specialized Gluon attention (ops/hstu_attention/gluon_ws.py) on the H200: correctness of its full
and cached forms against a float64 reference on fresh jagged inputs (length 1, odd lengths, targets,
contextual rows, long rows), NaN-poisoned outputs; then timings against the Triton kernel at the issue's
shapes and dlrm-v3's cached scoring, every one a CUDA-graph replay, variants in alternating rounds, with
the same run's matmul rate; with --trace, where a consumer warpgroup's cycles go per work item.

    python benchmarks/ws_probe.py --out DIR [--smoke | --bench-only | --trace | --cached-first]
                                            (writes DIR/ws_probe.json)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_hstu import ceilings, env, graphed, jagged, rel_err  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from hstu_opt import ops  # noqa: E402
from hstu_opt.ops.hstu_attention import gluon_ws as ws  # noqa: E402
from hstu_opt.ops.hstu_attention import triton as attn  # noqa: E402

CHECKS = [  # lengths, targets, C
    ([1], [0], 0), ([1, 7, 70, 129, 300], [1, 2, 5, 0, 30], 0), ([13, 5, 333, 1000], [3, 0, 4, 256], 4),
    ([4352] * 3, [256] * 3, 4), ([200, 90, 75], [7, 2, 0], 70),
]
CASES = [("N=512 B=512", 512, 512, 0, 20, None), ("N=4096 B=128", 128, 4096, 0, 20, None),
         ("N=1024 B=512", 512, 1024, 0, 20, None), ("N=2048 B=512", 512, 2048, 0, 20, None),
         ("N=256 B=512", 512, 256, 0, 20, None), ("dlrm-v3 B=16", 16, 4352, 4, 256, 4352)]
# (run 53: 128-key tiles with 2 stages gave wrong results, rel. error 0.8-1.0, except for one length-1 user;
# not found why, not timed, and launch_ws now refuses them.) {} is WS_TILES (4 stages, OVERLAP, COPRIME,
# COALESCE); each other config turns one of them back.
CONFIGS = [{}, {"COALESCE": False}, {"STAGES": 3}, {"OVERLAP": False}, {"COPRIME": False},
           {"BLOCK_N": 32, "STAGES": 4}]


def case(lengths, targets, C, gen, d: int = 128):
    """A check case's bf16 q/k/v (4 heads), offsets, targets, N and the float64 full attention."""
    lens = torch.tensor(lengths)
    offsets = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).cuda()
    nt = torch.tensor(targets).cuda()
    q, k, v = (torch.randn(int(lens.sum()), 4, d, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    N = max(lengths) + 3
    want = ops.hstu_attention(q.double(), k.double(), v.double(), offsets, nt, max_seq_len=N, alpha=d ** -0.5,
                              contextual_len=C, max_attn_len=0)
    return q, k, v, offsets, nt, N, want


def checked(out, want, **meta) -> dict:
    torch.cuda.synchronize()
    err = rel_err(out, want)
    row = {**meta, "rel_err": err, "unwritten": int(torch.isnan(out).sum()),
           "ok": err <= 1e-2 and not torch.isnan(out).any()}
    print("check", row, flush=True)
    return row


def check(cases=CHECKS, configs=CONFIGS) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(11)
    for lengths, targets, C in cases:
        q, k, v, offsets, nt, N, want = case(lengths, targets, C, gen)
        for cfg in configs:
            out = torch.full_like(v, float("nan"))
            ws.launch_ws(q, k, v, offsets, nt, out, N, 128 ** -0.5, C, config=cfg)
            rows.append(checked(out, want, lengths=lengths[:6], C=C, config=cfg))
    return rows


def split_cached(q, k, v, offsets, nt):
    """The cached form's inputs from a full one: each user's targets are its new rows, the rest its cache."""
    lens, nt_c = (offsets[1:] - offsets[:-1]).cpu(), nt.cpu()
    starts = offsets[:-1].cpu()
    rows_c = torch.cat([torch.arange(int(s), int(s + n - t)) for s, n, t in zip(starts, lens, nt_c)]).cuda()
    rows_d = torch.cat([torch.arange(int(s + n - t), int(s + n)) for s, n, t in zip(starts, lens, nt_c)]).cuda()
    co = torch.nn.functional.pad((lens - nt_c).cumsum(0), (1, 0)).cuda()
    do = torch.nn.functional.pad(nt_c.cumsum(0), (1, 0)).cuda()
    return (q[rows_d], k[rows_d], v[rows_d], do, k[rows_c], v[rows_c], co), rows_d, int(nt_c.max())


def check_cached(cases=CHECKS) -> list[dict]:
    """The cached form against the float64 full attention's target rows (NaN-poisoned outputs), directly and
    through triton.launch_cached's routing (the op's path)."""
    rows = []
    gen = torch.Generator().manual_seed(12)
    for lengths, targets, C in cases:
        targets = [max(t, 1) if n > 1 else t for n, t in zip(lengths, targets)]  # (new rows for most users)
        if not sum(targets):
            continue
        q, k, v, offsets, nt, N, want = case(lengths, targets, C, gen)
        (qd, kd, vd, do, kc, vc, co), rows_d, max_d = split_cached(q, k, v, offsets, nt)
        for how in ("direct", "launch_cached"):
            out = torch.full_like(vd, float("nan"))
            if how == "direct":
                ws.launch_cached_ws(qd, kd, vd, do, kc, vc, co, out, N, 128 ** -0.5, max_d)
            else:
                assert attn.takes_cached_ws(qd, kd, vd, kc, vc, out[None], 0, None)
                attn.launch_cached(qd, kd, vd, do, kc, vc, co, out[None], N, 128 ** -0.5, C, 0, max_d)
            rows.append(checked(out, want[rows_d], cached=how, lengths=lengths[:6], C=C))
    return rows


def bench_cached(matmul: float, B: int = 16, rounds: int = 3) -> list[dict]:
    """dlrm-v3 scoring: 256 new rows per user against a 4096-row cache (4 contextual rows), the Triton kernel
    (its TMA form, one key split at B=16) against the Gluon kernel's cached form, alternating rounds."""
    gen = torch.Generator().manual_seed(6)
    (q, k, v, offsets, nt), _ = jagged(B, 4352, 4, 128, 128, torch.bfloat16, gen, C=4, lengths=[4352] * B)
    nt.fill_(256)
    (qd, kd, vd, do, kc, vc, co), _, max_d = split_cached(q, k, v, offsets, nt)
    shape = attn.cached_partials_shape(qd, vd, do, 4352, max_d)
    out = torch.empty(shape, dtype=torch.float32 if shape[0] > 1 else qd.dtype, device="cuda")
    runs = {"triton": lambda: attn.launch_cached(qd, kd, vd, do, kc, vc, co, out, 4352, 128 ** -0.5, 4, 0, max_d, tma=True),
            "ws": lambda: ws.launch_cached_ws(qd, kd, vd, do, kc, vc, co, out[0], 4352, 128 ** -0.5, max_d)}
    graphs = {name: graphed(fn)[0] for name, fn in runs.items()}
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, g in graphs.items():
            times[name].append(do_bench(g, warmup=10, rep=60))
    flops = 2 * 4 * 256 * B * 256 * (4096 + 1)
    rows = []
    for name, ts in times.items():
        ms = sorted(ts)[len(ts) // 2]
        rows.append({"case": f"cached dlrm-v3 B={B}", "variant": name, "key_splits": shape[0], "ms": ms,
                     "rounds_ms": ts, "tflops": flops / ms / 1e9, "ratio_to_matmul": flops / ms / 1e9 / matmul})
        print(rows[-1], flush=True)
    return rows


def inputs(name, B, N, C, T, fixed, gen):
    (q, k, v, offsets, nt), lengths = jagged(B, N, 4, 128, 128, torch.bfloat16, gen, max_targets=T, C=C,
                                             lengths=None if fixed is None else [fixed] * B)
    if fixed is not None:
        nt.fill_(T)
    return q, k, v, offsets, nt, lengths


def bench(matmul: float, cases=CASES, configs=CONFIGS, rounds: int = 3) -> list[dict]:
    """Every variant of a case captured first, then timed in `rounds` alternating rounds (the H200's clock
    follows its power draw, so back-to-back variants would not see the same clock): the median round."""
    rows = []
    gen = torch.Generator().manual_seed(5)
    for name, B, N, C, T, fixed in cases:
        q, k, v, offsets, nt, lengths = inputs(name, B, N, C, T, fixed, gen)
        flops = 2 * 4 * 256 * float((lengths.double() ** 2).sum()) / 2
        out = torch.empty_like(v)
        # (config={}: the Triton kernel with its default tiles; launch_fwd would route ws_wanted shapes to Gluon)
        runs = [("triton", lambda: attn.launch_fwd(q, k, v, offsets, nt, out, N, 128 ** -0.5, C, 0, config={}))]
        runs += [(f"ws {cfg}", lambda cfg=cfg: ws.launch_ws(q, k, v, offsets, nt, out, N, 128 ** -0.5, C, config=cfg))
                 for cfg in configs]
        graphs, times = {}, {}
        for vname, fn in runs:
            try:
                graphs[vname] = graphed(fn)[0]
            except Exception as exc:
                rows.append({"case": name, "variant": vname, "error": repr(exc)[:400]})
                print(rows[-1], flush=True)
        for _ in range(rounds):
            for vname, g in graphs.items():
                times.setdefault(vname, []).append(do_bench(g, warmup=10, rep=60))
        for vname, ts in times.items():
            ms = sorted(ts)[len(ts) // 2]
            rows.append({"case": name, "variant": vname, "ms": ms, "rounds_ms": ts, "tflops": flops / ms / 1e9,
                         "ratio_to_matmul": flops / ms / 1e9 / matmul})
            print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in rows[-1].items()}, flush=True)
    return rows


def trace(cases=CASES[:2] + CASES[-1:], configs=({}, {"COALESCE": False}), items: int = 24) -> list[dict]:
    """Where a consumer warpgroup's cycles go, per work item (gluon_ws._consumer's TRACE points): waiting
    for Q, the first tile (S, then P), the pipelined tiles, the last P V plus the store, and the gap to
    the next item; medians over every CTA's first `items` items (after the first two)."""
    rows = []
    gen = torch.Generator().manual_seed(5)
    for name, B, N, C, T, fixed in cases:
        q, k, v, offsets, nt, _ = inputs(name, B, N, C, T, fixed, gen)
        out = torch.empty_like(v)
        for cfg in configs:
            tr = torch.zeros(ws.sm_count(q.device), 2, items, 8, dtype=torch.int64, device="cuda")
            for _ in range(3):  # (the last launch's counters are kept)
                ws.launch_ws(q, k, v, offsets, nt, out, N, 128 ** -0.5, C, config=cfg, trace=tr)
            torch.cuda.synchronize()
            t = tr.cpu().double()
            a, b, c, d, e, n = (t[..., i] for i in range(6))
            used = (e > 0)[..., 2:-1] & (e > 0)[..., 3:]
            parts = {"q_wait": b - a, "first_tile": c - b, "loop": d - c, "last_pv_store": e - d,
                     "gap_to_next": torch.cat([a[..., 1:] - e[..., :-1], torch.zeros_like(a[..., :1])], -1),
                     "item": torch.cat([a[..., 1:] - a[..., :-1], torch.zeros_like(a[..., :1])], -1)}
            row = {"case": name, "config": cfg}
            for key, x in parts.items():
                row[key + "_cyc"] = float(x[..., 2:-1][used].median())
            loop_tiles = (n - 1).clamp(min=1)[..., 2:-1][used]
            row["loop_per_tile_cyc"] = float(((d - c)[..., 2:-1][used] / loop_tiles).median())
            row["tiles_mean"] = float(n[..., 2:-1][used].mean())
            rows.append(row)
            print({k: (round(x, 1) if isinstance(x, float) else x) for k, x in row.items()}, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="one small launch (run under a timeout: a hang shows here)")
    ap.add_argument("--bench-only", action="store_true")
    ap.add_argument("--trace", action="store_true", help="also the per-item cycle breakdown (TRACE)")
    ap.add_argument("--cached-first", action="store_true", help="the cached form's checks and timing, then the "
                    "full kernel's shapes with its default config only")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        rows = check(CHECKS[1:3], [{}]) + check_cached(CHECKS[1:3])
        sys.exit(0 if all(r["ok"] for r in rows) else 1)
    t0 = time.time()
    result = {"env": env(), "ceilings": ceilings()}
    print(result, flush=True)
    result["check"] = [] if args.bench_only else check() + check_cached()
    (args.out / "ws_probe.json").write_text(json.dumps(result, indent=2))
    if all(r["ok"] for r in result["check"]):
        if args.trace:
            result["trace"] = trace()
            (args.out / "ws_probe.json").write_text(json.dumps(result, indent=2))
        result["bench"] = bench_cached(result["ceilings"]["matmul_bf16_tflops"])
        (args.out / "ws_probe.json").write_text(json.dumps(result, indent=2))
        result["bench"] += bench(result["ceilings"]["matmul_bf16_tflops"], configs=[{}] if args.cached_first else CONFIGS)
    result["seconds"] = time.time() - t0
    (args.out / "ws_probe.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
