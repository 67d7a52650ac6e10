// The decode path of the forward: a KV cache with m * G <= 64, so all the queries of one
// (sequence, kv head) fit one 64-row tile: few rows and long key lists. Each branch's key tiles
// are split over num_splits CTAs (flash-decoding; about 256 CTAs per branch, so B = 1 fills the
// GPU too); with m * G <= 16 the four warps of a CTA also share the 16 rows and split each tile's
// keys (attention.cuh, fold_warps). The cmp kernel stores its scaled scores, from which the blocks
// are scored without reading K_cmp a second time (decode_scoring.cuh). In stream order:
//   1. attention_kernel<cmp, split>  partial o_cmp and (max, sum) per split; the scores
//   2. decode_score_win_kernel       block scores with the merged cmp lse (not when block_indices
//                                    are given) and, in the same launch, partial o_win
//   3. decode_topn_kernel            top-n (Eqs. 11-12; not when block_indices are given)
//   4. attention_kernel<slc, split>  partial o_slc
//   5. decode_combine_kernel         merges the partials of the three branches (branch outputs,
//                                    lse) and the gated sum (Eq. 5) of the dtype-rounded outputs.
#pragma once

#include "cuda/attention.cuh"
#include "cuda/common.cuh"
#include "cuda/decode_scoring.cuh"
#include "cuda/top_n.cuh"

namespace nsa::cuda_detail {

inline constexpr int kDecodeThreads = 128;

// Merged statistics of branch `branch` for (query row grow, head): the max of the partials'
// running maxima (log2 domain) and the sum rescaled to it.
struct MergedRow {
  float max2, sum;
  __device__ float lse2() const { return sum > 0.f ? max2 + log2f(sum) : neg_inf(); }
};

__device__ __forceinline__ int64_t part_slot(const ForwardArgs& a, int branch, int part, int64_t grow, int head) {
  const int64_t rows = int64_t{a.batch} * a.seqlen;
  return ((int64_t{branch} * a.num_splits + part) * rows + grow) * a.num_q_heads + head;
}

// Run by a whole warp (lanes over the partials); every lane gets the result.
__device__ __forceinline__ MergedRow merge_row(const ForwardArgs& a, int branch, int64_t grow, int head) {
  const int lane = threadIdx.x & 31, parts = a.branch_splits[branch];
  float max2 = neg_inf();
  for (int s = lane; s < parts; s += 32) max2 = fmaxf(max2, a.split_ml[part_slot(a, branch, s, grow, head)].x);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) max2 = fmaxf(max2, __shfl_xor_sync(0xffffffffu, max2, off));
  float sum = 0.f;
  if (max2 != neg_inf())
    for (int s = lane; s < parts; s += 32) {
      const float2 ml = a.split_ml[part_slot(a, branch, s, grow, head)];
      sum += ml.y * fast_exp2(ml.x - max2);
    }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  return {max2, sum};
}

// Block scores (decode_scoring.cuh) of blocks chunk * score_blocks .. +score_blocks-1 for every
// query of (kv head blockIdx.y, sequence blockIdx.z), with the merged cmp lse. pg: score_tokens(a)
// floats of shared memory.
__device__ __forceinline__ void score_cta(const ForwardArgs& a, int chunk, float* pg) {
  __shared__ float sLse2[64];  // merged cmp lse of the rows, log2 domain
  const int b = blockIdx.z, kv_head = blockIdx.y, tid = threadIdx.x;
  const SeqInfo seq = seq_info(a, b);
  const int G = a.group, m = static_cast<int>(seq.len);
  const int j0 = chunk * a.score_blocks, j1 = min(j0 + a.score_blocks, a.decode_blocks);
  for (int R = tid >> 5; R < m * G; R += kDecodeThreads / 32) {
    const float lse2 = merge_row(a, kBranchCmp, seq.row0 + R / G, kv_head * G + R % G).lse2();
    if ((tid & 31) == 0) sLse2[R] = lse2;
  }
  for (int i = 0; i < m; ++i)
    score_block_range(a, seq, kv_head, i, sLse2 + i * G, j0, j1, pg,
                      a.block_scores + ((seq.row0 + i) * a.num_kv_heads + kv_head) * a.decode_blocks + j0);
}

