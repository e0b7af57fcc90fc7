"""export-onnx and fuse on the real tiny build: parity at several shapes, one HstuAttention per layer."""

from collections import Counter

import numpy as np
import onnx
import pytest

from hstu_opt.backends import onnxruntime as ort_backend
from hstu_opt.backends.eager import EagerRunner, graph_module
from hstu_opt.data.requests import random_requests
from hstu_opt.model.checkpoint import load_checkpoint

SHAPES = [(1, 1, 1), (2, 1, 16), (5, 37, 3), (16, 200, 16), (33, 64, 9)]  # batch, history, candidates


@pytest.fixture(scope="module")
def tiny_model(tiny_build):
    path, _ = tiny_build
    model, _ = load_checkpoint(path / "train-stub" / "checkpoint")
    return model


def _feed(model, kind, rng, b, h, c):
    req = random_requests(rng, b, h, c, num_items=model.cfg.num_items)
    return req.ranking_feed() if kind == "ranking" else req.retrieval_feed()


@pytest.mark.parametrize("kind,file", [("ranking", "model.onnx"), ("retrieval", "retrieval.onnx")])
def test_export_parity_on_fresh_shapes(tiny_build, tiny_model, kind, file):
    path, _ = tiny_build
    sess = ort_backend.session(path / "export-onnx" / file)
    eager = EagerRunner(graph_module(tiny_model, kind), kind)
    rng = np.random.default_rng(1234)
    for shape in SHAPES:
        feed = _feed(tiny_model, kind, rng, *shape)
        got = sess.run(None, feed)[0]
        want = next(iter(eager.run(feed).values()))
        assert got.shape == want.shape
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel <= 1e-4, (shape, rel)


