// Top-n (Eqs. 11-12) of one position from its block scores, shared by the prefill selection
// kernel (src/cuda/select.cuh) and the decode path (src/cuda/decode.cuh).
#pragma once

#include "cuda/common.cuh"

namespace nsa::cuda_detail {

// Scratch of one warp's pick_top_n in shared memory: a 256-bin histogram.
inline constexpr int kTopNHistBins = SelectSmem::kHistBins;

// A non-negative score's bits order like the score (NaN counts as 0, below every score).
__device__ __forceinline__ uint32_t score_key(float score) { return score == score ? __float_as_uint(score) : 0u; }

// Top-n for position t, run by one whole warp: the forced blocks (initial, local), then the best
// `take` of the remaining eligible ("free") blocks by score bs[j] >= 0, ties to the lower block,
// all of them when they fit. Writes the n chosen blocks ascending, -1 padded, to out[0 .. n).
// The take-th largest score is found by a radix select over the scores' bits (four 8-bit digits,
// a histogram in `hist` per digit): every free block above it is chosen, and of those equal to it
// the lowest blocks until `take` are. bs is only read.
__device__ __forceinline__ void pick_top_n(const ForwardArgs& a, const float* bs, int t, int32_t* out,
                                           uint32_t* hist) {
  const int lane = threadIdx.x & 31, n = a.num_selected;
  const int eligible = t / a.sel_block + 1;
  const int n_init = min(a.num_init, eligible);                                 // forced: 0 .. n_init-1
  const int free_hi = min(eligible, max(a.num_init, eligible - a.num_local));  // and free_hi .. eligible-1
  const int forced = n_init + (eligible - free_hi);
  const int free_avail = free_hi - n_init;  // free: n_init .. free_hi-1
  const int take = min(n - forced, free_avail);
  const bool all = take >= free_avail;
  uint32_t threshold = 0;  // the take-th largest free key
  int need = 0;            // free blocks with that key to choose (the lowest ones)
  if (!all && take > 0) {
    uint32_t prefix = 0, prefix_mask = 0;
    int rank = take;  // of the wanted key among the keys that match prefix, from the top
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int bin = lane; bin < kTopNHistBins; bin += 32) hist[bin] = 0u;
      __syncwarp();
#pragma unroll 4
      for (int j = n_init + lane; j < free_hi; j += 32) {
        const uint32_t key = score_key(bs[j]);
        if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
      }
      __syncwarp();
      // Lane l holds bins 8l .. 8l+7; count the keys in higher bins from the top down.
      uint32_t counts[8], lane_total = 0;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        counts[c] = hist[lane * 8 + c];
        lane_total += counts[c];
      }
      uint32_t above = lane_total;  // keys in the bins of lanes >= lane, after the scan
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const uint32_t other = __shfl_down_sync(0xffffffffu, above, off);
        if (lane + off < 32) above += other;
      }
      above -= lane_total;  // keys in the bins of lanes > lane
      const bool here = above < static_cast<uint32_t>(rank) && above + lane_total >= static_cast<uint32_t>(rank);
      const int owner = __ffs(__ballot_sync(0xffffffffu, here)) - 1;
      int digit = 0, new_rank = 0;
      if (lane == owner) {
        uint32_t seen = above;
        for (int c = 7; c >= 0; --c) {
          if (seen + counts[c] >= static_cast<uint32_t>(rank)) {
            digit = lane * 8 + c;
            new_rank = rank - static_cast<int>(seen);
            break;
          }
          seen += counts[c];
        }
      }
      digit = __shfl_sync(0xffffffffu, digit, owner);
      rank = __shfl_sync(0xffffffffu, new_rank, owner);
      prefix |= static_cast<uint32_t>(digit) << shift;
      prefix_mask |= 255u << shift;
      __syncwarp();  // hist is read before the next pass clears it
    }
    threshold = prefix;
    need = rank;
  }
  int k = 0, ties = 0;
#pragma unroll 4
  for (int base = 0; base < eligible; base += 32) {
    const int j = base + lane;
    const bool is_free = j >= n_init && j < free_hi;
    const uint32_t key = is_free && !all ? score_key(bs[j]) : 0u;
    const bool tie = is_free && !all && take > 0 && key == threshold;
    const unsigned tie_mask = __ballot_sync(0xffffffffu, tie);
    const int tie_rank = ties + __popc(tie_mask & ((1u << lane) - 1u));
    ties += __popc(tie_mask);
    const bool chosen = is_free && (all || (take > 0 && (key > threshold || (tie && tie_rank < need))));
    const bool sel = j < eligible && (!is_free || chosen);
    const unsigned mask = __ballot_sync(0xffffffffu, sel);
    if (sel) out[k + __popc(mask & ((1u << lane) - 1u))] = j;
    k += __popc(mask);
  }
  for (int x = k + lane; x < n; x += 32) out[x] = -1;
}

}  // namespace nsa::cuda_detail
