import importlib.util

import pytest

from hstu_opt.errors import BackendUnavailable

HAS_TRT = any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx"))


@pytest.mark.skipif(not HAS_TRT, reason="neither tensorrt nor tensorrt_rtx is installed (make test installs tensorrt-rtx)")
@pytest.mark.parametrize("name,source", [("ranking.fp32", "model.onnx"), ("ranking.int8", "model.int8.onnx")])
def test_tensorrt_sm89_plans_from_unfused_and_qdq_graphs(tiny_build, name, source):
    path, results = tiny_build
    desc = results["build-engine"].record["engines"]["tensorrt"][name]
    plan = path / "build-engine" / "tensorrt" / f"{name}.plan"
    assert plan.is_file() and plan.stat().st_size == desc["bytes"] > 100_000
    assert desc["source"] == source and desc["target"] == "SM89"
    assert desc["profiles"]["hist_ids"] == {"min": [1, 1], "opt": [8, 100], "max": [32, 200]}
    assert desc["profiles"]["cand_ids"]["max"] == [32, 16]
    layers = desc["network"]["layer_types"]
    assert layers["MATRIX_MULTIPLY"] >= 8 and desc["network"]["layers"] > 100
    if name.endswith("int8"):
        assert layers["QUANTIZE"] > 0 and layers["DEQUANTIZE"] > 0
    assert "available" in desc["engine_inspector"]


@pytest.mark.skipif(not HAS_TRT, reason="neither tensorrt nor tensorrt_rtx is installed")
def test_fused_plan_is_built_with_the_plugin_and_ships_it(tiny_build):
    """The fused graph's SM89 plan: one IPluginV3 layer per HstuAttention node, referenced by name in the plan,
    no attention math left in the network; the plugin package and its sm_89 cubins are bundle files with
    sha256s in the manifest, and `verify` finds nothing unlisted (no __pycache__ from the build's import)."""
    from hstu_opt.bundle import load_manifest, verify

    path, results = tiny_build
    desc = results["build-engine"].record["engines"]["tensorrt"]["ranking.fused"]
    assert "skipped" not in desc and desc["target"] == "SM89"
    assert (path / "build-engine" / "tensorrt" / "ranking.fused.plan").stat().st_size == desc["bytes"]
    assert [(p["layer"], p["name"], p["version"], p["namespace"], p["name_in_plan"]) for p in desc["plugin_layers"]] == [
        (f"layers.{i}.HstuAttention", "HstuAttention", "1", "", True) for i in range(2)]
    assert desc["network"]["layer_types"]["PLUGIN_V3"] == 2
    assert desc["plugin"]["name"] == "HstuAttention" and desc["plugin"]["arch"] == 89
    files = load_manifest(path)["files"]
    pkg = "build-engine/tensorrt/plugins/hstu_attention/"
    for name in ("__init__.py", "spec.py", "runtime.py", "plugin.py", "cubins/sm_89/manifest.json",
                 "cubins/sm_89/hstu_attention_fp32_d32.cubin"):
        assert len(files[pkg + name]) == 64
    assert not [f for f in files if "__pycache__" in f] and verify(path) == []


def test_onnxruntime_engines(tiny_build):
    path, results = tiny_build
    engines = results["build-engine"].record["engines"]["onnxruntime"]
    assert set(engines) == {"ranking.fp32", "ranking.int8", "retrieval.fp32", "retrieval.int8"}
    for name, desc in engines.items():
        assert (path / "build-engine" / "onnxruntime" / desc["file"]).is_file()
        assert (path / "build-engine" / "onnxruntime" / f"{name}.session.json").is_file()


def test_missing_backend_names_the_extra(monkeypatch):
    import sys

    for name in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, name, None)  # import of either now raises ImportError
    from hstu_opt.backends import tensorrt

    with pytest.raises(BackendUnavailable, match=r"pip install 'hstu-opt\[tensorrt-rtx\]'"):
        tensorrt.trt_module()


def test_missing_onnxruntime_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    from hstu_opt.backends import onnxruntime as ort_backend

    with pytest.raises(BackendUnavailable, match=r"backend 'onnxruntime'.*pip install 'hstu-opt\[onnx\]'"):
        ort_backend.session("x.onnx")


def test_package_imports_without_optional_backends():
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('tensorrt', 'tensorrt_rtx', 'onnxruntime', 'triton'): sys.modules[m] = None\n"
            "import hstu_opt.cli, hstu_opt.pipeline, hstu_opt.stages, hstu_opt.model\n"
            "bad = [m for m in ('tensorrt', 'tensorrt_rtx', 'onnxruntime', 'triton') if sys.modules.get(m)]\n"
            "assert not bad, bad\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
