"""The typed recipe: parsed once from YAML, frozen, unknown keys rejected, passed down as objects."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hstu_opt.errors import RecipeError


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def digest(self) -> str:
        """sha256 of this section's canonical JSON: part of each stage's cache key."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


class ModelSection(Section):
    embedding_dim: int = Field(64, ge=1, description="D")
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    attention_dim: int = Field(32, ge=1, description="dqk per head")
    linear_dim: int = Field(32, ge=1, description="dv per head")
    max_history_len: int = Field(200, ge=1)
    max_targets: int = Field(16, ge=1, description="most candidate rows per user in one request")
    contextual_len: int = Field(0, ge=0, description="C contextual rows per user")
    max_attn_len: int = Field(0, ge=0, description="local attention window; 0 = unlimited")
    min_full_attn_seq_len: int = Field(0, ge=0, description="with a window: the last rows before the targets (and "
                                       "the targets) keep full causal attention (HSTU.md 'The mask')")
    attn_alpha: float | None = Field(None, description="default 1/sqrt(attention_dim)")
    num_time_buckets: int = Field(2048, ge=1)
    time_bucket_fn: Literal["sqrt", "log"] = "sqrt"
    ranking_tasks: tuple[str, ...] = ("watched", "liked")
    ranking_hidden_dim: int = Field(64, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _check_tasks(self) -> "ModelSection":
        if len(self.ranking_tasks) < 1 or len(set(self.ranking_tasks)) != len(self.ranking_tasks):
            raise ValueError("ranking_tasks must name at least one task, each once")
        unknown = set(self.ranking_tasks) - set(KNOWN_TASKS)
        if unknown:
            raise ValueError(f"unknown ranking task(s) {sorted(unknown)}; known: {list(KNOWN_TASKS)}")
        return self


KNOWN_TASKS = ("watched", "liked")


class SyntheticSection(Section):
    num_users: int = Field(2000, ge=2)
    num_items: int = Field(5000, ge=2)
    min_len: int = Field(20, ge=3)
    max_len: int = Field(200, ge=3)
    num_clusters: int = Field(32, ge=1)
    zipf_alpha: float = Field(1.1, gt=0)
    contextual_cardinality: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _check_lengths(self) -> "SyntheticSection":
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) is larger than max_len ({self.max_len})")
        return self


class DataSection(Section):
    source: Literal["movielens", "synthetic"] = "movielens"
    path: Path | None = Field(None, description="ratings file; None = the bundled ML-100k")
    format: Literal["inter", "udata", "dat", "csv"] = "inter"
    min_user_interactions: int = Field(5, ge=3)
    seed: int = 0
    synthetic: SyntheticSection = SyntheticSection()


class TrainSection(Section):
    seed: int = 0
    epochs: int = Field(20, ge=1)
    max_seconds: float = Field(3600.0, gt=0, description="safety bound on training time; epochs should end it")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    dropout: float = Field(0.2, ge=0, lt=1)
    num_negatives: int = Field(128, ge=1, description="sampled-softmax negatives per batch")
    temperature: float = Field(0.05, gt=0)
    ranking_negatives: int = Field(4, ge=1, description="negative candidate rows per user")
    ranking_loss_weight: float = Field(1.0, ge=0)
    eval_negatives: int = Field(15, ge=1, description="negative candidates per user for ranking AUC")
    threads: int = Field(2, ge=1)


class ExportSection(Section):
    opset: int = Field(18, ge=17)
    max_batch: int = Field(256, ge=2, description="largest batch the exported graphs accept")
    graphs: tuple[Literal["ranking", "retrieval"], ...] = ("ranking", "retrieval")
    parity_rtol: float = Field(1e-4, gt=0)


class FuseSection(Section):
    attention_plugin: bool = True
    layer_norm: bool = True
    plugin_version: str = "1"
    plugin_namespace: str = ""
    parity_rtol: float = Field(1e-5, gt=0)


class QuantizeSection(Section):
    enabled: bool = True
    method: Literal["minmax", "entropy", "percentile"] = "percentile"
    percentile: float = Field(99.99, gt=90, le=100)
    calibration_users: int = Field(256, ge=1)
    sensitivity_threshold: float = Field(0.005, ge=0, description="max relative output error per MatMul")
    activation_matmuls: bool = Field(False, description="also quantize activation x activation MatMuls (attention)")
    max_relative_drop: float = Field(0.01, ge=0, description="accuracy gate: largest relative loss of full-ranking "
                                     "NDCG and each task's AUC the bootstrap interval may reach (README 'INT8')")
    gate_resamples: int = Field(1000, ge=100, description="paired bootstrap resamples of the test users")
    gate_confidence: float = Field(0.95, gt=0.5, lt=1, description="the gate's interval")


class ProfileSection(Section):
    batch: tuple[int, int, int] = (1, 8, 32)
    history: tuple[int, int, int] = (1, 100, 200)
    candidates: tuple[int, int, int] = (1, 8, 16)


