// uvqk in FP8: out[M, N] = where(gate[n], SiLU(z), z), z = (xq[M, K] @ Wq^T) * row_scale[m] * col_scale[n]
// + bias[n]; xq e4m3 (the quantizing LayerNorm pass: LN -> row absmax -> scale -> e4m3), Wq^T [N, K] e4m3
// quantized per output column at build time. fp32 accumulation, bf16 out. One instance (compile time):
// cooperative 128x256x128 tiles, clusters of 2 along M (fp8.hpp).
#include "fp8.hpp"
#include "uvqk.hpp"  // SiluWhere

namespace hstu {
namespace fp8 {
namespace uvqk {

using Vector = fusion::Sm90RowBroadcast<0, TileShape, Out, Acc, Stride<_0, _1, int64_t>, kAlignOut>;
using Biased = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, Acc, Acc, kRound>, Dequant, Vector>;
using Epilogue = fusion::Sm90EVT<fusion::Sm90Compute<SiluWhere, Out, Acc, kRound>, Biased, Vector>;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc,
    void, cutlass::layout::RowMajor, kAlignOut,   // no C operand
    Out, cutlass::layout::RowMajor, kAlignOut,    // D: [M, N] row-major
    EpilogueSchedule, Epilogue>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    ElementIn, cutlass::layout::RowMajor, kAlignIn,     // A = xq [M, K], K contiguous
    ElementIn, cutlass::layout::ColumnMajor, kAlignIn,  // B = Wq^T [N, K], K contiguous
    Acc, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
    MainloopSchedule>::CollectiveOp;

using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue,
                                                    cutlass::gemm::PersistentScheduler>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

typename Gemm::Arguments arguments(void const* a, int64_t lda, void const* wt, int64_t ldwt, void const* row_scale,
                                   void const* col_scale, void const* bias, void const* gate, void* out, int64_t ldo,
                                   int M, int N, int K) {
  typename Kernel::StrideA dA = make_stride(lda, _1{}, int64_t(0));   // (M, K, L)
  typename Kernel::StrideB dB = make_stride(ldwt, _1{}, int64_t(0));  // (N, K, L): Wq^T [N, K] row-major
  typename Kernel::StrideD dD = make_stride(ldo, _1{}, int64_t(0));   // (M, N, L)
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {static_cast<ElementIn const*>(a), dA, static_cast<ElementIn const*>(wt), dB},
      {{}, nullptr, {}, static_cast<Out*>(out), dD}};
  // {{dequant, bias, plus}, gate, silu_where}
  args.epilogue.thread = {{dequant_args(row_scale, col_scale), {static_cast<Out const*>(bias)}, {}},
                          {static_cast<Out const*>(gate)}, {}};
  return args;
}

}  // namespace uvqk
}  // namespace fp8
}  // namespace hstu

extern "C" {

// out [M, N] = [SiLU where gate](a [M, K] @ wt[N, K]^T * row_scale[m] * col_scale[n] + bias[n]): a and wt
// e4m3 (row strides lda, ldwt: 16-byte aligned), row_scale [M] and col_scale [N] fp32, bias and gate [N]
// bf16, out bf16 (ldo). Returns hstu::Code.
int hstu_uvqk_fp8(void const* a, int64_t lda, void const* wt, int64_t ldwt, void const* row_scale,
                  void const* col_scale, void const* bias, void const* gate, void* out, int64_t ldo, int M, int N,
                  int K, cudaStream_t stream) {
  using namespace hstu;
  if (!fp8::fp8_ok(a, lda) || !fp8::fp8_ok(wt, ldwt) || !tma_ok(out, ldo) || !tma_ok(bias, 8) ||
      !tma_ok(gate, 8) || !tma_ok(col_scale, 4, 4) || row_scale == nullptr) {
    return kCannotImplement;
  }
  auto args = fp8::uvqk::arguments(a, lda, wt, ldwt, row_scale, col_scale, bias, gate, out, ldo, M, N, K);
  return run<fp8::uvqk::Gemm>(args, stream);
}

int hstu_uvqk_fp8_can_implement(int64_t lda, int64_t ldwt, int64_t ldo, int M, int N, int K) {
  using namespace hstu;
  if (!fp8::fp8_ok(nullptr, lda) || !fp8::fp8_ok(nullptr, ldwt) || !tma_ok(nullptr, ldo)) return kCannotImplement;
  return can_implement<fp8::uvqk::Gemm>(
      fp8::uvqk::arguments(nullptr, lda, nullptr, ldwt, nullptr, nullptr, nullptr, nullptr, nullptr, ldo, M, N, K));
}

}  // extern "C"
