// uvqk FP8, cooperative schedule: both consumer warpgroups share a 128x256x128 tile, clusters of 2 along M
// share Wq's tiles by TMA multicast (fp8.hpp's shape and schedule; FastAccum: fp8.hpp says why).
#include "uvqk_fp8.hpp"

using UvqkFp8Coop = hstu::fp8::UvqkFp8<hstu::fp8::TileShape, hstu::fp8::ClusterShape, hstu::fp8::MainloopSchedule,
                                       hstu::fp8::EpilogueSchedule>;
HSTU_UVQK_FP8_EXPORT(coop, UvqkFp8Coop)
