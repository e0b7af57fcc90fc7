// uvqk's projection: out[M, N] = xn[M, K] @ W[K, N] + bias[N], SiLU on the columns whose gate[n] != 0
// (the u block, columns [0, H*dv) of [u | v | q | k]). bf16 in and out, fp32 accumulation.
//
// One Hopper GEMM (TMA + GMMA, warp-specialized cooperative, persistent) whose epilogue is a visitor
// tree: z = acc + bias[n], then where(gate[n], SiLU(z), z). The gate is a per-column vector because an
// EVT compute node sees values, not coordinates; it costs one more row broadcast per tile.
// The LayerNorm before it stays a separate memory-bound pass (ops/_triton.py says why) writing xn.
#include "common.hpp"

namespace hstu {
using namespace cute;

// where(gate != 0, SiLU(z), z) over an epilogue fragment (T: cutlass::Array<float, N>).
template <class T>
struct SiluWhere {
  CUTLASS_HOST_DEVICE T operator()(T const& z, T const& gate) const {
    T out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) {
#if defined(__CUDA_ARCH__)
      out[i] = gate[i] != 0.f ? fast_silu(z[i]) : z[i];
#else
      out[i] = z[i];
#endif
    }
    return out;
  }
};

namespace uvqk {
namespace fusion = cutlass::epilogue::fusion;
using Element = cutlass::bfloat16_t;
using Acc = float;
using TileShape = Shape<_128, _256, _64>;
using ClusterShape = Shape<_2, _1, _1>;
constexpr int kAlign = 8;  // 16 bytes of bf16: what TMA needs
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

using RowVector = fusion::Sm90RowBroadcast<0, TileShape, Element, Acc, Stride<_0, _1, int64_t>, kAlign>;
using BiasAdd = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, Acc, Acc, kRound>, fusion::Sm90AccFetch, RowVector>;
using Epilogue = fusion::Sm90EVT<fusion::Sm90Compute<SiluWhere, Element, Acc, kRound>, BiasAdd, RowVector>;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc,
    void, cutlass::layout::RowMajor, kAlign,      // no C operand
    Element, cutlass::layout::RowMajor, kAlign,   // D: [M, N] row-major
    cutlass::epilogue::TmaWarpSpecializedCooperative, Epilogue>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    Element, cutlass::layout::RowMajor, kAlign,   // A = xn [M, K], K contiguous
    Element, cutlass::layout::RowMajor, kAlign,   // B = W [K, N], N contiguous (the model's layout)
    Acc, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
    cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue,
                                                    cutlass::gemm::PersistentScheduler>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

typename Gemm::Arguments arguments(void const* a, int64_t lda, void const* w, int64_t ldw, void const* bias,
                                   void const* gate, void* out, int64_t ldo, int M, int N, int K) {
  using StrideA = typename Kernel::StrideA;  // (M, K, L): (lda, 1, 0)
  using StrideB = typename Kernel::StrideB;  // (N, K, L): (1, ldw, 0)
  using StrideD = typename Kernel::StrideD;  // (M, N, L): (ldo, 1, 0)
  StrideA dA = make_stride(lda, _1{}, int64_t(0));
  StrideB dB = make_stride(_1{}, ldw, int64_t(0));
  StrideD dD = make_stride(ldo, _1{}, int64_t(0));
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {static_cast<Element const*>(a), dA, static_cast<Element const*>(w), dB},
      {{}, nullptr, {}, static_cast<Element*>(out), dD}};
  auto& fusion = args.epilogue.thread;  // {{acc, bias, plus}, gate, silu_where}
  fusion = {{{}, {static_cast<Element const*>(bias)}, {}}, {static_cast<Element const*>(gate)}, {}};
  return args;
}
}  // namespace uvqk
}  // namespace hstu

extern "C" {

// out = where(gate, SiLU, id)(a @ w + bias): a [M, K] (row stride lda), w [K, N] (ldw), bias and gate
// [N] (contiguous; gate 1 on SiLU columns, 0 elsewhere), out [M, N] (ldo); all bf16, 16-byte aligned.
int hstu_uvqk_bf16(void const* a, int64_t lda, void const* w, int64_t ldw, void const* bias, void const* gate,
                   void* out, int64_t ldo, int M, int N, int K, cudaStream_t stream) {
  if (!hstu::tma_ok(a, lda) || !hstu::tma_ok(w, ldw) || !hstu::tma_ok(out, ldo) || !hstu::tma_ok(bias, 8) ||
      !hstu::tma_ok(gate, 8)) {
    return hstu::kCannotImplement;
  }
  auto args = hstu::uvqk::arguments(a, lda, w, ldw, bias, gate, out, ldo, M, N, K);
  return hstu::run<hstu::uvqk::Gemm>(args, stream);
}

int hstu_uvqk_bf16_can_implement(int64_t lda, int64_t ldw, int64_t ldo, int M, int N, int K) {
  if (!hstu::tma_ok(nullptr, lda) || !hstu::tma_ok(nullptr, ldw) || !hstu::tma_ok(nullptr, ldo)) return hstu::kCannotImplement;
  auto args = hstu::uvqk::arguments(nullptr, lda, nullptr, ldw, nullptr, nullptr, nullptr, ldo, M, N, K);
  return hstu::can_implement<hstu::uvqk::Gemm>(args);
}

}  // extern "C"
