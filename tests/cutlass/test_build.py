"""Compile-only CI for cutlass_kernels/: every shipped kernel builds for sm_90a, and the products are what
a Hopper GEMM must be: an sm_90a cubin (no PTX to JIT), warpgroup MMA (HGMMA) fed by TMA loads and
written by TMA stores, no local-memory spills; the library's C ABI exports load and answer
can_implement without a GPU.

The first run compiles each kernel (~50-75 s and ~3.3 GB each, one at a time); the products are cached
under .cache/cutlass/ by a hash of the sources, flags and toolchain, so reruns take about a second.
"""

import pytest

build = pytest.importorskip("cutlass_kernels.build")


def _toolchain_or_skip():
    try:
        build.nvcc_path(), build.cutlass_include()
    except FileNotFoundError as exc:
        pytest.skip(f"{exc} (the `cutlass` extra; `make install` installs it)")


@pytest.fixture(scope="module")
def built():
    _toolchain_or_skip()
    return build.build("sm_90a", jobs=1, check=True)


def test_every_source_is_one_sm90a_kernel_without_spills(built):
    from cutlass_kernels import SOURCES

    assert [k["source"] for k in built["kernels"]] == list(SOURCES)
    for k in built["kernels"]:
        assert k["entries"] == 1, k  # one kernel instance per source (compile time)
        assert k["spill_store_bytes"] == 0 and k["spill_load_bytes"] == 0, k
        assert k["stack_bytes"] == [0], k


def test_products_are_hopper_tma_gmma_code(built):
    for k in built["kernels"]:
        info = k["inspect"]
        assert info["archs"] == ["sm_90a"], k["source"]
        if info["sass"] is None:
            pytest.skip("cuobjdump not installed: architecture checked, instructions not")
        assert info["ptx"] == [], k["source"]  # SASS only: nothing for a driver to JIT
        sass = info["sass"]
        # bf16 kernels: HGMMA; FP8 kernels: QGMMA e4m3 x e4m3 -> F32 (and no bf16 MMA: nothing upcast)
        mma = ("QGMMA.E4M3", "HGMMA") if "_fp8" in k["source"] else ("HGMMA", "QGMMA.E4M3")
        assert sass[mma[0]] > 0 and sass[mma[1]] == 0, (k["source"], sass)
        assert sass["UTMALDG"] > 0 and sass["UTMASTG"] > 0, (k["source"], sass)
    for uvqk in (k for k in built["kernels"] if k["source"].startswith("uvqk_")):
        assert uvqk["inspect"]["sass"]["MUFU.TANH"] > 0  # the SiLU epilogue is in the GEMM


def test_a_second_build_is_the_cache(built):
    again = build.build("sm_90a", jobs=1)
    assert again["cached"] and again["lib"] == built["lib"]


def test_objects_are_cached_per_kernel():
    """A kernel's object key covers its own source and the headers it includes: adding the FP8 kernels (or
    editing fp8.hpp) does not recompile the bf16 ones."""
    nvcc = build.nvcc_path()
    assert "fp8.hpp" not in build.includes("uvqk_bf16_coop.cu") and "uvqk.hpp" in build.includes("uvqk_bf16_coop.cu")
    assert {"fp8.hpp", "common.hpp", "uvqk.hpp", "uvqk_fp8.hpp"} <= set(build.includes("uvqk_fp8_coop.cu"))
    keys = {build.object_key(s, "sm_90a", nvcc) for s in ("uvqk_bf16_coop.cu", "uvqk_fp8_coop.cu", "hstu_output_fp8.cu")}
    assert len(keys) == 3


def test_can_implement_through_the_c_abi(built):
    from hstu_opt.ops import _cutlass

    lib = _cutlass.load(built["lib"])  # loads without a GPU: only libcudart.so.13
    for config in _cutlass.UVQK_CONFIGS:
        uvqk = getattr(lib, f"hstu_uvqk_bf16_{config}_can_implement")  # (lda, ldw, ldo, M, N, K)
        assert uvqk(512, 2048, 2048, 69632, 2048, 512) == 0
        assert uvqk(64, 128, 128, 1, 128, 64) == 0  # M = 1, H = 1, d = 16: not a multiple of any tile
        assert uvqk(50, 128, 128, 7, 128, 50) == 1  # rows of 100 bytes: not TMA-aligned
        assert uvqk(64, 132, 128, 7, 128, 64) == 1  # W's rows not 16-byte aligned
    out = lib.hstu_output_bf16_can_implement  # (lda0, lda1, lda2, ldw, ldr, ldo, M, N, k_part)
    assert out(2048, 512, 512, 512, 512, 512, 69632, 512, 512) == 0
    assert out(128, 32, 32, 64, 64, 64, 3, 64, 32) == 0  # H*dv = 32: half a K tile per operand
    assert out(128, 36, 36, 64, 64, 64, 3, 64, 36) == 1
    # FP8: e4m3 rows (16-byte TMA rows = 16 elements), W stored transposed [N, K]
    for config in _cutlass.UVQK_CONFIGS:
        uvqk = getattr(lib, f"hstu_uvqk_fp8_{config}_can_implement")  # (lda, ldwt, ldo, M, N, K)
        assert uvqk(512, 512, 2048, 69632, 2048, 512) == 0
        assert uvqk(64, 64, 128, 1, 128, 64) == 0
        assert uvqk(50, 64, 128, 7, 128, 50) == 1  # rows of 50 bytes
        assert uvqk(64, 72, 128, 7, 128, 64) == 1  # W^T's rows not 16-byte aligned
    out = lib.hstu_output_fp8_can_implement  # (lda, ldwt, ldr, ldo, M, N, K = 3*H*dv)
    assert out(1536, 1536, 512, 512, 69632, 512, 1536) == 0
    assert out(96, 96, 64, 64, 3, 64, 96) == 0  # H*dv = 32
    assert out(100, 100, 64, 64, 3, 64, 100) == 1
