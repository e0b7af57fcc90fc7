// hstu_output, cooperative schedule: both consumer warpgroups share a 128x256 tile, clusters of 2 along M
// share W_out's tiles by TMA multicast (hstu_output.hpp has the kernel).
#include "hstu_output.hpp"

using HstuOutputCoop = hstu::HstuOutput<cute::Shape<cute::_128, cute::_256, cute::_64>, cute::Shape<cute::_2, cute::_1, cute::_1>,
                                        cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                                        cutlass::epilogue::TmaWarpSpecializedCooperative>;
HSTU_OUTPUT_EXPORT(hstu_output_bf16, HstuOutputCoop)
