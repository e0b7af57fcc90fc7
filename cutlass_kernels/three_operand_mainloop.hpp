// A Hopper TMA/GMMA mainloop over three A operands: D = [A0 | A1 | A2] @ [B0; B1; B2], the K dimension
// concatenated but never materialized. Each operand has its own TMA descriptor (own pointer and row
// stride), and so does each of B's three row blocks. Everything else (shared memory, pipeline, the
// consumer's GMMA loop) is the CollectiveBuilder's mainloop `Base`, unchanged.
//
// The kernel walks 3 * k_tiles_part K tiles (the problem's K is 3 * round_up(K_part, BLK_K)); tile kt
// reads operand kt / k_tiles_part at local tile kt % k_tiles_part. A K_part that is not a multiple of
// BLK_K (H*dv = 32 with 64-wide tiles) is covered by TMA's zero fill past each descriptor's K extent.
#pragma once

#include "common.hpp"

namespace hstu {
using namespace cute;

template <class Base>
struct ThreeOperandMainloop : Base {
  using typename Base::ElementA;
  using typename Base::ElementB;
  using typename Base::StrideA;
  using typename Base::StrideB;
  using typename Base::TileShape;
  using typename Base::DispatchPolicy;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::GmemTiledCopyA;
  using typename Base::GmemTiledCopyB;
  using BaseArguments = typename Base::Arguments;
  using BaseParams = typename Base::Params;

  struct Arguments {
    ElementA const* ptr_A[3];
    StrideA dA[3];
    ElementB const* ptr_B[3];  // B's row blocks (of one [3*K_part, N] weight: W + j * K_part * ldw)
    StrideB dB;
    int k_part;
    uint32_t mma_promotion_interval = 4;
  };

  struct Params : BaseParams {  // BaseParams' tma_load_a / tma_load_b are operand 0's
    typename BaseParams::TMA_A tma_load_a1, tma_load_a2;
    typename BaseParams::TMA_B tma_load_b1, tma_load_b2;
    int k_tiles_part;
  };

  template <class ProblemShape>
  static auto part_shape(ProblemShape const& problem_shape, int k_part) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    return make_shape(M, N, k_part, L);
  }

  static BaseArguments part(Arguments const& args, int j) {
    return {args.ptr_A[j], args.dA[j], args.ptr_B[j], args.dB, args.mma_promotion_interval};
  }

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args,
                                                  void* workspace) {
    auto shape = part_shape(problem_shape, args.k_part);
    BaseParams p0 = Base::to_underlying_arguments(shape, part(args, 0), workspace);
    BaseParams p1 = Base::to_underlying_arguments(shape, part(args, 1), workspace);
    BaseParams p2 = Base::to_underlying_arguments(shape, part(args, 2), workspace);
    return {p0, p1.tma_load_a, p2.tma_load_a, p1.tma_load_b, p2.tma_load_b,
            int(ceil_div(args.k_part, int(size<2>(TileShape{}))))};
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    int const blk_k = size<2>(TileShape{});
    bool ok = args.k_part > 0 && K == 3 * ceil_div(args.k_part, blk_k) * blk_k;
    auto shape = part_shape(problem_shape, args.k_part);
    for (int j = 0; j < 3; ++j) {
      ok = ok && Base::can_implement(shape, part(args, j));
      ok = ok && reinterpret_cast<uintptr_t>(args.ptr_A[j]) % 16 == 0 && reinterpret_cast<uintptr_t>(args.ptr_B[j]) % 16 == 0;
    }
    return ok;
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& p) {
    cute::prefetch_tma_descriptor(p.tma_load_a.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_load_a1.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_load_a2.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_load_b.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_load_b1.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_load_b2.get_tma_descriptor());
  }

  // Base::load with the descriptor chosen per K tile (the coordinate tensors of the three descriptors
  // are the same, so operand 0's partitioning serves all three).
  template <class TensorA, class TensorB, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB> const& load_inputs, BlockCoord const& blk_coord,
                           KTileIterator k_tile_iter, int k_tile_count, int thread_idx,
                           uint32_t block_rank_in_cluster, TensorStorage& shared_tensors) {
    int lane_predicate = cute::elect_one_sync();
    if (!lane_predicate) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});  // (BLK_M,BLK_K,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});  // (BLK_N,BLK_K,PIPE)

    constexpr uint32_t cluster_shape_x = get<0>(typename DispatchPolicy::ClusterShape());
    uint2 cluster_local_block_id = {block_rank_in_cluster % cluster_shape_x, block_rank_in_cluster / cluster_shape_x};
    Tensor gA_mkl = get<0>(load_inputs);
    Tensor gB_nkl = get<1>(load_inputs);
    auto block_tma_a = params.tma_load_a.get_slice(cluster_local_block_id.y);
    auto block_tma_b = params.tma_load_b.get_slice(cluster_local_block_id.x);
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    Tensor tAgA = block_tma_a.partition_S(gA_mkl(_, _, m_coord, _, l_coord));  // (TMA,TMA_M,TMA_K,k)
    Tensor tAsA = block_tma_a.partition_D(sA);                                 // (TMA,TMA_M,TMA_K,PIPE)
    Tensor tBgB = block_tma_b.partition_S(gB_nkl(_, _, n_coord, _, l_coord));  // (TMA,TMA_N,TMA_K,k)
    Tensor tBsB = block_tma_b.partition_D(sB);                                 // (TMA,TMA_N,TMA_K,PIPE)

    uint16_t mcast_mask_a = 0;
    uint16_t mcast_mask_b = 0;
    if constexpr (cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<typename DispatchPolicy::ClusterShape>{};  // (m,n) -> block_id
      for (int n = 0; n < size<1>(block_layout); ++n) {
        mcast_mask_a |= (uint16_t(1) << block_layout(cluster_local_block_id.x, n, Int<0>{}));
      }
    }
    if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<typename DispatchPolicy::ClusterShape>{};
      for (int m = 0; m < size<0>(block_layout); ++m) {
        mcast_mask_b |= (uint16_t(1) << block_layout(m, cluster_local_block_id.y, Int<0>{}));
      }
    }

    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* tma_barrier = pipeline.producer_get_barrier(smem_pipe_write);
      int const write_stage = smem_pipe_write.index();
      int const kt = *k_tile_iter;
      int const which = kt / params.k_tiles_part;
      int const local = kt - which * params.k_tiles_part;
      auto const& tma_a = which == 0 ? params.tma_load_a : (which == 1 ? params.tma_load_a1 : params.tma_load_a2);
      auto const& tma_b = which == 0 ? params.tma_load_b : (which == 1 ? params.tma_load_b1 : params.tma_load_b2);
      copy(tma_a.with(*tma_barrier, mcast_mask_a), tAgA(_, _, _, local), tAsA(_, _, _, write_stage));
      copy(tma_b.with(*tma_barrier, mcast_mask_b), tBgB(_, _, _, local), tBsB(_, _, _, write_stage));
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }
};

}  // namespace hstu
