"""The HstuAttention plugin's pure parts (formats, shapes, fields), its shipped cubins (right architecture,
compiled from today's kernel source, launch metadata matching the kernel's parameters) and the TensorRT
classes' build-time refusals. The kernel's numbers: test_hstu_attention_kernel.py (interpreter) and
benchmarks/gpu_plugin.py (H200). The fused plan built with it: tests/backends/test_engines.py."""

import ctypes
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from plugins.hstu_attention import compile as aot
from plugins.hstu_attention import runtime, spec

CUBINS = Path(aot.__file__).parent / "cubins"
ARCHS = sorted(int(p.name[3:]) for p in CUBINS.glob("sm_*"))


def test_format_rule():
    f, h, b, i32, i64 = "FLOAT", "HALF", "BF16", "INT32", "INT64"
    lin = [True] * 7
    assert spec.supports(0, [h, h, h, i64, i64, i64, h], lin, 89)
    assert not spec.supports(0, [b] * 3 + [i64] * 3 + [b], lin, 75)  # no bf16 before sm_80
    assert spec.supports(0, [b] * 3 + [i64] * 3 + [b], lin, 90)
    assert not spec.supports(1, [h, f, h, i64, i64, i64, h], lin, 89)  # k follows q
    assert not spec.supports(6, [h, h, h, i64, i64, i64, f], lin, 89)  # the output follows q
    assert spec.supports(3, [f, f, f, i32, i32, i64, f], lin, 89) and not spec.supports(3, [f, f, f, f, i32, i64, f], lin, 89)
    assert not spec.supports(4, [f, f, f, i64, i32, i64, f], lin, 89)  # num_candidates follows hist_lengths
    assert not spec.supports(0, [f] * 3 + [i64] * 3 + [f], [False] + lin[1:], 89)


def test_output_shape_and_head_dims():
    assert spec.output_shape(["B", "n", 4, 128], ["B", "n", 4, 128]) == ["B", "n", 4, 128]
    for d in spec.HEAD_DIMS:
        spec.check_head_dims(d, d)
    for dqk, dv in [(40, 40), (64, 32), (256, 256)]:
        with pytest.raises(spec.PluginError, match="not among the compiled and GPU-checked"):
            spec.check_head_dims(dqk, dv)


def test_fields_round_trip_and_errors():
    fields = {"alpha": np.array([0.125], np.float32), "max_seq_len": np.array([216], np.int32),
              "contextual_len": np.array([2], np.int32), "max_attn_len": np.array([5], np.int32),
              "min_full_attn_seq_len": np.array([1], np.int32), "has_targets": np.array([0], np.int32),
              "plugin_version": np.frombuffer(b"1", np.int8), "scale": np.array([1 / 216], np.float32)}
    attrs = spec.Attributes.from_fields(fields)
    assert attrs == spec.Attributes(0.125, 216, 2, 5, 1, 0)
    assert spec.Attributes.from_fields(attrs.fields()) == attrs
    with pytest.raises(spec.PluginError, match="lacks attribute"):
        spec.Attributes.from_fields({"alpha": 1.0})
    with pytest.raises(spec.PluginError, match="max_attn_len must be >= 0"):
        spec.Attributes.from_fields(attrs.fields() | {"max_attn_len": -1})
    # min_full only counts with a window (HSTU.md); lengths' 32-bit step: 2 for int64
    assert spec.scalar_args(spec.Attributes(0.5, 10, 0, 0, 3), 7, 2, 2)[5:] == [0, 0, 1, 2]


@pytest.mark.parametrize("arch", ARCHS)
def test_shipped_cubins_are_current_and_for_their_arch(arch):
    folder = CUBINS / f"sm_{arch}"
    assert aot.is_current(folder), "stale cubins: run `python -m plugins.hstu_attention.compile --arch 89 90`"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["arch"] == arch and manifest["triton"]
    assert set(manifest["kernels"]) == {spec.variant(t, d) for t, d in spec.variants(arch)}
    tool = shutil.which("cuobjdump") or _triton_tool("cuobjdump")
    for meta in manifest["kernels"].values():
        data = (folder / meta["cubin"]).read_bytes()
        assert aot.cubin_arch(data) == arch
        assert meta["params"][:len(spec.ARGS)] == [("u64" if t.startswith("*") else "f32" if t == "fp32" else "u32")
                                                 for _, t in spec.ARGS]
        assert meta["params"][len(spec.ARGS):] == ["u64"] * meta["trailing_null_pointers"]
        assert meta["shared"] <= spec.SHARED_LIMIT_KB[arch] * 1024
    if tool:  # the CUDA toolkit's own reading of one of them
        listing = subprocess.run([tool, "-lelf", str(folder / meta["cubin"])], capture_output=True, text=True).stdout
        assert f".sm_{arch}" in listing, listing


def test_stale_cubins_are_recompiled_with_the_interpreter_on(tmp_path, monkeypatch):
    """ship_plugin's path when the package's cubins are stale, in the test process where TRITON_INTERPRET=1
    (tests/ops/triton_interpreter.py) makes triton.jit functions uncompilable AOT: the child process compiles
    them, and they match the shipped ones byte for byte (the kernel source is the same)."""
    pytest.importorskip("triton")
    from hstu_opt.backends import tensorrt as trt_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(aot, "is_current", lambda folder: False)
    dst, shipped = trt_backend.ship_plugin(tmp_path / "tensorrt", 90)
    assert shipped["cubins"].startswith("compiled now for sm_90"), shipped
    monkeypatch.undo()
    fresh = dst / "cubins" / "sm_90"
    assert aot.is_current(fresh)
    kernels = json.loads((fresh / "manifest.json").read_text())["kernels"]
    shipped_kernels = json.loads((CUBINS / "sm_90" / "manifest.json").read_text())["kernels"]
    assert {k: v["sha256"] for k, v in kernels.items()} == {k: v["sha256"] for k, v in shipped_kernels.items()}


