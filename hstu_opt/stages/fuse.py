"""fuse: graph surgery with onnx-graphsurgeon.

(a) Each layer's attention subgraph (the exporter's `layers.<i>.attention` scope) becomes one
    `hstu::HstuAttention` node (inputs q, k, v [B, n, H, d] and the shared [B, n, n] mask) carrying
    the attributes a TensorRT plugin of that name needs. The model also carries a model-local ONNX
    function `hstu::HstuAttention` whose body is the reference math, so onnxruntime still runs it.
(b) Constant folding; LayerNormalization is already emitted as one node by the exporter, and the
    report says so rather than claiming a fusion.
Outputs: model.fused.onnx, retrieval.fused.onnx, fuse_report.json.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from hstu_opt._lazy import require
from hstu_opt.backends import polygraphy_compare
from hstu_opt.errors import StageError
from hstu_opt.fsutil import write_json_atomic
from hstu_opt.stages.base import Stage, StageContext
from hstu_opt.stages.export_onnx import GRAPH_FILES

DOMAIN, OP = "hstu", "HstuAttention"
SCOPE = re.compile(r"layers\.(\d+)\.attention$")
FUSED_FILES = {"ranking": "model.fused.onnx", "retrieval": "retrieval.fused.onnx"}


def attention_function():
    """The reference math as an ONNX function; it reads the node's alpha and max_seq_len attributes."""
    import onnx
    from onnx import AttributeProto, helper

    def const_ref(out: str, attr: str, kind=AttributeProto.FLOAT, field: str = "value_float"):
        """Constant whose value is the calling node's attribute `attr` (an attribute reference)."""
        node = helper.make_node("Constant", [], [out])
        ref = AttributeProto()
        ref.name, ref.ref_attr_name, ref.type = field, attr, kind
        node.attribute.append(ref)
        return node

    nodes = [
        helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1, 3]),  # [B, H, n, dqk]
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 3, 1]),  # [B, H, dqk, n]
        helper.make_node("Transpose", ["v"], ["vt"], perm=[0, 2, 1, 3]),  # [B, H, n, dv]
        helper.make_node("MatMul", ["qt", "kt"], ["s0"]),
        const_ref("alpha_f", "alpha"),
        helper.make_node("CastLike", ["alpha_f", "s0"], ["alpha_c"]),
        helper.make_node("Mul", ["s0", "alpha_c"], ["s"]),
        helper.make_node("Sigmoid", ["s"], ["sig"]),
        helper.make_node("Mul", ["s", "sig"], ["silu"]),
        # mask -> [B, 1, n, n] in the compute dtype, divided by N (as the reference does, so both round alike)
        helper.make_node("Constant", [], ["axis1"], value=helper.make_tensor("axis1", onnx.TensorProto.INT64, [1], [1])),
        helper.make_node("Unsqueeze", ["mask", "axis1"], ["m_b"]),
        helper.make_node("CastLike", ["m_b", "silu"], ["m_f"]),
        const_ref("n_i", "max_seq_len", AttributeProto.INT, "value_int"),
        helper.make_node("CastLike", ["n_i", "silu"], ["n_c"]),
        helper.make_node("Div", ["m_f", "n_c"], ["scaled_mask"]),
        helper.make_node("Mul", ["silu", "scaled_mask"], ["w"]),
        helper.make_node("MatMul", ["w", "vt"], ["a"]),  # [B, H, n, dv]
        helper.make_node("Transpose", ["a"], ["out"], perm=[0, 2, 1, 3]),  # [B, n, H, dv]
    ]
    return helper.make_function(
        DOMAIN, OP, ["q", "k", "v", "mask"], ["out"], nodes,
        opset_imports=[helper.make_opsetid("", 18)],
        attributes=["alpha", "scale", "max_seq_len", "causal", "has_targets", "contextual_len", "max_attn_len",
                    "min_full_attn_seq_len", "plugin_version", "plugin_namespace"],
    )


def _scopes(model) -> dict[str, str]:
    """node name -> innermost scope recorded by the exporter."""
    out = {}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        if scopes:
            out[node.name] = [s.strip(" '") for s in scopes.strip("[]").split(",")]
    return out


def _layer_groups(model, graph) -> dict[int, list]:
    scopes = _scopes(model)
    groups: dict[int, list] = {}
    for node in graph.nodes:
        for scope in scopes.get(node.name, []):
            m = SCOPE.search(scope)
            if m:
                groups.setdefault(int(m.group(1)), []).append(node)
                break
    return groups


