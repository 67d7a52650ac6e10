// Block scoring (Eqs. 8-10) of the decode path from the scores its cmp kernel stored
// (cmp_scores), so that K_cmp is not read a second time.
#pragma once

#include "cuda/common.cuh"

namespace nsa::cuda_detail {

// score_block_range's shared memory: pg [score_tokens(a), rounded up to 4], then the buffers of
// staged scores [kDecodeScoreStages][G][score_stage_tokens] (16-byte aligned rows).
__host__ __device__ inline int score_smem_floats(const ForwardArgs& a) {
  return (score_tokens(a) + 3) / 4 * 4 + kDecodeScoreStages * a.group * a.score_stage_tokens;
}

// Scores of blocks j0 .. j1-1 (at most score_blocks of them) for query i (position t) of
// (sequence, kv head) into out[j - j0]; blocks after t / l' get 0. lse2: the cmp lse (log2 domain)
// of the group's G heads for this query. pg(c) = sum over the heads h of 2^(score(h, c) - lse2(h))
// for the visible compressed tokens c overlapping the blocks, then P(t, j) = sum over the tokens of
// block j of the Eq. 9 overlap weight times pg(c). The heads' scores come through shared memory
// score_stage_tokens tokens at a time with 16-byte cp.async copies into kDecodeScoreStages
// buffers, the next chunks in flight while one is summed: register loads left the scoring
// latency-bound (about 6 KB in flight per SM), and a CTA that scores all the blocks of its
// (sequence, kv head) streams its scores in one pass. smem: score_smem_floats(a) floats. Every
// thread of the CTA calls it (it synchronizes). prologue() runs once the first scores are
// requested, before they are used: lse2 may be written there (the first barrier orders it). out
// may be shared memory: it is complete at the caller's next barrier.
template <class Prologue>
__device__ __forceinline__ void score_block_range(const ForwardArgs& a, const SeqInfo& seq, int kv_head, int i,
                                                  const float* lse2, int j0, int j1, float* smem, float* out,
                                                  Prologue&& prologue) {
  const int G = a.group, ls = a.sel_block, bm = ls / a.cmp_stride, bq = a.cmp_block / a.cmp_stride;
  const int tid = threadIdx.x, nthreads = blockDim.x, S = a.score_stage_tokens;
  const int t = static_cast<int>(seq.pos0) + i;
  const int nvis = num_visible_cmp(t, a.cmp_block, a.cmp_stride);
  const int c_lo = max(j0 * bm - bq + 1, 0), c_hi = min(j1 * bm - 1, nvis - 1);
  // Rows of cmp_score_stride (a multiple of 64) floats: the quads read stay in their row.
  const float* scores = a.cmp_scores + ((seq.row0 + i) * a.num_q_heads + kv_head * G) * a.cmp_score_stride;
  float* pg = smem;
  float* stage = smem + (score_tokens(a) + 3) / 4 * 4;
  const int first = c_lo & ~3;
  const int chunks = c_hi >= first ? (c_hi - first) / S + 1 : 0;
  // One commit group per chunk index, empty past the last chunk (as sweep_key_tiles).
  const auto issue = [&](int chunk) {
    if (chunk < chunks) {
      const int base = first + chunk * S;
      const int quads = (min(base + S - 1, c_hi) - base) / 4 + 1;
      float* buffer = stage + (chunk % kDecodeScoreStages) * G * S;
      for (int e = tid; e < G * quads; e += nthreads) {
        const int g = e / quads, quad = e - g * quads;
        cp_async_16<true>(buffer + g * S + 4 * quad, scores + int64_t{g} * a.cmp_score_stride + base + 4 * quad, true);
      }
    }
    cp_async_commit();
  };
  for (int chunk = 0; chunk < kDecodeScoreStages - 1; ++chunk) issue(chunk);
  prologue();
  for (int chunk = 0; chunk < chunks; ++chunk) {
    issue(chunk + kDecodeScoreStages - 1);
    cp_async_wait<kDecodeScoreStages - 1>();
    __syncthreads();  // the chunk landed; lse2 complete; the previous query's pg consumed
    const int base = first + chunk * S;
    const float* buffer = stage + (chunk % kDecodeScoreStages) * G * S;
    for (int c = max(base, c_lo) + tid; c <= min(base + S - 1, c_hi); c += nthreads) {
      float sum = 0.f;
      for (int g = 0; g < G; ++g) sum += fast_exp2(buffer[g * S + c - base] - lse2[g]);
      pg[c - c_lo] = sum;
    }
    __syncthreads();  // the buffer is refilled by the next iteration's issue; pg complete after the last
  }
  cp_async_wait<0>();  // (only empty groups remain)
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
