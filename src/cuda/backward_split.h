// How the backward's key-major kernels split a key tile's query list over CTAs: plain arithmetic
// (no CUDA types), so that the host tests check the function the launcher uses
// (tests/cpp/test_backward_split.cpp).
#pragma once

#include <algorithm>
#include <cmath>
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

// The selection branch's dq (params.h SelectedDq). Query-major, a dq CTA's 64 rows span
// max(1, 64 / G) positions and are multiplied with the union of the blocks those positions
// selected; key-major computes each (block, row) pair once, for one more product in the slc
// dK / dV kernel and fp32 atomics. The union factor: the union's expected size over the n blocks a
// row needs, for positions that see ceil(T / l') / 2 blocks (the causal average), share their
// `forced` blocks (initial and local) and pick the others at random. kAuto takes key-major from
// kKeyMajorDqMinUnionFactor on, which the measurements of docs/decisions/0012 set (H100,
// 2026-12-07, after the loads of decision 0013): key-major won at factors 3.7, 5.6 and 7.0 (Dk 64)
// and 7.0 (Dk 128), tied at 3.3 (Dk 128) and lost at 3.2 and below. An estimate: varlen batches
// pass their longest sequence (packed short documents have smaller unions), and caller-given
// block_indices need not hold the forced blocks.
inline constexpr int kKeyMajorDqMaxDk = 128;

inline double selected_dq_union_factor(int64_t group, int64_t seqlen, int64_t sel_block, int64_t num_selected,
                                       int64_t forced) {
  const double n = static_cast<double>(std::max<int64_t>(1, num_selected));
  const double positions = std::max(1.0, 64.0 / static_cast<double>(std::max<int64_t>(1, group)));
  const double blocks = static_cast<double>((seqlen + sel_block - 1) / std::max<int64_t>(1, sel_block));
  const double visible = std::max(n, blocks / 2);
  const double shared = std::min(n, static_cast<double>(std::max<int64_t>(0, forced)));
  const double free_blocks = visible - shared, picks = n - shared;
  const double picked_union =
      free_blocks > 0 ? free_blocks * (1 - std::pow(1 - picks / free_blocks, positions)) : 0.0;
  return (shared + picked_union) / n;
}

inline constexpr double kKeyMajorDqMinUnionFactor = 3.5;

// Whether kAuto takes key-major for these dims (the device and the deterministic mode are the
// caller's to check).
inline bool selected_dq_key_major_pays(int64_t head_dim_qk, int64_t group, int64_t seqlen, int64_t sel_block,
                                       int64_t num_selected, int64_t forced) {
  return head_dim_qk <= kKeyMajorDqMaxDk &&
         selected_dq_union_factor(group, seqlen, sel_block, num_selected, forced) >= kKeyMajorDqMinUnionFactor;
}

}  // namespace nsa::cuda_detail
