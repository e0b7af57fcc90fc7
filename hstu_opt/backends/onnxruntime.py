"""onnxruntime (CPU): the embedded default engine. build = an offline-optimized model plus the session
settings it needs; load/run serve it; OrtScorer evaluates it on the held-out split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hstu_opt._lazy import require
from hstu_opt.data.batching import PaddedBatch
from hstu_opt.fsutil import write_json_atomic

NAME = "onnxruntime"
# For Q/DQ models: MatMulAddFusion (a basic pass) would turn dequantize -> MatMul -> Add(bias) back into a float
# Gemm before the QDQ fusions run, so the MatMul never becomes MatMulIntegerToFloat.
QDQ_DISABLED_OPTIMIZERS = ("MatMulAddFusion",)


def _ort():
    return require("onnxruntime", backend=NAME, extra="onnx")


def session_options(threads: int, optimized_path: Path | None = None):
    ort = _ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # EXTENDED, not ALL, for the saved model: ALL adds layout transforms tied to this machine's CPU.
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if optimized_path
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    so.log_severity_level = 3
    return so


def disabled_optimizers(quantized: bool) -> list[str]:
    return list(QDQ_DISABLED_OPTIMIZERS if quantized else ())


def session(path: Path, threads: int = 2, quantized: bool = False):
    ort = _ort()
    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled_optimizers(quantized))


def build(src: Path, out_dir: Path, name: str, threads: int, quantized: bool = False) -> dict:
    """Write `<name>.ort.onnx` (optimized offline) and `<name>.session.json`; returns a description."""
    ort = _ort()
    out_dir.mkdir(parents=True, exist_ok=True)
    optimized = out_dir / f"{name}.ort.onnx"
    ort.InferenceSession(str(src), session_options(threads, optimized), providers=["CPUExecutionProvider"],
                         disabled_optimizers=disabled_optimizers(quantized))
    settings = {"file": optimized.name, "providers": ["CPUExecutionProvider"], "intra_op_num_threads": threads,
                "inter_op_num_threads": 1, "graph_optimization_level": "ORT_ENABLE_ALL at load (saved at EXTENDED)",
                "quantized": quantized, "disabled_optimizers": disabled_optimizers(quantized),
                "onnxruntime": ort.__version__}
    write_json_atomic(out_dir / f"{name}.session.json", settings)
    return describe(optimized) | {"session": settings}


def load(out_dir: Path, name: str):
    settings = json.loads((out_dir / f"{name}.session.json").read_text())
    return session(out_dir / settings["file"], settings["intra_op_num_threads"], settings["quantized"])


def run(sess, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed)))


def describe(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"backend": NAME, "file": path.name, "bytes": path.stat().st_size, "nodes": len(model.graph.node),
            "op_types": dict(sorted(ops.items()))}


class OrtScorer:
    """A ranking + retrieval pair of onnxruntime sessions behind the Scorer protocol."""

    def __init__(self, ranking: Path, retrieval: Path, item_table: np.ndarray, threads: int = 2, quantized: bool = False):
        self.ranking, self.retrieval = session(ranking, threads, quantized), session(retrieval, threads, quantized)
        self.table = item_table

    def rank(self, batch: PaddedBatch) -> np.ndarray:
        return self.ranking.run(None, batch.ranking_feed())[0]

    def retrieve(self, batch: PaddedBatch) -> np.ndarray:
        return self.retrieval.run(None, batch.retrieval_feed())[0]

    def score_items(self, batch: PaddedBatch) -> np.ndarray:
        return self.retrieve(batch) @ self.table.T
