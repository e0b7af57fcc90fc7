"""The warp-specialized Gluon attention (ops/hstu_attention/gluon_ws.py) on the H200: correctness against a
float64 reference on fresh jagged inputs (length 1, odd lengths, targets, contextual rows, long rows),
NaN-poisoned outputs, then timings against the Triton kernel at the issue's shapes, every one a CUDA-graph
replay, with the same run's matmul rate.

    python benchmarks/ws_probe.py --out DIR     (writes DIR/ws_probe.json)
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
         ("N=1024 B=512", 512, 1024, 0, 20, None), ("dlrm-v3 B=16", 16, 4352, 4, 256, 4352)]
# (run 53: 128-key tiles with 2 stages gave wrong results, rel. error 0.8-1.0, except for one length-1 user;
# not found why, not timed, and launch_ws now refuses them)
CONFIGS = [{}, {"STAGES": 2}, {"BLOCK_N": 32, "STAGES": 4}]


def check(cases=CHECKS, configs=CONFIGS) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(11)
    for lengths, targets, C in cases:
        H, d = 4, 128
        lens = torch.tensor(lengths)
        offsets = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).cuda()
        nt = torch.tensor(targets).cuda()
        q, k, v = (torch.randn(int(lens.sum()), H, d, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
        N = max(lengths) + 3
        want = ops.hstu_attention(q.double(), k.double(), v.double(), offsets, nt, max_seq_len=N, alpha=d ** -0.5,
                                  contextual_len=C, max_attn_len=0)
        for cfg in configs:
            out = torch.full_like(v, float("nan"))
            ws.launch_ws(q, k, v, offsets, nt, out, N, d ** -0.5, C, config=cfg)
            torch.cuda.synchronize()
            err = rel_err(out, want)
            rows.append({"lengths": lengths[:6], "C": C, "config": cfg, "rel_err": err,
                         "unwritten": int(torch.isnan(out).sum()), "ok": err <= 1e-2 and not torch.isnan(out).any()})
            print("check", rows[-1], flush=True)
    return rows


def bench(matmul: float) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(5)
    for name, B, N, C, T, fixed in CASES:
        (q, k, v, offsets, nt), lengths = jagged(B, N, 4, 128, 128, torch.bfloat16, gen, max_targets=T, C=C,
                                                 lengths=None if fixed is None else [fixed] * B)
        if fixed is not None:
            nt.fill_(T)
        flops = 2 * 4 * 256 * float((lengths.double() ** 2).sum()) / 2
        out = torch.empty_like(v)
        runs = [("triton", lambda: attn.launch_fwd(q, k, v, offsets, nt, out, N, 128 ** -0.5, C, 0))]
        runs += [(f"ws {cfg}", lambda cfg=cfg: ws.launch_ws(q, k, v, offsets, nt, out, N, 128 ** -0.5, C, config=cfg))
                 for cfg in CONFIGS]
        runs.append(("triton (again)", runs[0][1]))
        for vname, fn in runs:
            try:
                ms = do_bench(graphed(fn)[0], warmup=10, rep=100)
            except Exception as exc:
                rows.append({"case": name, "variant": vname, "error": repr(exc)[:400]})
                print(rows[-1], flush=True)
                continue
            rows.append({"case": name, "variant": vname, "ms": ms, "tflops": flops / ms / 1e9,
                         "ratio_to_matmul": flops / ms / 1e9 / matmul})
            print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in rows[-1].items()}, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="one small launch (run under a timeout: a hang shows here)")
    ap.add_argument("--bench-only", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        rows = check(CHECKS[1:3], [{}])
        sys.exit(0 if all(r["ok"] for r in rows) else 1)
    t0 = time.time()
    result = {"env": env(), "ceilings": ceilings()}
    print(result, flush=True)
    result["check"] = [] if args.bench_only else check()
    (args.out / "ws_probe.json").write_text(json.dumps(result, indent=2))
    if all(r["ok"] for r in result["check"]):
        result["bench"] = bench(result["ceilings"]["matmul_bf16_tflops"])
    result["seconds"] = time.time() - t0
    (args.out / "ws_probe.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
