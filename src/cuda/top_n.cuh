// Top-n (Eqs. 11-12) of one position from its block scores, shared by the prefill selection
// kernel (src/cuda/select.cuh: a warp per position) and the decode path (src/cuda/decode.cuh: the
// CTA's eight warps per position).
#pragma once

#include "cuda/common.cuh"

namespace nsa::cuda_detail {

// A non-negative score's bits order like the score (NaN counts as 0, below every score).
__device__ __forceinline__ uint32_t score_key(float score) { return score == score ? __float_as_uint(score) : 0u; }

// Barrier of the kWarps warps that run one pick_top_n (the whole CTA when kWarps > 1).
template <int kWarps>
__device__ __forceinline__ void top_n_sync() {
  if constexpr (kWarps == 1)
    __syncwarp();
  else
    __syncthreads();
}

// Top-n for position t, run by kWarps whole warps (one, or all of the CTA's): the forced blocks
// (initial, local), then the best `take` of the remaining eligible ("free") blocks by score
// bs[j] >= 0, ties to the lower block, all of them when they fit. Writes the n chosen blocks
// ascending, -1 padded, to out[0 .. n). The take-th largest score is found by a radix select over
// the scores' bits (up to four 8-bit digits, a shared histogram per digit): every free block above it is
// chosen, and of those equal to it the lowest blocks until `take` are. Once the bin of the take-th key
// holds exactly the keys still wanted, the select stops: the threshold is that bin's lowest key (the
// digits below it zero) and every key of the bin is chosen. bs is only read.
template <int kWarps>
__device__ __forceinline__ void pick_top_n(const ForwardArgs& a, const float* bs, int t, int32_t* out,
                                           TopNScratch& scratch) {
  constexpr int kThreads = kWarps * 32;
  const int tid = kWarps == 1 ? static_cast<int>(threadIdx.x & 31) : static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5, n = a.num_selected;
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
      for (int bin = tid; bin < TopNScratch::kBins; bin += kThreads) scratch.hist[bin] = 0u;
      top_n_sync<kWarps>();
#pragma unroll 4
      for (int j = n_init + tid; j < free_hi; j += kThreads) {
        const uint32_t key = score_key(bs[j]);
        if ((key & prefix_mask) == prefix) atomicAdd(&scratch.hist[(key >> shift) & 255u], 1u);
      }
      top_n_sync<kWarps>();
      if (warp == 0) {
        // Lane l holds bins 8l .. 8l+7; count the keys in higher bins from the top down.
        uint32_t counts[8], lane_total = 0;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          counts[c] = scratch.hist[lane * 8 + c];
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
        if (here) {
          uint32_t seen = above;
          for (int c = 7; c >= 0; --c) {
            if (seen + counts[c] >= static_cast<uint32_t>(rank)) {
              scratch.digit = lane * 8 + c;
              scratch.rank = rank - static_cast<int>(seen);
              scratch.whole = seen + counts[c] == static_cast<uint32_t>(rank);
              break;
            }
            seen += counts[c];
          }
        }
      }
      top_n_sync<kWarps>();
      prefix |= static_cast<uint32_t>(scratch.digit) << shift;
      prefix_mask |= 255u << shift;
      rank = scratch.rank;
      const bool whole = scratch.whole;  // uniform: read from shared memory by every thread
      top_n_sync<kWarps>();  // digit, rank and whole read before the next pass writes them
      // Every key of the bin is wanted: those above the threshold (the bin's lowest key) and the
      // `rank` or fewer equal to it.
      if (whole) break;
    }
    threshold = prefix;
    need = rank;
  }
  // Output in ascending block order: warp w owns the 32-block chunks w*chunks .. (w+1)*chunks-1.
  // Pass 0 counts each warp's chosen and tied blocks, pass 1 writes with the lower warps' counts.
  const int chunks = ((eligible + 31) / 32 + kWarps - 1) / kWarps;
  const int begin = warp * chunks * 32, end = min(eligible, begin + chunks * 32);
  int k = 0, ties = 0;
  for (int pass = kWarps == 1 ? 1 : 0; pass < 2; ++pass) {
    if (pass == 1 && kWarps > 1) {
      top_n_sync<kWarps>();
      k = ties = 0;
      for (int w = 0; w < warp; ++w) {
        k += scratch.warp_counts[0][w];
        ties += scratch.warp_counts[1][w];
      }
      k += min(ties, need);  // the tied blocks the lower warps chose
    }
    int chosen_here = 0, ties_here = 0;
#pragma unroll 4
    for (int base = begin; base < end; base += 32) {
      const int j = base + lane;
      const bool is_free = j >= n_init && j < free_hi;
      const uint32_t key = is_free && !all ? score_key(bs[j]) : 0u;
      const bool tie = is_free && !all && take > 0 && key == threshold;
      const unsigned tie_mask = __ballot_sync(0xffffffffu, tie);
      const bool above = is_free && (all || (take > 0 && key > threshold));
      if (pass == 0) {
        ties_here += __popc(tie_mask);
        chosen_here += __popc(__ballot_sync(0xffffffffu, j < end && (!is_free || above)));
        continue;
      }
      const int tie_rank = ties + __popc(tie_mask & ((1u << lane) - 1u));
      ties += __popc(tie_mask);
      const bool sel = j < end && (!is_free || above || (tie && tie_rank < need));
      const unsigned mask = __ballot_sync(0xffffffffu, sel);
      if (sel) out[k + __popc(mask & ((1u << lane) - 1u))] = j;
      k += __popc(mask);
    }
    if (pass == 0 && lane == 0) {
      scratch.warp_counts[0][warp] = chosen_here;
      scratch.warp_counts[1][warp] = ties_here;
    }
  }
  if constexpr (kWarps > 1) {
    int total = 0, tied = 0;
    for (int w = 0; w < kWarps; ++w) {
      total += scratch.warp_counts[0][w];
      tied += scratch.warp_counts[1][w];
    }
    k = total + min(tied, need);
    for (int x = k + tid; x < n; x += kThreads) out[x] = -1;
  } else {
    for (int x = k + lane; x < n; x += 32) out[x] = -1;
  }
}

}  // namespace nsa::cuda_detail
