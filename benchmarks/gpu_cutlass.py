"""H200 checks and timings of the CUTLASS projections (cutlass_kernels/), in one run (< 4 minutes).

    python benchmarks/gpu_cutlass.py --out DIR [--carried .cache/cutlass] [--no-build] [-j 8]
    python benchmarks/gpu_cutlass.py --smoke --out DIR     # no GPU: build (cached), can_implement of every case

1. libraries: every library carried under --carried (built on the CPU machine with the pip nvcc 13.5:
   `python -m cutlass_kernels.build`) and, unless --no-build, one built here with this machine's nvcc
   and the CUTLASS headers of the carried `nvidia-cutlass` wheel (--cutlass-wheel, default
   .gpu-wheels/nvidia_cutlass-4.2.0.0-*.whl); each is loaded and checked, and the JSON says which worked;
2. correctness of each kernel against float64 math, outputs NaN-poisoned before each launch: uvqk and
   hstu_output for D (uvqk's K, hstu_output's N) in {64, 512} x H in {1, 2, 4} x d in {32, 64, 128} x
   M in {1, 333} (no tile multiple), D = 192 and 1024, u read as the strided view of the uvqk output it is
   in the model, and M = 69,632 (dlrm-v3 batch 16); then the ops (LayerNorm pass + kernel, Impl.CUTLASS)
   against the float64 reference and with no fallback warning;
3. speed at dlrm-v3 batch 16 (M = 69,632, D = 512, H = 4, d = 128), CUDA-graph replays: the CUTLASS
   GEMM vs cuBLAS's bare torch.matmul of the same shape vs the Triton GEMM, and the whole ops (CUTLASS vs
   Triton); a bf16 8192^3 matmul ceiling in the same run.
Prints a table and writes gpu_cutlass.json (date, GPU, versions, build info) to DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
import warnings
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cutlass_kernels import LIB_NAME  # noqa: E402
from gpu_hstu import graphed  # noqa: E402
from cutlass_kernels import build as kbuild  # noqa: E402
from hstu_opt.ops import _cutlass  # noqa: E402

DEV = "cuda"
BAR = 1e-2  # bf16: max |err| / max |ref| against float64 (benchmarks/gpu_hstu.py's bar)
DLRM = dict(M=16 * (4096 + 256), D=512, H=4, d=128)


def cases() -> list[dict]:
    """(M, D, H, d, strided_u) of the kernel checks."""
    rows = [dict(M=M, D=D, H=H, d=d, strided=False) for D in (64, 512) for H in (1, 2, 4) for d in (32, 64, 128)
            for M in (1, 333)]
    rows += [dict(M=4353, D=192, H=2, d=64, strided=True), dict(M=4353, D=1024, H=4, d=128, strided=True),
             dict(M=1000, D=512, H=4, d=128, strided=True), dict(DLRM, strided=True)]
    return rows


def name(c: dict) -> str:
    return f"M={c['M']} D={c['D']} H={c['H']} d={c['d']}" + (" strided-u" if c["strided"] else "")


# ---------------------------------------------------------------------------------------------- checks
def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30))


def row(kernel: str, case: str, got: torch.Tensor, want: torch.Tensor, fell_back: bool = False, **extra) -> dict:
    err, unwritten = rel_err(got, want), int((~torch.isfinite(got)).sum())
    return {"kernel": kernel, "case": case, "rel_err": err, "bar": BAR, "unwritten": unwritten,
            "fell_back": fell_back, "ok": unwritten == 0 and err <= BAR and not fell_back, **extra}


def fell_back(fn) -> tuple[object, bool]:
    """fn()'s result, and whether it ran the Triton op instead of the kernel (the fallback's warning)."""
    _cutlass.warn_fallback.cache_clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = fn()
    return result, any("does not cover" in str(w.message) for w in seen)


def uvqk_inputs(c: dict, gen: torch.Generator) -> dict:
    M, D, H, d = c["M"], c["D"], c["H"], c["d"]
    N = 4 * H * d  # [u | v | q | k], dqk = dv = d
    return dict(xn=torch.randn(M, D, generator=gen).to(DEV, torch.bfloat16),
                w=(torch.randn(D, N, generator=gen) * D ** -0.5).to(DEV, torch.bfloat16),
                bias=(torch.randn(N, generator=gen) * 0.5).to(DEV, torch.bfloat16), hv=H * d)


def uvqk_want(t: dict) -> torch.Tensor:
    z = t["xn"].double() @ t["w"].double() + t["bias"].double()
    z[:, :t["hv"]] = torch.nn.functional.silu(z[:, :t["hv"]])
    return z


def output_inputs(c: dict, gen: torch.Generator) -> dict:
    M, D, hv = c["M"], c["D"], c["H"] * c["d"]
    uvqk_out = torch.randn(M, 4 * hv, generator=gen).to(DEV, torch.bfloat16)  # u: its first hv columns
    u = uvqk_out[:, :hv] if c["strided"] else uvqk_out[:, :hv].contiguous()
    a, g = (torch.randn(M, hv, generator=gen).to(DEV, torch.bfloat16) for _ in range(2))
    return dict(u=u, a=a, g=g, x=torch.randn(M, D, generator=gen).to(DEV, torch.bfloat16),
                w=(torch.randn(3 * hv, D, generator=gen) * (3 * hv) ** -0.5).to(DEV, torch.bfloat16))


def output_want(t: dict) -> torch.Tensor:
    y = torch.cat([t["u"], t["a"], t["g"]], dim=1).double()
    return y @ t["w"].double() + t["x"].double()


def check_kernels(lib, label: str) -> list[dict]:
    from hstu_opt.ops.hstu_output.cutlass import launch as output_launch
    from hstu_opt.ops.uvqk.cutlass import launch as uvqk_launch

    gen, rows = torch.Generator().manual_seed(0), []
    for c in cases():  # a fallback to Triton (the kernel refused the case) fails the row
        t = uvqk_inputs(c, gen)
        want = uvqk_want(t)
        for config in _cutlass.UVQK_CONFIGS:
            out = torch.full((c["M"], t["w"].shape[1]), float("nan"), device=DEV, dtype=torch.bfloat16)
            _, fb = fell_back(lambda: uvqk_launch(t["xn"], t["w"], t["bias"], out, t["hv"], lib=lib, config=config))
            rows.append(row(f"uvqk {config}", name(c), out, want, lib=label, fell_back=fb))
        t = output_inputs(c, gen)
        out = torch.full_like(t["x"], float("nan"))
        _, fb = fell_back(lambda: output_launch(t["u"], t["a"], t["g"], t["x"], t["w"], out, lib=lib))
        rows.append(row("hstu_output", name(c), out, output_want(t), lib=label, fell_back=fb))
    torch.cuda.synchronize()
    return rows


OP_CASES = ((333, 512, 4, 128), (1, 64, 1, 32), (4353, 192, 2, 64))  # M, D, H, d of the op checks


def op_inputs(device: str = DEV, seed: int = 1):
    """The op checks' inputs, case by case from one seeded generator, always drawn in the same order (so
    gpu_fp8's op check and fp8_code_flips.py see exactly these): (case label, M, D, H, d, x [M, D] bf16, uvqk
    params [norm weight, norm bias, W [D, N] bf16, bias], a [M, H*d] bf16, hstu_output params [norm weight,
    norm bias, W_out [3*H*d, D] bf16])."""
    gen = torch.Generator().manual_seed(seed)
    for M, D, H, d in OP_CASES:
        hv, N = H * d, 4 * H * d
        f = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
        x = (f(M, D) * 2 + 1).to(torch.bfloat16)
        p = [f(D) * 0.2 + 1, f(D) * 0.2, (f(D, N) * D ** -0.5).to(torch.bfloat16), f(N) * 0.3]
        a = f(M, hv).to(torch.bfloat16)
        q = [f(hv) * 0.2 + 1, f(hv) * 0.2, (f(3 * hv, D) * (3 * hv) ** -0.5).to(torch.bfloat16)]
        yield f"M={M} D={D} H={H} d={d}", M, D, H, d, x, p, a, q


def check_ops() -> list[dict]:
    """ops.uvqk / ops.hstu_output with Impl.CUTLASS (LayerNorm pass + kernel) against the float64
    reference ops; a fallback warning (an uncovered call) fails the check."""
    from hstu_opt import ops
    from hstu_opt.ops import Impl

    rows = []
    for case, M, D, H, d, x, p, a, q in op_inputs():
        kw = dict(num_heads=H, attention_dim=d, linear_dim=d)
        got, fb = fell_back(lambda: ops.uvqk(x, *p, impl=Impl.CUTLASS, **kw))  # noqa: B023
        want = ops.uvqk(x.double(), *(t.double() for t in p), **kw)
        for n, g, w in zip("uqkv", got, want):
            rows.append(row(f"op uvqk.{n}", case, g, w, fell_back=fb))
        u = got[0]
        out, fb = fell_back(lambda: ops.hstu_output(u, a, x, *q, impl=Impl.CUTLASS))  # noqa: B023
        want = ops.hstu_output(u.double(), a.double(), x.double(), *(t.double() for t in q))
        rows.append(row("op hstu_output", case, out, want, fell_back=fb))
    return rows


# ---------------------------------------------------------------------------------------------- speed


def bench(fn, rep: int) -> dict:
    """ms per call of CUDA-graph replays (how the compiled engine runs them); eager if capture fails."""
    from triton.testing import do_bench

    try:
        return {"ms": do_bench(graphed(fn)[0], warmup=10, rep=rep), "mode": "graph"}
    except Exception as exc:  # noqa: BLE001
        torch.cuda.synchronize()
        return {"ms": do_bench(fn, warmup=10, rep=rep), "mode": "eager", "graph_error": f"{type(exc).__name__}: {exc}"}


def ceiling(rep: int) -> float:
    from triton.testing import do_bench

    a, b = (torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192 ** 3 / do_bench(lambda: a @ b, warmup=50, rep=rep * 3) / 1e9


def timings(rep: int) -> list[dict]:
    from hstu_opt.ops._triton import ensure_allocator, launch_gemm
    from hstu_opt.ops.hstu_output.cutlass import hstu_output_cutlass
    from hstu_opt.ops.hstu_output.cutlass import launch as output_launch
    from hstu_opt.ops.hstu_output.triton import hstu_output_triton
    from hstu_opt.ops.uvqk.cutlass import launch as uvqk_launch
    from hstu_opt.ops.uvqk.cutlass import uvqk_cutlass
    from hstu_opt.ops.uvqk.triton import uvqk_triton

    ensure_allocator(torch.device(DEV))
    gen, ident = torch.Generator().manual_seed(2), (lambda kernel: kernel)
    M, D = DLRM["M"], DLRM["D"]
    c = dict(DLRM, strided=True)
    t, o = uvqk_inputs(c, gen), output_inputs(c, gen)
    N, hv = t["w"].shape[1], t["hv"]
    x, nw, nb = o["x"], torch.ones(D, device=DEV), torch.zeros(D, device=DEV)
    out_p, out_o = torch.empty(M, N, device=DEV, dtype=torch.bfloat16), torch.empty_like(o["x"])
    y = torch.cat([o["u"], o["a"], o["g"]], dim=1)  # cuBLAS's operand: the concat it would need
    nwo, nbo = torch.ones(hv, device=DEV), torch.zeros(hv, device=DEV)
    flop_p, flop_o = 2 * M * D * N, 2 * M * 3 * hv * D
    variants = [
        *[("uvqk gemm", f"cutlass {config}", flop_p,
           lambda config=config: uvqk_launch(t["xn"], t["w"], t["bias"], out_p, hv, config=config))
          for config in _cutlass.UVQK_CONFIGS],
        ("uvqk gemm", "cublas matmul (no epilogue)", flop_p, lambda: torch.matmul(t["xn"], t["w"], out=out_p)),
        ("uvqk gemm", "triton", flop_p,
         lambda: launch_gemm([t["xn"]], t["w"], out_p, ident, bias=t["bias"], silu_cols=hv)),
        ("uvqk op (LN + gemm)", f"cutlass {_cutlass.UVQK_CONFIG}", flop_p,
         lambda: uvqk_cutlass(x, nw, nb, t["w"], t["bias"], hv, 1e-6)),
        ("uvqk op (LN + gemm)", "triton", flop_p, lambda: uvqk_triton(x, nw, nb, t["w"], t["bias"], hv, 1e-6)),
        ("hstu_output gemm", "cutlass", flop_o, lambda: output_launch(o["u"], o["a"], o["g"], x, o["w"], out_o)),
        ("hstu_output gemm", "cublas matmul (no epilogue)", flop_o, lambda: torch.matmul(y, o["w"], out=out_o)),
        ("hstu_output gemm", "triton", flop_o,
         lambda: launch_gemm([o["u"], o["a"], o["g"]], o["w"], out_o, ident, residual=x)),
        ("hstu_output op (gated LN + gemm)", "cutlass", flop_o,
         lambda: hstu_output_cutlass(o["u"], o["a"], x, nwo, nbo, o["w"], 1e-6)),
        ("hstu_output op (gated LN + gemm)", "triton", flop_o,
         lambda: hstu_output_triton(o["u"], o["a"], x, nwo, nbo, o["w"], 1e-6)),
    ]
    rows = []
    for what, impl, flop, fn in variants:
        try:
            r = bench(fn, rep)
            rows.append({"what": what, "impl": impl, **r, "tflops": flop / r["ms"] / 1e9})
        except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others
            rows.append({"what": what, "impl": impl, "error": f"{type(exc).__name__}: {exc}"})
    return rows


# ---------------------------------------------------------------------------------------------- libraries
def cutlass_headers(wheel: Path | None) -> None:
    """Unpack the carried nvidia-cutlass wheel's headers and point the build at them (no registry here)."""
    if os.environ.get("CUTLASS_INCLUDE") or kbuild._wheel_dir("cutlass_library"):
        return
    wheels = [wheel] if wheel else sorted((ROOT / ".gpu-wheels").glob("nvidia_cutlass-4.2.0.0-*.whl"))
    if not wheels or not wheels[0].exists():
        raise FileNotFoundError("no CUTLASS headers: carry the nvidia-cutlass 4.2.0.0 wheel (--cutlass-wheel)")
    dest = Path("/tmp/hstu_cutlass_wheel")
    if not (dest / "cutlass_library" / "source" / "include" / "cutlass").is_dir():
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(dest, [n for n in z.namelist() if n.startswith("cutlass_library/source/include/")])
    os.environ["CUTLASS_INCLUDE"] = str(dest / "cutlass_library" / "source" / "include")