def test_exported_dims_are_dynamic(tiny_build):
    path, _ = tiny_build
    model = onnx.load(str(path / "export-onnx" / "model.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert all(isinstance(d, str) for shape in dims.values() for d in shape), dims


def test_exactly_one_hstu_attention_per_layer_with_attributes(tiny_build):
    path, results = tiny_build
    for file in ("model.fused.onnx", "retrieval.fused.onnx"):
        model = onnx.load(str(path / "fuse" / file))
        nodes = [n for n in model.graph.node if n.op_type == "HstuAttention"]
        assert len(nodes) == 2 and all(n.domain == "hstu" for n in nodes)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
        assert attrs["max_seq_len"] == 216 and attrs["scale"] == pytest.approx(1 / 216)
        assert attrs["alpha"] == pytest.approx(1 / np.sqrt(32)) and attrs["causal"] == 1
        assert {"contextual_len", "max_attn_len", "plugin_version", "plugin_namespace", "has_targets"} <= set(attrs)
        assert [(f.domain, f.name) for f in model.functions] == [("hstu", "HstuAttention")]
        # no attention math left outside the plugin nodes: the only Sigmoids are the ranking head's
        ops = Counter(n.op_type for n in model.graph.node)
        assert ops["MatMul"] + ops.get("FusedMatMul", 0) < Counter(
            n.op_type for n in onnx.load(str(path / "export-onnx" / file.replace(".fused", ""))).graph.node)["MatMul"]
    report = results["fuse"].record["report"]["ranking"]
    assert [m["layer"] for m in report["attention_fused"]] == [0, 1]


@pytest.mark.parametrize("kind", ["ranking", "retrieval"])
def test_fused_matches_unfused_in_onnxruntime(tiny_build, tiny_model, kind):
    path, _ = tiny_build
    files = {"ranking": ("model.onnx", "model.fused.onnx"), "retrieval": ("retrieval.onnx", "retrieval.fused.onnx")}
    unfused = ort_backend.session(path / "export-onnx" / files[kind][0])
    fused = ort_backend.session(path / "fuse" / files[kind][1])
    rng = np.random.default_rng(99)
    for shape in SHAPES:
        feed = _feed(tiny_model, kind, rng, *shape)
        a, b = fused.run(None, feed)[0], unfused.run(None, feed)[0]
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), shape


def test_windowed_contextual_model_exports_the_spec_mask(tmp_path):
    """A model with contextual rows, a window and min_full_attn_seq_len: the exported graph (whose mask is
    layout.Padded's, checked element for element against HSTU.md's pseudo-code in tests/ops) matches the
    eager model in onnxruntime, at lengths where the window hides the contextual rows."""
    from dataclasses import replace

    from hstu_opt.backends.eager import example_feed
    from hstu_opt.model import HstuModel
    from hstu_opt.stages.export_onnx import check_parity, export_graph
    from tests.model.helpers import tiny_model as make

    base = make(C=2, window=3, D=32, H=2, dqk=16, dv=16, seed=5)
    model = HstuModel(replace(base.cfg, min_full_attn_seq_len=2)).eval()
    model.load_state_dict(base.state_dict())
    path = tmp_path / "model.onnx"
    export_graph(model, "ranking", path, opset=18, max_batch=8)
    result = check_parity(model, "ranking", path, rtol=1e-4, seed=3)
    assert result["passed"], result
    feed = example_feed(model, "ranking", np.random.default_rng(1), 3, model.cfg.max_history_len, 4)
    got = ort_backend.session(path).run(None, feed)[0]
    unwindowed = HstuModel(replace(model.cfg, max_attn_len=0)).eval()
    unwindowed.load_state_dict(model.state_dict())
    assert got.shape[:2] == (3, feed["cand_ids"].shape[1])
    assert np.abs(got - EagerRunner(graph_module(unwindowed, "ranking"), "ranking").run(feed)["probs"]).max() > 1e-4


@pytest.mark.parametrize("C,window,full", [(2, 3, 2), (3, 0, 0)])
def test_fused_node_builds_the_mask_from_lengths(tmp_path, C, window, full):
    """The HstuAttention node takes lengths, not a mask: its ONNX function builds HSTU.md's mask from
    hist_lengths / num_candidates / history_width, so onnxruntime gives the unfused graph's outputs with
    contextual rows, a window, min_full_attn_seq_len and targets, in both graphs, at lengths past the window."""
    from dataclasses import replace

    from hstu_opt.backends.eager import example_feed
    from hstu_opt.model import HstuModel
    from hstu_opt.stages.export_onnx import export_graph
    from hstu_opt.stages.fuse import fuse_graph
    from tests.model.helpers import tiny_model as make

    base = make(C=C, window=window, D=32, H=2, dqk=16, dv=16, seed=7)
    model = HstuModel(replace(base.cfg, min_full_attn_seq_len=full)).eval()
    model.load_state_dict(base.state_dict())
    cfg = model.cfg
    attrs = {"alpha": cfg.alpha, "scale": 1 / cfg.max_seq_len, "max_seq_len": cfg.max_seq_len, "causal": 1,
             "has_targets": 1, "contextual_len": C, "max_attn_len": window, "min_full_attn_seq_len": full,
             "plugin_version": "1", "plugin_namespace": ""}
    rng = np.random.default_rng(C + window)
    for kind in ("ranking", "retrieval"):
        src, dst = tmp_path / f"{kind}.onnx", tmp_path / f"{kind}.fused.onnx"
        export_graph(model, kind, src, opset=18, max_batch=8)
        fuse_graph(src, dst, attrs, fold=True)
        node = next(n for n in onnx.load(str(dst)).graph.node if n.op_type == "HstuAttention")
        assert len(node.input) == 6 and list(node.input)[3] == "hist_lengths"
        unfused, fused = ort_backend.session(src), ort_backend.session(dst)
        for b, h, c in [(3, cfg.max_history_len, cfg.max_targets), (4, 5, 1), (2, 1, 2)]:
            feed = example_feed(model, kind, rng, b, h, c)
            want, got = unfused.run(None, feed)[0], fused.run(None, feed)[0]
            assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), (kind, b, h, c)
