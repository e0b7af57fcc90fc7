// uvqk, ping-pong schedule: each consumer warpgroup owns a 128x128 tile and one's epilogue overlaps the
// other's MMAs. With K = 512 a tile is only 8 K steps, so the epilogue (bias, SiLU, store) is a large
// share of the time: this is the candidate that hides it; benchmarks/gpu_cutlass.py times both.
#include "uvqk.hpp"

using UvqkPingpong = hstu::Uvqk<cute::Shape<cute::_128, cute::_128, cute::_64>, cute::Shape<cute::_2, cute::_1, cute::_1>,
                                cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                cutlass::epilogue::TmaWarpSpecialized>;
HSTU_UVQK_EXPORT(pingpong, UvqkPingpong)
