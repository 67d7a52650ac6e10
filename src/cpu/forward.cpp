// CPU reference forward: for each (sequence, query position, kv head) task, compressed
// attention for the G query heads, block scores (Eqs. 8-10) and top-n, selected attention,
// window attention, and the gated combine. float64 throughout. Prefill, decode and chunked
// prefill are one path: a query row knows its position and where its sequence's keys start
// (sequence_table), and reads exactly the keys that position sees.
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/reference.h"
#include "cpu/threads.h"
#include "nsa/nsa.h"

namespace nsa::cpu {
namespace {

// One softmax over the keys in `spans` for one query row. Writes the branch output to `out`
// (zeros when there are no keys) and, if `probs` is given, the probabilities key by key in span
// order. Returns the log-sum-exp of the scaled scores (-inf when there are no keys).
double attend(const double* query, const Dense& keys, const Dense& values, int64_t first_row, int64_t kv_head,
              const std::vector<KeySpan>& spans, double scale, std::vector<double>* scores, double* out,
              std::vector<double>* probs) {
  scores->clear();
  double max_score = -std::numeric_limits<double>::infinity();
  for (const KeySpan& span : spans)
    for (int64_t s = span.begin; s < span.end; ++s) {
      scores->push_back(scale * dot(query, keys.at(first_row + s, kv_head), keys.dim));
      max_score = std::max(max_score, scores->back());
    }
  std::fill(out, out + values.dim, 0.0);
  if (probs) probs->clear();
  if (scores->empty()) return -std::numeric_limits<double>::infinity();
  double sum = 0;
  for (double score : *scores) sum += std::exp(score - max_score);
  const double lse = max_score + std::log(sum);
  size_t key = 0;
  for (const KeySpan& span : spans)
    for (int64_t s = span.begin; s < span.end; ++s, ++key) {
      const double p = std::exp((*scores)[key] - lse);
      axpy(p, values.at(first_row + s, kv_head), out, values.dim);
      if (probs) probs->push_back(p);
    }
  return lse;
}

}  // namespace

Status forward(const ForwardParams& p, int num_threads) {
  Status status = validate(p);
  if (!status.ok()) return status;
  const Config& c = p.config;
  const Shape& s = p.shape;
  const std::vector<SequenceRows> sequences = sequence_table(c, s, p.varlen, p.cache);
  const Inputs in(p, sequences);
  const int64_t rows = total_rows(s, p.varlen);
  const int64_t group = s.num_q_heads / s.num_kv_heads;
  const int64_t n = c.num_selected;
  const double scale = softmax_scale(c, s);
  const DType stats = stats_dtype(p.dtype);
  Dense out(rows, s.num_q_heads, s.head_dim_v);

  // Task = (query row, kv head); the row's sequence is found through row_to_seq.
  std::vector<int64_t> row_to_seq(static_cast<size_t>(rows));
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t i = 0; i < sequences[b].length; ++i) row_to_seq[sequences[b].first_row + i] = b;
  // Keys each branch's softmax reads, per task: summed into tokens_read after the parallel loop
  // so that the sum needs no atomics and its order is fixed.
  std::vector<int64_t> keys_read(p.tokens_read ? static_cast<size_t>(rows * s.num_kv_heads * kNumBranches) : 0);

  parallel_for(rows * s.num_kv_heads, resolve_num_threads(num_threads), [&](int64_t task) {
    const int64_t row = task / s.num_kv_heads, kv_head = task % s.num_kv_heads;
    const SequenceRows& seq = sequences[row_to_seq[row]];
    const int64_t t = seq.first_position + (row - seq.first_row);  // the query's position
    std::vector<double> scores, probs, block_score;
    std::vector<int64_t> blocks;
    std::array<std::vector<KeySpan>, kNumBranches> spans;  // the keys of each branch at t
    std::vector<std::vector<double>> branch_out(kNumBranches, std::vector<double>(s.head_dim_v));
    std::vector<double> lse(static_cast<size_t>(group * kNumBranches));
    int32_t* selection = p.block_indices + (row * s.num_kv_heads + kv_head) * n;

    // Compressed branch first: its probabilities are the block scores (Eqs. 8-10).
    std::vector<std::vector<double>> cmp_out(group, std::vector<double>(s.head_dim_v));
    block_score.assign(static_cast<size_t>(num_eligible_blocks(t, c.sel_block)), 0.0);
    branch_spans(kBranchCmp, t, c, blocks, &spans[kBranchCmp]);
    for (int64_t g = 0; g < group; ++g) {
      const int64_t head = kv_head * group + g;
      lse[g * kNumBranches + kBranchCmp] = attend(in.q.at(row, head), in.k_cmp, in.v_cmp, seq.first_cmp_row, kv_head,
                                                  spans[kBranchCmp], scale, &scores, cmp_out[g].data(), &probs);
      for (size_t i = 0; i < probs.size(); ++i) {
        const int64_t cmp_index = static_cast<int64_t>(i);
        const int64_t first_block = cmp_index * c.cmp_stride / c.sel_block;
        const int64_t last_block = (cmp_index * c.cmp_stride + c.cmp_block - 1) / c.sel_block;
        for (int64_t j = first_block; j <= last_block; ++j)
          block_score[j] += probs[i] * static_cast<double>(
                                           overlap_weight(cmp_index, j, c.cmp_block, c.cmp_stride, c.sel_block));
      }
    }
    if (!p.block_indices_given) select_top_blocks(block_score, t, c, selection);
    selected_blocks(selection, n, &blocks);
    for (int branch : {kBranchSlc, kBranchWin}) branch_spans(branch, t, c, blocks, &spans[branch]);
    if (p.tokens_read)
      for (int branch = 0; branch < kNumBranches; ++branch)
        keys_read[task * kNumBranches + branch] = num_keys(spans[branch]);

    for (int64_t g = 0; g < group; ++g) {
      const int64_t head = kv_head * group + g;
      branch_out[kBranchCmp] = cmp_out[g];
      for (int branch : {kBranchSlc, kBranchWin})
        lse[g * kNumBranches + branch] = attend(in.q.at(row, head), in.branch_keys(branch), in.branch_values(branch),
                                                seq.first_key_row, kv_head, spans[branch], scale, &scores,
                                                branch_out[branch].data(), nullptr);
      double* combined = out.at(row, head);
      const double* gate = in.gates.at(row, head);
      for (int branch = 0; branch < kNumBranches; ++branch) {
        axpy(gate[branch], branch_out[branch].data(), combined, s.head_dim_v);
        const int64_t stat_offset = (row * s.num_q_heads + head) * kNumBranches + branch;
        store_element(stats, p.lse, stat_offset, lse[g * kNumBranches + branch]);
        if (p.out_branch)
          for (int64_t e = 0; e < s.head_dim_v; ++e)
            store_element(p.dtype, p.out_branch, stat_offset * s.head_dim_v + e, branch_out[branch][e]);
      }
    }
  });
  scatter(p.dtype, out, p.out, rows, p.varlen.cu_seqlens ? 0 : s.seqlen);
  if (p.tokens_read)
    for (int64_t task = 0; task < rows * s.num_kv_heads; ++task)
      for (int branch = 0; branch < kNumBranches; ++branch)
        p.tokens_read[row_to_seq[task / s.num_kv_heads] * kNumBranches + branch] +=
            keys_read[task * kNumBranches + branch];
  return Status::Ok();
}

}  // namespace nsa::cpu
