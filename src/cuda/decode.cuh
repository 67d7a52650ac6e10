// The decode path of the forward: a KV cache with m * G <= 64, so all the queries of one
// (sequence, kv head) fit one 64-row tile: few rows and long key lists. Each branch's key tiles
// are split over num_splits CTAs (flash-decoding; about 256 CTAs per branch, so B = 1 fills the
// GPU too); with m * G <= 16 the four warps of a CTA also share the 16 rows and split each tile's
// keys (attention.cuh, fold_warps). The cmp kernel stores its scaled scores, from which the blocks
// are scored without reading K_cmp a second time (decode_scoring.cuh). In stream order:
//   1. decode_cmp_win_kernel         partial o_cmp and o_win and their (max, sum) per split; the
//                                    cmp scores. Every sweep of the path keeps decode_stages(Dk, Dv)
//                                    key tiles in flight or being computed.
//   2. decode_score_topn_kernel      block scores with the merged cmp lse, then, by the last CTA
//                                    of each (kv head, sequence), the top-n (Eqs. 11-12); not when
//                                    block_indices are given
//   3. attention_kernel<slc, split>  partial o_slc
//   4. decode_combine_kernel         merges the partials of the three branches (branch outputs,
//                                    lse) and the gated sum (Eq. 5) of the dtype-rounded outputs;
//                                    not when every branch ran one split (B * Hkv > 112): then
//                                    the slc kernel's epilogue does it (decode_merge.cuh).
// Kernels 2-4 are chained launches (launch_chained, sm_90+): each may start while the one before
// it finishes and waits (wait_for_previous_kernel) before it reads what that one wrote. Each has
// CTAs that pass that wait before they exit, so a kernel completes only after every earlier one
// has: the slc and combine kernels read the cmp + win kernel's partials on that ground.
#pragma once

#include "cuda/attention.cuh"
#include "cuda/common.cuh"
#include "cuda/decode_merge.cuh"
#include "cuda/decode_scoring.cuh"
#include "cuda/top_n.cuh"

