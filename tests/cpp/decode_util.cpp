// Decode and chunked prefill in tests; see decode_util.h.
#include "decode_util.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>

namespace nsa_test {

namespace {

// Copies packed row `src_row` of the problem's tensor `arg` into logical row `dst_row` of `dst`.
void copy_row(const Problem& problem, int arg, int64_t src_row, StridedTensor& dst, int64_t dst_row) {
  const int64_t heads = problem.heads(arg), dim = problem.dim(arg);
  const double* src = problem.data[arg].data() + src_row * heads * dim;
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t x = 0; x < dim; ++x) dst.buf.set(dst.index(dst_row, h, x), src[h * dim + x]);
}

// Copies row `from_row` of every output of `from` into row `to_row` of `to` (same heads and dims).
void copy_output_row(const Problem& problem, const Outputs& from, int64_t from_row, Outputs& to, int64_t to_row) {
  const ProblemSpec& s = problem.spec;
  auto copy = [&](const auto& src, auto& dst, int64_t per_row) {
    std::copy(src.begin() + from_row * per_row, src.begin() + (from_row + 1) * per_row, dst.begin() + to_row * per_row);
  };
  copy(from.out, to.out, s.hq * s.dv);
  if (!to.out_branch.empty()) copy(from.out_branch, to.out_branch, s.hq * 3 * s.dv);
  copy(from.lse, to.lse, s.hq * 3);
  copy(from.indices, to.indices, s.hkv * s.config.num_selected);
}

std::string describe_call(size_t index, const DecodeCall& call) {
  std::ostringstream os;
  os << "call " << index << " (m " << call.m << ", lengths";
  for (int64_t len : call.lens) os << " " << len;
  os << ")";
  return os.str();
}

}  // namespace

std::vector<DecodeCall> chunked_schedule(const Problem& problem, int64_t chunk) {
  const int64_t length = problem.seqlen(0);
  for (int64_t len : problem.spec.seqlens)
    if (len != length) throw std::invalid_argument("nsa_test: chunked_schedule needs sequences of equal length");
  std::vector<DecodeCall> schedule;
  for (int64_t start = 0; start < length; start += chunk) {
    const int64_t m = std::min(chunk, length - start);
    schedule.push_back({m, std::vector<int64_t>(static_cast<size_t>(problem.num_seqs()), start + m)});
  }
  return schedule;
}

std::vector<DecodeCall> staggered_schedule(const Problem& problem, int64_t m, const std::vector<int64_t>& offsets) {
  if (static_cast<int64_t>(offsets.size()) != problem.num_seqs())
    throw std::invalid_argument("nsa_test: staggered_schedule needs one offset per sequence");
  for (int64_t len : problem.spec.seqlens)
    if (len < m) throw std::invalid_argument("nsa_test: staggered_schedule needs sequences of length >= m");
  std::vector<DecodeCall> schedule;
  for (int64_t k = 1;; ++k) {
    DecodeCall call{m, {}};
    bool complete = true;
    for (int64_t b = 0; b < problem.num_seqs(); ++b) {
      call.lens.push_back(std::clamp(k * m - offsets[b], m, problem.seqlen(b)));
      complete = complete && call.lens.back() == problem.seqlen(b);
    }
    schedule.push_back(call);
    if (complete) return schedule;
  }
}

Outputs cpu_forward_runner(Buffers& buffers, nsa::Status* status) {
  *status = run_forward(buffers);
  return status->ok() ? buffers.read_forward() : Outputs{};
}

