"""What one-step e4m3 code differences in the quantizing LayerNorm pass do to the FP8 uvqk op's error, in
float64 on the CPU (no GPU needed).

H200 run 75 (benchmarks/results/gpu_fp8_h200_2026-12-04_run75.json) found two things:
- the Triton quantizing pass writes e4m3 codes that differ from torch's quantization of torch's LayerNorm
  in 0.05-0.13% of elements, each by one code step (LN's fp32 statistics differ in the last bits, which can
  move a bf16 rounding and then an e4m3 rounding): `quant_pass_checks`;
- the uvqk op, checked against float64 of *torch's* codes, was 1.0-2.0% off at D=512 M=333 and D=192
  M=4353 (bar 1%), while every GEMM alone was within 0.4% of float64 of its own inputs.

This script takes the op check's shapes and inputs (gpu_cutlass.op_inputs, which gpu_fp8.check_ops uses),
quantizes them as torch does, flips a random fraction of the activation codes by one step, and reports the same
max-relative error the op check reports between the flipped and unflipped float64 results (outputs rounded
to bf16, as the kernel writes). If flips at the measured rate reproduce run 75's numbers, the op check's
reference (not the GEMM) is what differs, and the op is to be checked against its own codes.

    python benchmarks/fp8_code_flips.py [--trials 20] [--out benchmarks/results/...json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

import gpu_cutlass as gc  # (the op checks' inputs: gc.op_inputs)
from hstu_opt.ops import _fp8

RATES = (0.0005, 0.001, 0.0013)  # the pass's measured code-difference rates on the H200 (run 75)
RUN75 = Path(__file__).parent / "results" / "gpu_fp8_h200_2026-12-04_run75.json"


def run75_op_errors() -> dict[str, list[float]]:
    """Run 75's uvqk op rows (u, q, k, v) against torch's codes, by case, from its results file."""
    out: dict[str, list[float]] = {}
    for row in json.loads(RUN75.read_text())["op_checks"]:
        if row["kernel"].startswith("op uvqk.") and "rel_err_vs_dequantized" in row:
            out.setdefault(row["case"], []).append(row["rel_err_vs_dequantized"])
    return out


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30))


def step(q: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Every code moved one e4m3 step, up or down in magnitude at random (zero moves up; 448 moves down)."""
    bits = q.view(torch.uint8)
    mag = bits & 0x7F
    up = torch.rand(bits.shape, generator=gen) < 0.5
    mag = torch.where((up & (mag < 0x7E)) | (mag == 0), mag + 1, mag - 1)
    return ((bits & 0x80) | mag).view(torch.float8_e4m3fn)


def case(name: str, x: torch.Tensor, p: list, hv: int, flip_gen: torch.Generator, trials: int, run75: dict) -> dict:
    """x, p: one case of gc.op_inputs (the uvqk op check's input rows and parameters)."""
    nw, nb, w, b = p
    xq, rs = _fp8.reference_ln_quant(x, nw, nb, 1e-6)  # torch's codes, as run 75's op reference had them
    wq, cs = _fp8.quantize_weight(w)

    def z_of(codes: torch.Tensor) -> torch.Tensor:
        return _fp8.reference_gemm(codes, rs, wq, cs, b, hv)

    def worst(z: torch.Tensor, z0: torch.Tensor) -> float:  # over the u, v, q, k blocks, as the op rows
        return max(rel(c, c0) for c, c0 in zip(z.to(torch.bfloat16).split(hv, 1), z0.split(hv, 1)))

    z0 = z_of(xq)
    moved = step(xq, flip_gen)
    by_rate = {}
    for rate in RATES:
        errs = []
        for _ in range(trials):
            sel = torch.rand(xq.shape, generator=flip_gen) < rate
            codes = torch.where(sel, moved.view(torch.uint8), xq.view(torch.uint8)).view(torch.float8_e4m3fn)
            errs.append(worst(z_of(codes), z0))
        errs.sort()
        by_rate[str(rate)] = {"min": errs[0], "median": errs[len(errs) // 2], "max": errs[-1]}
    return {"case": name, "bf16_output_rounding_alone": worst(z0, z0), "flipped": by_rate,
            "run75_op_rel_err_uqkv": run75.get(name)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / f"fp8_code_flips_cpu_{date.today()}.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    flip_gen = torch.Generator().manual_seed(7)
    run75 = run75_op_errors()
    rows = [case(name, x, p, H * d, flip_gen, args.trials, run75)
            for name, M, D, H, d, x, p, a, q in gc.op_inputs(device="cpu")]
    print(f"{'case':24} {'bf16 alone':>10} " + " ".join(f"{'flip ' + str(r):>22}" for r in RATES) + "  run 75 (u q k v)")
    for r in rows:
        cells = " ".join(f"{v['min']:.4f}/{v['median']:.4f}/{v['max']:.4f}".rjust(22) for v in r["flipped"].values())
        print(f"{r['case']:24} {r['bf16_output_rounding_alone']:10.4f} {cells}  "
              + " ".join(f"{e:.4f}" for e in r["run75_op_rel_err_uqkv"]))
    print("(cells: min/median/max over trials of the worst block's max |error| / max |reference|)")
    result = {"date": str(date.today()), "host": platform.node(), "torch": torch.__version__, "trials": args.trials,
              "rates": RATES, "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
              "reads": "each cell: max |z(flipped codes) - z(codes)| / max |z(codes)| over one output block "
                       "(u, v, q or k), float64 with bf16-rounded outputs, worst block"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
