"""The Q/DQ graph follows the rules TensorRT needs, and INT8 accuracy stays within the recipe's bar."""

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
