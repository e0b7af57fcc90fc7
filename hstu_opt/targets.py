"""Build targets and precisions: what `--target` and `--precision` change in a recipe.

A CI matrix builds one recipe for several targets and precisions. The mapping from a target to the
engine backends that serve it lives here, tested with the rest of hstu-opt, so the pipeline files
only pass the two flags through. The overridden recipe is what every stage key hashes and what the
bundle's manifest records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hstu_opt import toolchain
from hstu_opt.errors import RecipeError
from hstu_opt.recipe import Recipe


@dataclass(frozen=True)
class Target:
    summary: str
    engine: dict = field(default_factory=dict)  # EngineSection fields this target sets
    needs_gpu_cc: str | None = None  # the engine compiles for the GPU it is built on
    int8: bool = True  # whether the target has an INT8 engine


TARGETS = {
    "cpu": Target("onnxruntime engines (fp32, and int8 with --precision int8), run on the CPU",
                  {"backends": ("onnxruntime",)}),
    "sm89": Target("TensorRT-RTX plans for compute capability 8.9, built on a machine without a GPU",
                   {"backends": ("tensorrt",), "tensorrt_target_cc": "8.9"}),
    "sm90": Target("the compiled engine (torch.compile, Triton ops, CUDA graphs), built on an sm_90 GPU",
                   {"backends": ("compiled",)}, needs_gpu_cc="9.0", int8=False),
}

# float: engines in the recipe's model.dtype only (no calibrate-int8); int8: the Q/DQ engines as well
PRECISIONS = {"float": False, "int8": True}


def for_target(recipe: Recipe, target: str | None, precision: str | None) -> Recipe:
    """The recipe with the target's backends and the precision's quantize.enabled; unchanged for None."""
    if target is not None:
        recipe = _with_target(recipe, target)
        if precision == "int8" and not TARGETS[target].int8:
            raise RecipeError(f"target '{target}' builds no INT8 engine ({TARGETS[target].summary}): "
                              "use --precision float")
    if precision is not None:
        if precision not in PRECISIONS:
            raise RecipeError(f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}")
        recipe = recipe.model_copy(update={"quantize": recipe.quantize.model_copy(
            update={"enabled": PRECISIONS[precision]})})
    return recipe


def _with_target(recipe: Recipe, name: str) -> Recipe:
    if name not in TARGETS:
        raise RecipeError(f"unknown target '{name}': choose one of {', '.join(TARGETS)}")
    target = TARGETS[name]
    have = toolchain.toolchain()["gpu_cc"]
    if target.needs_gpu_cc is not None and have != target.needs_gpu_cc:
        raise RecipeError(f"target '{name}' ({target.summary}) needs a GPU of compute capability "
                          f"{target.needs_gpu_cc}; this machine has {have or 'no GPU'}: run it on such a machine")
    return recipe.model_copy(update={"engine": recipe.engine.model_copy(update=target.engine)})