DecodeResult run_decode(const Problem& problem, const std::vector<DecodeCall>& schedule, const ForwardRunner& run,
                        const DecodeOptions& options, const std::function<void(const Buffers&)>& check_before_run) {
  const ProblemSpec& spec = problem.spec;
  const nsa::Config& c = spec.config;
  const int64_t num_seqs = problem.num_seqs(), n = c.num_selected;
  const int64_t capacity = problem.max_seqlen() + options.extra_capacity;
  const int64_t cmp_capacity =
      nsa::num_cmp_tokens(problem.max_seqlen(), c.cmp_block, c.cmp_stride) + options.extra_cmp_capacity;

  DecodeResult result;
  Outputs& all = result.outputs;
  const double nan = std::nan("");
  all.out.assign(static_cast<size_t>(problem.rows() * spec.hq * spec.dv), nan);
  if (options.with_out_branch) all.out_branch.assign(static_cast<size_t>(problem.rows() * spec.hq * 3 * spec.dv), nan);
  all.lse.assign(static_cast<size_t>(problem.rows() * spec.hq * 3), nan);
  all.indices.assign(static_cast<size_t>(problem.rows() * spec.hkv * n), -12345);
  std::vector<bool> queried(static_cast<size_t>(problem.rows()), false);

  Buffers hb;
  int64_t buffers_m = 0;  // the m the buffers were made for
  std::vector<int64_t> held(static_cast<size_t>(num_seqs), 0);  // cache rows written per sequence
  for (size_t k = 0; k < schedule.size(); ++k) {
    const DecodeCall& call = schedule[k];
    const int64_t m = call.m;
    if (m != buffers_m) {  // another query shape: new buffers, the cache written again from row 0
      hb = make_cache_buffers(problem, m, capacity, cmp_capacity, options.input_layout, options.output_layout);
      hb.with_out_branch = options.with_out_branch;
      hb.block_indices_given = options.given_indices != nullptr;
      hb.tokens_read.assign(static_cast<size_t>(num_seqs * 3), 0);
      std::fill(held.begin(), held.end(), 0);
      buffers_m = m;
    }
    for (int64_t b = 0; b < num_seqs; ++b) {
      const int64_t len = call.lens[b];
      if (len < held[b] || len < m || len > problem.seqlen(b))
        throw std::invalid_argument("nsa_test: run_decode: invalid " + describe_call(k, call));
      for (int64_t pos = held[b]; pos < len; ++pos)
        for (int arg : {kK, kV, kKWin, kVWin})
          if (problem.has(arg)) copy_row(problem, arg, problem.row_begin[b] + pos, hb.in[arg], b * capacity + pos);
      for (int64_t i = nsa::num_cmp_tokens(held[b], c.cmp_block, c.cmp_stride);
           i < nsa::num_cmp_tokens(len, c.cmp_block, c.cmp_stride); ++i)
        for (int arg : {kKCmp, kVCmp}) copy_row(problem, arg, problem.cmp_begin[b] + i, hb.in[arg], b * cmp_capacity + i);
      held[b] = len;
      hb.cache_seqlens[b] = static_cast<int32_t>(len);
      for (int64_t i = 0; i < m; ++i) {
        const int64_t row = problem.row_begin[b] + len - m + i;
        for (int arg : {kQ, kGates}) copy_row(problem, arg, row, hb.in[arg], b * m + i);
        if (options.given_indices)
          std::copy(options.given_indices->begin() + row * spec.hkv * n,
                    options.given_indices->begin() + (row + 1) * spec.hkv * n,
                    hb.block_indices.begin() + (b * m + i) * spec.hkv * n);
      }
    }
    std::fill(hb.tokens_read.begin(), hb.tokens_read.end(), 0);
    if (check_before_run) check_before_run(hb);
    nsa::Status status;
    const Outputs got = run(hb, &status);
    if (!status.ok() || got.out.empty()) {
      ADD_FAILURE() << "decode " << describe_call(k, call) << " failed: " << nsa::status_code_name(status.code)
                    << ": " << status.message;
      return result;
    }
    for (int64_t b = 0; b < num_seqs; ++b) {
      for (int64_t i = 0; i < m; ++i) {
        const int64_t row = problem.row_begin[b] + call.lens[b] - m + i;
        copy_output_row(problem, got, b * m + i, all, row);
        queried[row] = true;
      }
      result.tokens_read.push_back({hb.tokens_read[b * 3], hb.tokens_read[b * 3 + 1], hb.tokens_read[b * 3 + 2]});
    }
  }
  result.ok = !options.query_every_row || std::all_of(queried.begin(), queried.end(), [](bool q) { return q; });
  if (!result.ok) ADD_FAILURE() << "the decode schedule left rows of the problem unqueried";
  return result;
}

::testing::AssertionResult cache_past_seqlens_is_nan(const Buffers& hb) {
  const nsa::Config& c = hb.spec.config;
  for (int arg : {kK, kV, kKWin, kVWin, kKCmp, kVCmp}) {
    const StridedTensor& t = hb.in[arg];
    if (t.rows() == 0) continue;
    const bool cmp = arg == kKCmp || arg == kVCmp;
    const int64_t rows_per_seq = cmp ? hb.cache_cmp_capacity : hb.cache_capacity;
    for (size_t b = 0; b < hb.cache_seqlens.size(); ++b) {
      const int64_t len = hb.cache_seqlens[b];
      const int64_t held = cmp ? nsa::num_cmp_tokens(len, c.cmp_block, c.cmp_stride) : len;
      for (int64_t r = held; r < rows_per_seq; ++r)
        for (int64_t h = 0; h < t.heads; ++h)
          for (int64_t x = 0; x < t.dim; ++x) {
            const int64_t row = static_cast<int64_t>(b) * rows_per_seq + r;
            if (!std::isnan(t.buf.get(t.index(row, h, x))))
              return ::testing::AssertionFailure() << arg_name(arg) << " cache row " << r << " of sequence " << b
                                                   << " (holding " << held << " rows) is not NaN";
          }
    }
  }
  return ::testing::AssertionSuccess();
}

