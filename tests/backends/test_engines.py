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
def test_fused_graph_without_plugin_says_so(tiny_build):
    _, results = tiny_build
    skipped = results["build-engine"].record["engines"]["tensorrt"]["ranking.fused"]["skipped"]
    assert "no TensorRT plugin 'HstuAttention'" in skipped


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