class EngineSection(Section):
    backends: tuple[Literal["onnxruntime", "tensorrt", "aoti", "compiled"], ...] = ("onnxruntime",)
    tensorrt_target_cc: str = Field("8.9", pattern=r"^\d+\.\d+$")
    tensorrt_hardware_compatibility: Literal["none", "ampere_plus", "same_cc"] = "none"
    profile: ProfileSection = ProfileSection()
    intra_op_threads: int = Field(2, ge=1)
    ops: dict[Literal["uvqk", "hstu_output", "hstu_attention", "layer_norm", "embedding_rows"],
              Literal["reference", "triton", "cutlass", "cutlass_fp8"]] = Field(
        {}, description="the `compiled` engine's implementation per op on a GPU, e.g. "
        "`{uvqk: cutlass, hstu_output: cutlass, hstu_attention: triton}` (ops not named: the reference, fused by "
        "Inductor); empty: Triton for every op. CPU builds run the reference")
    precision: Literal["bf16", "fp8"] = Field(
        "bf16", description="the `compiled` engine's projections on a GPU: `fp8` runs uvqk and hstu_output as "
        "CUTLASS e4m3 GEMMs (weights per channel, activations per row, scales in the epilogue; overrides their "
        "`ops` entries; `fp8_accuracy.json` in the bundle has the accuracy gate against bf16; shapes the FP8 kernels are not "
        "checked for run the bf16 projections, with a warning; needs `model.dtype: bfloat16`); `bf16`: `ops` as given")

    def impl(self) -> dict | None:
        """The per-op map the compiled engine is built with (None: Triton for every op)."""
        ops = dict(self.ops)
        if self.precision == "fp8":
            base = ops or {op: "triton" for op in ("hstu_attention", "layer_norm", "embedding_rows")}
            return {**base, "uvqk": "cutlass_fp8", "hstu_output": "cutlass_fp8"}
        return ops or None


class BenchSection(Section):
    batch_sizes: tuple[int, ...] = (1, 32)
    history_lengths: tuple[int, ...] = (200,)
    candidates: tuple[int, ...] = (16,)
    warmup: int = Field(3, ge=0)
    repeats: int = Field(20, ge=1)

    def grid(self) -> list[tuple[int, int, int]]:
        """(batch, history, candidates) for every combination of the lists."""
        return [(b, h, c) for b in self.batch_sizes for h in self.history_lengths for c in self.candidates]


class ServingSection(Section):
    time_granularity_s: int = Field(60, ge=1, description="`hstu-opt serve` floors every request's query time to "
                                    "this many seconds, so cached and uncached scores agree")


class Recipe(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    version: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    export: ExportSection = ExportSection()
    fuse: FuseSection = FuseSection()
    quantize: QuantizeSection = QuantizeSection()
    engine: EngineSection = EngineSection()
    bench: BenchSection = BenchSection()
    serving: ServingSection = ServingSection()

    def section(self, name: str) -> Section:
        return getattr(self, name)

    @model_validator(mode="after")
    def _check_kernel_dtype(self) -> "Recipe":
        """The CUTLASS kernels take bf16 activations only: asked of another model dtype, every call would
        fall back, so the engine would not be what the recipe says."""
        if self.model.dtype == "bfloat16":
            return self
        if self.engine.precision == "fp8":
            raise ValueError(f"engine.precision fp8 needs model.dtype bfloat16 (the FP8 projections quantize bf16 "
                             f"activations; a {self.model.dtype} model would run its projections unquantized): set "
                             "model.dtype: bfloat16, or engine.precision: bf16")
        cutlass = sorted(f"{op}: {impl}" for op, impl in self.engine.ops.items() if impl.startswith("cutlass"))
        if cutlass:
            raise ValueError(f"engine.ops {', '.join(cutlass)} needs model.dtype bfloat16 (the CUTLASS kernels take "
                             f"bf16; a {self.model.dtype} model would run them as Triton): set model.dtype: bfloat16, "
                             "or name triton for those ops")
        return self


def _fields_at(loc: tuple, model: type[BaseModel] = Recipe) -> list[str]:
    """The valid keys of the section that holds `loc`'s last key (for 'did you mean')."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _describe(path: Path, err: dict) -> str:
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc) or "<top>"
    if err["type"] == "extra_forbidden":
        valid = _fields_at(loc)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(valid)}"
        return f"{path}: unknown key '{where}' ({hint})"
    if err["type"] == "missing":
        return f"{path}: missing required key '{where}': add it"
    if not loc:  # a check across sections: its message names the fields and the fix
        return f"{path}: {err['msg'].removeprefix('Value error, ')}"
    return f"{path}: {where}: {err['msg']} (got {err.get('input')!r}): fix this value"


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found: pass the path to a YAML recipe (see recipes/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping with keys name, version, model, ...")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        # A misspelled key also makes its correct spelling "missing": name the unknown key first,
        # since its did-you-mean is the fix (pydantic lists missing fields before extra ones).
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise RecipeError(_describe(path, errors[0])) from exc
    if recipe.data.path is not None and not recipe.data.path.is_absolute():
        recipe = recipe.model_copy(
            update={"data": recipe.data.model_copy(update={"path": (path.parent / recipe.data.path).resolve()})}
        )
    return recipe
