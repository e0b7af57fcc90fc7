"""The FP8 accuracy gate: the compiled engine's FP8 projections (engine.precision: fp8) against the same
model with bf16 projections, the same kind of gate as INT8's (data/agreement.py, stages/calibrate_int8.py).

On the held-out test split (leave-one-out), both variants score every user in the same process and on the
same GPU; the report has the outputs' agreement (probability differences, top-10 overlap, users whose
held-out item changed rank) and, for full-ranking NDCG and each task's AUC, the relative change fp8 vs bf16
with a paired bootstrap interval over users. FP8 passes when every interval's lower end is at least
-bar (quantize.max_relative_drop): the data must show any loss is within the bar.

The FP8 kernels are sm_90a code: on any other machine the gate is not run, and the report says so and
why (`skipped`), with `passed: null`; it never reports a pass it did not measure.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from hstu_opt.data import agreement
from hstu_opt.data.batching import PaddedBatch
from hstu_opt.model.scoring import to_tensors

RULE = ("FP8 projections (uvqk and hstu_output as CUTLASS e4m3 GEMMs: weights per output channel, activations "
        "per row) against the same model with bf16 projections ({base}), on the held-out test split: relative "
        "change of full-ranking NDCG and of each task's AUC, paired bootstrap over users ({resamples} resamples, "
        "{confidence:.0%} interval); FP8 passes when every interval's lower end is >= -{bar:.2%}. Output agreement "
        "(max / mean |probability difference|, top-10 overlap, users whose held-out item changed rank) is reported "
        "beside it.")


def skip_reason() -> str | None:
    """Why the FP8 gate cannot run here (None: it can)."""
    if not torch.cuda.is_available():
        return ("no CUDA GPU on this machine: the FP8 projections are CUTLASS sm_90a kernels, which run only on an "
                "H100/H200-class GPU, so the FP8 accuracy gate was not run (and FP8 is not shown to be accurate)")
    if torch.cuda.get_device_capability() != (9, 0):
        return (f"{torch.cuda.get_device_name()} is not sm_90: the FP8 kernels are sm_90a code, so the FP8 accuracy "
                "gate was not run")
    return None


class ImplScorer:
    """A model behind the Scorer protocol with a given per-op implementation map, on `device`."""

    def __init__(self, model, impl, device: str | torch.device = "cuda"):
        self.model, self.impl, self.device = model, impl, torch.device(device)
        with torch.no_grad():
            self.table = model.item_table().float()

    @torch.no_grad()
    def rank(self, batch: PaddedBatch) -> np.ndarray:
        self.model.impl = self.impl
        return self.model.rank(**to_tensors(batch.ranking_feed(), self.device)).float().cpu().numpy()

    @torch.no_grad()
    def score_items(self, batch: PaddedBatch) -> np.ndarray:
        self.model.impl = self.impl
        emb = self.model.retrieve(**to_tensors(batch.retrieval_feed(), self.device)).float()
        return (emb @ self.table.T).cpu().numpy()


def run_gate(eval_set, base, test, tasks: tuple[str, ...], bar: float, resamples: int = 1000,
             confidence: float = 0.95, base_name: str = "bf16") -> dict:
    """The gate over any two scorers (base: bf16, test: fp8): the report, rule and numbers."""
    base_out = agreement.collect(eval_set, base)
    test_out = agreement.collect(eval_set, test)
    gate = agreement.paired_gate(eval_set, base_out, test_out, tasks, bar, resamples, confidence)
    return {"rule": RULE.format(base=base_name, resamples=resamples, confidence=confidence, bar=bar),
            "passed": gate["passed"], "gated": gate["gated"], "agreement": gate["agreement"], "bar": bar,
            "bf16": agreement.metrics(eval_set, base_out, tasks), "fp8": agreement.metrics(eval_set, test_out, tasks),
            "split": f"{eval_set.split} (leave-one-out), {len(eval_set.users)} users"}


def fp8_impl(base_impl: dict | None) -> dict:
    """The FP8 variant of a per-op map (None: Triton everywhere)."""
    base = dict(base_impl or {op: "triton" for op in ("hstu_attention", "layer_norm", "embedding_rows", "uvqk",
                                                        "hstu_output")})
    return {**base, "uvqk": "cutlass_fp8", "hstu_output": "cutlass_fp8"}


def bf16_model(model):
    """`model` computing in bf16, what the FP8 (and bf16 CUTLASS) kernels take: itself when its config says
    so, else a copy with the same weights and a bf16 config (model.to(bfloat16) alone would keep the
    config's dtype, and the trunk casts its activations to that: the projections would get float32 and
    fall back)."""
    if model.cfg.dtype == "bfloat16":
        return model
    copy = type(model)(dataclasses.replace(model.cfg, dtype="bfloat16"), impl=model.impl)
    copy.load_state_dict(model.state_dict())
    return copy


def fp8_gate(model, eval_set, tasks: tuple[str, ...], bar: float, resamples: int = 1000, confidence: float = 0.95,
             base_impl: dict | None = None) -> dict:
    """Run the gate for `model` on this machine's GPU: bf16 projections (base_impl, default Triton for
    every op) against FP8 ones. Off an sm_90 GPU: {skipped: why, passed: None, rule}."""
    from hstu_opt.ops import Impl

    base = dict(base_impl or {op: "triton" for op in ("hstu_attention", "layer_norm", "embedding_rows", "uvqk",
                                                       "hstu_output")})
    rule = RULE.format(base=_describe(base), resamples=resamples, confidence=confidence, bar=bar)
    why = skip_reason()
    if why:
        return {"skipped": why, "passed": None, "rule": rule}
    from hstu_opt.ops import _fp8

    cast_from = None if model.cfg.dtype == "bfloat16" else model.cfg.dtype
    model = bf16_model(model).to("cuda", torch.bfloat16).eval()
    _fp8.prepare(model)
    to_impl = lambda m: {op: Impl(v) for op, v in m.items()}  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run_gate(eval_set, ImplScorer(model, to_impl(base)), ImplScorer(model, to_impl(fp8_impl(base))),
                          tasks, bar, resamples, confidence, _describe(base))
    cast = f" (cast from the checkpoint's {cast_from} for both sides)" if cast_from else ""
    report |= {"gpu": torch.cuda.get_device_name(), "model_dtype": "bfloat16" + cast}
    fell_back = sorted({str(w.message).split(":")[0] for w in caught if "(fp8)" in str(w.message)})
    if fell_back or report["agreement"].get("prob_max_abs_diff") == 0.0:
        # FP8 did not run (H200 run 75: the tiny model computes in float32, which the kernels do not take, and
        # both sides ran the same fallback): no measurement, so no pass
        why = (f"the FP8 kernels did not run for this model ({'; '.join(fell_back) or 'outputs identical to bf16'}): "
               "nothing was measured")
        return report | {"skipped": why, "passed": None, "measured_passed": report["passed"]}
    return report


def _describe(impl: dict) -> str:
    return "uvqk " + impl.get("uvqk", "reference") + ", hstu_output " + impl.get("hstu_output", "reference")
