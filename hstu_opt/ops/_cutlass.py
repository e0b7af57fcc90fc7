"""The CUTLASS kernels' library (cutlass_kernels/, built by `python -m cutlass_kernels.build`), loaded with
ctypes, and the rule of which calls it takes.

The library is found through $HSTU_CUTLASS_LIB (the build prints its path). Nothing here imports CUDA
or opens the library until a kernel runs, so the package imports on a machine without either.

`uvqk_uncovered` / `output_uncovered` are the router: the kernels take the dtype and the range of shapes
benchmarks/gpu_cutlass.py checks against float64 on the H200. Anything else, and any call whose strides
or alignment the kernel itself refuses, runs the Triton op instead (the reference off the GPU), with a
warning once per reason.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings

import torch

from hstu_opt.errors import HstuOptError

ENV_LIB = "HSTU_CUTLASS_LIB"
CODES = {0: "ok", 1: "cannot implement (shape, stride or alignment)", 2: "needs a workspace",
         3: "initialize failed", 4: "launch failed"}  # cutlass_kernels/common.hpp's hstu::Code
CANNOT_IMPLEMENT = 1
# uvqk's kernel instances (cutlass_kernels/uvqk_bf16_<config>.cu): cooperative 128x256 tiles or ping-pong
# 128x128 tiles; UVQK_CONFIG is the one the op runs: ping-pong, 0.2504 against 0.2667 ms at dlrm-v3 batch 16
# (H200 run 73, benchmarks/results/gpu_cutlass_h200_2026-12-04_run73.json; both pass every check there).
UVQK_CONFIGS = ("coop", "pingpong")
UVQK_CONFIG = "pingpong"
# the FP8 uvqk's instances (cutlass_kernels/uvqk_fp8_<config>.cu), the same two schedules with K tiles of 128;
# UVQK_FP8_CONFIG is the one the op runs until benchmarks/gpu_fp8.py has timed both
UVQK_FP8_CONFIG = "pingpong"

# What the GPU check covers (benchmarks/gpu_cutlass.py: D in {64, 192, 512, 1024}, H in {1, 2, 4}, d in
# {32, 64, 128}): bf16; the model width D (uvqk's K, hstu_output's N) a multiple of 64 up to 1024;
# per-head widths multiples of 32, so uvqk's N and SiLU columns and hstu_output's K blocks (H*dv) are
# multiples of 32, up to 2048 and 512.
MAX_D, MAX_HV, MAX_N = 1024, 512, 2048


class CutlassUnavailable(HstuOptError):
    """The CUTLASS kernels' library is not built or cannot load."""


@functools.cache
def library() -> ctypes.CDLL:
    path = os.environ.get(ENV_LIB)
    if not path or not os.path.exists(path):
        raise CutlassUnavailable(
            f"the CUTLASS kernels are not built (${ENV_LIB}={path!r}): run `python -m cutlass_kernels.build "
            f"--arch sm_90a` and set {ENV_LIB} to the library it prints")
    return load(path)


_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# The C ABI of each kind of kernel (cutlass_kernels/*.hpp's export macros): (kernel args, can_implement args).
ABI = {
    # a, lda, w, ldw, bias, gate, out, ldo, M, N, K, stream | lda, ldw, ldo, M, N, K
    "uvqk_bf16": ([_P, _I64, _P, _I64, _P, _P, _P, _I64, _I32, _I32, _I32, _P], [_I64] * 3 + [_I32] * 3),
    # a0, lda0, a1, lda1, a2, lda2, w, ldw, residual, ldr, out, ldo, M, N, k_part, stream | lda0..2, ldw, ldr, ldo, M, N, k_part
    "output_bf16": ([_P, _I64] * 6 + [_I32] * 3 + [_P], [_I64] * 6 + [_I32] * 3),
    # a, lda, wt, ldwt, row_scale, col_scale, bias, gate, out, ldo, M, N, K, stream | lda, ldwt, ldo, M, N, K
    "uvqk_fp8": ([_P, _I64, _P, _I64, _P, _P, _P, _P, _P, _I64, _I32, _I32, _I32, _P], [_I64] * 3 + [_I32] * 3),
    # a, lda, wt, ldwt, row_scale, col_scale, residual, ldr, out, ldo, M, N, K, stream | lda, ldwt, ldr, ldo, M, N, K
    "output_fp8": ([_P, _I64, _P, _I64, _P, _P, _P, _I64, _P, _I64, _I32, _I32, _I32, _P], [_I64] * 4 + [_I32] * 3),
}
# the shipped library's symbols: (ABI kind, symbol)
SYMBOLS = ([("uvqk_bf16", f"hstu_uvqk_bf16_{c}") for c in UVQK_CONFIGS] + [("output_bf16", "hstu_output_bf16")]
           + [("uvqk_fp8", f"hstu_uvqk_fp8_{c}") for c in UVQK_CONFIGS] + [("output_fp8", "hstu_output_fp8")])


