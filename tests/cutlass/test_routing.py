"""The CUTLASS ops' routing, on the CPU: which calls the kernels take (what benchmarks/gpu_cutlass.py
checks on the H200), that everything else runs the Triton op on a GPU or the reference elsewhere with a
warning, and that the custom ops' fake functions agree with the real ones. The kernels' numbers are
checked on the H200 (benchmarks/gpu_cutlass.py), not here."""

import inspect
import os

import pytest
import torch

from hstu_opt import ops
from hstu_opt.ops import Impl, _cutlass


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(_cutlass, "on_hopper", lambda t: True)


@pytest.mark.parametrize("D,N,silu,dtype,covered", [
    (512, 2048, 512, torch.bfloat16, True),      # dlrm-v3: H=4, d=128
    (64, 128, 32, torch.bfloat16, True),         # H=1, d=32 (the smallest checked)
    (1024, 2048, 512, torch.bfloat16, True),
    (512, 4096, 1024, torch.bfloat16, False),    # H*d past what the check covers
    (512, 2048, 512, torch.float16, False),
    (512, 2048, 512, torch.float32, False),
    (50, 2048, 512, torch.bfloat16, False),      # D not a multiple of 64
    (2048, 2048, 512, torch.bfloat16, False),    # D past what the check covers
    (512, 200, 48, torch.bfloat16, False),       # d = 25: widths not multiples of 32
])
def test_uvqk_covers_what_the_gpu_check_checks(hopper, D, N, silu, dtype, covered):
    reason = _cutlass.uvqk_uncovered(torch.empty(3, D, dtype=dtype), torch.empty(D, N), silu)
    assert (reason is None) == covered, reason


@pytest.mark.parametrize("hv,D,dtype,covered", [
    (512, 512, torch.bfloat16, True), (32, 64, torch.bfloat16, True), (96, 512, torch.bfloat16, True),
    (48, 512, torch.bfloat16, False), (1024, 512, torch.bfloat16, False), (512, 500, torch.bfloat16, False),
    (512, 512, torch.float16, False),
])
def test_hstu_output_covers_what_the_gpu_check_checks(hopper, hv, D, dtype, covered):
    reason = _cutlass.output_uncovered(torch.empty(3, hv, dtype=dtype), torch.empty(3 * hv, D))
    assert (reason is None) == covered, reason


def test_not_hopper_is_not_covered():
    assert _cutlass.uvqk_uncovered(torch.empty(3, 512, dtype=torch.bfloat16), torch.empty(512, 2048), 512)
    assert _cutlass.output_uncovered(torch.empty(3, 512, dtype=torch.bfloat16), torch.empty(1536, 512))


def _uvqk_args(D=64, H=2, d=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    width = H * 4 * d
    return (torch.randn(5, D, generator=g).to(dtype), torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g),
            torch.randn(D, width, generator=g).to(dtype), torch.randn(width, generator=g)), dict(
        num_heads=H, attention_dim=d, linear_dim=d)


def test_uncovered_calls_run_the_reference_on_cpu_with_a_warning():
    args, kw = _uvqk_args()
    _cutlass.warn_fallback.cache_clear()
    with pytest.warns(UserWarning, match="does not cover"):
        got = ops.uvqk(*args, impl=Impl.CUTLASS, **kw)
    for g, w in zip(got, ops.uvqk(*args, **kw)):
        torch.testing.assert_close(g, w)
    with pytest.warns(UserWarning, match="does not cover"):
        k, v = ops.uvqk_kv(*args, impl=Impl.CUTLASS, **kw)
    torch.testing.assert_close(k, got[2])

    u, a, x = torch.randn(5, 64), torch.randn(5, 64), torch.randn(5, 32)
    out_args = (u, a, x, torch.rand(64) + 0.5, torch.randn(64), torch.randn(192, 32))
    with pytest.warns(UserWarning, match="does not cover"):
        got = ops.hstu_output(*out_args, impl=Impl.CUTLASS)
    torch.testing.assert_close(got, ops.hstu_output(*out_args))


