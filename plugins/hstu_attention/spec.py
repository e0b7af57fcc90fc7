"""What the HstuAttention plugin accepts and computes, without TensorRT, Triton or a GPU: the node's
attributes (the plugin's serialized fields), the kernel variants shipped as cubins, the output shape
rule, the format rule and the launch arguments. plugin.py (TensorRT), runtime.py (cuda-bindings),
compile.py (Triton) and the tests all read this one table.

Node (written by hstu_opt/stages/fuse.py), padded layout [contextual C][history Nh][candidates Nc]:
  inputs  q, k [B, n, H, dqk], v [B, n, H, dv] (n = C + Nh + Nc), hist_lengths [B], num_candidates [B],
          history_width [1] (= Nh, where the candidate slots start)
  output  [B, n, H, dv] in q's dtype; rows that are padding are written as 0
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

NAME, VERSION = "HstuAttention", "1"
NUM_INPUTS = 6
INPUT_NAMES = ("q", "k", "v", "hist_lengths", "num_candidates", "history_width")
FLOAT_TYPES = ("FLOAT", "HALF", "BF16")  # TensorRT DataType names
LENGTH_TYPES = ("INT32", "INT64")
HEAD_DIMS = (32, 50, 64, 128)  # dqk == dv: what benchmarks/gpu_plugin.py sweeps on the H200
BF16_MIN_ARCH = 80
DTYPE_TAG = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}


class PluginError(ValueError):
    """A node or format the plugin does not take; the message says what and what to do."""


@dataclass(frozen=True)
class Attributes:
    """The node's attributes = the plugin's fields (serialized into the plan)."""

    alpha: float
    max_seq_len: int
    contextual_len: int = 0
    max_attn_len: int = 0
    min_full_attn_seq_len: int = 0
    has_targets: int = 1

    FLOAT_FIELDS = ("alpha",)

    @classmethod
    def from_fields(cls, fields: dict) -> "Attributes":
        """From a name -> value dict (TensorRT passes numpy arrays of one element); unknown names are the
        ONNX node's informational attributes (scale, causal, plugin_version, ...) and are ignored."""
        def scalar(v):
            return v.item() if hasattr(v, "item") and getattr(v, "size", 1) == 1 else v

        known = {k: scalar(v) for k, v in fields.items() if k in cls.__dataclass_fields__}
        missing = [k for k in ("alpha", "max_seq_len") if k not in known]
        if missing:
            raise PluginError(f"{NAME}: the node lacks attribute(s) {', '.join(missing)}: re-run the fuse stage")
        attrs = cls(**{k: float(v) if k in cls.FLOAT_FIELDS else int(v) for k, v in known.items()})
        attrs.check()
        return attrs

    def check(self) -> None:
        if self.max_seq_len <= 0 or not math.isfinite(self.alpha):
            raise PluginError(f"{NAME}: max_seq_len must be > 0 and alpha finite (got {self.max_seq_len}, {self.alpha})")
        for k in ("contextual_len", "max_attn_len", "min_full_attn_seq_len"):
            if getattr(self, k) < 0:
                raise PluginError(f"{NAME}: attribute {k} must be >= 0 (got {getattr(self, k)})")

    def fields(self) -> dict:
        return asdict(self)


def check_head_dims(dqk: int, dv: int) -> None:
    if dqk != dv or dqk not in HEAD_DIMS:
        raise PluginError(f"{NAME}: head dims dqk={dqk}, dv={dv} are not among the compiled and GPU-checked ones "
                          f"(dqk == dv in {HEAD_DIMS}): use one of those, or add it to spec.HEAD_DIMS, recompile the "
                          "cubins and run benchmarks/gpu_plugin.py on the GPU")


def float_types(arch: int | None) -> tuple[str, ...]:
    """Float types the plugin takes on a target (bf16 needs sm_80+)."""
    return FLOAT_TYPES if arch is None or arch >= BF16_MIN_ARCH else ("FLOAT", "HALF")


