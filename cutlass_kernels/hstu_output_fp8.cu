// hstu_output in FP8: out[M, N] = (cq[M, K] @ Wq^T) * row_scale[m] * col_scale[n] + residual[M, N],
// cq = e4m3 [uq | aq | gq] (K = 3*H*dv), Wq^T [N, K] e4m3 quantized per output column at build time.
//
// One row scale over the three blocks u, a, g = u * LN(a): the three share one fp32 accumulator, so a
// scale per block cannot be undone in the epilogue (it would take three accumulators, or three GEMMs
// chained through C). The quantizing gated-LayerNorm pass takes the absmax over all three, and since it
// writes new (e4m3) buffers anyway it writes them side by side: the GEMM reads one operand, and the
// bf16 kernel's three-descriptor mainloop is not needed. The residual is the epilogue's C (TMA loads).
#include "fp8.hpp"

namespace hstu {
namespace fp8 {
namespace output {

using Epilogue = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::homogeneous_multiply_add, Out, Acc, kRound>,
                                 fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, Acc, Acc, kRound>,
                                                 fusion::Sm90AccFetch, RowScale>,
                                 ColScale, fusion::Sm90SrcFetch<Out>>;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc,
    Out, cutlass::layout::RowMajor, kAlignOut,   // C = the residual x [M, N]
    Out, cutlass::layout::RowMajor, kAlignOut,   // D = out [M, N]
    EpilogueSchedule, Epilogue>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    ElementIn, cutlass::layout::RowMajor, kAlignIn,     // A = [uq | aq | gq] [M, K], K contiguous
    ElementIn, cutlass::layout::ColumnMajor, kAlignIn,  // B = Wq^T [N, K], K contiguous
    Acc, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
    MainloopSchedule>::CollectiveOp;

using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue,
                                                    cutlass::gemm::PersistentScheduler>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

typename Gemm::Arguments arguments(void const* a, int64_t lda, void const* wt, int64_t ldwt, void const* row_scale,
                                   void const* col_scale, void const* residual, int64_t ldr, void* out, int64_t ldo,
                                   int M, int N, int K) {
  typename Kernel::StrideA dA = make_stride(lda, _1{}, int64_t(0));
  typename Kernel::StrideB dB = make_stride(ldwt, _1{}, int64_t(0));
  typename Kernel::StrideC dC = make_stride(ldr, _1{}, int64_t(0));
  typename Kernel::StrideD dD = make_stride(ldo, _1{}, int64_t(0));
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {static_cast<ElementIn const*>(a), dA, static_cast<ElementIn const*>(wt), dB},
      {{}, static_cast<Out const*>(residual), dC, static_cast<Out*>(out), dD}};
  // {dequant, col_scale... }: {{acc, row_scale, *}, col_scale, C, multiply_add}
  args.epilogue.thread = {{{}, {static_cast<float const*>(row_scale)}, {}},
                          {static_cast<float const*>(col_scale)}, {}, {}};
  return args;
}

}  // namespace output
}  // namespace fp8
}  // namespace hstu

extern "C" {

// out [M, N] = a [M, K] @ wt[N, K]^T * row_scale[m] * col_scale[n] + residual [M, N]: a, wt e4m3 (16-byte
// aligned rows), row_scale [M] / col_scale [N] fp32, residual and out bf16. Returns hstu::Code.
int hstu_output_fp8(void const* a, int64_t lda, void const* wt, int64_t ldwt, void const* row_scale,
                    void const* col_scale, void const* residual, int64_t ldr, void* out, int64_t ldo, int M, int N,
                    int K, cudaStream_t stream) {
  using namespace hstu;
  if (!fp8::fp8_ok(a, lda) || !fp8::fp8_ok(wt, ldwt) || !tma_ok(residual, ldr) || !tma_ok(out, ldo) ||
      !tma_ok(col_scale, 4, 4) || row_scale == nullptr) {
    return kCannotImplement;
  }
  auto args = fp8::output::arguments(a, lda, wt, ldwt, row_scale, col_scale, residual, ldr, out, ldo, M, N, K);
  return run<fp8::output::Gemm>(args, stream);
}

int hstu_output_fp8_can_implement(int64_t lda, int64_t ldwt, int64_t ldr, int64_t ldo, int M, int N, int K) {
  using namespace hstu;
  if (!fp8::fp8_ok(nullptr, lda) || !fp8::fp8_ok(nullptr, ldwt) || !tma_ok(nullptr, ldr) || !tma_ok(nullptr, ldo)) {
    return kCannotImplement;
  }
  return can_implement<fp8::output::Gemm>(
      fp8::output::arguments(nullptr, lda, nullptr, ldwt, nullptr, nullptr, nullptr, ldr, nullptr, ldo, M, N, K));
}

}  // extern "C"
