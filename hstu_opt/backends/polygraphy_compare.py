"""Runner comparisons through polygraphy's Comparator (ONNX-Runtime runners need no TensorRT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hstu_opt._lazy import require


def onnxrt_runner(path: Path, name: str, threads: int = 2):
    require("onnxruntime", backend="onnxruntime", extra="onnx")
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"]), name=name)


def compare(runners: list, feeds: list[dict[str, np.ndarray]], rtol: float, atol: float) -> dict:
    """Run every runner on every feed; compare each runner to the first. Returns a JSON-able summary with the
    max elementwise relative error (|a-b| / max(|b|, atol/rtol)) and polygraphy's pass/fail."""
    require("polygraphy", backend="polygraphy", extra="onnx")
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    G_LOGGER.colors = False
    results = Comparator.run(runners, data_loader=feeds)
    try:  # polygraphy >= 0.53; CompareFunc.simple before (deprecated since)
        from polygraphy.comparator.compare import SimpleCompareFunc as simple
    except ImportError:
        simple = CompareFunc.simple
    passed = bool(Comparator.compare_accuracy(results, compare_func=simple(rtol=rtol, atol=atol)))
    (ref_name, ref_iters), *others = results.items()
    worst = {}
    for name, iters in others:
        errs = []
        for ref_out, out in zip(ref_iters, iters):
            for key in ref_out.keys():
                a, b = np.asarray(out[key], np.float64), np.asarray(ref_out[key], np.float64)
                errs.append(float((np.abs(a - b) / np.maximum(np.abs(b), atol / rtol)).max()))
        worst[name] = max(errs)
    return {"reference": ref_name, "passed": passed, "rtol": rtol, "atol": atol, "max_rel_error": worst,
            "feeds": len(feeds)}
