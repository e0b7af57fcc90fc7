"""hstu-opt's CUTLASS Hopper kernels: CUDA C++ sources (one .cu per GEMM) and their build.

Each .cu is one CUTLASS 3.x sm_90a GEMM (CollectiveBuilder, TMA + GMMA, warp-specialized cooperative
persistent kernel, epilogue visitor tree) behind a small C ABI: raw device pointers, sizes, row strides
and a cudaStream_t in, an error code out (CODES), plus a `<name>_can_implement` that checks shapes and
strides without launching. `build.py` compiles them into one shared library that needs only
libcudart.so.13 at run time; hstu_opt/ops/_cutlass.py loads it with ctypes.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("uvqk_bf16_coop.cu", "uvqk_bf16_pingpong.cu", "hstu_output_bf16.cu",  # one kernel each: ~50-100 s, ~3.3 GB
           "uvqk_fp8_coop.cu", "uvqk_fp8_pingpong.cu", "hstu_output_fp8.cu")  # e4m3 x e4m3 -> bf16, scales in the epilogue (fp8.hpp)
UVQK_CONFIGS = ("coop", "pingpong")  # uvqk_bf16_<config>.cu
HEADERS = ("common.hpp", "uvqk.hpp", "three_operand_mainloop.hpp", "hstu_output.hpp", "fp8.hpp", "uvqk_fp8.hpp")
LIB_NAME = "libhstu_cutlass.so"
ENV_LIB = "HSTU_CUTLASS_LIB"  # where hstu_opt/ops/_cutlass.py finds the built library

# The C ABI's return codes (common.hpp's hstu::Code).
CODES = {0: "ok", 1: "cannot implement (shape, stride or alignment)", 2: "needs a workspace",
         3: "initialize failed", 4: "launch failed"}
