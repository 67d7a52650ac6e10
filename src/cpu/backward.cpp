// CPU reference backward. Two race-free passes, each output element owned by one task:
//   pass A, per (query row, kv head): dgates, the per-branch delta = gate * (dO . o_branch),
//     and dq, recomputing each branch's probabilities from the saved lse;
//   pass B, per (key row, kv head): dk, dv (and dk_win, dv_win) from the queries that attend
//     the key (the window's, and those that selected its block, found through a block->query
//     list); per (compressed row, kv head): dk_cmp, dv_cmp from every query that sees it.
// The selection itself is not differentiated (the paper's choice). float64 throughout, fixed
// summation order: results are bitwise reproducible for any thread count.
#include <cmath>
#include <vector>

#include "cpu/reference.h"
#include "cpu/threads.h"
#include "nsa/nsa.h"

namespace nsa::cpu {
namespace {

struct PairGrad {
  double prob;        // P(t, s) of the branch softmax
  double grad_score;  // dL/d(scaled score) = P * (dP - delta)
};

// Gradient quantities of one (query, key) pair of a branch with the given saved statistics.
PairGrad pair_grad(const double* query, const double* grad_out, const double* key, const double* value,
                   int64_t head_dim_qk, int64_t head_dim_v, double scale, double lse, double gate, double delta) {
  const double prob = std::exp(scale * dot(query, key, head_dim_qk) - lse);
  const double grad_prob = gate * dot(grad_out, value, head_dim_v);
  return {prob, prob * (grad_prob - delta)};
}

}  // namespace

Status backward(const BackwardParams& p, int num_threads) {
  Status status = validate(p);
  if (!status.ok()) return status;
  const Config& c = p.config;
  const Shape& s = p.shape;
  // The backward is prefill only: a sequence's key rows are its query rows.
  const std::vector<SequenceRows> sequences = sequence_table(c, s, p.varlen, KvCacheView{});
  const Inputs in(p, sequences);
  const int64_t rows = total_rows(s, p.varlen), cmp_rows = total_rows(sequences, RowKind::kCmp);
  const bool varlen = p.varlen.cu_seqlens != nullptr;
  const int64_t per_batch = varlen ? 0 : s.seqlen;
  const int64_t cmp_per_batch = varlen ? 0 : num_cmp_tokens(s.seqlen, c.cmp_block, c.cmp_stride);
  const int64_t group = s.num_q_heads / s.num_kv_heads;
  const int64_t n = c.num_selected;
  const int64_t Dk = s.head_dim_qk, Dv = s.head_dim_v;
  const double scale = softmax_scale(c, s);
  const int threads = resolve_num_threads(num_threads);

  const Dense grad_out = gather(p.dtype, p.grad_out, sequences, varlen, RowKind::kQuery, s.num_q_heads, Dv);
  Dense lse(rows, s.num_q_heads, kNumBranches), out_branch(rows, s.num_q_heads * kNumBranches, Dv);
  for (size_t e = 0; e < lse.data.size(); ++e) lse.data[e] = load_element(stats_dtype(p.dtype), p.lse, int64_t(e));
  for (size_t e = 0; e < out_branch.data.size(); ++e)
    out_branch.data[e] = load_element(p.dtype, p.out_branch, int64_t(e));

  std::vector<int64_t> row_to_seq(static_cast<size_t>(rows)), cmp_row_to_seq(static_cast<size_t>(cmp_rows));
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t t = 0; t < sequences[b].length; ++t) row_to_seq[sequences[b].first_row + t] = b;
    for (int64_t i = 0; i < sequences[b].num_cmp; ++i) cmp_row_to_seq[sequences[b].first_cmp_row + i] = b;
  }
  auto selection_row = [&](int64_t row, int64_t kv_head) { return p.block_indices + (row * s.num_kv_heads + kv_head) * n; };

  // Pass A: dgates, delta and dq per (query row, kv head).
  Dense grad_q(rows, s.num_q_heads, Dk), grad_gates(rows, s.num_q_heads, kNumBranches);
  Dense delta(rows, s.num_q_heads, kNumBranches);
  parallel_for(rows * s.num_kv_heads, threads, [&](int64_t task) {
    const int64_t row = task / s.num_kv_heads, kv_head = task % s.num_kv_heads;
    const SequenceRows& seq = sequences[row_to_seq[row]];
    const int64_t t = row - seq.first_row;
    std::vector<int64_t> blocks;
    std::vector<KeySpan> spans;
    selected_blocks(selection_row(row, kv_head), n, &blocks);
    for (int64_t g = 0; g < group; ++g) {
      const int64_t head = kv_head * group + g;
      const double* query = in.q.at(row, head);
      const double* d_out = grad_out.at(row, head);
      double* d_query = grad_q.at(row, head);
      for (int branch = 0; branch < kNumBranches; ++branch) {
        const double gate = in.gates.at(row, head)[branch];
        const double d_gate = dot(d_out, out_branch.at(row, head * kNumBranches + branch), Dv);
        grad_gates.at(row, head)[branch] = d_gate;
        const double branch_delta = gate * d_gate;
        delta.at(row, head)[branch] = branch_delta;
        const Dense& keys = in.branch_keys(branch);
        const Dense& values = in.branch_values(branch);
        const int64_t first = branch == kBranchCmp ? seq.first_cmp_row : seq.first_key_row;
        branch_spans(branch, t, c, blocks, &spans);
        for (const KeySpan& span : spans)
          for (int64_t key = span.begin; key < span.end; ++key) {
            const double* key_row = keys.at(first + key, kv_head);
            const PairGrad pg = pair_grad(query, d_out, key_row, values.at(first + key, kv_head), Dk, Dv, scale,
                                          lse.at(row, head)[branch], gate, branch_delta);
            axpy(scale * pg.grad_score, key_row, d_query, Dk);
          }
      }
    }
  });

  // Block -> queries that selected it, per (sequence, kv head), queries ascending.
  std::vector<std::vector<std::vector<int64_t>>> queries_of_block(static_cast<size_t>(s.batch * s.num_kv_heads));
  parallel_for(s.batch * s.num_kv_heads, threads, [&](int64_t task) {
    const int64_t b = task / s.num_kv_heads, kv_head = task % s.num_kv_heads;
    const SequenceRows& seq = sequences[b];
    auto& lists = queries_of_block[task];
    lists.resize(static_cast<size_t>(seq.length > 0 ? num_eligible_blocks(seq.length - 1, c.sel_block) : 0));
    std::vector<int64_t> blocks;
    for (int64_t t = 0; t < seq.length; ++t) {
      selected_blocks(selection_row(seq.first_row + t, kv_head), n, &blocks);
      for (int64_t j : blocks) lists[j].push_back(t);
    }
  });

  // Adds the gradient of every (query t, head of the group) pair of `branch` to one key.
  auto accumulate_key = [&](int branch, int64_t key_row, int64_t kv_head, int64_t first_query_row, int64_t t,
                            double* d_key, double* d_value) {
    const Dense& keys = in.branch_keys(branch);
    const Dense& values = in.branch_values(branch);
    const int64_t row = first_query_row + t;
    for (int64_t g = 0; g < group; ++g) {
      const int64_t head = kv_head * group + g;
      const double gate = in.gates.at(row, head)[branch];
      const double* query = in.q.at(row, head);
      const double* d_out = grad_out.at(row, head);
      const PairGrad pg = pair_grad(query, d_out, keys.at(key_row, kv_head), values.at(key_row, kv_head), Dk, Dv,
                                    scale, lse.at(row, head)[branch], gate, delta.at(row, head)[branch]);
      axpy(pg.prob * gate, d_out, d_value, Dv);
      axpy(scale * pg.grad_score, query, d_key, Dk);
    }
  };

  // Pass B, raw keys: selection and window branches.
  Dense grad_k(rows, s.num_kv_heads, Dk), grad_v(rows, s.num_kv_heads, Dv);
  Dense grad_k_win(in.has_k_win ? rows : 0, s.num_kv_heads, Dk), grad_v_win(in.has_v_win ? rows : 0, s.num_kv_heads, Dv);
  parallel_for(rows * s.num_kv_heads, threads, [&](int64_t task) {
    const int64_t row = task / s.num_kv_heads, kv_head = task % s.num_kv_heads;
    const int64_t b = row_to_seq[row];
    const SequenceRows& seq = sequences[b];
    const int64_t key = row - seq.first_row;
    for (int64_t t : queries_of_block[b * s.num_kv_heads + kv_head][key / c.sel_block])
      if (t >= key) accumulate_key(kBranchSlc, row, kv_head, seq.first_row, t, grad_k.at(row, kv_head), grad_v.at(row, kv_head));
    std::vector<double> d_key(Dk, 0.0), d_value(Dv, 0.0);
    for (int64_t t = key; t < std::min(seq.length, key + c.window); ++t)
      accumulate_key(kBranchWin, row, kv_head, seq.first_row, t, d_key.data(), d_value.data());
    axpy(1.0, d_key.data(), in.has_k_win ? grad_k_win.at(row, kv_head) : grad_k.at(row, kv_head), Dk);
    axpy(1.0, d_value.data(), in.has_v_win ? grad_v_win.at(row, kv_head) : grad_v.at(row, kv_head), Dv);
  });

  // Pass B, compressed keys: every query t with i*d + l - 1 <= t sees compressed token i.
  Dense grad_k_cmp(cmp_rows, s.num_kv_heads, Dk), grad_v_cmp(cmp_rows, s.num_kv_heads, Dv);
  parallel_for(cmp_rows * s.num_kv_heads, threads, [&](int64_t task) {
    const int64_t cmp_row = task / s.num_kv_heads, kv_head = task % s.num_kv_heads;
    const SequenceRows& seq = sequences[cmp_row_to_seq[cmp_row]];
    const int64_t cmp_index = cmp_row - seq.first_cmp_row;
    for (int64_t t = cmp_index * c.cmp_stride + c.cmp_block - 1; t < seq.length; ++t)
      accumulate_key(kBranchCmp, cmp_row, kv_head, seq.first_row, t, grad_k_cmp.at(cmp_row, kv_head),
                     grad_v_cmp.at(cmp_row, kv_head));
  });

  scatter(p.dtype, grad_q, p.grad_q, rows, per_batch);
  scatter(p.dtype, grad_gates, p.grad_gates, rows, per_batch);
  scatter(p.dtype, grad_k, p.grad_k, rows, per_batch);
  scatter(p.dtype, grad_v, p.grad_v, rows, per_batch);
  if (in.has_k_win) scatter(p.dtype, grad_k_win, p.grad_k_win, rows, per_batch);
  if (in.has_v_win) scatter(p.dtype, grad_v_win, p.grad_v_win, rows, per_batch);
  if (cmp_rows > 0) {
    scatter(p.dtype, grad_k_cmp, p.grad_k_cmp, cmp_rows, cmp_per_batch);
    scatter(p.dtype, grad_v_cmp, p.grad_v_cmp, cmp_rows, cmp_per_batch);
  }
  return Status::Ok();
}

}  // namespace nsa::cpu
