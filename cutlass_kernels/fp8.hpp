// Shared pieces of the FP8 (e4m3) GEMMs: e4m3 A [M, K] (K contiguous) x e4m3 W^T [N, K] (K contiguous: FP8
// GMMA reads both operands K-major from shared memory, so the weight is stored transposed, once, when it
// is quantized at build time), fp32 accumulation, bf16 out. The epilogue first dequantizes:
// z = acc * row_scale[m] * col_scale[n] (row_scale: the activation's per-row scale, written by the
// quantizing LayerNorm pass; col_scale: the weight's per-output-column scale), then the bf16 kernels'
// epilogue (bias + SiLU on u columns, or + residual).
//
// Mainloop schedule: KernelTmaWarpSpecializedCooperativeFP8FastAccum. The non-"fast" FP8 schedule promotes
// the GMMA accumulator into a second fp32 accumulator every few K blocks, which doubles the accumulator
// registers (128x256 tile: 256 per thread) and spills; at these K (512 for uvqk, 3*H*dv <= 1536 for
// hstu_output) the in-GMMA accumulation is what the FP8 accuracy gate measures.
#pragma once

#include "common.hpp"

namespace hstu {
namespace fp8 {
using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

using ElementIn = cutlass::float_e4m3_t;
using Out = cutlass::bfloat16_t;
using Acc = float;
// hstu_output's (and the cooperative uvqk's) shape and schedule; the ping-pong uvqk: uvqk_fp8_pingpong.cu
using TileShape = Shape<_128, _256, _128>;  // 128 e4m3 = 128 bytes of K per stage row
using ClusterShape = Shape<_2, _1, _1>;
constexpr int kAlignIn = 16;   // 16 bytes of e4m3
constexpr int kAlignOut = 8;   // 16 bytes of bf16
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;

// row_scale[m] (one fp32 per output row, plain predicated loads: M is free) and col_scale[n], for a tile shape.
template <class Tile>
struct Scales {
  using RowScale = fusion::Sm90ColBroadcast<0, Tile, float, Acc, Stride<_1, _0, int64_t>, 1>;
  using ColScale = fusion::Sm90RowBroadcast<0, Tile, float, Acc, Stride<_0, _1, int64_t>, 4>;
  // acc * row_scale[m] * col_scale[n]
  using Dequant = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, Acc, Acc, kRound>,
                                  fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, Acc, Acc, kRound>,
                                                  fusion::Sm90AccFetch, RowScale>,
                                  ColScale>;

  static typename Dequant::Arguments args(void const* row_scale, void const* col_scale) {
    // {{acc, row_scale, *}, col_scale, *}
    return {{{}, {static_cast<float const*>(row_scale)}, {}}, {static_cast<float const*>(col_scale)}, {}};
  }
};
using RowScale = Scales<TileShape>::RowScale;
using ColScale = Scales<TileShape>::ColScale;

inline bool fp8_ok(void const* ptr, int64_t row_stride) { return tma_ok(ptr, row_stride, 1); }

}  // namespace fp8
}  // namespace hstu
