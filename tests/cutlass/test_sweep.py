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
