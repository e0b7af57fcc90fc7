"""H200: every tile / cluster / schedule variant of cutlass_kernels/sweep.py, checked and timed in one run.

    python benchmarks/cutlass_sweep.py --out DIR [-j 16] [--only uvqk_bf16,output_bf16] [--rep 200]
    python benchmarks/cutlass_sweep.py --out DIR --compile-only [-j 2]    # no GPU: build + SASS counts

1. builds the sweep library on this machine (cutlass_kernels/sweep.py: one .cu per variant, compiled in
   parallel; CUTLASS headers from the carried nvidia-cutlass wheel as benchmarks/gpu_cutlass.py does);
2. checks every variant that compiled against float64 on every case benchmarks/gpu_cutlass.py checks
   (NaN-poisoned outputs, M not a multiple of any tile, strided u; FP8 against float64 of its own
   dequantized inputs, benchmarks/gpu_fp8.py's rule), a refusal or fallback failing its row;
3. times each at dlrm-v3 batch 16 (M = 69,632, CUDA-graph replays) beside cuBLAS's bare matmul of the
   same shape (bf16; torch._scaled_mm rowwise for FP8) and the bf16 8192^3 matmul ceiling, all in this
   run; the table ranks the variants per GEMM with their ratio to cuBLAS (bf16) or to the fastest bf16
   uvqk (FP8: issue 19's 1.6x bar).
Writes cutlass_sweep.json (date, GPU, versions, build, checks, timings) to DIR. A winner is shipped only
through a .cu in cutlass_kernels/ and benchmarks/gpu_cutlass.py's full check.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cutlass_kernels import sweep  # noqa: E402


def load(lib_path: str, variants: list) -> object:
    from hstu_opt.ops import _cutlass

    compiled = [(sweep.GEMMS[v.gemm][4], v.symbol) for v in variants]
    return _cutlass.load(lib_path, symbols=compiled)


def can_implement(variants: list, lib) -> dict[str, dict[str, int]]:
    """Each variant's own can_implement (no GPU needed) at dlrm-v3 batch 16 and at an odd M: 0 = takes it."""
    import gpu_cutlass as gc

    D, hv = gc.DLRM["D"], gc.DLRM["H"] * gc.DLRM["d"]
    N = 4 * hv
    args = {"uvqk_bf16": lambda M: (D, N, N, M, N, D), "uvqk_fp8": lambda M: (D, D, N, M, N, D),
            "output_bf16": lambda M: (N, hv, hv, D, D, D, M, D, hv)}  # u: the strided view of uvqk's output
    return {f"{v.gemm} {v.name}": {f"M={M}": getattr(lib, f"{v.symbol}_can_implement")(*args[v.gemm](M))
                                   for M in (gc.DLRM["M"], 333)} for v in variants}


def launcher(v, lib):
    """fn(inputs, out) running variant v from the sweep library through the ops' own launchers."""
    from hstu_opt.ops.hstu_output.cutlass import launch as output_launch
    from hstu_opt.ops.uvqk.cutlass import launch as uvqk_launch
    from hstu_opt.ops.uvqk.cutlass_fp8 import launch as uvqk_fp8_launch

    if v.gemm == "uvqk_bf16":
        return lambda t, out: uvqk_launch(t["xn"], t["w"], t["bias"], out, t["hv"], lib=lib, config=v.name)
    if v.gemm == "uvqk_fp8":
        return lambda t, out: uvqk_fp8_launch(t["xq"], t["rs"], t["wq"], t["cs"], t["bias"], out, t["hv"], lib=lib,
                                              config=v.name)
    return lambda t, out: output_launch(t["u"], t["a"], t["g"], t["x"], t["w"], out, lib=lib, symbol=v.symbol)


def inputs(c: dict, gen) -> dict:
    """The check inputs of one case for every GEMM kind, with their float64 answers."""
    import gpu_cutlass as gc
    from hstu_opt.ops import _fp8

    t, o = gc.uvqk_inputs(c, gen), gc.output_inputs(c, gen)
    xq, rs = _fp8.quantize_rows(t["xn"])
    wq, cs = _fp8.quantize_weight(t["w"])
    fp8 = dict(t, xq=xq, rs=rs, wq=wq, cs=cs)
    return {"uvqk_bf16": (t, gc.uvqk_want(t), None), "output_bf16": (o, gc.output_want(o), None),
            "uvqk_fp8": (fp8, _fp8.reference_gemm(xq, rs, wq, cs, t["bias"], t["hv"]), gc.uvqk_want(t))}


