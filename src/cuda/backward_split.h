// How the backward's key-major kernels split a key tile's query list over CTAs: plain arithmetic
// (no CUDA types), so that the host tests check the function the launcher uses
// (tests/cpp/test_backward_split.cpp).
#pragma once

#include <algorithm>
#include <cstdint>

namespace nsa::cuda_detail {

// Positions of a key tile's query list that one key-major CTA of a branch takes in the default mode:
// as many rows (positions x G) as spread the branch's work over about kTargetCtas CTAs, but at least
// kMinRows (a CTA's setup and its adds to the accumulators) and at most kMaxRows, and few enough
// CTAs per key tile for the grid's z dimension (<= 65535). key_tile_ctas: B * key tiles * Hkv;
// list_positions: a key tile's typical list length. Measured on an H100 (docs/decisions/0007):
// with 16384 rows a CTA for every shape, the showcase's cmp dk/dv (B = 16, G = 6, 2k) ran 64 CTAs
// for 0.60 ms, with 1024 rows 768 CTAs for 0.19 ms; the paper config at 64k, whose grid is large
// anyway, slowed by 3-15% per branch with 4096 rows or fewer.
inline int64_t key_major_split_positions(int64_t key_tile_ctas, int64_t list_positions, int64_t group,
                                         int64_t seqlen) {
  constexpr int64_t kTargetCtas = 2048, kMinRows = 1024, kMaxRows = 16384;
  // In double: the product of the estimates may pass 2^63 for varlen batches (seqlen: the longest).
  const double work_rows = static_cast<double>(key_tile_ctas) * static_cast<double>(list_positions) *
                           static_cast<double>(group);
  const int64_t rows = static_cast<int64_t>(
      std::min<double>(kMaxRows, std::max<double>(kMinRows, work_rows / kTargetCtas)));
  return std::max<int64_t>({1, (rows + group - 1) / group, (seqlen + 65534) / 65535});
}

}  // namespace nsa::cuda_detail
