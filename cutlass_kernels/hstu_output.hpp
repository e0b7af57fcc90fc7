// hstu_output's projection: out[M, N] = [u | a | g] @ W_out + residual, g = u * LN(a) written by the
// gated LayerNorm pass before it. bf16 in and out, fp32 accumulation.
//
// The three operands are never concatenated: a mainloop with one TMA descriptor per operand (and per
// row block of W_out) walks the concatenated K (three_operand_mainloop.hpp). The residual is the
// epilogue's C operand (D = acc + C, loaded by TMA). Chaining three GEMMs through C instead would
// write and re-read the [M, N] output twice more and round it to bf16 between them.
// Instantiated per (tile, cluster, schedule): hstu_output_bf16.cu is the shipped instance,
// cutlass_kernels/sweep.py generates the others it times.
#pragma once

#include "three_operand_mainloop.hpp"

namespace hstu {

template <class TileShape, class ClusterShape, class MainloopSchedule, class EpilogueSchedule>
struct HstuOutput {
  using Element = cutlass::bfloat16_t;
  using Acc = float;
  static constexpr int kAlign = 8;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc,
      Element, cutlass::layout::RowMajor, kAlign,   // C = the residual x [M, N]
      Element, cutlass::layout::RowMajor, kAlign,   // D = out [M, N]
      EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, Acc, Element, Acc, kRound>>::CollectiveOp;

  using BaseMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, cutlass::layout::RowMajor, kAlign,   // A_j [M, K_part], K contiguous
      Element, cutlass::layout::RowMajor, kAlign,   // B_j = W_out rows [j*K_part, (j+1)*K_part), N contiguous
      Acc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;
  using CollectiveMainloop = ThreeOperandMainloop<BaseMainloop>;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(void const* const a[3], int64_t const lda[3], void const* w, int64_t ldw,
                                            void const* residual, int64_t ldr, void* out, int64_t ldo, int M, int N,
                                            int k_part) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideC = typename Kernel::StrideC;
    using StrideD = typename Kernel::StrideD;
    int const blk_k = size<2>(TileShape{});
    int const K = 3 * ceil_div(k_part, blk_k) * blk_k;
    typename CollectiveMainloop::Arguments mainloop{};
    for (int j = 0; j < 3; ++j) {
      mainloop.ptr_A[j] = static_cast<Element const*>(a[j]);
      mainloop.dA[j] = StrideA(make_stride(lda[j], _1{}, int64_t(0)));
      mainloop.ptr_B[j] = w ? static_cast<Element const*>(w) + int64_t(j) * k_part * ldw : nullptr;
    }
    mainloop.dB = StrideB(make_stride(_1{}, ldw, int64_t(0)));
    mainloop.k_part = k_part;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        mainloop,
        {{}, static_cast<Element const*>(residual), StrideC(make_stride(ldr, _1{}, int64_t(0))),
         static_cast<Element*>(out), StrideD(make_stride(ldo, _1{}, int64_t(0)))}};
    args.epilogue.thread.alpha = 1.f;
    args.epilogue.thread.beta = 1.f;
    return args;
  }

  static int run(void const* const a[3], int64_t const lda[3], void const* w, int64_t ldw, void const* residual,
                 int64_t ldr, void* out, int64_t ldo, int M, int N, int k_part, cudaStream_t stream) {
    for (int j = 0; j < 3; ++j) {
      if (!tma_ok(a[j], lda[j])) return kCannotImplement;
    }
    if (!tma_ok(w, ldw) || !tma_ok(residual, ldr) || !tma_ok(out, ldo)) return kCannotImplement;
    auto args = arguments(a, lda, w, ldw, residual, ldr, out, ldo, M, N, k_part);
    return hstu::run<Gemm>(args, stream);
  }

  static int can_implement(int64_t const lda[3], int64_t ldw, int64_t ldr, int64_t ldo, int M, int N, int k_part) {
    void const* a[3] = {nullptr, nullptr, nullptr};
    for (int64_t ld : {lda[0], lda[1], lda[2], ldw, ldr, ldo}) {
      if (!tma_ok(nullptr, ld)) return kCannotImplement;
    }
    return hstu::can_implement<Gemm>(arguments(a, lda, nullptr, ldw, nullptr, ldr, nullptr, ldo, M, N, k_part));
  }
};

}  // namespace hstu

// The C ABI of one instance, named SYMBOL: SYMBOL(a0, lda0, a1, lda1, a2, lda2, w, ldw, residual, ldr, out,
// ldo, M, N, k_part, stream) computes out = [a0 | a1 | a2] @ w + residual: a_j [M, k_part] (row strides
// lda_j), w [3*k_part, N] (ldw), residual and out [M, N] (ldr, ldo); all bf16, 16-byte aligned; and
// SYMBOL_can_implement(lda0, lda1, lda2, ldw, ldr, ldo, M, N, k_part). Returns hstu::Code.
#define HSTU_OUTPUT_EXPORT(SYMBOL, INSTANCE)                                                                   \
  extern "C" int SYMBOL(void const* a0, int64_t lda0, void const* a1, int64_t lda1, void const* a2, int64_t lda2, \
                        void const* w, int64_t ldw, void const* residual, int64_t ldr, void* out, int64_t ldo,    \
                        int M, int N, int k_part, cudaStream_t stream) {                                        \
    void const* a[3] = {a0, a1, a2};                                                                            \
    int64_t const lda[3] = {lda0, lda1, lda2};                                                                  \
    return INSTANCE::run(a, lda, w, ldw, residual, ldr, out, ldo, M, N, k_part, stream);                        \
  }                                                                                                             \
  extern "C" int SYMBOL##_can_implement(int64_t lda0, int64_t lda1, int64_t lda2, int64_t ldw, int64_t ldr,     \
                                        int64_t ldo, int M, int N, int k_part) {                                \
    int64_t const lda[3] = {lda0, lda1, lda2};                                                                  \
    return INSTANCE::can_implement(lda, ldw, ldr, ldo, M, N, k_part);                                           \
  }
