// uvqk FP8, cooperative schedule: both consumer warpgroups share a 128x256x128 tile, clusters of 2 along M
// share Wq's tiles by TMA multicast (FastAccum: fp8.hpp says why).
#include "uvqk_fp8.hpp"

using UvqkFp8Coop = hstu::fp8::UvqkFp8<cute::Shape<cute::_128, cute::_256, cute::_128>, cute::Shape<cute::_2, cute::_1, cute::_1>,
                                       cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum,
                                       cutlass::epilogue::TmaWarpSpecializedCooperative>;
HSTU_UVQK_FP8_EXPORT(coop, UvqkFp8Coop)