namespace nsa::cuda_detail {

// Threads of a scoring CTA: eight warps, so that the few CTAs of a large batch (one per sequence
// and kv head, two per SM) keep enough loads and arithmetic in flight.
inline constexpr int kDecodeThreads = 256;

// The cmp branch's CTAs (branch_splits[cmp] per (kv head, sequence)) and then the window
// branch's, in one 1-D launch: the cmp CTAs are few (about 256) and long, the window's short, so
// these fill the SMs' free slots and the cmp sweeps' tails instead of needing a launch of their
// own; the cmp CTAs come first in the grid, so that none of them waits for a slot behind a
// window CTA.
template <class T, int Dk, int Dv, bool kWarpSplit>
__global__ void __launch_bounds__(kAttnThreads, (kAttnMinBlocks<Dk, kBranchCmp>)) decode_cmp_win_kernel(const ForwardArgs a) {
  static_assert(kAttnMinBlocks<Dk, kBranchCmp> == kAttnMinBlocks<Dk, kBranchWin>, "one launch bound for both");
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t cmp_ctas = int64_t{a.branch_splits[kBranchCmp]} * a.num_kv_heads * a.batch;
  const bool cmp = blockIdx.x < cmp_ctas;
  const int64_t x = cmp ? blockIdx.x : blockIdx.x - cmp_ctas;
  const int splits = a.branch_splits[cmp ? kBranchCmp : kBranchWin];
  const int split = static_cast<int>(x % splits), kv_head = static_cast<int>(x / splits % a.num_kv_heads);
  const int b = static_cast<int>(x / splits / a.num_kv_heads);
  if (cmp && split == 0 && threadIdx.x == 0) a.score_counters[int64_t{b} * a.num_kv_heads + kv_head] = 0;
  if (cmp)
    attention_cta<T, Dk, Dv, kBranchCmp, true, kWarpSplit>(a, split, kv_head, b, smem);
  else
    attention_cta<T, Dk, Dv, kBranchWin, true, kWarpSplit>(a, split, kv_head, b, smem);
}

// Block scoring and top-n in one launch: CTA x scores blocks x * score_blocks .. for each query
// of (kv head blockIdx.y, sequence blockIdx.z) with the merged cmp lse (decode_scoring.cuh).
// score_alone(a) (one CTA per pair): the block scores stay in shared memory and the CTA picks each
// query's blocks as soon as it has scored them. Otherwise every CTA writes its blocks' scores to
// block_scores and the last of the pair's CTAs to finish (a counter per pair, zeroed by the cmp
// kernel) runs the top-n of its queries, on a copy of the block scores in shared memory when
// decode_blocks floats fit (topn_in_smem). The top-n is the CTA's eight warps per query. One launch
// fewer than a separate top-n kernel (docs/decisions/0005). smem: score_smem_floats(a) floats, then
// with score_alone(a) decode_blocks more; else at least decode_blocks when topn_in_smem.
// (T: one instantiation per instantiation file, as the other kernels.)
template <class T>
__global__ void __launch_bounds__(kDecodeThreads) decode_score_topn_kernel(const ForwardArgs a) {
  extern __shared__ __align__(16) float score_smem[];
  __shared__ TopNScratch scratch;
  __shared__ float sLse2[64];  // merged cmp lse of the rows, log2 domain
  __shared__ bool last;
  const int b = blockIdx.z, kv_head = blockIdx.y, tid = threadIdx.x;
  wait_for_previous_kernel();  // chained to the cmp + win kernel: its scores, lse and counters
  const SeqInfo seq = seq_info(a, b);
  const int G = a.group, m = static_cast<int>(seq.len);
  const int j0 = static_cast<int>(blockIdx.x) * a.score_blocks, j1 = min(j0 + a.score_blocks, a.decode_blocks);
  // Run after the first query's first scores are requested, so that their loads overlap.
  const auto merge_lse = [&] {
    for (int R = tid >> 5; R < m * G; R += kDecodeThreads / 32) {
      const float lse2 = merge_row(a, kBranchCmp, seq.row0 + R / G, kv_head * G + R % G).lse2();
      if ((tid & 31) == 0) sLse2[R] = lse2;
    }
  };
  const bool alone = score_alone(a);
  float* alone_scores = score_smem + score_smem_floats(a);
  for (int i = 0; i < m; ++i) {
    const int64_t row = (seq.row0 + i) * a.num_kv_heads + kv_head;
    float* out = alone ? alone_scores : a.block_scores + row * a.decode_blocks + j0;
    score_block_range(a, seq, kv_head, i, sLse2 + i * G, j0, j1, score_smem, out, [&] {
      if (i == 0) merge_lse();
    });
    if (alone) {
      __syncthreads();  // the block scores are complete
      pick_top_n<kDecodeThreads / 32>(a, alone_scores, static_cast<int>(seq.pos0) + i,
                                      a.block_indices + row * a.num_selected, scratch);
      __syncthreads();  // the top-n is done with them and with the scratch
    }
  }
  if (alone) return;  // (the slc kernel launches as these CTAs exit)
  __threadfence();  // this CTA's block scores are visible device-wide before it is counted
  __syncthreads();
  if (tid == 0)
    last = atomicAdd(a.score_counters + int64_t{b} * a.num_kv_heads + kv_head, 1) == static_cast<int>(gridDim.x) - 1;
  __syncthreads();
  allow_next_kernel();  // the slc kernel may launch (and load its Q tiles) during the top-n tails
  if (!last) return;
  __threadfence();
  for (int i = 0; i < m; ++i) {
    const int t = static_cast<int>(seq.pos0) + i;
    const int64_t row = (seq.row0 + i) * a.num_kv_heads + kv_head;
    const float* scores = a.block_scores + row * a.decode_blocks;
    __syncthreads();  // the previous query's top-n is done with the copy and the scratch
    if (a.topn_in_smem) {
#pragma unroll 4
      for (int j = tid; j <= t / a.sel_block; j += kDecodeThreads) score_smem[j] = __ldcg(scores + j);
      __syncthreads();
      scores = score_smem;
    }
    pick_top_n<kDecodeThreads / 32>(a, scores, t, a.block_indices + row * a.num_selected, scratch);
  }
}

// One CTA per (query row, head), a thread per two output dims: merges the partials of the three
// branches (warp b computes branch b's weights 2^(max_s - max) / sum into shared memory, then every
// thread sums its dims over the partials with independent loads) and writes the branch outputs,
// their lse and the gated sum.
inline constexpr int kCombineThreads = 64;

template <class T, int Dv>
__global__ void __launch_bounds__(kCombineThreads) decode_combine_kernel(const ForwardArgs a) {
  static_assert(Dv <= 2 * kCombineThreads, "a thread per two dims");
  __shared__ float sWeight[kNumBranches][kDecodeMaxSplits];
  const int H = a.num_q_heads, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t grow = blockIdx.x / H;
  const int head = static_cast<int>(blockIdx.x % H);
  wait_for_previous_kernel();  // chained to the slc kernel
  for (int branch = warp; branch < kNumBranches; branch += kCombineThreads / 32) {
    const MergedRow row = merge_row(a, branch, grow, head);
    for (int s = lane; s < a.branch_splits[branch]; s += 32)
      sWeight[branch][s] = row.sum > 0.f ? fast_exp2(a.split_ml[part_slot(a, branch, s, grow, head)].x - row.max2) / row.sum : 0.f;
    if (lane == 0) store_branch_lse(a, grow, head, branch, row);
  }
  __syncthreads();
  const int dim = tid * 2;
  if (dim >= Dv) return;
  float2 o[kNumBranches];
#pragma unroll
  for (int branch = 0; branch < kNumBranches; ++branch) {
    float2 sum = make_float2(0.f, 0.f);
    const float* acc = a.split_acc + part_slot(a, branch, 0, grow, head) * Dv + dim;
    const int64_t part_stride = int64_t{a.batch} * a.seqlen * H * Dv;  // consecutive splits
#pragma unroll 16
    for (int s = 0; s < a.branch_splits[branch]; ++s) {
      const float2 part = *reinterpret_cast<const float2*>(acc + s * part_stride);
      sum.x += sWeight[branch][s] * part.x;
      sum.y += sWeight[branch][s] * part.y;
    }
    o[branch] = sum;
  }
  CombinedRow<T>(a, grow, head).store(dim, o);
}

}  // namespace nsa::cuda_detail
