// uvqk in FP8: out[M, N] = where(gate[n], SiLU(z), z), z = (xq[M, K] @ Wq^T) * row_scale[m] * col_scale[n]
// + bias[n]; xq e4m3 (the quantizing LayerNorm pass: LN -> row absmax -> scale -> e4m3), Wq^T [N, K] e4m3
// quantized per output column at build time. fp32 accumulation, bf16 out. Instantiated per (tile,
// schedule) by uvqk_fp8_*.cu, one kernel per translation unit (compile time). With K = 512 a tile is only
// 4 K steps of 128, so the epilogue (dequantize, bias, SiLU, store) is an even larger share than in bf16:
// the ping-pong instance overlaps one warpgroup's epilogue with the other's MMAs.
#pragma once

#include "fp8.hpp"
#include "uvqk.hpp"  // SiluWhere

namespace hstu {
namespace fp8 {

template <class Tile, class Cluster, class Mainloop, class EpilogueSched>
struct UvqkFp8 {
  using Scale = Scales<Tile>;
  using Vector = fusion::Sm90RowBroadcast<0, Tile, Out, Acc, Stride<_0, _1, int64_t>, kAlignOut>;
  using Biased = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, Acc, Acc, kRound>, typename Scale::Dequant, Vector>;
  using Epilogue = fusion::Sm90EVT<fusion::Sm90Compute<SiluWhere, Out, Acc, kRound>, Biased, Vector>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc,
      void, cutlass::layout::RowMajor, kAlignOut,   // no C operand
      Out, cutlass::layout::RowMajor, kAlignOut,    // D: [M, N] row-major
      EpilogueSched, Epilogue>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementIn, cutlass::layout::RowMajor, kAlignIn,     // A = xq [M, K], K contiguous
      ElementIn, cutlass::layout::ColumnMajor, kAlignIn,  // B = Wq^T [N, K], K contiguous
      Acc, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      Mainloop>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(void const* a, int64_t lda, void const* wt, int64_t ldwt,
                                            void const* row_scale, void const* col_scale, void const* bias,
                                            void const* gate, void* out, int64_t ldo, int M, int N, int K) {
    typename Kernel::StrideA dA = make_stride(lda, _1{}, int64_t(0));   // (M, K, L)
    typename Kernel::StrideB dB = make_stride(ldwt, _1{}, int64_t(0));  // (N, K, L): Wq^T [N, K] row-major
    typename Kernel::StrideD dD = make_stride(ldo, _1{}, int64_t(0));   // (M, N, L)
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        {static_cast<ElementIn const*>(a), dA, static_cast<ElementIn const*>(wt), dB},
        {{}, nullptr, {}, static_cast<Out*>(out), dD}};
    // {{dequant, bias, plus}, gate, silu_where}
    args.epilogue.thread = {{Scale::args(row_scale, col_scale), {static_cast<Out const*>(bias)}, {}},
                            {static_cast<Out const*>(gate)}, {}};
    return args;
  }

  static int run(void const* a, int64_t lda, void const* wt, int64_t ldwt, void const* row_scale,
                 void const* col_scale, void const* bias, void const* gate, void* out, int64_t ldo, int M, int N,
                 int K, cudaStream_t stream) {
    if (!fp8_ok(a, lda) || !fp8_ok(wt, ldwt) || !tma_ok(out, ldo) || !tma_ok(bias, 8) || !tma_ok(gate, 8) ||
        !tma_ok(col_scale, 4, 4) || row_scale == nullptr) {
      return kCannotImplement;
    }
    auto args = arguments(a, lda, wt, ldwt, row_scale, col_scale, bias, gate, out, ldo, M, N, K);
    return hstu::run<Gemm>(args, stream);
  }

  static int can_implement(int64_t lda, int64_t ldwt, int64_t ldo, int M, int N, int K) {
    if (!fp8_ok(nullptr, lda) || !fp8_ok(nullptr, ldwt) || !tma_ok(nullptr, ldo)) return kCannotImplement;
    return hstu::can_implement<Gemm>(
        arguments(nullptr, lda, nullptr, ldwt, nullptr, nullptr, nullptr, nullptr, nullptr, ldo, M, N, K));
  }
};

}  // namespace fp8
}  // namespace hstu

// The C ABI of one instance: hstu_uvqk_fp8_<NAME>(a, lda, wt, ldwt, row_scale, col_scale, bias, gate, out,
// ldo, M, N, K, stream) and hstu_uvqk_fp8_<NAME>_can_implement(lda, ldwt, ldo, M, N, K). a [M, K] and
// wt [N, K] e4m3 (16-byte aligned rows), row_scale [M] / col_scale [N] fp32, bias and gate [N] bf16, out
// [M, N] bf16. Returns hstu::Code.
#define HSTU_UVQK_FP8_EXPORT(NAME, INSTANCE)                                                                  \
  extern "C" int hstu_uvqk_fp8_##NAME(void const* a, int64_t lda, void const* wt, int64_t ldwt,              \
                                      void const* row_scale, void const* col_scale, void const* bias,          \
                                      void const* gate, void* out, int64_t ldo, int M, int N, int K,           \
                                      cudaStream_t stream) {                                                   \
    return INSTANCE::run(a, lda, wt, ldwt, row_scale, col_scale, bias, gate, out, ldo, M, N, K, stream);      \
  }                                                                                                            \
  extern "C" int hstu_uvqk_fp8_##NAME##_can_implement(int64_t lda, int64_t ldwt, int64_t ldo, int M, int N,   \
                                                      int K) {                                                 \
    return INSTANCE::can_implement(lda, ldwt, ldo, M, N, K);                                                   \
  }
