// uvqk, cooperative schedule: both consumer warpgroups share a 128x256 tile (the Triton kernel's best
// tile on the H200), clusters of 2 along M share W's tiles by TMA multicast.
#include "uvqk.hpp"

using UvqkCoop = hstu::Uvqk<cute::Shape<cute::_128, cute::_256, cute::_64>, cute::Shape<cute::_2, cute::_1, cute::_1>,
                            cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                            cutlass::epilogue::TmaWarpSpecializedCooperative>;
HSTU_UVQK_EXPORT(coop, UvqkCoop)
