"""build-engine: one engine set per backend in engine.backends, each through its backend module.

  onnxruntime  fp32 (from export-onnx) and int8 (from calibrate-int8), ranking and retrieval
  tensorrt     plans from the unfused fp32 graph, the Q/DQ graph and the fused graph; the fused one with the
               HstuAttention plugin (plugins/hstu_attention), built in a child process
               (backends/tensorrt_build.py), its package and the target's cubins shipped in tensorrt/plugins/
  aoti         AOTInductor packages of the checkpoint's graphs (torch.export, dynamic shapes)
  compiled     the checkpoint's jagged ranking graph under torch.compile (Triton ops and CUDA graphs on a
               GPU, reference ops on a CPU) with Inductor's cache artifacts; cold and warm start measured
Outputs: <backend>/... and engines.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from hstu_opt.backends import onnxruntime as ort_backend
from hstu_opt.backends import tensorrt as trt_backend
from hstu_opt.errors import StageError
from hstu_opt.fsutil import sha256_file, source_digest, write_json_atomic
from hstu_opt.stages.base import Stage, StageContext
from hstu_opt.stages.calibrate_int8 import INT8_FILES
from hstu_opt.stages.export_onnx import GRAPH_FILES
from hstu_opt.stages.fuse import FUSED_FILES


def check_profile(recipe, limits: dict) -> None:
    prof = recipe.engine.profile
    for axis, (lo, hi) in {"batch": limits["batch"], "history": limits["history"],
                           "candidates": limits["candidates"]}.items():
        mn, opt, mx = getattr(prof, axis)
        if not (lo <= mn <= opt <= mx <= hi):
            raise StageError(f"engine.profile.{axis}=({mn}, {opt}, {mx}) must satisfy {lo} <= min <= opt <= max <= {hi} "
                             "(the exported graph's limits): fix the recipe")


PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent  # holds hstu_opt/


class BuildEngine(Stage):
    name = "build-engine"
    version = 5  # 2: Q/DQ engines keep MatMulAddFusion off; 3: session.json records `quantized`; 4: compiled;
    # 5: the fused TensorRT plan with the HstuAttention plugin
    # (keyed on `bench` too when it builds the compiled engine: key_sections)
    sections = ("engine",)
    inputs = ("train-stub", "export-onnx", "fuse", "calibrate-int8")

    def key_sections(self, recipe) -> tuple[str, ...]:
        # the compiled engine is compiled ahead for the bench grid's shapes (see _compiled)
        extra = ("bench",) if "compiled" in recipe.engine.backends else ()
        if "compiled" in recipe.engine.backends and recipe.engine.precision == "fp8":  # the FP8 accuracy gate's
            extra += ("quantize", "data", "model")  # bar, held-out split and tasks
        return self.sections + extra

    def code_digests(self, recipe) -> dict[str, str]:
        """The kernels this stage compiles or ships: the HstuAttention plugin package (the fused TensorRT plan),
        hstu-opt's model and ops (the compiled and AOTInductor engines), the CUTLASS library they ship."""
        out: dict[str, str] = {}
        backends = set(recipe.engine.backends)
        if "tensorrt" in backends and recipe.fuse.attention_plugin:
            found = importlib.util.find_spec("plugins.hstu_attention")
            # (its kernel imports hstu_opt/ops/_triton.py: plugins/hstu_attention/compile.source_digest)
            out["hstu_attention_plugin"] = (source_digest(Path(found.origin).parent.parent.parent, "plugins/hstu_attention")
                                            + sha256_file(PACKAGE_ROOT / "hstu_opt" / "ops" / "_triton.py")
                                            if found and found.origin else "not installed")
        if backends & {"compiled", "aoti"}:
            out["hstu_opt"] = source_digest(PACKAGE_ROOT, "hstu_opt/ops", "hstu_opt/model", "hstu_opt/backends")
        if "compiled" in backends:
            from hstu_opt.backends.compiled import uses_cutlass
            from hstu_opt.ops import _cutlass

            if uses_cutlass(recipe.engine.impl() or {}):
                lib = os.environ.get(_cutlass.ENV_LIB)
                out["cutlass_lib"] = sha256_file(Path(lib)) if lib and os.path.isfile(lib) else "not built"
        return out

    def input_stages(self, recipe) -> tuple[str, ...]:
        optional = {"fuse": recipe.fuse.attention_plugin, "calibrate-int8": recipe.quantize.enabled,
                    "train-stub": bool({"aoti", "compiled"} & set(recipe.engine.backends))}  # these compile the checkpoint
        return tuple(s for s in self.inputs if optional.get(s, True))

    def run(self, ctx: StageContext) -> dict:
        recipe = ctx.recipe
        contract = json.loads((ctx.inputs["export-onnx"] / "contract.json").read_text())
        if "tensorrt" in recipe.engine.backends:
            check_profile(recipe, contract["limits"])
        sources = self._sources(ctx, contract)
        engines: dict[str, dict] = {}
        with ctx.reporter.task("build-engine", len(recipe.engine.backends)) as advance:
            for backend in recipe.engine.backends:
                build = {"onnxruntime": self._onnxruntime, "tensorrt": self._tensorrt, "aoti": self._aoti,
                         "compiled": self._compiled}[backend]
                engines[backend] = build(ctx, sources, contract)
                advance(1)
        write_json_atomic(ctx.out_dir / "engines.json", engines)
        built = [f"{b}:{n}" for b, e in engines.items() for n, d in e.items() if "skipped" not in d]
        skipped = [f"{b}:{n}" for b, e in engines.items() for n, d in e.items() if "skipped" in d]
        headline = f"{len(built)} engines ({', '.join(built)})" + (f"; skipped {', '.join(skipped)}" if skipped else "")
        return {"engines": engines, "headline": headline}

    @staticmethod
    def _sources(ctx: StageContext, contract: dict) -> dict[str, dict]:
        """precision -> graph kind -> ONNX path."""
        exp = ctx.inputs["export-onnx"]
        out = {"fp32": {k: exp / GRAPH_FILES[k] for k in contract["graphs"]}}
        if "calibrate-int8" in ctx.inputs:
            out["int8"] = {k: ctx.inputs["calibrate-int8"] / INT8_FILES[k] for k in contract["graphs"]}
        if "fuse" in ctx.inputs:
            out["fused"] = {k: ctx.inputs["fuse"] / FUSED_FILES[k] for k in contract["graphs"]}
        return out

    @staticmethod
    def _onnxruntime(ctx: StageContext, sources: dict, contract: dict) -> dict:
        out = {}
        for precision in ("fp32", "int8"):
            for kind, path in sources.get(precision, {}).items():
                out[f"{kind}.{precision}"] = ort_backend.build(path, ctx.out_dir / "onnxruntime", f"{kind}.{precision}",
                                                               ctx.recipe.engine.intra_op_threads,
                                                               quantized=precision == "int8")
        return out

    @staticmethod
    def _aoti(ctx: StageContext, sources: dict, contract: dict) -> dict:
        from hstu_opt.backends import aoti
        from hstu_opt.model.checkpoint import load_checkpoint

        model, _ = load_checkpoint(ctx.inputs["train-stub"] / "checkpoint", expect=ctx.recipe.model)
        return {kind: aoti.build(model, kind, ctx.out_dir / "aoti", ctx.recipe.export.max_batch) for kind in contract["graphs"]}

    @staticmethod
    def _compiled(ctx: StageContext, sources: dict, contract: dict) -> dict:
        from hstu_opt.backends import compiled
        from hstu_opt.model.checkpoint import load_checkpoint

        recipe = ctx.recipe
        model, _ = load_checkpoint(ctx.inputs["train-stub"] / "checkpoint", expect=recipe.model)
        out = {"ranking": compiled.build(model, ctx.out_dir / "compiled", recipe.export.max_batch, recipe.bench.grid(),
                                         impl=recipe.engine.impl())}
        if recipe.engine.precision == "fp8":
            out["ranking"]["fp8_accuracy"] = BuildEngine._fp8_gate(ctx, model)
        return out

    @staticmethod
    def _fp8_gate(ctx: StageContext, model) -> dict:
        """engine.precision fp8: the FP8 accuracy gate (backends/fp8_gate.py) into compiled/fp8_accuracy.json;
        a measured failure stops the build (the FP8 engine is not shipped), a skip is recorded as such."""
        from hstu_opt.backends import fp8_gate
        from hstu_opt.data.sequences import load_sequences
        from hstu_opt.data.splits import leave_one_out

        recipe, section = ctx.recipe, ctx.recipe.quantize
        tasks = recipe.model.ranking_tasks
        seqs = load_sequences(recipe.data, recipe.model.contextual_len)
        test = leave_one_out(seqs, "test", max_history=recipe.model.max_history_len,
                             num_negatives=recipe.train.eval_negatives, tasks=tasks, seed=recipe.data.seed)
        ops = dict(recipe.engine.ops)
        base = {**ops, "uvqk": ops.get("uvqk", "triton"), "hstu_output": ops.get("hstu_output", "triton")} if ops else None
        report = fp8_gate.fp8_gate(model, test, tasks, section.max_relative_drop, section.gate_resamples,
                                   section.gate_confidence, base_impl=base)
        write_json_atomic(ctx.out_dir / "compiled" / "fp8_accuracy.json", report)
        if report["passed"] is False:
            raise StageError(f"engine.precision fp8: the FP8 accuracy gate failed ({report['gated']}); see "
                             f"{ctx.out_dir / 'compiled' / 'fp8_accuracy.json'}")
        return report

    @staticmethod
    def _tensorrt(ctx: StageContext, sources: dict, contract: dict) -> dict:
        recipe = ctx.recipe
        trt_backend.trt_module()  # (a clear error when neither TensorRT is installed)
        out = {}
        C = contract["limits"]["contextual_len"]
        for precision in ("fp32", "int8"):
            if precision in sources:
                path = sources[precision]["ranking"]
                out[f"ranking.{precision}"] = trt_backend.build(path, ctx.out_dir / "tensorrt", f"ranking.{precision}",
                                                                recipe.engine, C)
        if "fused" in sources:
            out["ranking.fused"] = trt_backend.build_fused(
                sources["fused"]["ranking"], ctx.out_dir / "tensorrt", "ranking.fused", recipe.engine, C,
                recipe.fuse.plugin_namespace)
        return out
