// Block scoring (Eqs. 8-10) of the decode path from the scores its cmp kernel stored
// (cmp_scores), so that K_cmp is not read a second time.
#pragma once

#include "cuda/common.cuh"

namespace nsa::cuda_detail {

// Shared-memory floats of the head-summed probabilities of one block range's tokens.
__host__ __device__ inline int score_tokens(const ForwardArgs& a) {
  return a.score_blocks * (a.sel_block / a.cmp_stride) + a.cmp_block / a.cmp_stride;
}

// Scores of blocks j0 .. j1-1 (at most score_blocks of them) for query i (position t) of
// (sequence, kv head) into out[j - j0]; blocks after t / l' get 0. lse2: the cmp lse (log2 domain)
// of the group's G heads for this query. pg(c) = sum over the heads h of 2^(score(h, c) - lse2(h))
// for the visible compressed tokens c overlapping the blocks (token-major: coalesced reads), kept
// in `pg` (score_tokens(a) floats of shared memory); then P(t, j) = sum over the tokens of block j
// of the Eq. 9 overlap weight times pg(c). Every thread of the CTA calls it (two barriers).
__device__ __forceinline__ void score_block_range(const ForwardArgs& a, const SeqInfo& seq, int kv_head, int i,
                                                  const float* lse2, int j0, int j1, float* pg, float* out) {
  const int G = a.group, ls = a.sel_block, bm = ls / a.cmp_stride, bq = a.cmp_block / a.cmp_stride;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int t = static_cast<int>(seq.pos0) + i;
  const int nvis = num_visible_cmp(t, a.cmp_block, a.cmp_stride);
  const int c_lo = max(j0 * bm - bq + 1, 0), c_hi = min(j1 * bm - 1, nvis - 1);
  const float* scores = a.cmp_scores + ((seq.row0 + i) * a.num_q_heads + kv_head * G) * a.cmp_score_stride;
  __syncthreads();  // lse2 complete; the previous range's pg consumed
  for (int c = c_lo + tid; c <= c_hi; c += nthreads) {
    float sum = 0.f;
    int g = 0;
    for (; g + 4 <= G; g += 4) {  // four independent loads in flight
      float x[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) x[u] = scores[int64_t{g + u} * a.cmp_score_stride + c];
#pragma unroll
      for (int u = 0; u < 4; ++u) sum += fast_exp2(x[u] - lse2[g + u]);
    }
    for (; g < G; ++g) sum += fast_exp2(scores[int64_t{g} * a.cmp_score_stride + c] - lse2[g]);
    pg[c - c_lo] = sum;
  }
  __syncthreads();
  for (int j = j0 + tid; j < j1; j += nthreads) {
    float score = 0.f;
    if (j <= t / ls) {
      const int lo = max(j * bm - bq + 1, 0), hi = min(j * bm + bm - 1, nvis - 1);
      for (int c = lo; c <= hi; ++c) {
        const int u = c - j * bm;
        score += static_cast<float>(min(u + bq, bm) - max(u, 0)) * pg[c - c_lo];
      }
    }
    out[j - j0] = score;
  }
}

}  // namespace nsa::cuda_detail