std::array<int64_t, 3> expected_keys_read(const Problem& problem, const std::vector<int32_t>& indices, int64_t b,
                                          int64_t t) {
  const nsa::Config& c = problem.spec.config;
  const int64_t hkv = problem.spec.hkv, n = c.num_selected;
  const int64_t row = problem.row_begin[b] + t;
  std::array<int64_t, 3> keys{};
  keys[nsa::kBranchCmp] = hkv * nsa::num_visible_cmp_tokens(t, c.cmp_block, c.cmp_stride);
  keys[nsa::kBranchWin] = hkv * std::min(c.window, t + 1);
  for (int64_t h = 0; h < hkv; ++h)
    for (int64_t x = 0; x < n; ++x) {
      const int64_t j = indices[(row * hkv + h) * n + x];
      if (j >= 0) keys[nsa::kBranchSlc] += std::min((j + 1) * c.sel_block, t + 1) - j * c.sel_block;
    }
  return keys;
}

::testing::AssertionResult tokens_read_as_expected(const Problem& problem, const std::vector<DecodeCall>& schedule,
                                                   const DecodeResult& result) {
  const int64_t num_seqs = problem.num_seqs();
  if (result.tokens_read.size() != schedule.size() * static_cast<size_t>(num_seqs))
    return ::testing::AssertionFailure() << "tokens_read of " << result.tokens_read.size() << " (call, sequence) pairs, "
                                         << "expected " << schedule.size() * static_cast<size_t>(num_seqs);
  for (size_t k = 0; k < schedule.size(); ++k) {
    const DecodeCall& call = schedule[k];
    for (int64_t b = 0; b < num_seqs; ++b) {
      std::array<int64_t, 3> want{};
      for (int64_t t = call.lens[b] - call.m; t < call.lens[b]; ++t) {
        const std::array<int64_t, 3> keys = expected_keys_read(problem, result.outputs.indices, b, t);
        for (int br = 0; br < 3; ++br) want[br] += keys[br];
      }
      const std::array<int64_t, 3>& got = result.tokens_read[k * static_cast<size_t>(num_seqs) + b];
      if (got != want)
        return ::testing::AssertionFailure() << "tokens_read of sequence " << b << " in " << describe_call(k, call)
                                             << ": got (" << got[0] << ", " << got[1] << ", " << got[2]
                                             << "), want (" << want[0] << ", " << want[1] << ", " << want[2] << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

void PrintTo(const DecodeCase& decode_case, std::ostream* os) { *os << decode_case.name; }

std::vector<DecodeCall> schedule_of(const DecodeCase& decode_case, const Problem& problem) {
  return decode_case.stagger.empty() ? chunked_schedule(problem, decode_case.chunk)
                                     : staggered_schedule(problem, decode_case.chunk, decode_case.stagger);
}

DecodeOptions options_of(const DecodeCase& decode_case, const std::vector<int32_t>& given) {
  DecodeOptions options;
  options.extra_capacity = decode_case.extra_capacity;
  options.extra_cmp_capacity = decode_case.extra_cmp_capacity;
  options.with_out_branch = decode_case.with_out_branch;
  if (decode_case.given_indices) options.given_indices = &given;
  return options;
}

namespace {

std::vector<int32_t> given_indices_of(const DecodeCase& decode_case, const Problem& problem) {
  return decode_case.given_indices ? random_block_indices(problem, decode_case.spec.seed + 7, 0)
                                   : std::vector<int32_t>{};
}

std::function<void(const Buffers&)> poison_check_of(const DecodeCase& decode_case) {
  if (decode_case.extra_capacity == 0 && decode_case.extra_cmp_capacity == 0) return nullptr;
  return [](const Buffers& buffers) { EXPECT_TRUE(cache_past_seqlens_is_nan(buffers)); };
}

}  // namespace

CaseRun run_case(const DecodeCase& decode_case, const Problem& problem, const ForwardRunner& run) {
  CaseRun case_run;
  case_run.given = given_indices_of(decode_case, problem);
  case_run.schedule = schedule_of(decode_case, problem);
  case_run.result = run_decode(problem, case_run.schedule, run, options_of(decode_case, case_run.given),
                               poison_check_of(decode_case));
  return case_run;
}

std::vector<DecodeCase> decode_cases(nsa::DType dtype, int64_t head_dim, int64_t long_seqlen) {
  const int64_t D = head_dim;
  std::vector<DecodeCase> cases;
  uint64_t seed = 500;
  auto add = [&](std::string name, ProblemSpec spec, nsa::Config config, int64_t chunk) -> DecodeCase& {
    spec.config = config;
    spec.dtype = dtype;
    spec.seed = ++seed;
    DecodeCase c;
    c.name = std::move(name);
    c.spec = std::move(spec);
    c.chunk = chunk;
    cases.push_back(std::move(c));
    return cases.back();
  };
  const nsa::Config paper;
  // Paper geometry with n and w small enough that top-n chooses and the window slides early.
  const nsa::Config tight = make_config(32, 16, 64, 4, 1, 2, 100);
  // Token by token over long sequences: every position, so every compressed-token emission
  // (t = l-1 + k*d), selection block edge and window edge, into the steady state of top-n.
  add("token_G1_paper", padded_spec(1, long_seqlen, 2, 2, D, D), paper, 1);
  add("token_G3_sepwin", padded_spec(1, long_seqlen, 3, 1, D, D), tight, 1).spec.separate_window = true;
  add("token_G16", padded_spec(1, long_seqlen, 16, 1, D, D), tight, 1);
  // Other geometries: small blocks without an initial block; l > l' (blocks are eligible before any
  // compressed token is visible); d = l.
  add("token_l16d8s32_B2", padded_spec(2, 300, 4, 2, D, D), make_config(16, 8, 32, 4, 0, 3, 40), 1);
  add("token_l64d16s32", padded_spec(1, 300, 4, 2, D, D), make_config(64, 16, 32, 3, 1, 1, 50), 1);
  add("token_l32d32s64", padded_spec(1, 300, 4, 1, D, D), make_config(32, 32, 64, 3, 1, 1, 20), 1);
  // Chunked prefill; 1000 is not a multiple of any chunk, so the last chunk is partial.
  for (int64_t chunk : {7, 64, 300}) {
    DecodeCase& c = add("chunk" + std::to_string(chunk), padded_spec(2, 1000, 4, 2, D, D), tight, chunk);
    c.spec.separate_window = chunk != 64;  // both window modes
  }
  // All queries of a (sequence, kv head) in one 64-row tile with more than 16 rows: the CUDA decode
  // path without the warps sharing rows (m * G = 21 and 48).
  add("chunk7_G3", padded_spec(2, 700, 6, 2, D, D), tight, 7);
  add("chunk3_G16", padded_spec(1, 700, 16, 1, D, D), tight, 3);
  // A large n (37 free blocks to take of up to 47), with m * G = 64 (the CUDA decode path's
  // four-warp top-n without shared rows).
  add("chunk4_G16_n40", padded_spec(1, 1600, 16, 1, D, D), make_config(32, 16, 32, 40, 1, 2, 100), 4);
  // Batches whose sequences hold different numbers of tokens in every call, with cache rows past
  // the longest sequence (NaN like every row past a sequence's length).
  {
    DecodeCase& c = add("batch_m1", varlen_spec({40, 1, 95, 300, 333, 64, 129, 33}, 4, 2, D, D), tight, 1);
    c.stagger = {0, 5, 50, 3, 100, 17, 0, 250};
    c.extra_capacity = 37;
    c.extra_cmp_capacity = 5;
  }
  {
    DecodeCase& c = add("batch_m5_sepwin", varlen_spec({40, 5, 95, 300, 64, 129}, 6, 3, D, D), tight, 5);
    c.spec.separate_window = true;
    c.stagger = {0, 7, 50, 3, 100, 17};
    c.extra_capacity = 3;
    c.extra_cmp_capacity = 1;
    c.with_out_branch = false;
  }
  // Caller-supplied block indices (any order, -1 anywhere, some rows empty).
  add("given_token", padded_spec(1, 600, 4, 2, D, D), tight, 1).given_indices = true;
  add("given_chunk7", padded_spec(2, 300, 4, 2, D, D), tight, 7).given_indices = true;
  for (DecodeCase& c : cases) c.name += std::string("_") + nsa::dtype_name(dtype);
  return cases;
}

}  // namespace nsa_test