def _triton_tool(name):
    found = importlib.util.find_spec("triton")
    if found is None:
        return None
    path = Path(found.origin).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.is_file() else None


def test_runtime_packs_the_kernel_parameters():
    meta = json.loads((CUBINS / f"sm_{ARCHS[0]}" / "manifest.json").read_text())["kernels"]["hstu_attention_fp16_d64"]
    values = [1, 2, 3, 4, 5, 6, 7] + spec.scalar_args(spec.Attributes(0.125, 100), 50, 2, 2) + [0, 0]
    held, array = runtime._pack(values, meta["params"])
    assert len(array) == len(meta["params"])
    assert ctypes.c_float.from_address(array[7]).value == pytest.approx(0.125)
    assert ctypes.c_uint64.from_address(array[3]).value == 4
    with pytest.raises(RuntimeError, match="arguments for a kernel"):
        runtime._pack(values[:-1], meta["params"])


def test_missing_arch_is_a_clear_error(tmp_path):
    with pytest.raises(spec.PluginError, match="python -m plugins.hstu_attention.compile --arch 75"):
        runtime.Runtime(spec.Attributes(0.1, 10), tmp_path, arch=75).kernels()


HAS_TRT = any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx"))


def _desc(trt, type_name, dims):
    return SimpleNamespace(desc=SimpleNamespace(type=getattr(trt.DataType, type_name), format=trt.TensorFormat.LINEAR,
                                                dims=dims))


@pytest.mark.skipif(not HAS_TRT, reason="neither tensorrt nor tensorrt_rtx is installed")
def test_tensorrt_classes_take_the_node_and_refuse_what_was_not_checked():
    from hstu_opt.backends.tensorrt import trt_module
    from plugins.hstu_attention import plugin

    trt = trt_module()
    _, creator_cls = plugin.make_classes(trt, CUBINS, 89)
    creator = creator_cls("")
    assert {f.name for f in creator.field_names} == {"alpha", *plugin.INT_FIELDS}
    fc = trt.PluginFieldCollection([trt.PluginField("alpha", np.array([0.2], np.float32), trt.PluginFieldType.FLOAT32),
                                    trt.PluginField("max_seq_len", np.array([64], np.int32), trt.PluginFieldType.INT32)])
    p = creator.create_plugin("x", fc, trt.TensorRTPhase.BUILD)
    assert (p.plugin_name, p.plugin_version, p.num_outputs) == ("HstuAttention", "1", 1)
    assert p.attrs == spec.Attributes(float(np.float32(0.2)), 64)  # (a float32 field)
    io = [_desc(trt, "HALF", [-1, -1, 2, 64])] * 3 + [_desc(trt, "INT64", [-1])] * 2 + [_desc(trt, "INT64", [1]),
                                                                                      _desc(trt, "HALF", [-1, -1, 2, 64])]
    assert all(p.supports_format_combination(i, io, 6) for i in range(7))
    assert p.get_output_data_types([trt.DataType.HALF] * 6) == [trt.DataType.HALF]
    fields = {f.name: np.asarray(f.data) for f in p.get_fields_to_serialize()}
    assert spec.Attributes.from_fields(fields) == p.attrs
    odd = [_desc(trt, "HALF", [-1, -1, 2, 40])] * 3 + io[3:]
    with pytest.raises(Exception, match="not among the compiled"):
        p.supports_format_combination(0, odd, 6)
    with pytest.raises(Exception, match="no cubins for sm_75"):
        plugin.make_classes(trt, CUBINS, 75)[1]("").create_plugin("x", fc, trt.TensorRTPhase.BUILD)


@pytest.mark.skipif(not HAS_TRT, reason="neither tensorrt nor tensorrt_rtx is installed")
def test_load_registers_the_bundle_copy_before_deserializing(tmp_path):
    """backends/tensorrt.load on a plans folder that ships the plugin: the creator is registered from that copy
    (not the source tree) before the plan is deserialized, which then fails here (no GPU), as it must. In a
    child process with the libtensorrt_rtx.so symlink, as the build runs (tensorrt_build.child_env)."""
    import sys

    from hstu_opt.backends import tensorrt as trt_backend
    from hstu_opt.backends.tensorrt_build import child_env

    plans = tmp_path / "tensorrt"
    _, shipped = trt_backend.ship_plugin(plans, 89)
    assert "current" in shipped["cubins"] and shipped["arch"] == 89
    (plans / "ranking.fused.plan").write_bytes(b"not a plan")
    code = ("import sys; from pathlib import Path; from hstu_opt.backends import tensorrt as t\n"
            "try:\n    t.load(Path(sys.argv[1]), 'hstu')\nexcept Exception as e:\n    print('ERR', e)\n"
            "trt = t.trt_module(); print('REG', t.plugin_registered(trt, 'HstuAttention', '1', 'hstu'))\n"
            "print('FROM', [m.__file__ for n, m in sys.modules.items() if n.startswith('hstu_plugin_')][0])")
    out = subprocess.run([sys.executable, "-c", code, str(plans / "ranking.fused.plan")], env=child_env(tmp_path),
                         capture_output=True, text=True, timeout=120).stdout
    assert "ERR" in out and "cannot be deserialized" in out and "REG True" in out, out
    assert f"FROM {plans / 'plugins' / 'hstu_attention' / '__init__.py'}" in out, out
    assert not list(plans.rglob("__pycache__"))