def declare(lib: ctypes.CDLL, kind: str, symbol: str) -> None:
    """Declare one exported kernel's C signature (and its _can_implement's) on a loaded library."""
    args, can = ABI[kind]
    getattr(lib, symbol).argtypes = args
    getattr(lib, f"{symbol}_can_implement").argtypes = can


def load(path: str, symbols=SYMBOLS) -> ctypes.CDLL:
    """Open a built library and declare its C ABI (cutlass_kernels/*.cu's extern "C" functions)."""
    if torch.cuda.is_available():
        torch.cuda.init()  # loads torch's libcudart.so.13, which the library links by soname
    lib = ctypes.CDLL(path)
    for kind, symbol in symbols:
        declare(lib, kind, symbol)
    return lib


def check(code: int, kernel: str) -> None:
    if code != 0:
        raise RuntimeError(f"CUTLASS {kernel}: {CODES.get(code, code)}")


def stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def on_hopper(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and _is_sm90(t.device.index if t.device.index is not None else -1)


@torch.compiler.assume_constant_result  # a constant while torch.compile traces the op wrappers
def _is_sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(None if index < 0 else index) == (9, 0)


def uvqk_uncovered(x: torch.Tensor, weight: torch.Tensor, silu_cols: int) -> str | None:
    """Why the CUTLASS uvqk does not take x [M, D] @ weight [D, N] with SiLU on silu_cols columns (None: it does)."""
    D, N = weight.shape
    if x.dtype != torch.bfloat16:
        return f"dtype {x.dtype} (bf16 only)"
    if not on_hopper(x):
        return "not an sm_90 GPU"
    if D % 64 or not 64 <= D <= MAX_D:
        return f"D={D} (multiples of 64 up to {MAX_D})"
    if N % 32 or N > MAX_N or silu_cols % 32:
        return f"N={N}, SiLU columns {silu_cols} (multiples of 32, N up to {MAX_N})"
    return None


def output_uncovered(u: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the CUTLASS hstu_output does not take u [M, H*dv] with weight [3*H*dv, D] (None: it does)."""
    hv, D = u.shape[-1], weight.shape[1]
    if u.dtype != torch.bfloat16:
        return f"dtype {u.dtype} (bf16 only)"
    if not on_hopper(u):
        return "not an sm_90 GPU"
    if D % 64 or not 64 <= D <= MAX_D:
        return f"D={D} (multiples of 64 up to {MAX_D})"
    if hv % 32 or not 32 <= hv <= MAX_HV:
        return f"H*dv={hv} (multiples of 32 up to {MAX_HV})"
    return None


def fallback(t: torch.Tensor):
    """The implementation an uncovered call runs: Triton on a GPU, the reference elsewhere."""
    from hstu_opt.ops._registry import Impl

    return Impl.TRITON if t.device.type == "cuda" else Impl.REFERENCE


def run_fallback(table, entry: str, label: str, reason: str, x: torch.Tensor, *args):
    """An uncovered call of a CUTLASS entry: warn (once per label and reason), then run `entry` of the
    fallback implementation (`fallback(x)`) with (x, *args)."""
    warn_fallback(label, reason)
    return table.get(fallback(x), entry)(x, *args)


@functools.cache
def warn_fallback(op: str, reason: str) -> None:
    warnings.warn(f"{op}: the CUTLASS kernel does not cover {reason}; running the Triton (GPU) or reference op",
                  stacklevel=3)
