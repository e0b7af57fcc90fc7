// Shared pieces of the hstu-opt CUTLASS kernels: the C ABI's error codes, the device's SM count (queried
// once per device, not on every launch) and one run() for any GemmUniversalAdapter.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/kernel_hardware_info.h"

namespace hstu {

// The C ABI's return codes (cutlass_kernels/__init__.py mirrors them).
enum Code : int {
  kOk = 0,
  kCannotImplement = 1,  // shape, stride or alignment the kernel does not take
  kNeedsWorkspace = 2,   // the kernels are built not to need one; a nonzero size is a build error
  kInitFailed = 3,
  kLaunchFailed = 4,
};

inline int sm_count() {
  static int cached[64] = {0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 0;
  if (cached[device] == 0) {
    cached[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  }
  return cached[device];
}

// TMA's own rules, which CUTLASS's can_implement does not check for run-time strides: 16-byte aligned
// start addresses and row strides (8 bf16 elements).
inline bool tma_ok(void const* ptr, int64_t row_stride, int elem_bytes = 2) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (row_stride * elem_bytes) % 16 == 0 && row_stride > 0;
}

template <class Gemm>
int run(typename Gemm::Arguments& args, cudaStream_t stream) {
  args.hw_info.sm_count = sm_count();
  if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return kCannotImplement;
  if (Gemm::get_workspace_size(args) != 0) return kNeedsWorkspace;
  Gemm gemm;
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return kInitFailed;
  return gemm.run(stream) == cutlass::Status::kSuccess ? kOk : kLaunchFailed;
}

template <class Gemm>
int can_implement(typename Gemm::Arguments const& args) {
  return Gemm::can_implement(args) == cutlass::Status::kSuccess ? kOk : kCannotImplement;
}

// SiLU for the epilogues: x/2 + x/2 * tanh(x/2), one tanh.approx.f32 (max relative error ~2^-11, below
// bf16 rounding) instead of an exp and a full division; the same formula as the Triton kernels'.
CUTLASS_DEVICE float fast_silu(float x) {
  float h = 0.5f * x, t;
  asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(h));
  return h + h * t;
}

}  // namespace hstu