def test_per_op_maps_pick_cutlass_for_the_projections_only():
    from hstu_opt.ops.hstu_attention import TABLE as attention
    from hstu_opt.ops.uvqk import TABLE as uvqk

    spec = {"uvqk": "cutlass", "hstu_output": "cutlass", "hstu_attention": "triton"}
    assert uvqk.resolve(spec) == Impl.CUTLASS and attention.resolve(spec) == Impl.TRITON


def test_real_and_fake_signatures_agree():
    from hstu_opt.ops.hstu_output.cutlass import hstu_output_cutlass
    from hstu_opt.ops.uvqk.cutlass import uvqk_cutlass

    for op, name, n in ((uvqk_cutlass, "uvqk_cutlass", 8), (hstu_output_cutlass, "hstu_output_cutlass", 7)):
        real = [a.name for a in getattr(torch.ops.hstu_opt, name).default._schema.arguments]
        assert real == list(inspect.signature(op._abstract_fn).parameters) and len(real) == n


def test_fake_ops_give_shapes_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hstu_opt.ops.hstu_output.cutlass import hstu_output_cutlass
    from hstu_opt.ops.uvqk.cutlass import uvqk_cutlass

    with FakeTensorMode():
        x, w = torch.empty(7, 64, dtype=torch.bfloat16), torch.empty(64, 256, dtype=torch.bfloat16)
        assert uvqk_cutlass(x, torch.empty(64), torch.empty(64), w, torch.empty(256), 64, 1e-6).shape == (7, 256)
        u = torch.empty(7, 32, dtype=torch.bfloat16)
        out = hstu_output_cutlass(u, u, x, torch.empty(32), torch.empty(32), torch.empty(96, 64, dtype=torch.bfloat16),
                                  1e-6)
        assert out.shape == (7, 64)


def test_missing_library_says_how_to_build(monkeypatch):
    monkeypatch.delenv(_cutlass.ENV_LIB, raising=False)
    _cutlass.library.cache_clear()
    with pytest.raises(_cutlass.CutlassUnavailable, match="cutlass_kernels.build"):
        _cutlass.library()


def test_the_recipe_picks_implementations_per_op():
    from pydantic import ValidationError

    from hstu_opt.backends.compiled import device_plan
    from hstu_opt.recipe import EngineSection

    ops_map = {"uvqk": "cutlass", "hstu_output": "cutlass", "hstu_attention": "triton"}
    assert dict(EngineSection(ops=ops_map).ops) == ops_map and dict(EngineSection().ops) == {}
    for bad in ({"uvqk": "cuda"}, {"attention": "triton"}):
        with pytest.raises(ValidationError):
            EngineSection(ops=bad)
    if not torch.cuda.is_available():  # a CPU build runs the reference whatever the map names
        assert device_plan(ops_map)["impl"] == "reference"


def test_an_engine_with_cutlass_ops_ships_its_library(tmp_path, monkeypatch):
    from hstu_opt.backends import compiled

    lib = tmp_path / "libhstu_cutlass.so"
    lib.write_bytes(b"\x7fELF not really")
    monkeypatch.setenv(_cutlass.ENV_LIB, str(lib))
    meta = {"impl": {"uvqk": "cutlass", "hstu_attention": "triton"}}
    compiled.ship_cutlass(meta, tmp_path)
    assert (tmp_path / compiled.CUTLASS_LIB).read_bytes() == lib.read_bytes() and len(meta["cutlass_lib"]["sha256"]) == 64
    monkeypatch.setenv(_cutlass.ENV_LIB, "/elsewhere.so")
    compiled.use_shipped_cutlass(meta, tmp_path)
    assert os.environ[_cutlass.ENV_LIB] == str(tmp_path / compiled.CUTLASS_LIB)

    plain = {"impl": "triton"}
    compiled.ship_cutlass(plain, tmp_path / "x")
    assert "cutlass_lib" not in plain
    monkeypatch.delenv(_cutlass.ENV_LIB)
    with pytest.raises(_cutlass.CutlassUnavailable):
        compiled.ship_cutlass({"impl": "cutlass"}, tmp_path)
