"""fuse: graph surgery with onnx-graphsurgeon.

(a) Each layer's attention subgraph (the exporter's `layers.<i>.attention` scope) becomes one
    `hstu::HstuAttention` node carrying the attributes the TensorRT plugin of that name needs
    (plugins/hstu_attention/spec.py), with inputs q, k, v [B, n, H, d] and the lengths of the padded
    contract: hist_lengths [B], num_candidates [B] and history_width [1] (Shape(hist_ids)[1], where the
    candidate slots start). No [B, n, n] mask (19 MB per user at 4096+256 rows): the kernel builds it.
    The model also carries a model-local ONNX function `hstu::HstuAttention` whose body builds the same
    mask from the lengths and does the reference math, so onnxruntime runs the fused graph unchanged.
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


LENGTH_INPUTS = ("hist_lengths", "num_candidates", "history_width")


def _mask_nodes(ref) -> list:
    """Nodes computing the [B, n, n] bool `mask` from q's row count and the lengths, on the padded layout
    [contextual C][history Nh = history_width][candidates]: layout.Padded + reference.row_ids +
    reference.attention_mask (HSTU.md "The mask", in its order), branch-free so one function serves every
    attribute value (max_attn_len 0 makes the window term true)."""
    from onnx import TensorProto, helper

    def n(op, ins, out, **kw):
        return helper.make_node(op, ins, [out], **kw)

    def const(name, value):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [], [value]))

    def axes(name, values):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))

    i64 = TensorProto.INT64
    return [
        const("zero", 0), const("one", 1), axes("ax1", [1]), axes("ax2", [2]), axes("ax12", [1, 2]),
        ref("C", "contextual_len"), ref("W", "max_attn_len"), ref("F", "min_full_attn_seq_len"),
        ref("T", "has_targets"),
        n("Shape", ["q"], "n1", start=1, end=2), n("Squeeze", ["n1"], "n"),
        n("Range", ["zero", "n", "one"], "r"),  # [n] padded row index
        n("Cast", ["hist_lengths"], "hl0", to=i64), n("Unsqueeze", ["hl0", "ax1"], "hl"),  # [B, 1]
        n("Cast", ["num_candidates"], "nc0", to=i64), n("Unsqueeze", ["nc0", "ax1"], "nc1"),
        n("Mul", ["nc1", "T"], "nc"),  # without targets (retrieval) no candidate rows
        n("Cast", ["history_width"], "nh1", to=i64), n("Squeeze", ["nh1"], "nh"),
        n("Add", ["C", "nh"], "cand_slot"), n("Add", ["C", "hl"], "hist_end"),  # hist_end [B, 1]
        n("GreaterOrEqual", ["r", "cand_slot"], "is_cand"),  # [n]
        n("Sub", ["r", "nh"], "r_nh"), n("Add", ["r_nh", "hl"], "cand_pos"),
        n("Where", ["is_cand", "cand_pos", "r"], "pos"),  # [B, n] position in the unpadded sequence
        n("Less", ["r", "C"], "is_ctx"), n("Less", ["r", "hist_end"], "in_hist"), n("Not", ["is_cand"], "not_cand"),
        n("And", ["in_hist", "not_cand"], "hist_ok"), n("Sub", ["r", "cand_slot"], "cand_idx"),
        n("Less", ["cand_idx", "nc"], "cand_lt"), n("And", ["is_cand", "cand_lt"], "cand_ok"),
        n("Or", ["is_ctx", "hist_ok"], "v0"), n("Or", ["v0", "cand_ok"], "valid"),  # [B, n]
        # row ids (reference.row_ids): contextual 0, history 1.., targets hi
        n("Min", ["pos", "hist_end"], "pmin"), n("Sub", ["pmin", "C"], "pc"), n("Add", ["pc", "one"], "hid"),
        n("Less", ["pos", "C"], "pos_ctx"), n("Where", ["pos_ctx", "zero", "hid"], "ids"),
        n("Sub", ["hist_end", "C"], "hc"), n("Add", ["hc", "one"], "hi1"), n("Unsqueeze", ["hi1", "ax2"], "hi"),
        n("Unsqueeze", ["ids", "ax2"], "id_i"), n("Unsqueeze", ["ids", "ax1"], "id_j"),
        n("Sub", ["id_i", "id_j"], "d"),  # [B, n, n]
        n("Unsqueeze", ["r", "ax1"], "r_i"), n("Equal", ["r_i", "r"], "diag"),
        n("Greater", ["d", "zero"], "earlier"), n("Or", ["diag", "earlier"], "causal"),
        # window: d <= W, or W == 0, or (F > 0 and id_i >= hi - F)
        n("LessOrEqual", ["W", "zero"], "no_window"), n("LessOrEqual", ["d", "W"], "near"),
        n("Greater", ["F", "zero"], "has_full"), n("Sub", ["hi", "F"], "hi_f"),
        n("GreaterOrEqual", ["id_i", "hi_f"], "recent"), n("And", ["has_full", "recent"], "full"),
        n("Or", ["no_window", "near"], "w0"), n("Or", ["w0", "full"], "in_window"),
        n("And", ["causal", "in_window"], "m0"),
        # contextual rows see contextual + history
        n("Equal", ["id_i", "zero"], "ctx_i"), n("Less", ["id_j", "hi"], "before_hi"),
        n("And", ["ctx_i", "before_hi"], "ctx_sees"), n("Or", ["m0", "ctx_sees"], "m1"),
        n("Unsqueeze", ["valid", "ax2"], "valid_i"), n("Unsqueeze", ["valid", "ax1"], "valid_j"),
        n("And", ["m1", "valid_i"], "m2"), n("And", ["m2", "valid_j"], "mask"),
    ]


def attention_function():
    """The reference math as an ONNX function of (q, k, v, hist_lengths, num_candidates, history_width): it
    builds the mask from the lengths (_mask_nodes) and reads the node's attributes."""
    from onnx import AttributeProto, helper

    def const_ref(out: str, attr: str, kind=AttributeProto.FLOAT, field: str = "value_float"):
        """Constant whose value is the calling node's attribute `attr` (an attribute reference)."""
        node = helper.make_node("Constant", [], [out])
        ref = AttributeProto()
        ref.name, ref.ref_attr_name, ref.type = field, attr, kind
        node.attribute.append(ref)
        return node

    def int_ref(out: str, attr: str):
        return const_ref(out, attr, AttributeProto.INT, "value_int")

    nodes = _mask_nodes(int_ref) + [
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
        helper.make_node("Unsqueeze", ["mask", "ax1"], ["m_b"]),
        helper.make_node("CastLike", ["m_b", "silu"], ["m_f"]),
        int_ref("n_i", "max_seq_len"),
        helper.make_node("CastLike", ["n_i", "silu"], ["n_c"]),
        helper.make_node("Div", ["m_f", "n_c"], ["scaled_mask"]),
        helper.make_node("Mul", ["silu", "scaled_mask"], ["w"]),
        helper.make_node("MatMul", ["w", "vt"], ["a"]),  # [B, H, n, dv]
        helper.make_node("Transpose", ["a"], ["out"], perm=[0, 2, 1, 3]),  # [B, n, H, dv]
    ]
    return helper.make_function(
        DOMAIN, OP, ["q", "k", "v", *LENGTH_INPUTS], ["out"], nodes,
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


def _length_inputs(graph) -> tuple[list, int]:
    """The node's (hist_lengths, num_candidates, history_width) tensors from the contract's graph inputs, and
    has_targets: history_width is Shape(hist_ids)[1:2] (where the candidate slots start); a graph without
    candidates (retrieval) gets zeros for num_candidates."""
    import numpy as np
    import onnx_graphsurgeon as gs

    inputs = {t.name: t for t in graph.inputs}
    if "hist_lengths" not in inputs or "hist_ids" not in inputs:
        raise StageError("fuse: the graph has no hist_lengths / hist_ids inputs (the engine contract's): report it")
    width = gs.Variable("history_width", dtype=np.int64, shape=[1])
    graph.nodes.append(gs.Node("Shape", "history_width", attrs={"start": 1, "end": 2}, inputs=[inputs["hist_ids"]],
                               outputs=[width]))
    if "num_candidates" in inputs:
        return [inputs["hist_lengths"], inputs["num_candidates"], width], 1
    zeros = gs.Variable("no_candidates", dtype=np.int64)
    graph.nodes.append(gs.Node("Mul", "no_candidates", inputs=[inputs["hist_lengths"],
                                                               gs.Constant("zero_i64", np.zeros((), np.int64))],
                               outputs=[zeros]))
    return [inputs["hist_lengths"], zeros, width], 0


def fuse_graph(src: Path, dst: Path, attrs: dict, fold: bool) -> dict:
    onnx = require("onnx", backend="fuse", extra="onnx")
    gs = require("onnx_graphsurgeon", backend="fuse", extra="onnx")
    model = onnx.load(str(src))
    before = Counter(n.op_type for n in model.graph.node)
    graph = gs.import_onnx(model)
    groups = _layer_groups(model, graph)
    lengths, has_targets = _length_inputs(graph)
    matched = []
    for layer, nodes in sorted(groups.items()):
        roles, out, nodes = _boundary(nodes, graph)
        for n in nodes:
            n.outputs.clear()
        graph.nodes.append(gs.Node(op=OP, domain=DOMAIN, name=f"layers.{layer}.HstuAttention",
                                   attrs=dict(attrs) | {"has_targets": has_targets},
                                   inputs=[roles[r] for r in ("q", "k", "v")] + lengths, outputs=[out]))
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
    version = 4  # 2: 1/N rides on the mask; 3: HSTU.md's mask, min_full_attn_seq_len; 4: lengths, not a mask
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