def out_like(kind: str, t: dict):
    import torch

    rows, cols = (t["x"].shape if kind == "output_bf16" else (t["xn"].shape[0], t["w"].shape[1]))
    return torch.full((rows, cols), float("nan"), device="cuda", dtype=torch.bfloat16)


def check(variants: list, lib) -> list[dict]:
    import torch

    import gpu_cutlass as gc
    import gpu_fp8 as gf

    gen, rows = torch.Generator().manual_seed(0), []
    for c in gc.cases():
        per_kind = inputs(c, gen)
        for v in variants:
            t, want, want_bf16 = per_kind[v.gemm]
            out = out_like(v.gemm, t)
            label = {"kernel": f"{v.gemm} {v.name}", "lib": "sweep"}
            try:
                _, fb = gc.fell_back(lambda: launcher(v, lib)(t, out))  # noqa: B023
                rows.append(gf.check_row(label["kernel"], gc.name(c), out, want, want_bf16, fell_back=fb, lib="sweep")
                            if want_bf16 is not None else gc.row(label["kernel"], gc.name(c), out, want, fell_back=fb,
                                                                  lib="sweep"))
            except Exception as exc:  # noqa: BLE001 - a refused case fails its row
                rows.append({**label, "case": gc.name(c), "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]})
    torch.cuda.synchronize()
    return rows


def timings(variants: list, lib, rep: int) -> list[dict]:
    import torch

    import gpu_cutlass as gc

    gen = torch.Generator().manual_seed(2)
    c = dict(gc.DLRM, strided=True)
    per_kind = {k: v[0] for k, v in inputs(c, gen).items()}
    M, D = gc.DLRM["M"], gc.DLRM["D"]
    t, o, f = per_kind["uvqk_bf16"], per_kind["output_bf16"], per_kind["uvqk_fp8"]
    flop = {"uvqk_bf16": 2 * M * D * t["w"].shape[1], "uvqk_fp8": 2 * M * D * t["w"].shape[1],
            "output_bf16": 2 * M * o["w"].shape[0] * D}
    outs = {k: out_like(k, per_kind[k]) for k in per_kind}
    y = torch.cat([o["u"], o["a"], o["g"]], dim=1)
    baselines = [
        ("uvqk_bf16", "cublas matmul (no epilogue)", lambda: torch.matmul(t["xn"], t["w"], out=outs["uvqk_bf16"])),
        ("uvqk_fp8", "cublas _scaled_mm rowwise (no epilogue)",
         lambda: torch._scaled_mm(f["xq"], f["wq"].t(), f["rs"][:, None], f["cs"][None, :], out_dtype=torch.bfloat16)),
        ("output_bf16", "cublas matmul of the concat (no epilogue)", lambda: torch.matmul(y, o["w"], out=outs["output_bf16"])),
    ]
    runs = [(k, impl, fn, None) for k, impl, fn in baselines]
    runs += [(v.gemm, v.name, (lambda v=v: launcher(v, lib)(per_kind[v.gemm], outs[v.gemm])), v) for v in variants]
    rows = []
    for kind, impl, fn, v in runs:
        row = {"gemm": kind, "impl": impl, "shipped": v.shipped if v else "", "cublas": v is None}
        try:
            r = gc.bench(fn, rep)
            rows.append(row | r | {"tflops": flop[kind] / r["ms"] / 1e9})
        except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others
            rows.append(row | {"error": f"{type(exc).__name__}: {exc}"[:500]})
    return rows


def ranked(rows: list[dict], ok: set[str]) -> list[dict]:
    """Per GEMM, the checked variants fastest first, with the bar's ratio: bf16 against cuBLAS's bare
    matmul (bar <= 1.0), FP8 uvqk as the speedup over the fastest checked bf16 uvqk (bar >= 1.6)."""
    timed = [r for r in rows if "ms" in r]
    best_bf16 = min((r["ms"] for r in timed if r["gemm"] == "uvqk_bf16" and not r["cublas"]
                     and f"uvqk_bf16 {r['impl']}" in ok), default=None)
    out = []
    for kind in sweep.GEMMS:
        cublas = next((r["ms"] for r in timed if r["gemm"] == kind and r["cublas"]), None)
        for r in sorted((r for r in timed if r["gemm"] == kind), key=lambda r: r["ms"]):
            if not r["cublas"] and f"{kind} {r['impl']}" not in ok:
                continue
            extra = ({"x_cublas": r["ms"] / cublas} if cublas and kind != "uvqk_fp8" else {}) | (
                {"speedup_vs_bf16": best_bf16 / r["ms"]} if best_bf16 and kind == "uvqk_fp8" else {})
            out.append(r | extra)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("-j", "--jobs", type=int, default=16)
    p.add_argument("--only", default="", help=f"comma-separated GEMMs of {sorted(sweep.GEMMS)}")
    p.add_argument("--rep", type=int, default=200, help="ms of timing per variant")
    p.add_argument("--cutlass-wheel", type=Path, default=None)
    p.add_argument("--compile-only", action="store_true", help="no GPU: build the variants and disassemble them")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    only = {g for g in args.only.split(",") if g} or None
    import gpu_cutlass as gc

    gc.cutlass_headers(args.cutlass_wheel)
    built = sweep.build(args.out / "build", jobs=args.jobs, check=True, only=only)
    result = {"build": {k: v for k, v in built.items() if k != "variants"},
              "variants": [{k: v for k, v in r.items() if k != "error"} | ({"error": r["error"][-600:]} if "error" in r else {})
                           for r in built["variants"]]}
    compiled = [v for v, r in zip(sweep.variants(only), built["variants"]) if r["compiled"]]
    if compiled:
        result["can_implement"] = can_implement(compiled, load(built["lib"], compiled))
    if not args.compile_only and compiled:
        result["env"] = gc.env()
        try:
            lib = load(built["lib"], compiled)
            result["checks"] = check(compiled, lib)
            ok = {k for k in {r["kernel"] for r in result["checks"]}
                  if all(r["ok"] for r in result["checks"] if r["kernel"] == k)}
            result["ceiling_matmul_bf16_tflops"] = gc.ceiling(args.rep)
            result["timings"] = timings(compiled, lib, args.rep)
            result["ranked"] = ranked(result["timings"], ok)
        except Exception:  # noqa: BLE001 - keep what was measured
            result["error"] = traceback.format_exc()[-3000:]
    (args.out / "cutlass_sweep.json").write_text(json.dumps(result, indent=1, default=str))
    report(result)
    failed = [r for r in result.get("checks", []) if not r["ok"]]
    refused = [k for k, codes in result.get("can_implement", {}).items() if any(codes.values())]
    return 0 if compiled and "error" not in result and not refused and (args.compile_only or not failed) else 1


def report(result: dict) -> None:
    for r in result["variants"]:
        state = (f"regs {r['registers']} spills {r['spill_store_bytes']} B {r['compile_s']:.0f} s" if r["compiled"]
                 else "did not compile: " + r["error"].strip().splitlines()[-1][:100])
        print(f"{r['gemm']:12} {r['name']:26} {'(shipped ' + r['shipped'] + ')' if r['shipped'] else '':18} {state}")
    refused = {k: c for k, c in result.get("can_implement", {}).items() if any(c.values())}
    print(f"can_implement at dlrm-v3 batch 16 and M=333: {len(result.get('can_implement', {})) - len(refused)} take both"
          + (f"; refused: {refused}" if refused else ""))
    if "checks" in result:
        failed = [r for r in result["checks"] if not r["ok"]]
        print(f"checks: {len(result['checks'])} rows, {len(failed)} failed")
        for r in failed[:20]:
            print("  FAIL", {k: r.get(k) for k in ("kernel", "case", "rel_err", "rel_err_vs_dequantized", "error")})
    if "ranked" in result:
        ceil = result["ceiling_matmul_bf16_tflops"]
        print(f"bf16 8192^3 matmul ceiling: {ceil:.0f} TFLOP/s (same run)")
        for r in result["ranked"]:
            ratio = (f"{r['x_cublas']:.3f}x cuBLAS" if "x_cublas" in r else
                     f"{r['speedup_vs_bf16']:.2f}x bf16" if "speedup_vs_bf16" in r else "")
            print(f"{r['gemm']:12} {r['impl']:42} {r['ms']:8.4f} ms {r['tflops']:6.0f} TFLOP/s {ratio:>16}"
                  + (f"  shipped {r['shipped']}" if r["shipped"] else ""))
    if "error" in result:
        print(result["error"])


if __name__ == "__main__":
    sys.exit(main())