// The block scoring (its first score_ctas CTAs in x; none when block_indices are given) and the
// window branch's splits (the rest) in one launch: the scoring is latency-bound, the window's
// gather bandwidth-bound, so each fills the other's idle time.
template <class T, int Dk, int Dv, bool kWarpSplit>
__global__ void __launch_bounds__(kAttnThreads, (kAttnMinBlocks<Dk, kBranchWin>))
    decode_score_win_kernel(const ForwardArgs a, int score_ctas) {
  static_assert(kDecodeThreads == kAttnThreads, "one block size for both halves");
  extern __shared__ __align__(16) unsigned char smem[];
  const int x = static_cast<int>(blockIdx.x);
  if (x < score_ctas)
    score_cta(a, x, reinterpret_cast<float*>(smem));
  else
    attention_cta<T, Dk, Dv, kBranchWin, true, kWarpSplit>(a, x - score_ctas, smem);
}

// Top-n of every query of one (kv head, sequence) from its block scores, the CTA's four warps per
// query, on a copy of the scores in shared memory when decode_blocks floats fit (topn_in_smem).
template <class T>
__global__ void __launch_bounds__(kDecodeThreads) decode_topn_kernel(const ForwardArgs a) {
  extern __shared__ float sScores[];  // [decode_blocks] when topn_in_smem
  __shared__ TopNScratch scratch;
  const int b = blockIdx.y, kv_head = blockIdx.x;
  const SeqInfo seq = seq_info(a, b);
  for (int i = 0; i < seq.len; ++i) {
    const int t = static_cast<int>(seq.pos0) + i;
    const int64_t row = (seq.row0 + i) * a.num_kv_heads + kv_head;
    const float* scores = a.block_scores + row * a.decode_blocks;
    __syncthreads();  // the previous query's top-n is done with the copy and the scratch
    if (a.topn_in_smem) {
#pragma unroll 4
      for (int j = threadIdx.x; j <= t / a.sel_block; j += kDecodeThreads) sScores[j] = scores[j];
      __syncthreads();
      scores = sScores;
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
  using Tr = TypeTraits<T>;
  __shared__ float sWeight[kNumBranches][kDecodeMaxSplits];
  const int H = a.num_q_heads, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t grow = blockIdx.x / H;
  const int head = static_cast<int>(blockIdx.x % H);
  constexpr float kLn2 = 0.69314718055994531f;
  for (int branch = warp; branch < kNumBranches; branch += kCombineThreads / 32) {
    const MergedRow row = merge_row(a, branch, grow, head);
    for (int s = lane; s < a.branch_splits[branch]; s += 32)
      sWeight[branch][s] = row.sum > 0.f ? fast_exp2(a.split_ml[part_slot(a, branch, s, grow, head)].x - row.max2) / row.sum : 0.f;
    if (lane == 0) a.lse[(grow * H + head) * 3 + branch] = row.sum > 0.f ? row.lse2() * kLn2 : neg_inf();
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
#pragma unroll 8
    for (int s = 0; s < a.branch_splits[branch]; ++s) {
      const float2 part = *reinterpret_cast<const float2*>(acc + s * part_stride);
      sum.x += sWeight[branch][s] * part.x;
      sum.y += sWeight[branch][s] * part.y;
    }
    o[branch] = Tr::unpack(Tr::pack(sum.x, sum.y));  // rounded to T, as the branch outputs are stored
  }
  const int b = static_cast<int>(grow / a.seqlen);
  const int64_t i = grow % a.seqlen;
  const T* gate = static_cast<const T*>(a.gates.data) + int64_t{b} * a.gates.batch_stride + i * a.gates.seq_stride +
                  int64_t{head} * a.gates.head_stride;
  const float g_cmp = Tr::to_float(gate[0]), g_slc = Tr::to_float(gate[1]), g_win = Tr::to_float(gate[2]);
  *reinterpret_cast<uint32_t*>(branch_row<T>(a.cmp_out, a, grow, head) + dim) = Tr::pack(o[0].x, o[0].y);
  *reinterpret_cast<uint32_t*>(branch_row<T>(a.slc_out, a, grow, head) + dim) = Tr::pack(o[1].x, o[1].y);
  if (a.win_out != nullptr)
    *reinterpret_cast<uint32_t*>(branch_row<T>(a.win_out, a, grow, head) + dim) = Tr::pack(o[2].x, o[2].y);
  T* out = static_cast<T*>(a.out) + int64_t{b} * a.out_batch_stride + i * a.out_seq_stride +
           int64_t{head} * a.out_head_stride;
  *reinterpret_cast<uint32_t*>(out + dim) = Tr::pack(g_cmp * o[0].x + g_slc * o[1].x + g_win * o[2].x,
                                                     g_cmp * o[0].y + g_slc * o[1].y + g_win * o[2].y);
}

}  // namespace nsa::cuda_detail
