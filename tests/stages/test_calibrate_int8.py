"""The Q/DQ graph follows the rules TensorRT needs, and INT8 accuracy stays within the recipe's bar."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

QDQ = ("QuantizeLinear", "DequantizeLinear")


@pytest.fixture(scope="module", params=["model.int8.onnx", "retrieval.int8.onnx"])
def qdq_model(request, tiny_build):
    path, _ = tiny_build
    return onnx.load(str(path / "calibrate-int8" / request.param))


def test_every_zero_point_is_zero(qdq_model):
    inits = {i.name: numpy_helper.to_array(i) for i in qdq_model.graph.initializer}
    nodes = [n for n in qdq_model.graph.node if n.op_type in QDQ]
    assert nodes
    for n in nodes:
        assert len(n.input) == 3, f"{n.name} has no explicit zero-point"
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), n.name


def test_weights_are_per_channel_and_activations_per_tensor(qdq_model):
    inits = {i.name: numpy_helper.to_array(i) for i in qdq_model.graph.initializer}
    weight_dq = [n for n in qdq_model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    act_q = [n for n in qdq_model.graph.node if n.op_type == "QuantizeLinear"]
    assert weight_dq and act_q
    for n in weight_dq:
        axis = {a.name: a.i for a in n.attribute}.get("axis")
        assert axis is not None and inits[n.input[1]].size == inits[n.input[0]].shape[axis] > 1, n.name
    for n in act_q:
        assert inits[n.input[1]].size == 1, n.name


def test_qdq_only_on_matmul_and_gemm_inputs(qdq_model):
    consumers = {}
    for n in qdq_model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in qdq_model.graph.node:
        if n.op_type == "QuantizeLinear":
            assert [c.op_type for c in consumers[n.output[0]]] == ["DequantizeLinear"] * len(consumers[n.output[0]])
        if n.op_type == "DequantizeLinear":
            assert {c.op_type for c in consumers[n.output[0]]} <= {"MatMul", "Gemm"}, n.name
            for c in consumers[n.output[0]]:
                assert list(c.input).index(n.output[0]) < 2, f"{n.name} feeds {c.name}'s bias"


def test_int8_gate_passed_and_sensitivity_reported(tiny_build):
    """The paired gate (data/agreement.py) passed on the held-out split, accuracy.json states its rule and every
    number, and each MatMul kept in float says why (sensitivity threshold or the gate)."""
    import json

    path, results = tiny_build
    record = results["calibrate-int8"].record
    acc = record["accuracy"]
    assert set(acc["gated"]) == {"ndcg_full", "auc_watched", "auc_liked"}
    assert acc["passed"] and all(m["ci"][0] >= -acc["bar"] for m in acc["gated"].values())
    assert "paired-bootstrap" in acc["rule"] and acc["agreement"]["users"] > 500
    assert {"hr@10", "ndcg@10", "ndcg_full", "auc_watched"} <= set(acc["int8"])
    assert 0 < record["quantized_matmuls"] <= record["matmuls"]
    sens = json.loads((path / "calibrate-int8" / "sensitivity.json").read_text())
    for graph in sens.values():
        for s in graph["sensitivity"]:
            if s["quantized"]:
                assert s["rel_error"] <= 0.005
            elif s["rel_error"] > 0.005:
                assert "threshold" in s["why"]
            else:  # returned to float by the accuracy gate
                assert "accuracy gate" in s["why"] and "bar" in s["why"]


def test_gate_reverts_exactly_a_deliberately_harmed_matmul(tiny_build, tmp_path, monkeypatch):
    """One MatMul's weight scale is tripled wherever it is quantized; with the sensitivity threshold out of the way
    (every MatMul int8 by sensitivity), the accuracy gate must put back to float exactly that MatMul."""
    import json

    from hstu_opt.stages import calibrate_int8 as stage
    from hstu_opt.stages.base import StageContext
    from tests.conftest import SilentReporter

    path, _ = tiny_build
    sens = json.loads((path / "calibrate-int8" / "sensitivity.json").read_text())
    victim = next(r["node"] for r in sens["ranking"]["sensitivity"] if r["quantized"])
    ranking_src = path / "export-onnx" / "model.onnx"
    original = stage._quantize

    def harmful(src, dst, feeds, method, percentile, cache, nodes=None):
        original(src, dst, feeds, method, percentile, cache, nodes)
        if Path(src).resolve() != ranking_src.resolve() or (nodes is not None and victim not in nodes):
            return
        model = onnx.load(str(dst))
        producers = {o: n for n in model.graph.node for o in n.output}
        node = next(n for n in model.graph.node if n.name == victim)
        dq = next(producers[i] for i in node.input[:2] if i in producers and producers[i].op_type == "DequantizeLinear"
                  and producers[i].input[0] in {t.name for t in model.graph.initializer})
        scale = next(t for t in model.graph.initializer if t.name == dq.input[1])
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 3, scale.name))
        onnx.save(model, str(dst))

    monkeypatch.setattr(stage, "_quantize", harmful)
    from hstu_opt.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml")
    recipe = recipe.model_copy(update={"quantize": recipe.quantize.model_copy(update={"sensitivity_threshold": 1e9})})
    out = tmp_path / "int8"
    out.mkdir()
    ctx = StageContext(recipe=recipe, out_dir=out, reporter=SilentReporter(),
                       inputs={"train-stub": path / "train-stub", "export-onnx": path / "export-onnx"})
    record = stage.CalibrateInt8().run(ctx)
    report = json.loads((out / "sensitivity.json").read_text())
    reverted = [(g, r["node"]) for g, rep in report.items() for r in rep["sensitivity"] if not r["quantized"]]
    assert reverted == [("ranking", victim)], reverted
    why = next(r["why"] for r in report["ranking"]["sensitivity"] if r["node"] == victim)
    assert "accuracy gate" in why
    assert record["accuracy"]["passed"] and record["quantized_matmuls"] == record["matmuls"] - 1
