"""cutlass_kernels/sweep.py's variants, without compiling them (CI has no time for 20 CUTLASS kernels; the
CPU machine's compile-only run is benchmarks/results/cutlass_sweep_compile_cpu_*.json): every variant is a
distinct instance with its own symbol and a declared C ABI, and the variants marked `shipped` are exactly
the shipped instances (the same template, tile, cluster and schedules as their .cu), so the sweep's
timings compare against what the engine runs today."""

import re

from cutlass_kernels import HERE, SOURCES, sweep
from hstu_opt.ops import _cutlass


def _instance(text: str) -> tuple:
    """(template, numbers of the tile and cluster shapes, schedules) of the one instance a .cu defines."""
    template = re.search(r"(hstu::(?:fp8::)?\w+)<", text).group(1)
    dims = tuple(int(n) for n in re.findall(r"cute::_(\d+)", text))
    schedules = tuple(re.findall(r"cutlass::(?:gemm|epilogue)::\w+", text))
    return template, dims, schedules


def test_variants_are_distinct_instances_with_declared_abis():
    vs = sweep.variants()
    assert len({v.symbol for v in vs}) == len(vs) and len({v.stem for v in vs}) == len(vs)
    assert len({(v.gemm, v.schedule, v.tile, v.cluster) for v in vs}) == len(vs)
    for v in vs:
        assert sweep.GEMMS[v.gemm][4] in _cutlass.ABI
        text = v.source()
        assert f'#include "{sweep.GEMMS[v.gemm][0]}"' in text and (HERE / sweep.GEMMS[v.gemm][0]).exists()
        assert v.name in text and v.symbol.startswith(sweep.GEMMS[v.gemm][3])


def test_shipped_variants_are_the_shipped_kernels():
    shipped = {"uvqk_bf16": {f"uvqk_bf16_{c}.cu": c for c in _cutlass.UVQK_CONFIGS},
               "uvqk_fp8": {f"uvqk_fp8_{c}.cu": c for c in _cutlass.UVQK_CONFIGS},
               "output_bf16": {"hstu_output_bf16.cu": "coop"}}
    marked = {(v.gemm, v.shipped): v for v in sweep.variants() if v.shipped}
    assert len(marked) == sum(len(s) for s in shipped.values())
    for gemm, files in shipped.items():
        for source, config in files.items():
            assert source in SOURCES
            v = marked[(gemm, config)]
            assert _instance((HERE / source).read_text()) == _instance(v.source()), (source, v.name)


def test_only_filters_by_gemm():
    assert {v.gemm for v in sweep.variants({"output_bf16"})} == {"output_bf16"}
    assert len(sweep.variants()) == len(sweep.VARIANTS)


def test_the_gpu_scripts_checks_and_ranking(monkeypatch):
    """benchmarks/cutlass_sweep.py's bookkeeping on the CPU, with each variant's kernel replaced by its math in
    torch: every variant checked on every case, a variant that leaves its output unwritten (NaN-poisoned) or
    wrong fails and drops out of the ranking, and the ranking's ratios are the bars' (bf16 against cuBLAS,
    FP8 against the fastest checked bf16 uvqk)."""
    import sys

    import torch

    from hstu_opt.ops import _fp8

    sys.path.insert(0, str(HERE.parent / "benchmarks"))
    import cutlass_sweep as cs
    import gpu_cutlass as gc

    cases = [dict(M=7, D=64, H=1, d=32, strided=False), dict(M=33, D=64, H=2, d=32, strided=True)]
    monkeypatch.setattr(gc, "DEV", "cpu")
    monkeypatch.setattr(gc, "cases", lambda: cases)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(cs, "out_like", lambda kind, t: torch.full(
        t["x"].shape if kind == "output_bf16" else (t["xn"].shape[0], t["w"].shape[1]), float("nan"), dtype=torch.bfloat16))
    broken = {"uvqk_bf16 pingpong_128x128x64_c1x1": "unwritten", "output_bf16 coop_128x256x64_c1x1": "wrong"}

    def math(v, lib):
        def run(t, out):
            if v.gemm == "uvqk_bf16":
                z = t["xn"].float() @ t["w"].float() + t["bias"].float()
                z[:, :t["hv"]] = torch.nn.functional.silu(z[:, :t["hv"]])
            elif v.gemm == "uvqk_fp8":
                z = _fp8.reference_gemm(t["xq"], t["rs"], t["wq"], t["cs"], t["bias"], t["hv"])
            else:
                z = torch.cat([t["u"], t["a"], t["g"]], 1).float() @ t["w"].float() + t["x"].float()
            how = broken.get(f"{v.gemm} {v.name}")
            if how != "unwritten":
                out.copy_(z * (1.1 if how == "wrong" else 1.0))
        return run

    monkeypatch.setattr(cs, "launcher", math)
    variants = sweep.variants()
    rows = cs.check(variants, lib=None)
    assert len(rows) == len(variants) * len(cases)
    failed = {r["kernel"] for r in rows if not r["ok"]}
    assert failed == set(broken)
    ok = {r["kernel"] for r in rows} - failed
    timed = [{"gemm": v.gemm, "impl": v.name, "shipped": v.shipped, "cublas": False, "ms": 0.2 + 0.01 * i}
             for i, v in enumerate(variants)]
    timed += [{"gemm": g, "impl": "cublas", "shipped": "", "cublas": True, "ms": 0.25} for g in sweep.GEMMS]
    ranked = cs.ranked(timed, ok)
    assert not {f"{r['gemm']} {r['impl']}" for r in ranked} & set(broken)
    best_bf16 = min(r["ms"] for r in ranked if r["gemm"] == "uvqk_bf16" and not r["cublas"])
    for r in ranked:
        if r["gemm"] == "uvqk_fp8":
            assert r["speedup_vs_bf16"] == best_bf16 / r["ms"]
        else:
            assert r["x_cublas"] == r["ms"] / 0.25
    assert [r["ms"] for r in ranked if r["gemm"] == "output_bf16"] == sorted(r["ms"] for r in ranked if r["gemm"] == "output_bf16")
