"""export-onnx: the ranking and retrieval inference graphs of the checkpoint, in standard ONNX ops,
with dynamic batch, history length and candidate count, checked against PyTorch in onnxruntime.

Outputs: model.onnx (ranking), retrieval.onnx, item_embeddings.npy (the retrieval item table),
contract.json (inputs, outputs, limits, the fixed N), parity.json.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from hstu_opt._lazy import require
from hstu_opt.backends import polygraphy_compare
from hstu_opt.backends.eager import EagerRunner, dynamic_shapes, example_feed, graph_module, input_names, output_names
from hstu_opt.errors import StageError
from hstu_opt.fsutil import write_json_atomic
from hstu_opt.model.checkpoint import load_checkpoint
from hstu_opt.model.hstu import HstuModel
from hstu_opt.model.scoring import to_tensors
from hstu_opt.stages.base import Stage, StageContext

GRAPH_FILES = {"ranking": "model.onnx", "retrieval": "retrieval.onnx"}


@contextlib.contextmanager
def _quiet(logger: str):
    """The exporter logs harmless notes (e.g. torchvision ops it skips) at WARNING."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def export_graph(model: HstuModel, kind: str, path: Path, opset: int, max_batch: int) -> None:
    cfg = model.cfg
    # Example sizes >= 2 on every dynamic dim, so torch.export does not specialize them to 1.
    example = example_feed(model, kind, np.random.default_rng(0), 2, min(3, cfg.max_history_len), min(2, cfg.max_targets),
                    exact=True)
    with warnings.catch_warnings(), _quiet("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph_module(model, kind), (), kwargs=to_tensors(example), dynamic_shapes=dynamic_shapes(kind, model, max_batch),
            dynamo=True, opset_version=opset, input_names=input_names(kind, cfg.contextual_len),
            output_names=list(output_names(kind)), verbose=False,
        )
    program.save(str(path))
    fold_constants(path)


def fold_constants(path: Path) -> None:
    """Fold constant subgraphs (e.g. slices of a weight) into initializers, so quantizers see weights.
    onnx-graphsurgeon drops node metadata; the exporter's scopes (which fuse relies on) are copied back."""
    onnx = require("onnx", backend="onnx export", extra="onnx")
    gs = require("onnx_graphsurgeon", backend="onnx export", extra="onnx")
    model = onnx.load(str(path))
    meta = {n.name: list(n.metadata_props) for n in model.graph.node}
    graph = gs.import_onnx(model)
    graph.fold_constants().cleanup()
    folded = gs.export_onnx(graph)
    for node in folded.graph.node:
        node.metadata_props.extend(meta.get(node.name, []))
    onnx.save(folded, str(path))


def parity_shapes(model: HstuModel) -> list[tuple[int, int, int]]:
    cfg = model.cfg
    return [(1, 1, 1), (3, min(17, cfg.max_history_len), min(5, cfg.max_targets)),
            (8, cfg.max_history_len, cfg.max_targets)]


def check_parity(model: HstuModel, kind: str, path: Path, rtol: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    feeds = [example_feed(model, kind, rng, *shape) for shape in parity_shapes(model)]
    runners = [EagerRunner(graph_module(model, kind), kind).as_polygraphy(path),
               polygraphy_compare.onnxrt_runner(path, "onnxruntime")]
    return polygraphy_compare.compare(runners, feeds, rtol=rtol, atol=1e-7)


class ExportOnnx(Stage):
    name = "export-onnx"
    version = 7  # 2: mask * (1/N) not where + divide; 3: output projection as 3 GEMMs; 4: folded; 6: MatMul; 7: HSTU.md mask
    sections = ("model", "export")
    inputs = ("train-stub",)

    def run(self, ctx: StageContext) -> dict:
        require("onnx", backend="onnx export", extra="onnx")
        recipe = ctx.recipe
        model, _ = load_checkpoint(ctx.inputs["train-stub"] / "checkpoint", expect=recipe.model)
        parity = {}
        with ctx.reporter.task("export-onnx: exporting and checking parity", len(recipe.export.graphs)) as advance:
            for kind in recipe.export.graphs:
                path = ctx.out_dir / GRAPH_FILES[kind]
                export_graph(model, kind, path, recipe.export.opset, recipe.export.max_batch)
                parity[kind] = check_parity(model, kind, path, recipe.export.parity_rtol, seed=recipe.train.seed + 1)
                if not parity[kind]["passed"]:
                    raise StageError(f"export-onnx: {kind} graph differs from PyTorch (max relative error "
                                     f"{parity[kind]['max_rel_error']}) beyond export.parity_rtol="
                                     f"{recipe.export.parity_rtol}: run with --debug and report it")
                advance(1)
        with torch.no_grad():
            np.save(ctx.out_dir / "item_embeddings.npy", model.item_table().float().numpy())
        cfg = model.cfg
        contract = {
            "graphs": {kind: {"file": GRAPH_FILES[kind], "inputs": input_names(kind, cfg.contextual_len),
                              "outputs": list(output_names(kind))} for kind in recipe.export.graphs},
            "limits": {"batch": [1, recipe.export.max_batch], "history": [1, cfg.max_history_len],
                       "candidates": [1, cfg.max_targets], "contextual_len": cfg.contextual_len,
                       "num_items": cfg.num_items, "contextual_cardinality": cfg.contextual_cardinality},
            "attention_scale_N": cfg.max_seq_len, "alpha": cfg.alpha, "tasks": list(cfg.ranking_tasks),
            "item_embeddings": "item_embeddings.npy (row i = item id i+1, L2-normalized)",
        }
        write_json_atomic(ctx.out_dir / "contract.json", contract)
        write_json_atomic(ctx.out_dir / "parity.json", parity)
        worst = max(max(p["max_rel_error"].values()) for p in parity.values())
        return {"parity": parity, "contract": contract,
                "headline": f"{', '.join(recipe.export.graphs)} exported; onnxruntime vs PyTorch max rel err {worst:.1e}"}