def libraries(args) -> tuple[dict, list[dict]]:
    """name -> library path, and what happened building / finding each."""
    found, notes = {}, []
    for manifest in sorted(Path(args.carried).glob(f"*/{LIB_NAME}")):
        info = json.loads((manifest.parent / "build.json").read_text())
        if info.get("sources_sha256") != kbuild.sources_digest():  # built from other sources: not the code now
            notes.append({"lib": f"carried:{manifest.parent.name}", "skipped": "stale: built from other sources "
                          f"({info.get('sources_sha256', 'no digest: an older build')[:16]}, now "
                          f"{kbuild.sources_digest()[:16]})"})
            continue
        found[f"carried:{manifest.parent.name}"] = str(manifest)
        notes.append({"lib": f"carried:{manifest.parent.name}", "nvcc": info["nvcc"], "cutlass": info["cutlass"]})
    if not args.no_build:
        try:
            cutlass_headers(args.cutlass_wheel)
            t0 = time.perf_counter()
            info = kbuild.build("sm_90a", Path("/tmp/hstu_cutlass_build"), jobs=args.jobs, check=True)
            found["built_here"] = info["lib"]
            notes.append({"lib": "built_here", "wall_s": round(time.perf_counter() - t0, 1),
                          **{k: info[k] for k in ("nvcc", "cutlass", "build_s", "kernels", "cached")}})
        except Exception as exc:  # noqa: BLE001
            notes.append({"lib": "built_here", "error": f"{type(exc).__name__}: {exc}"[-3000:]})
    return found, notes


