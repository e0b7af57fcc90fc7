"""calibrate-int8: explicit (Q/DQ) INT8 that TensorRT accepts, with a per-MatMul sensitivity pass and an
accuracy report on the held-out split.

Rules: Q/DQ only on MatMul/Gemm inputs; symmetric int8 activations and per-channel symmetric int8 weights
(every zero-point 0). Calibration data are real user histories (the validation split), never random
tensors. A MatMul whose quantization alone moves the graph output by more than
quantize.sensitivity_threshold (relative L2) stays in float, and the report says so.
Then the accuracy gate (data/agreement.py): on the held-out test split, the relative change of full-ranking
NDCG and of each task's AUC over all scored pairs, int8 against fp32, paired bootstrap over users; int8 passes
when each interval's lower end is at least -quantize.max_relative_drop. While it fails, the most sensitive
quantized MatMul of the graph behind the failing metric goes back to float.
Outputs: model.int8.onnx, retrieval.int8.onnx, sensitivity.json, accuracy.json (the rule and every number).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from hstu_opt._lazy import require
from hstu_opt.backends import onnxruntime as ort_backend
from hstu_opt.data import agreement
from hstu_opt.data.sequences import load_sequences
from hstu_opt.data.splits import leave_one_out
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


GATE_RULE = ("int8 passes when, for full-ranking NDCG (per user 1/log2(rank+2) of the held-out item) and each "
             "task's AUC over all scored (user, candidate) pairs, the {confidence:.0%} paired-bootstrap interval "
             "({resamples} resamples of the test users) of the relative change (int8 - fp32) / fp32 has its lower "
             "end >= -{bar:.2%}; while it does not, the most sensitive quantized MatMul of the graph behind the "
             "failing metric (retrieval for NDCG, ranking for AUCs) goes back to float.")


def _gate(test, fp32_out, scorer, section, tasks) -> tuple[dict, agreement.Outputs]:
    out = agreement.collect(test, scorer)
    return agreement.paired_gate(test, fp32_out, out, tasks, section.max_relative_drop, section.gate_resamples,
                                 section.gate_confidence), out


def _worst(gate: dict) -> str:
    """The failing metric with the lowest interval end."""
    failing = {k: m["ci"][0] for k, m in gate["gated"].items() if not m["passed"]}
    return min(failing, key=failing.get)


class CalibrateInt8(Stage):
    name = "calibrate-int8"
    version = 7  # 2: float biases; 3: weight MatMuls only; 4: no output Q/DQ; 5: accuracy bar; 6: fused; 7: paired gate
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
            fp32_out = agreement.collect(test, scorer(0))
            gate, int8_out = _gate(test, fp32_out, scorer(1), section, tasks)
            while not gate["passed"]:
                worst = _worst(gate)
                kind = "ranking" if worst.startswith("auc") else "retrieval"
                quantized = [r for r in sensitivity[kind] if r["quantized"]]
                if not quantized:
                    break
                victim = max(quantized, key=lambda r: r["rel_error"])
                m = gate["gated"][worst]
                victim.update(quantized=False, why=f"kept float by the accuracy gate: {worst} change "
                                                   f"{m['relative_change']:+.2%}, interval [{m['ci'][0]:+.2%}, "
                                                   f"{m['ci'][1]:+.2%}] below the bar -{section.max_relative_drop:.2%}")
                rel_err[kind] = write_int8(*paths[kind], feeds[kind], reference[kind], section, caches[kind],
                                           sensitivity[kind])
                gate, int8_out = _gate(test, fp32_out, scorer(1), section, tasks)
        report = {k: {"sensitivity": sensitivity[k], "quantized": sum(r["quantized"] for r in sensitivity[k]),
                      "kept_float": sum(not r["quantized"] for r in sensitivity[k]),
                      "calibration_rel_error": rel_err[k]} for k in paths}
        fp32, int8 = agreement.metrics(test, fp32_out, tasks), agreement.metrics(test, int8_out, tasks)
        accuracy = {"rule": GATE_RULE.format(confidence=section.gate_confidence, resamples=section.gate_resamples,
                                             bar=section.max_relative_drop),
                    "passed": gate["passed"], "gated": gate["gated"], "agreement": gate["agreement"],
                    "fp32": fp32, "int8": int8, "bar": section.max_relative_drop,
                    "split": f"test (leave-one-out), {len(test.users)} users",
                    "calibration": f"{len(calib.users)} users of the validation split", "method": section.method}
        write_json_atomic(ctx.out_dir / "accuracy.json", accuracy)
        write_json_atomic(ctx.out_dir / "sensitivity.json", report)
        quantized = sum(r["quantized"] for r in report.values())
        total = quantized + sum(r["kept_float"] for r in report.values())
        lows = {k: m["ci"][0] for k, m in gate["gated"].items()}
        worst = min(lows, key=lows.get)
        return {
            "accuracy": accuracy, "quantized_matmuls": quantized, "matmuls": total,
            "headline": f"{quantized}/{total} MatMuls int8 ({section.method}); gate "
                        f"{'passed' if gate['passed'] else 'FAILED'}: lowest interval end {worst} {lows[worst]:+.2%} "
                        f"(bar -{section.max_relative_drop:.2%})",
            "tables": [{"title": "INT8 vs FP32 (onnxruntime, held-out test split, paired bootstrap over users)",
                        "columns": ["metric", "fp32", "int8", "relative change", "interval", "gate"],
                        "rows": [[k, fp32[k], int8[k], f"{(int8[k] - fp32[k]) / fp32[k]:+.2%}" if fp32[k] else "",
                                  (f"[{gate['gated'][k]['ci'][0]:+.2%}, {gate['gated'][k]['ci'][1]:+.2%}]"
                                   if k in gate["gated"] else "(reported)"),
                                  ("pass" if gate["gated"][k]["passed"] else "FAIL") if k in gate["gated"] else ""]
                                 for k in fp32]}],
        }