def _escaping(nodes: list, graph) -> list:
    inside = {id(n) for n in nodes}
    return [t for n in nodes for t in n.outputs if any(id(c) not in inside for c in t.outputs) or t in graph.outputs]


def _prune_shared(nodes: list, graph) -> list:
    """The exporter shares identical subexpressions across layers (e.g. the unsqueezed mask computed in
    layer 0's scope feeds every layer): such nodes stay in the graph and their outputs become inputs."""
    final = nodes[-1]  # nodes are in topological order; the attention output is produced last
    while True:
        inside = {id(n) for n in nodes}
        shared = [n for n in nodes if n is not final
                  and any(any(id(c) not in inside for c in t.outputs) for t in n.outputs)]
        if not shared:
            return nodes
        nodes = [n for n in nodes if n not in shared]


def _bool_mask_source(t) -> object:
    """Walk back from the scaled mask the scope multiplies by (Div(Cast(Unsqueeze(mask, 1)), N), possibly
    shared across layers) to the [B, n, n] bool mask the HstuAttention node takes."""
    while t.inputs and t.inputs[0].op in ("Div", "Cast", "CastLike", "Unsqueeze"):
        t = t.inputs[0].inputs[0]
    return t


def _boundary(nodes: list, graph) -> tuple[dict[str, object], object]:
    """Identify q, k, v, mask [B, n, n] (the group's non-constant inputs) and its single output."""
    import onnx_graphsurgeon as gs

    nodes = _prune_shared(nodes, graph)
    produced = {t.name for n in nodes for t in n.outputs}
    inputs = {t.name: t for n in nodes for t in n.inputs if t.name not in produced and not isinstance(t, gs.Constant)}
    outputs = _escaping(nodes, graph)
    matmuls = [n for n in nodes if n.op == "MatMul"]
    sigmoids = [n for n in nodes if n.op == "Sigmoid"]
    if len(matmuls) != 2 or len(sigmoids) != 1 or len(outputs) != 1 or len(inputs) != 4:
        raise StageError(f"fuse: attention scope does not have the expected shape (MatMul x{len(matmuls)}, "
                         f"Sigmoid x{len(sigmoids)}, {len(inputs)} inputs, {len(outputs)} outputs): the exporter's "
                         "output changed; rerun with --debug and report it")

    def source(t):  # walk back through the scope's Transposes / Unsqueezes to a boundary tensor
        while t.name not in inputs:
            t = t.inputs[0].inputs[0]
        return inputs[t.name]

    scores, weighted = matmuls
    scaled_mask = next(t for name, t in inputs.items()
                       if name not in {source(scores.inputs[0]).name, source(scores.inputs[1]).name,
                                       source(weighted.inputs[1]).name})
    roles = {"q": source(scores.inputs[0]), "k": source(scores.inputs[1]), "v": source(weighted.inputs[1]),
             "mask": _bool_mask_source(scaled_mask)}
    if len({id(t) for t in roles.values()}) != 4:
        raise StageError("fuse: could not tell q, k, v and mask apart in an attention scope: report it")
    return roles, outputs[0], nodes


def fuse_graph(src: Path, dst: Path, attrs: dict, fold: bool) -> dict:
    onnx = require("onnx", backend="fuse", extra="onnx")
    gs = require("onnx_graphsurgeon", backend="fuse", extra="onnx")
    model = onnx.load(str(src))
    before = Counter(n.op_type for n in model.graph.node)
    graph = gs.import_onnx(model)
    groups = _layer_groups(model, graph)
    matched = []
    for layer, nodes in sorted(groups.items()):
        roles, out, nodes = _boundary(nodes, graph)
        for n in nodes:
            n.outputs.clear()
        graph.nodes.append(gs.Node(op=OP, domain=DOMAIN, name=f"layers.{layer}.HstuAttention", attrs=dict(attrs),
                                   inputs=[roles[r] for r in ("q", "k", "v", "mask")], outputs=[out]))
        matched.append({"layer": layer, "replaced_nodes": len(nodes),
                        "replaced_ops": dict(Counter(n.op for n in nodes))})
    graph.cleanup().toposort()
    if fold:
        graph.fold_constants().cleanup()
    fused = gs.export_onnx(graph)
    fused.functions.append(attention_function())
    fused.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    onnx.checker.check_model(fused)
    onnx.save(fused, str(dst))
    after = Counter(n.op_type for n in fused.graph.node)
    return {"nodes_before": dict(sorted(before.items())), "nodes_after": dict(sorted(after.items())),
            "attention_fused": matched, "layer_norm_nodes": after.get("LayerNormalization", 0),
            "layer_norm_note": "the exporter emits LayerNormalization directly; no decomposed norms to fuse",
            "constant_folding": fold}


