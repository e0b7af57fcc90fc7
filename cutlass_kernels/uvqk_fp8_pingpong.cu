// uvqk FP8, ping-pong schedule: each consumer warpgroup owns a 128x128x128 tile and one's epilogue
// (dequantize, bias, SiLU, store) overlaps the other's MMAs: at K = 512 the mainloop is 4 K steps, so the
// epilogue is most of a tile's time. benchmarks/gpu_fp8.py times both instances.
#include "uvqk_fp8.hpp"

using UvqkFp8Pingpong = hstu::fp8::UvqkFp8<cute::Shape<cute::_128, cute::_128, cute::_128>,
                                           cute::Shape<cute::_2, cute::_1, cute::_1>,
                                           cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum,
                                           cutlass::epilogue::TmaWarpSpecialized>;
HSTU_UVQK_FP8_EXPORT(pingpong, UvqkFp8Pingpong)
