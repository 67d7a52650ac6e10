// The index arithmetic of NSA's contract (docs/semantics.md): which compressed tokens and
// selection blocks a query sees, and the Eq. 9 overlap weights. Header-only so that every
// backend (and users sizing tensors) use the same definitions.
#pragma once

#include <cstdint>

#include "nsa/config.h"

#if defined(__CUDACC__)
#define NSA_HOST_DEVICE __host__ __device__
#else
#define NSA_HOST_DEVICE
#endif

namespace nsa {

// Tc: compressed tokens of a sequence of `seqlen` raw tokens; token i covers [i*d, i*d + l).
NSA_HOST_DEVICE inline int64_t num_cmp_tokens(int64_t seqlen, int64_t cmp_block, int64_t cmp_stride) {
  return seqlen >= cmp_block ? (seqlen - cmp_block) / cmp_stride + 1 : 0;
}

// Compressed tokens visible to query t: those with i*d + l - 1 <= t (a prefix 0 .. count-1).
NSA_HOST_DEVICE inline int64_t num_visible_cmp_tokens(int64_t t, int64_t cmp_block, int64_t cmp_stride) {
  return num_cmp_tokens(t + 1, cmp_block, cmp_stride);
}

// Selection blocks eligible at query t: j <= floor(t / l').
NSA_HOST_DEVICE inline int64_t num_eligible_blocks(int64_t t, int64_t sel_block) { return t / sel_block + 1; }

// Eq. 9 weight of compressed token i in selection block j:
// |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d. An integer because d divides l and l'.
NSA_HOST_DEVICE inline int64_t overlap_weight(int64_t cmp_index, int64_t block_index, int64_t cmp_block,
                                              int64_t cmp_stride, int64_t sel_block) {
  const int64_t cmp_begin = cmp_index * cmp_stride;
  const int64_t cmp_end = cmp_begin + cmp_block;
  const int64_t blk_begin = block_index * sel_block;
  const int64_t blk_end = blk_begin + sel_block;
  const int64_t lo = cmp_begin > blk_begin ? cmp_begin : blk_begin;
  const int64_t hi = cmp_end < blk_end ? cmp_end : blk_end;
  return hi > lo ? (hi - lo) / cmp_stride : 0;
}

// Compressed tokens that can overlap block j: [first, last] (clip to [0, Tc) yourself).
NSA_HOST_DEVICE inline int64_t first_cmp_in_block(int64_t block_index, int64_t cmp_block, int64_t cmp_stride,
                                                  int64_t sel_block) {
  // Smallest i with i*d + l > j*l'.
  const int64_t num = block_index * sel_block - cmp_block;
  return num < 0 ? 0 : num / cmp_stride + 1;
}
NSA_HOST_DEVICE inline int64_t last_cmp_in_block(int64_t block_index, int64_t cmp_stride, int64_t sel_block) {
  // Largest i with i*d < (j+1)*l'.
  return ((block_index + 1) * sel_block - 1) / cmp_stride;
}

}  // namespace nsa