class Fuse(Stage):
    name = "fuse"
    version = 3  # 2: the 1/N scale rides on the mask; 3: HSTU.md's rewritten mask, min_full_attn_seq_len attribute
    sections = ("fuse",)
    inputs = ("export-onnx",)

    def enabled(self, recipe) -> bool:
        return recipe.fuse.attention_plugin

    def run(self, ctx: StageContext) -> dict:
        import json

        recipe, src = ctx.recipe, ctx.inputs["export-onnx"]
        contract = json.loads((src / "contract.json").read_text())
        attrs = {"alpha": float(contract["alpha"]), "scale": 1.0 / contract["attention_scale_N"],
                 "max_seq_len": int(contract["attention_scale_N"]), "causal": 1, "has_targets": 1,
                 "contextual_len": int(contract["limits"]["contextual_len"]),
                 "max_attn_len": int(recipe.model.max_attn_len),
                 "min_full_attn_seq_len": int(recipe.model.min_full_attn_seq_len),
                 "plugin_version": recipe.fuse.plugin_version, "plugin_namespace": recipe.fuse.plugin_namespace}
        report, parity = {}, {}
        for kind in contract["graphs"]:
            dst = ctx.out_dir / FUSED_FILES[kind]
            report[kind] = fuse_graph(src / GRAPH_FILES[kind], dst, attrs, fold=True)
            if len(report[kind]["attention_fused"]) != recipe.model.num_layers:
                raise StageError(f"fuse: {kind} graph has {len(report[kind]['attention_fused'])} attention scopes, "
                                 f"expected one per layer ({recipe.model.num_layers}): report it")
            parity[kind] = self._parity(src / GRAPH_FILES[kind], dst, kind, contract, recipe)
        write_json_atomic(ctx.out_dir / "fuse_report.json", {"graphs": report, "parity": parity, "attributes": attrs})
        worst = max(max(p["max_rel_error"].values()) for p in parity.values())
        n = report["ranking"]["nodes_before"], report["ranking"]["nodes_after"]
        return {"report": report, "parity": parity,
                "headline": f"{recipe.model.num_layers} HstuAttention/graph; ranking nodes {sum(n[0].values())} -> "
                            f"{sum(n[1].values())}; fused vs unfused max rel err {worst:.1e}",
                "tables": [{"title": f"fuse: node counts ({kind})", "columns": ["op", "before", "after"],
                            "rows": [[op, r["nodes_before"].get(op, 0), r["nodes_after"].get(op, 0)]
                                     for op in sorted(set(r["nodes_before"]) | set(r["nodes_after"]))]}
                           for kind, r in report.items() if kind == "ranking"]}

    @staticmethod
    def _parity(unfused: Path, fused: Path, kind: str, contract: dict, recipe) -> dict:
        from hstu_opt.data.requests import random_requests

        rng = np.random.default_rng(recipe.train.seed + 2)
        lim = contract["limits"]
        feeds = []
        for b, h, c in [(1, 1, 1), (4, min(23, lim["history"][1]), min(7, lim["candidates"][1])),
                        (8, lim["history"][1], lim["candidates"][1])]:
            req = random_requests(rng, b, h, c, num_items=lim["num_items"], contextual_len=lim["contextual_len"],
                                  contextual_cardinality=lim["contextual_cardinality"])
            feeds.append(req.ranking_feed() if kind == "ranking" else req.retrieval_feed())
        runners = [polygraphy_compare.onnxrt_runner(unfused, "unfused"), polygraphy_compare.onnxrt_runner(fused, "fused")]
        result = polygraphy_compare.compare(runners, feeds, rtol=recipe.fuse.parity_rtol, atol=1e-8)
        if not result["passed"]:
            raise StageError(f"fuse: fused {kind} graph differs from the unfused one (max relative error "
                             f"{result['max_rel_error']}) beyond fuse.parity_rtol={recipe.fuse.parity_rtol}: report it")
        return result