def smoke(args) -> dict:
    """No GPU: build (or find) the library, then every check case through can_implement."""
    info = kbuild.build("sm_90a", jobs=args.jobs, check=True)
    lib = _cutlass.load(info["lib"])
    bad = []
    for c in cases():
        M, D, hv = c["M"], c["D"], c["H"] * c["d"]
        for config in _cutlass.UVQK_CONFIGS:
            if getattr(lib, f"hstu_uvqk_bf16_{config}_can_implement")(D, 4 * hv, 4 * hv, M, 4 * hv, D) != 0:
                bad.append((f"uvqk {config}", name(c)))
        lda0 = 4 * hv if c["strided"] else hv
        if lib.hstu_output_bf16_can_implement(lda0, hv, hv, D, D, D, M, D, hv) != 0:
            bad.append(("hstu_output", name(c)))
    return {"lib": info["lib"], "cached": info["cached"], "cases": len(cases()), "refused": bad}


def env() -> dict:
    import triton

    return {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gpu": torch.cuda.get_device_name(),
            "capability": ".".join(map(str, torch.cuda.get_device_capability())), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "driver": torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--carried", type=Path, default=ROOT / ".cache" / "cutlass")
    p.add_argument("--cutlass-wheel", type=Path, default=None)
    p.add_argument("--no-build", action="store_true", help="only the carried libraries")
    p.add_argument("-j", "--jobs", type=int, default=8)
    p.add_argument("--rep", type=int, default=200, help="ms of timing per variant")
    p.add_argument("--smoke", "--compile-only", action="store_true", help="no GPU: build + can_implement of every case")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        result = smoke(args)
        (args.out / "gpu_cutlass_smoke.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return 0 if not result["refused"] else 1
    result = {"env": env()}
    found, result["libraries"] = libraries(args)
    result["checks"], working = [], []
    for label, path in found.items():
        try:
            rows = check_kernels(_cutlass.load(path), label)
        except Exception:  # noqa: BLE001 - e.g. a carried library the driver cannot run
            rows = [{"kernel": "*", "lib": label, "ok": False, "error": traceback.format_exc()[-2000:]}]
        result["checks"] += rows
        if all(r["ok"] for r in rows):
            working.append(label)
    result["working_libraries"] = working
    if working:
        os.environ[_cutlass.ENV_LIB] = found[working[0]]
        result["timed_library"] = working[0]
        result["op_checks"] = check_ops()
        result["ceiling_matmul_bf16_tflops"] = ceiling(args.rep)
        result["timings"] = timings(args.rep)
    (args.out / "gpu_cutlass.json").write_text(json.dumps(result, indent=1, default=str))
    report(result)
    return 0 if working and all(r["ok"] for r in result["checks"] + result["op_checks"]) else 1


def report(result: dict) -> None:
    failed = [r for r in result["checks"] + result.get("op_checks", []) if not r["ok"]]
    print(f"libraries: {[n.get('lib') for n in result['libraries']]}; working: {result['working_libraries']}")
    for n in result["libraries"]:
        if "error" in n:
            print(f"  {n['lib']}: {n['error'][-500:]}")
    print(f"checks: {len(result['checks']) + len(result.get('op_checks', []))} rows, {len(failed)} failed")
    for r in failed[:20]:
        print("  FAIL", r)
    worst = max((r for r in result["checks"] if "rel_err" in r), key=lambda r: r["rel_err"], default=None)
    if worst:
        print(f"  worst rel_err {worst['rel_err']:.2e} ({worst['kernel']} {worst['case']} {worst['lib']})")
    if "timings" in result:
        ceil = result["ceiling_matmul_bf16_tflops"]
        print(f"bf16 8192^3 matmul ceiling: {ceil:.0f} TFLOP/s")
        print(f"{'what':34} {'impl':28} {'ms':>8} {'TFLOP/s':>8} {'of ceil':>7}")
        for r in result["timings"]:
            if "error" in r:
                print(f"{r['what']:34} {r['impl']:28} {r['error'][:60]}")
            else:
                print(f"{r['what']:34} {r['impl']:28} {r['ms']:8.4f} {r['tflops']:8.0f} {r['tflops'] / ceil:7.2f}"
                      + ("" if r["mode"] == "graph" else " (eager: graph capture failed)"))


if __name__ == "__main__":
    sys.exit(main())
