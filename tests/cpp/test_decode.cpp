// Decode and chunked prefill on the CPU reference (DESIGN.md section 1): queries at the end of a KV
// cache give exactly what prefill gives at their positions (same selected blocks, outputs within
// float64 noise), whatever the chunking, the batch, the cache capacity (rows past a sequence's
// length hold NaN) and the window keys; tokens_read counts the keys each softmax reads. (The
// validation of the cache params: test_validation.cpp.)
#include <gtest/gtest.h>

#include <array>
#include <cctype>
#include <cstdint>
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
  const CaseRun run = run_case(c, problem, cpu_forward_runner);
  const DecodeResult& decoded = run.result;
  ASSERT_TRUE(decoded.ok);
  RunOptions prefill_options;
  if (c.given_indices) prefill_options.given_indices = &run.given;
  const Outputs prefill = reference_forward(problem, prefill_options);
  // Exact indices; out, out_branch and lse within float64 noise (NaN fails).
  EXPECT_TRUE(outputs_near(problem, decoded.outputs, prefill, tolerance_for(c.spec.dtype)));
  EXPECT_TRUE(tokens_read_as_expected(problem, run.schedule, decoded));
}

INSTANTIATE_TEST_SUITE_P(Cases, Decode, ::testing::ValuesIn(decode_cases(DType::kFloat64, 16, kLongSeqlen)),
                         case_name<DecodeCase>);

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

}  // namespace
}  // namespace nsa_test
