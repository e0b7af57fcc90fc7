// uvqk's projection: out[M, N] = xn[M, K] @ W[K, N] + bias[N], SiLU on the columns whose gate[n] != 0
// (the u block, columns [0, H*dv) of [u | v | q | k]). bf16 in and out, fp32 accumulation.
//
// A Hopper GEMM (TMA + GMMA, warp-specialized, persistent) whose epilogue is a visitor tree:
// z = acc + bias[n], then where(gate[n], SiLU(z), z). The gate is a per-column vector because an EVT
// compute node sees values, not coordinates; it costs one more row broadcast per tile.
// The LayerNorm before it stays a separate memory-bound pass (ops/_triton.py says why) writing xn.
// Instantiated per (tile, schedule) by uvqk_bf16_*.cu, one kernel per translation unit (compile time).
#pragma once

#include "common.hpp"

namespace hstu {
using namespace cute;

// where(gate != 0, SiLU(z), z) over an epilogue fragment (T: cutlass::Array<float, N>). A fragment lies in
// one epilogue subtile (32 columns or more) and the u block is a multiple of 32 columns wide, so the
// branch is uniform and v/q/k subtiles skip the special-function unit, which bounds the epilogue.
template <class T>
struct SiluWhere {
  CUTLASS_HOST_DEVICE T operator()(T const& z, T const& gate) const {
#if defined(__CUDA_ARCH__)
    bool any = false;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) any |= gate[i] != 0.f;
    if (!any) return z;
    T out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) out[i] = gate[i] != 0.f ? fast_silu(z[i]) : z[i];
    return out;
#else
    return z;
#endif
  }
};

template <class TileShape, class ClusterShape, class MainloopSchedule, class EpilogueSchedule>
struct Uvqk {
  using Element = cutlass::bfloat16_t;
  using Acc = float;
  static constexpr int kAlign = 8;  // 16 bytes of bf16: what TMA needs
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  using RowVector = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, Element, Acc, Stride<_0, _1, int64_t>, kAlign>;
  using BiasAdd = cutlass::epilogue::fusion::Sm90EVT<cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, Acc, Acc, kRound>,
                                                     cutlass::epilogue::fusion::Sm90AccFetch, RowVector>;
  using Epilogue = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<SiluWhere, Element, Acc, kRound>, BiasAdd, RowVector>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc,
      void, cutlass::layout::RowMajor, kAlign,      // no C operand
      Element, cutlass::layout::RowMajor, kAlign,   // D: [M, N] row-major
      EpilogueSchedule, Epilogue>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, cutlass::layout::RowMajor, kAlign,   // A = xn [M, K], K contiguous
      Element, cutlass::layout::RowMajor, kAlign,   // B = W [K, N], N contiguous (the model's layout)
      Acc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(void const* a, int64_t lda, void const* w, int64_t ldw, void const* bias,
                                            void const* gate, void* out, int64_t ldo, int M, int N, int K) {
    typename Kernel::StrideA dA = make_stride(lda, _1{}, int64_t(0));  // (M, K, L)
    typename Kernel::StrideB dB = make_stride(_1{}, ldw, int64_t(0));  // (N, K, L): W [K, N] row-major
    typename Kernel::StrideD dD = make_stride(ldo, _1{}, int64_t(0));  // (M, N, L)
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        {static_cast<Element const*>(a), dA, static_cast<Element const*>(w), dB},
        {{}, nullptr, {}, static_cast<Element*>(out), dD}};
    // {{acc, bias, plus}, gate, silu_where}
    args.epilogue.thread = {{{}, {static_cast<Element const*>(bias)}, {}}, {static_cast<Element const*>(gate)}, {}};
    return args;
  }

  static int run(void const* a, int64_t lda, void const* w, int64_t ldw, void const* bias, void const* gate,
                 void* out, int64_t ldo, int M, int N, int K, cudaStream_t stream) {
    if (!tma_ok(a, lda) || !tma_ok(w, ldw) || !tma_ok(out, ldo) || !tma_ok(bias, 8) || !tma_ok(gate, 8)) {
      return kCannotImplement;
    }
    auto args = arguments(a, lda, w, ldw, bias, gate, out, ldo, M, N, K);
    return hstu::run<Gemm>(args, stream);
  }

  static int can_implement(int64_t lda, int64_t ldw, int64_t ldo, int M, int N, int K) {
    if (!tma_ok(nullptr, lda) || !tma_ok(nullptr, ldw) || !tma_ok(nullptr, ldo)) return kCannotImplement;
    return hstu::can_implement<Gemm>(arguments(nullptr, lda, nullptr, ldw, nullptr, nullptr, nullptr, ldo, M, N, K));
  }
};

}  // namespace hstu

// The C ABI of one instance: hstu_uvqk_bf16_<NAME>(a, lda, w, ldw, bias, gate, out, ldo, M, N, K, stream)
// and hstu_uvqk_bf16_<NAME>_can_implement(lda, ldw, ldo, M, N, K). a [M, K], w [K, N], out [M, N] with
// row strides lda / ldw / ldo; bias and gate [N] contiguous (gate 1 on SiLU columns); all bf16,
// 16-byte aligned. Returns hstu::Code.
#define HSTU_UVQK_EXPORT(NAME, INSTANCE)                                                                    \
  extern "C" int hstu_uvqk_bf16_##NAME(void const* a, int64_t lda, void const* w, int64_t ldw,              \
                                       void const* bias, void const* gate, void* out, int64_t ldo, int M,     \
                                       int N, int K, cudaStream_t stream) {                                   \
    return INSTANCE::run(a, lda, w, ldw, bias, gate, out, ldo, M, N, K, stream);                              \
  }                                                                                                           \
  extern "C" int hstu_uvqk_bf16_##NAME##_can_implement(int64_t lda, int64_t ldw, int64_t ldo, int M, int N,  \
                                                       int K) {                                               \
    return INSTANCE::can_implement(lda, ldw, ldo, M, N, K);                                                   \
  }
