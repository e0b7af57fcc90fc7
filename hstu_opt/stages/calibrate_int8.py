"""calibrate-int8: explicit (Q/DQ) INT8 that TensorRT accepts, with a per-MatMul sensitivity pass and an
accuracy report on the held-out split.

Rules: Q/DQ only on MatMul/Gemm inputs; symmetric int8 activations and per-channel symmetric int8 weights
(every zero-point 0). Calibration data are real user histories (the validation split), never random
tensors. A MatMul whose quantization alone moves the graph output by more than
quantize.sensitivity_threshold (relative L2) stays in float, and the report says so.
Outputs: model.int8.onnx, retrieval.int8.onnx, sensitivity.json, accuracy.json.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from hstu_opt._lazy import require
from hstu_opt.backends import onnxruntime as ort_backend
from hstu_opt.data.metrics import evaluate
from hstu_opt.data.sequences import load_sequences
from hstu_opt.data.splits import leave_one_out
from hstu_opt.errors import StageError
from hstu_opt.fsutil import write_json_atomic
from hstu_opt.stages.base import Stage, StageContext
from hstu_opt.stages.export_onnx import GRAPH_FILES

INT8_FILES = {"ranking": "model.int8.onnx", "retrieval": "retrieval.int8.onnx"}
QUANTIZED_OPS = ["MatMul", "Gemm"]
SENSITIVITY_BATCHES = 4  # calibration uses every batch; each per-node error is measured on the first few


def _quantize(src: Path, dst: Path, feeds: list[dict], method: str, percentile: float, cache: Path,
              nodes: list[str] | None = None) -> None:
    q = require("onnxruntime.quantization", backend="calibrate-int8", extra="onnx")

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    methods = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
               "percentile": q.CalibrationMethod.Percentile}
    # The quantizer prints progress and logs a pre-processing hint on the root logger for every call.
    with contextlib.redirect_stdout(io.StringIO()), _root_log_level(logging.ERROR):
        _quantize_static(q, src, dst, Reader(), methods[method], percentile, cache, nodes)


@contextlib.contextmanager
def _root_log_level(level: int):
    root = logging.getLogger()
    saved = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(saved)


def _quantize_static(q, src, dst, reader, method, percentile, cache, nodes) -> None:
    q.quantize_static(
        str(src), str(dst), reader, quant_format=q.QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS,
        nodes_to_quantize=nodes, per_channel=True, activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
        calibrate_method=method, calibration_cache_path=str(cache),
        # Bias stays float (TensorRT rejects int32 DequantizeLinear inputs); MatMul/Gemm outputs stay float
        # (Q/DQ on inputs only, as TensorRT wants; onnxruntime then fuses into MatMulIntegerToFloat).
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibPercentile": percentile,
                       "QuantizeBias": False, "OpTypesToExcludeOutputQuantization": QUANTIZED_OPS},
    )


def _outputs(path: Path, feeds: list[dict], quantized: bool = False) -> list[np.ndarray]:
    sess = ort_backend.session(path, quantized=quantized)
    return [sess.run(None, f)[0] for f in feeds]


def _rel_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    num = sum(float(np.sum((x.astype(np.float64) - y) ** 2)) for x, y in zip(a, b))
    den = sum(float(np.sum(y.astype(np.float64) ** 2)) for y in b)
    return float(np.sqrt(num / max(den, 1e-30)))


def matmul_nodes(path: Path, activation_matmuls: bool) -> list[str]:
    """MatMul/Gemm nodes to consider. By default only those with a weight (an initializer input): the
    attention's activation x activation MatMuls gain nothing in onnxruntime on a CPU (they run as
    DequantizeLinear + float MatMul) and are the most sensitive."""
    onnx = require("onnx", backend="calibrate-int8", extra="onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type in QUANTIZED_OPS
            and (activation_matmuls or any(i in weights for i in n.input[:2]))]


def measure_sensitivity(src: Path, feeds: list[dict], reference: list[np.ndarray], section, cache: Path,
                        work: Path) -> list[dict]:
    """Calibrate once (fills `cache`), then quantize each candidate MatMul alone and measure the output
    against `reference` (the float graph's outputs on the probe batches)."""
    _quantize(src, work / "all.onnx", feeds, section.method, section.percentile, cache)
    probe = feeds[:SENSITIVITY_BATCHES]
    rows = []
    for name in matmul_nodes(src, section.activation_matmuls):
        _quantize(src, work / "one.onnx", feeds, section.method, section.percentile, cache, nodes=[name])
        err = _rel_error(_outputs(work / "one.onnx", probe, quantized=True), reference)
        keep = err <= section.sensitivity_threshold
        rows.append({"node": name, "rel_error": err, "quantized": keep,
                     "why": "" if keep else f"rel error {err:.2e} > threshold {section.sensitivity_threshold:.1e}"})
    return rows


def write_int8(src: Path, dst: Path, feeds: list[dict], reference: list[np.ndarray], section, cache: Path,
               sensitivity: list[dict]) -> float:
    """Quantize the MatMuls marked quantized; returns the output's relative error on the probe batches."""
    chosen = [s["node"] for s in sensitivity if s["quantized"]]
    if chosen:
        _quantize(src, dst, feeds, section.method, section.percentile, cache, nodes=chosen)
    else:  # every MatMul stays float: the "int8" graph is the float one
        shutil.copyfile(src, dst)
    return _rel_error(_outputs(dst, feeds[:SENSITIVITY_BATCHES], quantized=True), reference)


def relative_drop(fp32: float, int8: float) -> float:
    return (fp32 - int8) / fp32 if fp32 else 0.0


def _drops(fp32: dict, int8: dict) -> dict[str, float]:
    """Relative drop of the metrics the bar covers: NDCG@10 and every AUC."""
    return {k: relative_drop(fp32[k], int8[k]) for k in fp32 if k.startswith(("ndcg", "auc"))}


class CalibrateInt8(Stage):
    name = "calibrate-int8"
    version = 6  # 2: float biases (TensorRT); 3: weight MatMuls only; 4: no output Q/DQ; 5: accuracy bar; 6: fused
    sections = ("quantize", "data", "model")
    inputs = ("train-stub", "export-onnx")

    def enabled(self, recipe) -> bool:
        return recipe.quantize.enabled

    def run(self, ctx: StageContext) -> dict:
        recipe, src = ctx.recipe, ctx.inputs["export-onnx"]
        section, tasks = recipe.quantize, recipe.model.ranking_tasks
        seqs = load_sequences(recipe.data, recipe.model.contextual_len)
        split = dict(max_history=recipe.model.max_history_len, num_negatives=recipe.train.eval_negatives, tasks=tasks,
                     seed=recipe.data.seed)
        calib = leave_one_out(seqs, "val", max_users=section.calibration_users, **split)
        # onnxruntime's histogram calibrators stack batches: one batch size, one history width.
        size = min(32, len(calib.users))
        batches = [b for _, b in calib.batches(size, hist_width=recipe.model.max_history_len)
                   if len(b.hist_lengths) == size]
        feeds = {"ranking": [b.ranking_feed() for b in batches], "retrieval": [b.retrieval_feed() for b in batches]}
        table = np.load(src / "item_embeddings.npy")
        test = leave_one_out(seqs, "test", **split)
        paths = {k: (src / GRAPH_FILES[k], ctx.out_dir / INT8_FILES[k]) for k in ("ranking", "retrieval")}

        def scorer(which: int):  # 0: fp32, 1: int8 (evaluated with the session settings its engine gets)
            return ort_backend.OrtScorer(paths["ranking"][which], paths["retrieval"][which], table, quantized=which == 1)

        sensitivity, rel_err = {}, {}
        with tempfile.TemporaryDirectory() as work, \
                ctx.reporter.task("calibrate-int8: calibrating, sensitivity, accuracy", None):
            caches = {k: Path(work) / f"{k}.calibration.json" for k in paths}
            reference = {k: _outputs(paths[k][0], feeds[k][:SENSITIVITY_BATCHES]) for k in paths}
            for kind, (fp32_path, int8_path) in paths.items():
                sensitivity[kind] = measure_sensitivity(fp32_path, feeds[kind], reference[kind], section, caches[kind],
                                                        Path(work))
                rel_err[kind] = write_int8(fp32_path, int8_path, feeds[kind], reference[kind], section, caches[kind],
                                           sensitivity[kind])
            fp32, int8 = evaluate(test, scorer(0), tasks), evaluate(test, scorer(1), tasks)
            drops = _drops(fp32, int8)
            # The accuracy bar is the recipe's: while a metric drops too far, the most sensitive quantized
            # MatMul of the graph behind it (retrieval for NDCG, ranking for the AUCs) goes back to float.
            while max(drops.values()) > section.max_relative_drop:
                worst = max(drops, key=drops.get)
                kind = "retrieval" if worst.startswith("ndcg") else "ranking"
                quantized = [r for r in sensitivity[kind] if r["quantized"]]
                if not quantized:
                    break
                victim = max(quantized, key=lambda r: r["rel_error"])
                victim.update(quantized=False, why=f"kept float: {worst} dropped {drops[worst]:.2%} with it quantized "
                                                   f"(bar {section.max_relative_drop:.0%})")
                rel_err[kind] = write_int8(*paths[kind], feeds[kind], reference[kind], section, caches[kind],
                                           sensitivity[kind])
                int8 = evaluate(test, scorer(1), tasks)
                drops = _drops(fp32, int8)
        report = {k: {"sensitivity": sensitivity[k], "quantized": sum(r["quantized"] for r in sensitivity[k]),
                      "kept_float": sum(not r["quantized"] for r in sensitivity[k]),
                      "calibration_rel_error": rel_err[k]} for k in paths}
        accuracy = {"fp32": fp32, "int8": int8, "relative_drop": drops, "bar": section.max_relative_drop,
                    "within_bar": all(d <= section.max_relative_drop for d in drops.values()),
                    "split": "test (leave-one-out)", "calibration": f"{len(calib.users)} users of the validation split",
                    "method": section.method}
        write_json_atomic(ctx.out_dir / "accuracy.json", accuracy)
        write_json_atomic(ctx.out_dir / "sensitivity.json", report)
        worst = max(drops.values())
        quantized = sum(r["quantized"] for r in report.values())
        total = quantized + sum(r["kept_float"] for r in report.values())
        return {
            "accuracy": accuracy, "quantized_matmuls": quantized, "matmuls": total,
            "headline": f"{quantized}/{total} MatMuls int8 ({section.method}); worst relative drop {worst:+.2%} "
                        f"({'within' if accuracy['within_bar'] else 'OVER'} the {section.max_relative_drop:.0%} bar)",
            "tables": [{"title": "INT8 vs FP32 (onnxruntime, held-out test split)",
                        "columns": ["metric", "fp32", "int8", "relative drop"],
                        "rows": [[k, fp32[k], int8[k], f"{drops[k]:+.2%}" if k in drops else ""] for k in fp32]}],
        }
