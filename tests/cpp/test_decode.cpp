// Decode and chunked prefill on the CPU reference (DESIGN.md section 1): queries at the end of a KV
// cache give exactly what prefill gives at their positions (same selected blocks, outputs within
// float64 noise), whatever the chunking, the batch, the cache capacity (rows past a sequence's
// length hold NaN) and the window keys; tokens_read counts the keys each softmax reads; the cache
// params are validated.
#include <gtest/gtest.h>

#include <array>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "decode_util.h"
#include "nsa/nsa.h"
#include "test_util.h"

namespace nsa_test {
namespace {

using nsa::DType;

// Long enough for top-16 to choose among 64 blocks; shorter under AddressSanitizer, which still
// reaches the steady state of the paper config (t >= 960).
constexpr int64_t kLongSeqlen = kSanitizerBuild ? 1024 : 4096;

class Decode : public ::testing::TestWithParam<DecodeCase> {};

// Every call's outputs, lse and selected blocks equal the prefill's at the same positions; the
// tokens each call reads are the keys its queries' softmaxes see.
TEST_P(Decode, MatchesPrefill) {
  const DecodeCase& c = GetParam();
  const Problem problem = make_problem(c.spec);
  const std::vector<int32_t> given = given_indices_of(c, problem);
  const std::vector<DecodeCall> schedule = schedule_of(c, problem);
  const DecodeResult decoded =
      run_decode(problem, schedule, cpu_forward_runner, options_of(c, given), poison_check_of(c));
  ASSERT_TRUE(decoded.ok);
  RunOptions prefill_options;
  if (c.given_indices) prefill_options.given_indices = &given;
  const Outputs prefill = reference_forward(problem, prefill_options);
  // Exact indices; out, out_branch and lse within float64 noise (NaN fails).
  EXPECT_TRUE(outputs_near(problem, decoded.outputs, prefill, tolerance_for(c.spec.dtype)));
  EXPECT_TRUE(tokens_read_as_expected(problem, schedule, decoded));
}

INSTANTIATE_TEST_SUITE_P(Cases, Decode, ::testing::ValuesIn(decode_cases(DType::kFloat64, 16, kLongSeqlen)),
                         [](const ::testing::TestParamInfo<DecodeCase>& param_info) {
                           std::string name = param_info.param.name;
                           for (char& ch : name)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return name;
                         });

// Each sequence of a batch with different cache lengths decodes bit for bit as it does alone.
TEST(DecodeProperties, BatchEqualsEachSequenceAlone) {
  int64_t batches = 0;
  for (const DecodeCase& c : decode_cases(DType::kFloat64, 16, kLongSeqlen)) {
    if (c.stagger.empty()) continue;
    ++batches;
    const Problem problem = make_problem(c.spec);
    const DecodeResult batch = run_decode(problem, schedule_of(c, problem), cpu_forward_runner, options_of(c, {}));
    ASSERT_TRUE(batch.ok) << c.name;
    for (int64_t b = 0; b < problem.num_seqs(); ++b) {
      const Problem alone = extract_sequence(problem, b);
      const DecodeResult single = run_decode(alone, chunked_schedule(alone, c.chunk), cpu_forward_runner);
      ASSERT_TRUE(single.ok) << c.name << " sequence " << b;
      EXPECT_TRUE(outputs_identical(alone, slice_sequence(problem, batch.outputs, b), single.outputs))
          << c.name << " sequence " << b << " (length " << problem.seqlen(b) << ")";
    }
  }
  EXPECT_GE(batches, 2);
}

// Strided caches (rows a slice of wider rows, heads outermost, padding rows) and 32- and 16-bit
// inputs: still the prefill's results.
TEST(DecodeProperties, LayoutsAndDtypes) {
  Layout sliced;
  sliced.dim_pad = 5;
  sliced.row_pad = 3;
  Layout heads_outer;
  heads_outer.heads_outer = true;
  heads_outer.dim_pad = 1;
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    ProblemSpec spec = padded_spec(2, 150, 4, 2, 16, 8);
    spec.config = make_config(32, 16, 64, 3, 1, 1, 40);
    spec.dtype = dtype;
    spec.separate_window = true;
    spec.seed = 90;
    const Problem problem = make_problem(spec);
    const Outputs prefill = reference_forward(problem);
    for (const auto& [in, out] : {std::pair{sliced, heads_outer}, std::pair{heads_outer, sliced}}) {
      DecodeOptions options;
      options.input_layout = in;
      options.output_layout = out;
      options.extra_capacity = 10;
      const DecodeResult decoded = run_decode(problem, chunked_schedule(problem, 5), cpu_forward_runner, options);
      ASSERT_TRUE(decoded.ok);
      EXPECT_TRUE(outputs_near(problem, decoded.outputs, prefill, tolerance_for(dtype)))
          << nsa::dtype_name(dtype) << " in " << in.describe() << " out " << out.describe();
    }
  }
}

// ------------------------------------------------------------------------------------------------
// tokens_read.

// Decode with the paper config: per kv head, the visible compressed tokens, the keys <= t of the n
// selected blocks (all full but the block of t) and w window keys; with t+1 a multiple of l' the
// block of t is full too and the count is the paper's (L-l)/d + 1 + n*l' + w for the L = t+1
// tokens up to t (the paper counts tokens 1 .. L; with 0-indexed positions, (t-l)/d + 1 would
// miss the compressed token that ends at t, which exists exactly when l' | t+1 because d | l').
TEST(DecodeTokensRead, PaperFormulaInSteadyState) {
  ProblemSpec spec = padded_spec(1, kSanitizerBuild ? 1100 : 1600, 4, 2, 16, 16);
  spec.seed = 91;
  const Problem problem = make_problem(spec);
  const nsa::Config& c = spec.config;
  const std::vector<DecodeCall> schedule = chunked_schedule(problem, 1);
  const DecodeResult decoded = run_decode(problem, schedule, cpu_forward_runner);
  ASSERT_TRUE(decoded.ok);
  EXPECT_TRUE(tokens_read_as_expected(problem, schedule, decoded));
  const int64_t hkv = spec.hkv;
  int64_t steady = 0, full_local_block = 0;
  for (size_t call = 0; call < schedule.size(); ++call) {
    const int64_t t = schedule[call].lens[0] - 1;
    if (t / c.sel_block + 1 < c.num_selected || t + 1 < c.window) continue;  // not the steady state
    ++steady;
    const std::array<int64_t, 3>& got = decoded.tokens_read[call];
    const int64_t cmp = (t + 1 - c.cmp_block) / c.cmp_stride + 1;
    const int64_t slc = c.num_selected * c.sel_block - (c.sel_block - 1 - t % c.sel_block);
    EXPECT_EQ(got, (std::array<int64_t, 3>{hkv * cmp, hkv * slc, hkv * c.window})) << "t " << t;
    if ((t + 1) % c.sel_block == 0) {
      ++full_local_block;
      EXPECT_EQ(got[0] + got[1] + got[2],
                hkv * ((t + 1 - c.cmp_block) / c.cmp_stride + 1 + c.num_selected * c.sel_block + c.window))
          << "t " << t;
    }
  }
  EXPECT_GT(steady, 100);
  EXPECT_GE(full_local_block, 2);
}

// Prefill counts every query (padded and varlen), adds to what tokens_read holds, and reads in
// total what token-by-token and chunked decode read.
TEST(DecodeTokensRead, PrefillCountsEveryQuery) {
  const nsa::Config config = make_config(32, 16, 64, 4, 1, 2, 50);
  for (bool varlen : {false, true}) {
    ProblemSpec spec = varlen ? varlen_spec({300, 1, 129, 70}, 6, 3, 16, 16) : padded_spec(2, 300, 6, 3, 16, 16);
    spec.config = config;
    spec.separate_window = true;
    spec.seed = 92;
    const Problem problem = make_problem(spec);
    Buffers buffers = make_buffers(problem);
    buffers.tokens_read.assign(static_cast<size_t>(problem.num_seqs() * 3), 0);
    ASSERT_TRUE(run_forward(buffers).ok());
    const Outputs prefill = buffers.read_forward();
    const std::vector<int64_t> once = buffers.tokens_read;
    for (int64_t b = 0; b < problem.num_seqs(); ++b) {
      std::array<int64_t, 3> want{};
      for (int64_t t = 0; t < problem.seqlen(b); ++t) {
        const std::array<int64_t, 3> keys = expected_keys_read(problem, prefill.indices, b, t);
        for (int br = 0; br < 3; ++br) want[br] += keys[br];
      }
      EXPECT_EQ((std::array<int64_t, 3>{once[b * 3], once[b * 3 + 1], once[b * 3 + 2]}), want) << "sequence " << b;
      EXPECT_GT(want[nsa::kBranchSlc], 0);
    }
    ASSERT_TRUE(run_forward(buffers).ok());
    for (size_t i = 0; i < once.size(); ++i) EXPECT_EQ(buffers.tokens_read[i], 2 * once[i]) << "entry " << i;
    if (varlen) continue;
    for (int64_t chunk : {1, 7}) {
      const DecodeResult decoded = run_decode(problem, chunked_schedule(problem, chunk), cpu_forward_runner);
      ASSERT_TRUE(decoded.ok);
      std::vector<int64_t> total(once.size(), 0);
      for (size_t e = 0; e < decoded.tokens_read.size(); ++e)
        for (int br = 0; br < 3; ++br) total[e % problem.num_seqs() * 3 + br] += decoded.tokens_read[e][br];
      EXPECT_EQ(total, once) << "chunk " << chunk;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Validation of the cache params.

// A valid float32 decode call: B = 2 sequences holding 40 and 70 tokens, m = 3 queries each,
// capacity 70, 7 compressed rows (num_cmp_tokens(70) with l = 16, d = 8), outputs poisoned.
struct CacheCall {
  static constexpr int64_t kM = 3, kCapacity = 70, kCmpCapacity = 7;
  Problem problem;
  Buffers buffers;
  nsa::ForwardParams params;

  static ProblemSpec spec() {
    ProblemSpec spec = padded_spec(2, kCapacity, 4, 2, 8, 6);
    spec.config = make_config(16, 8, 32, 3, 1, 1, 20);
    spec.dtype = DType::kFloat32;
    spec.seed = 93;
    return spec;
  }

  CacheCall() : problem(make_problem(spec())), buffers(make_cache_buffers(problem, kM, kCapacity, kCmpCapacity)) {
    buffers.cache_seqlens = {40, 70};
    buffers.poison_forward();
    params = buffers.forward_params();
  }
};

bool all_nan(const TypedBuffer& values) {
  for (int64_t e = 0; e < values.numel(); ++e)
    if (!std::isnan(values.get(e))) return false;
  return true;
}

// Applies `mutate` to a valid call and expects kInvalidArgument with `expected` in the message,
// and the outputs untouched.
void expect_cache_error(const std::function<void(CacheCall&)>& mutate, const std::string& expected) {
  CacheCall call;
  const nsa::Status valid = nsa::validate(call.params);
  ASSERT_TRUE(valid.ok()) << valid.message;
  mutate(call);
  const nsa::Status status = nsa::cpu::forward(call.params);
  EXPECT_EQ(status.code, nsa::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message.find(expected), std::string::npos)
      << "message \"" << status.message << "\" lacks \"" << expected << "\"";
  EXPECT_TRUE(all_nan(call.buffers.out.buf));
  EXPECT_TRUE(all_nan(call.buffers.lse));
}

TEST(DecodeValidation, CacheParams) {
  expect_cache_error(
      [](CacheCall& c) {
        static const int32_t offsets[] = {0, 3, 6};
        static const int32_t cmp_offsets[] = {0, 0, 0};
        c.params.varlen = {offsets, cmp_offsets, 6, 0};
      },
      "cache.seqlens (decode / chunked prefill) needs the padded layout: varlen.cu_seqlens");
  expect_cache_error([](CacheCall& c) { c.buffers.cache_seqlens[1] = 2; },
                     "cache.seqlens[1] must be >= shape.seqlen (m, the queries per sequence) = 3, got 2");
  expect_cache_error([](CacheCall& c) { c.buffers.cache_seqlens[0] = 71; },
                     "cache.seqlens[0] must be <= cache.capacity = 70, got 71");
  // num_cmp_tokens(40) = (40 - 16) / 8 + 1 = 4.
  expect_cache_error([](CacheCall& c) { c.params.cache.cmp_capacity = 3; },
                     "cache.cmp_capacity must hold the 4 compressed tokens of cache.seqlens[0] = 40, got 3");
  expect_cache_error([](CacheCall& c) { c.params.cache.capacity = 2; },
                     "cache.capacity must be >= shape.seqlen (m, the queries per sequence) = 3, got 2");
  expect_cache_error([](CacheCall& c) { c.params.cache.cmp_capacity = -1; },
                     "cache.cmp_capacity must be >= num_cmp_tokens(shape.seqlen) = 0");
  expect_cache_error([](CacheCall& c) { c.params.cache.seqlens = nullptr; },
                     "cache.capacity or cache.cmp_capacity is set but cache.seqlens is null");
  expect_cache_error([](CacheCall& c) { c.params.k_cmp.data = nullptr; }, "k_cmp must not be null");
  expect_cache_error([](CacheCall& c) { c.params.v.seq_stride = -1; }, "v: strides must be >= 0");
}

// The host cannot check a device-resident seqlens: device validation accepts what host validation
// rejects.
TEST(DecodeValidation, DeviceSpaceDoesNotReadSeqlens) {
  CacheCall call;
  call.buffers.cache_seqlens[0] = 1000;
  EXPECT_FALSE(nsa::validate(call.params, nsa::MemorySpace::kHost).ok());
  const nsa::Status device = nsa::validate(call.params, nsa::MemorySpace::kDevice);
  EXPECT_TRUE(device.ok()) << device.message;
}

// Given block indices are checked against each query's position, not its row: query 0 of
// sequence 0 sits at t = 40 - 3 = 37, where blocks 0 and 1 are eligible (l' = 32).
TEST(DecodeValidation, GivenBlockIndicesByPosition) {
  const int64_t n = 3, hkv = 2;
  auto given = [&](int32_t second_block) {
    return [second_block](CacheCall& c) {
      std::fill(c.buffers.block_indices.begin(), c.buffers.block_indices.end(), -1);
      for (size_t e = 0; e < c.buffers.block_indices.size(); e += n) c.buffers.block_indices[e] = 0;
      c.buffers.block_indices[1] = second_block;  // row (b 0, query 0), kv head 0, slot 1
      c.params.block_indices_given = true;
    };
  };
  {
    CacheCall call;
    given(1)(call);
    const nsa::Status status = nsa::cpu::forward(call.params);
    EXPECT_TRUE(status.ok()) << status.message;
  }
  expect_cache_error(given(2), "block_indices[sequence 0, t=37, kv head 0, slot 1] = 2 is out of range");
  // Sequence 1, query 0 (t = 67, blocks 0 .. 2 eligible): block 3 is out of range.
  expect_cache_error(
      [&](CacheCall& c) {
        given(1)(c);
        c.buffers.block_indices[(CacheCall::kM * hkv) * n + 1] = 3;
      },
      "block_indices[sequence 1, t=67, kv head 0, slot 1] = 3 is out of range");
}

}  // namespace
}  // namespace nsa_test