def supports(pos: int, types: list[str], linear: list[bool], arch: int | None) -> bool:
    """supports_format_combination's rule: position `pos` of (inputs..., output), TensorRT DataType names
    `types` and whether each is in the linear format, positions before `pos` already chosen."""
    if not linear[pos]:
        return False
    if pos in (0, 6):  # q and the output: a float type; the output follows q
        return types[pos] in float_types(arch) and (pos == 0 or types[pos] == types[0])
    if pos in (1, 2):
        return types[pos] == types[0]
    if pos == 4:  # num_candidates is read like hist_lengths (one 32-bit step for both)
        return types[4] == types[3]
    return types[pos] in LENGTH_TYPES  # hist_lengths, history_width: int32 or int64


def output_shape(q_dims: list, v_dims: list) -> list:
    """[B, n, H, dv]: q's first three dims, v's last (symbolic or concrete)."""
    return [q_dims[0], q_dims[1], q_dims[2], v_dims[3]]


# ---- kernel variants and launch -----------------------------------------------------------------

def block_d(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


# Largest shared memory one block may take (KB): sm_86/89 have 99 KB, sm_80 163, sm_90 227.
SHARED_LIMIT_KB = {75: 64, 80: 163, 86: 99, 87: 163, 89: 99, 90: 227, 100: 227, 120: 99}


def tiles(dtype: str, arch: int = 90) -> dict:
    """Tile sizes per dtype: 16-bit 64x64 (3 stages, 4 warps), the hstu-opt Triton kernel's measured best
    for head dims up to 128 on the H200 (ops/hstu_attention/triton.py _blocks); fp32 (the exact path)
    64x32. Below sm_90 two stages, so head dim 128 fits sm_89's 99 KB of shared memory."""
    if dtype == "fp32":
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3 if arch >= 90 else 2}


def variant(dtype: str, d: int) -> str:
    return f"hstu_attention_{dtype}_d{d}"


def variants(arch: int) -> list[tuple[str, int]]:
    """(dtype tag, head dim) of every cubin shipped for `arch`."""
    return [(DTYPE_TAG[t], d) for t in float_types(arch) for d in HEAD_DIMS]


def constexprs(dtype: str, d: int, interpret: bool = False) -> dict:
    """The kernel's compile-time constants. FAST (one tanh.approx SiLU) for 16-bit on a GPU; the
    interpreter cannot run inline PTX."""
    t = tiles(dtype)
    return {"DQK": d, "DV": d, "BLOCK_M": t["BLOCK_M"], "BLOCK_N": t["BLOCK_N"], "BLOCK_DQK": block_d(d),
            "BLOCK_DV": block_d(d), "IEEE": dtype == "fp32", "FAST": dtype != "fp32" and not interpret}


# Runtime arguments of the kernel, in order, with their Triton signature types ("*fp" = the float dtype).
ARGS = (("Q", "*fp"), ("K", "*fp"), ("V", "*fp"), ("Out", "*fp"), ("HistLen", "*i32"), ("NumCand", "*i32"),
        ("HistWidth", "*i32"), ("alpha", "fp32"), ("inv_n", "fp32"), ("n", "i32"), ("H", "i32"), ("C", "i32"),
        ("window", "i32"), ("min_full", "i32"), ("has_targets", "i32"), ("len_step", "i32"))
POINTER_ALIGN = 16  # TensorRT's buffers are 256-byte aligned; the compiled kernels assume 16


def grid(B: int, n: int, H: int, block_m: int) -> tuple[int, int, int]:
    return (-(-n // block_m), B * H, 1)


def scalar_args(attrs: Attributes, n: int, H: int, len_step: int) -> list:
    """The non-pointer arguments in ARGS order. Lengths are read as 32-bit words with step len_step (2 for
    int64: their low words, little-endian; lengths are < 2^31), so one cubin takes either type."""
    return [float(attrs.alpha), 1.0 / attrs.max_seq_len, n, H, attrs.contextual_len, attrs.max_attn_len,
            attrs.min_full_attn_seq_len if attrs.max_attn_len else 0, attrs.has_targets, len_step]
