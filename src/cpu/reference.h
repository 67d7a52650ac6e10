// Shared pieces of the CPU reference forward and backward: the inputs as dense float64 arrays,
// which keys each branch attends for a query, and the top-n block selection.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/layout.h"
#include "nsa/params.h"
#include "nsa/semantics.h"

namespace nsa::cpu {

inline double dot(const double* a, const double* b, int64_t n) {
  // Four partial sums: a fixed order, so results are reproducible, and faster than one chain.
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t e = 0;
  for (; e + 4 <= n; e += 4) {
    s0 += a[e] * b[e];
    s1 += a[e + 1] * b[e + 1];
    s2 += a[e + 2] * b[e + 2];
    s3 += a[e + 3] * b[e + 3];
  }
  for (; e < n; ++e) s0 += a[e] * b[e];
  return (s0 + s1) + (s2 + s3);
}

inline void axpy(double alpha, const double* x, double* y, int64_t n) {
  for (int64_t e = 0; e < n; ++e) y[e] += alpha * x[e];
}

inline double softmax_scale(const Config& config, const Shape& shape) {
  return config.scale > 0 ? config.scale : 1.0 / std::sqrt(static_cast<double>(shape.head_dim_qk));
}

// The attention inputs of either params struct, as dense float64 [rows, heads, dim] arrays laid
// out as `table` (sequence_table) says: q and gates by query row, the keys by key row.
struct Inputs {
  Dense q, k, v, k_win, v_win, k_cmp, v_cmp, gates;
  bool has_k_win = false, has_v_win = false;

  template <class Params>
  Inputs(const Params& p, const std::vector<SequenceRows>& table) {
    const Shape& s = p.shape;
    const bool varlen = p.varlen.cu_seqlens != nullptr;
    has_k_win = p.k_win.data != nullptr;
    has_v_win = p.v_win.data != nullptr;
    auto convert = [&](const InputTensor& t, RowKind kind, int64_t heads, int64_t dim) {
      return gather(p.dtype, t, table, varlen, kind, heads, dim);
    };
    q = convert(p.q, RowKind::kQuery, s.num_q_heads, s.head_dim_qk);
    gates = convert(p.gates, RowKind::kQuery, s.num_q_heads, kNumBranches);
    k = convert(p.k, RowKind::kKey, s.num_kv_heads, s.head_dim_qk);
    v = convert(p.v, RowKind::kKey, s.num_kv_heads, s.head_dim_v);
    if (has_k_win) k_win = convert(p.k_win, RowKind::kKey, s.num_kv_heads, s.head_dim_qk);
    if (has_v_win) v_win = convert(p.v_win, RowKind::kKey, s.num_kv_heads, s.head_dim_v);
    k_cmp = convert(p.k_cmp, RowKind::kCmp, s.num_kv_heads, s.head_dim_qk);
    v_cmp = convert(p.v_cmp, RowKind::kCmp, s.num_kv_heads, s.head_dim_v);
  }

  const Dense& branch_keys(int branch) const {
    return branch == kBranchCmp ? k_cmp : branch == kBranchWin && has_k_win ? k_win : k;
  }
  const Dense& branch_values(int branch) const {
    return branch == kBranchCmp ? v_cmp : branch == kBranchWin && has_v_win ? v_win : v;
  }
};

// A half-open range of key positions within a sequence (compressed positions for cmp).
struct KeySpan {
  int64_t begin, end;
};

// Keys in a list of spans.
inline int64_t num_keys(const std::vector<KeySpan>& spans) {
  int64_t count = 0;
  for (const KeySpan& span : spans) count += span.end - span.begin;
  return count;
}

// The selected blocks of one (t, kv head) row, ascending, without -1 entries.
inline void selected_blocks(const int32_t* row, int64_t num_selected, std::vector<int64_t>* blocks) {
  blocks->clear();
  for (int64_t slot = 0; slot < num_selected; ++slot)
    if (row[slot] >= 0) blocks->push_back(row[slot]);
  std::sort(blocks->begin(), blocks->end());
}

// Keys that branch `branch` attends for query t; `blocks` are the selected ones (ascending).
inline void branch_spans(int branch, int64_t t, const Config& c, const std::vector<int64_t>& blocks,
                         std::vector<KeySpan>* spans) {
  spans->clear();
  if (branch == kBranchCmp) {
    const int64_t visible = num_visible_cmp_tokens(t, c.cmp_block, c.cmp_stride);
    if (visible > 0) spans->push_back({0, visible});
  } else if (branch == kBranchSlc) {
    for (int64_t j : blocks) spans->push_back({j * c.sel_block, std::min((j + 1) * c.sel_block, t + 1)});
  } else {
    spans->push_back({std::max<int64_t>(0, t - c.window + 1), t + 1});
  }
}

// Top-n of Eqs. 11-12: forced initial and local blocks, then the highest scores among the other
// eligible blocks, ties to the lower index. Writes num_selected entries, ascending, -1 padded.
inline void select_top_blocks(const std::vector<double>& block_score, int64_t t, const Config& c, int32_t* out) {
  const int64_t eligible = num_eligible_blocks(t, c.sel_block);
  std::vector<char> chosen(static_cast<size_t>(eligible), 0);
  int64_t count = 0;
  auto take = [&](int64_t j) {
    if (j >= 0 && j < eligible && !chosen[j]) {
      chosen[j] = 1;
      ++count;
    }
  };
  for (int64_t j = 0; j < c.num_init; ++j) take(j);
  for (int64_t back = 0; back < c.num_local; ++back) take(t / c.sel_block - back);
  while (count < c.num_selected && count < eligible) {
    int64_t best = -1;
    for (int64_t j = 0; j < eligible; ++j)
      if (!chosen[j] && (best < 0 || block_score[j] > block_score[best])) best = j;
    take(best);
  }
  int64_t slot = 0;
  for (int64_t j = 0; j < eligible; ++j)
    if (chosen[j]) out[slot++] = static_cast<int32_t>(j);
  for (; slot < c.num_selected; ++slot) out[slot] = -1;
}

}  // namespace nsa::cpu
