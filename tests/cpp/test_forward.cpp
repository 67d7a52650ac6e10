// The CPU reference forward (nsa::cpu::forward) against the brute-force oracle, and the
// properties that need no oracle: varlen == padded per sequence, layout and thread-count
// independence, caller-supplied indices, causality.
#include <gtest/gtest.h>

#include <cctype>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <ostream>
#include <string>
#include <vector>

#include "nsa/nsa.h"
#include "test_util.h"

namespace nsa_test {
namespace {

using nsa::DType;

// Paper defaults except a small n and window, so that top-n actually chooses and the window
// does not cover everything at moderate T.
nsa::Config tight_config() { return make_config(32, 16, 64, 3, 1, 1, 48); }

// ------------------------------------------------------------------------------------------------
// Reference vs oracle over a table of cases.

struct Case {
  std::string name;
  ProblemSpec spec;
  Layout input_layout, output_layout;
};

// gtest prints parameters on failure: the name, not the bytes.
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

Case make_case(std::string name, ProblemSpec spec, nsa::Config config, DType dtype = DType::kFloat64,
               bool separate_window = false, uint64_t seed = 1) {
  spec.config = config;
  spec.dtype = dtype;
  spec.separate_window = separate_window;
  spec.seed = seed;
  Case c;
  c.name = std::move(name) + "_" + nsa::dtype_name(dtype) + (separate_window ? "_sepwin" : "");
  c.spec = std::move(spec);
  return c;
}

std::vector<Case> oracle_cases() {
  std::vector<Case> cases;
  const nsa::Config paper;  // defaults: n = 16 exceeds the eligible blocks for T <= 1024
  uint64_t seed = 100;
  // Sequence lengths around the block sizes; T < l, w > T, fewer eligible blocks than n.
  for (int64_t T : {1, 2, 31, 32, 33, 63, 64, 65, 200, 1000}) {
    const int64_t B = (T == 65 || T == 200) ? 2 : 1;
    cases.push_back(make_case("T" + std::to_string(T) + "_paper", padded_spec(B, T, 4, 2, 32, 32), paper,
                              DType::kFloat64, false, ++seed));
    cases.push_back(make_case("T" + std::to_string(T) + "_tight", padded_spec(B, T, 4, 2, 32, 32), tight_config(),
                              DType::kFloat64, T % 2 == 1, ++seed));
  }
  // Group sizes.
  const std::pair<int64_t, int64_t> heads[] = {{3, 3}, {4, 2}, {6, 2}, {12, 2}, {16, 1}};
  for (const auto& [hq, hkv] : heads) {
    cases.push_back(make_case("G" + std::to_string(hq / hkv) + "_Hq" + std::to_string(hq),
                              padded_spec(1, 150, hq, hkv, 16, 16), make_config(16, 8, 32, 3, 1, 1, 40),
                              DType::kFloat64, hq == 6, ++seed));
  }
  // Dk != Dv, window k/v shared or separate.
  for (bool sep : {false, true}) {
    cases.push_back(make_case("Dk48_Dv32", padded_spec(2, 130, 4, 2, 48, 32), tight_config(), DType::kFloat64, sep,
                              ++seed));
    cases.push_back(make_case("Dk16_Dv40", padded_spec(1, 130, 6, 3, 16, 40), tight_config(), DType::kFloat64, sep,
                              ++seed));
  }
  // Other (l, d, l') and forced-block settings.
  cases.push_back(make_case("l16d8s32_n5_init0_local3", padded_spec(1, 300, 6, 2, 24, 16),
                            make_config(16, 8, 32, 5, 0, 3, 100), DType::kFloat64, false, ++seed));
  cases.push_back(make_case("l16d8s32_paper_n_T1000", padded_spec(1, 1000, 2, 1, 16, 16),
                            make_config(16, 8, 32, 16, 1, 2, 512), DType::kFloat64, true, ++seed));
  cases.push_back(make_case("l64d16s64_n3_init2_local0", padded_spec(1, 300, 4, 2, 16, 24),
                            make_config(64, 16, 64, 3, 2, 0, 64), DType::kFloat64, false, ++seed));
  cases.push_back(make_case("l32d32s64_n4_init2_local1_w1", padded_spec(1, 300, 4, 1, 16, 16),
                            make_config(32, 32, 64, 4, 2, 1, 1), DType::kFloat64, true, ++seed));
  // l > l': no compressed token is visible for t < 63 while two blocks are eligible -> all scores
  // tie at 0 and the lower block wins.
  cases.push_back(make_case("l64d16s32_n1_init0_local0", padded_spec(1, 200, 4, 2, 16, 16),
                            make_config(64, 16, 32, 1, 0, 0, 7), DType::kFloat64, false, ++seed));
  cases.push_back(make_case("n_eq_init_plus_local", padded_spec(1, 400, 4, 2, 16, 16),
                            make_config(32, 16, 64, 3, 1, 2, 33), DType::kFloat64, false, ++seed));
  cases.push_back(make_case("init3_local2_n6_scale0.1", padded_spec(1, 700, 2, 1, 16, 16),
                            make_config(32, 16, 64, 6, 3, 2, 100, 0.1), DType::kFloat64, false, ++seed));
  cases.push_back(make_case("init0_local0_n2", padded_spec(1, 400, 4, 2, 16, 16), make_config(32, 16, 64, 2, 0, 0, 20),
                            DType::kFloat64, false, ++seed));
  // Packed varlen with mixed lengths (0, 1, < l, block edges).
  const std::vector<int64_t> lengths = {1, 20, 64, 65, 200, 33, 31, 2};
  cases.push_back(make_case("varlen_tight", varlen_spec(lengths, 6, 2, 32, 24), tight_config(), DType::kFloat64, true,
                            ++seed));
  cases.push_back(make_case("varlen_paper", varlen_spec(lengths, 4, 4, 16, 16), paper, DType::kFloat64, false, ++seed));
  cases.push_back(make_case("varlen_l16d8s32", varlen_spec({100, 0, 1, 257, 15, 16, 17, 0}, 4, 2, 16, 16),
                            make_config(16, 8, 32, 4, 1, 2, 30), DType::kFloat64, false, ++seed));
  cases.push_back(make_case("varlen_all_short", varlen_spec({1, 5, 31}, 2, 1, 8, 8), paper, DType::kFloat64, false,
                            ++seed));
  // float32 and bfloat16 inputs.
  cases.push_back(make_case("T200_paper", padded_spec(2, 200, 4, 2, 32, 32), paper, DType::kFloat32, false, ++seed));
  cases.push_back(make_case("T333_tight_G3", padded_spec(1, 333, 6, 2, 32, 16), tight_config(), DType::kFloat32, true,
                            ++seed));
  cases.push_back(make_case("varlen_tight", varlen_spec(lengths, 4, 2, 24, 32), tight_config(), DType::kFloat32, false,
                            ++seed));
  cases.push_back(make_case("T1000_tight", padded_spec(1, 1000, 2, 1, 32, 32), tight_config(), DType::kFloat32,
                            false, ++seed));
  cases.push_back(make_case("T150_tight", padded_spec(1, 150, 4, 2, 32, 32), tight_config(), DType::kBFloat16, true,
                            ++seed));
  // Strided inputs and outputs.
  Layout dim_pad;
  dim_pad.dim_pad = 8;
  Layout heads_outer;
  heads_outer.heads_outer = true;
  Layout mixed;
  mixed.heads_outer = true;
  mixed.dim_pad = 3;
  mixed.row_pad = 5;
  Layout row_pad;
  row_pad.row_pad = 7;
  const std::pair<Layout, Layout> layouts[] = {{dim_pad, Layout{}}, {heads_outer, dim_pad}, {mixed, mixed},
                                               {row_pad, heads_outer}};
  for (const auto& [in_layout, out_layout] : layouts) {
    for (bool varlen : {false, true}) {
      Case c = make_case(std::string(varlen ? "varlen" : "padded") + "_in_" + in_layout.describe() + "_out_" +
                             out_layout.describe(),
                         varlen ? varlen_spec({97, 1, 40, 130}, 4, 2, 16, 8) : padded_spec(2, 97, 4, 2, 16, 8),
                         tight_config(), varlen ? DType::kFloat32 : DType::kFloat64, true, ++seed);
      c.input_layout = in_layout;
      c.output_layout = out_layout;
      cases.push_back(c);
    }
  }
  return cases;
}

class ForwardVsOracle : public ::testing::TestWithParam<Case> {};

TEST_P(ForwardVsOracle, Matches) {
  const Case& c = GetParam();
  const Problem problem = make_problem(c.spec);
  RunOptions options;
  options.input_layout = c.input_layout;
  options.output_layout = c.output_layout;
  const Outputs got = reference_forward(problem, options);
  const Outputs want = oracle_forward(problem);
  EXPECT_TRUE(outputs_well_formed(problem, got));
  const auto near = outputs_near(problem, got, want, tolerance_for(c.spec.dtype));
  EXPECT_TRUE(near);
  if (near) std::cout << "[ info ] " << c.name << ": " << near.message() << "\n";
}

INSTANTIATE_TEST_SUITE_P(Cases, ForwardVsOracle, ::testing::ValuesIn(oracle_cases()),
                         [](const ::testing::TestParamInfo<Case>& param_info) {
                           std::string name = param_info.param.name;
                           for (char& ch : name)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return name + "_" + std::to_string(param_info.index);
                         });

// The top-n path must actually be exercised by the table above: somewhere more blocks are eligible
// than n, forced blocks are not all there is, and the choice is not just "the latest blocks".
TEST(ForwardOracleCoverage, TopNIsExercised) {
  const Problem problem = make_problem([] {
    ProblemSpec s = padded_spec(1, 1000, 2, 1, 32, 32);
    s.config = tight_config();
    return s;
  }());
  const Outputs want = oracle_forward(problem);
  int64_t far_choices = 0;
  for (int64_t t = 0; t < problem.rows(); ++t) {
    const int64_t current = t / problem.spec.config.sel_block;
    for (int64_t x = 0; x < problem.spec.config.num_selected; ++x) {
      const int32_t j = want.indices[t * problem.spec.config.num_selected + x];
      if (j >= 1 && j < current - 1) ++far_choices;  // neither forced nor adjacent
    }
  }
  EXPECT_GT(far_choices, 100);
}

// ------------------------------------------------------------------------------------------------
// Properties without the oracle.

ProblemSpec with(ProblemSpec s, nsa::Config config, DType dtype, bool separate_window, uint64_t seed) {
  s.config = config;
  s.dtype = dtype;
  s.separate_window = separate_window;
  s.seed = seed;
  return s;
}

// Each sequence of a varlen batch gives bit for bit what it gives alone in a padded batch of one.
TEST(ForwardProperties, VarlenEqualsEachSequenceAlone) {
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    for (const nsa::Config& config : {tight_config(), nsa::Config{}, make_config(16, 8, 32, 4, 0, 2, 25)}) {
      const Problem problem = make_problem(with(varlen_spec({1, 20, 64, 65, 200, 33, 31, 2, 129}, 6, 2, 16, 24),
                                                config, dtype, true, 7));
      const Outputs batch = reference_forward(problem);
      ASSERT_FALSE(batch.out.empty());
      for (int64_t b = 0; b < problem.num_seqs(); ++b) {
        const Problem alone = extract_sequence(problem, b);
        EXPECT_TRUE(outputs_identical(alone, slice_sequence(problem, batch, b), reference_forward(alone)))
            << "sequence " << b << " (length " << problem.seqlen(b) << "), " << nsa::dtype_name(dtype);
      }
    }
  }
}

// Same for the sequences of a padded batch.
TEST(ForwardProperties, PaddedBatchEqualsEachSequenceAlone) {
  const Problem problem = make_problem(with(padded_spec(3, 150, 4, 2, 16, 16), tight_config(), DType::kFloat64,
                                            false, 8));
  const Outputs batch = reference_forward(problem);
  ASSERT_FALSE(batch.out.empty());
  for (int64_t b = 0; b < problem.num_seqs(); ++b) {
    const Problem alone = extract_sequence(problem, b);
    EXPECT_TRUE(outputs_identical(alone, slice_sequence(problem, batch, b), reference_forward(alone)))
        << "sequence " << b;
  }
}

TEST(ForwardProperties, ThreadCountDoesNotChangeResults) {
  const Problem problem = make_problem(with(varlen_spec({300, 7, 129}, 6, 3, 16, 16), tight_config(),
                                            DType::kFloat64, true, 9));
  RunOptions one;
  one.num_threads = 1;
  const Outputs base = reference_forward(problem, one);
  for (int threads : {2, 3, 8}) {
    RunOptions many;
    many.num_threads = threads;
    EXPECT_TRUE(outputs_identical(problem, reference_forward(problem, many), base)) << threads << " threads";
  }
}

// Strided inputs and outputs give bit for bit what contiguous ones give.
TEST(ForwardProperties, LayoutDoesNotChangeResults) {
  Layout a;
  a.dim_pad = 5;
  a.row_pad = 3;
  Layout b;
  b.heads_outer = true;
  Layout c = b;
  c.dim_pad = 1;
  c.row_pad = 2;
  for (bool varlen : {false, true}) {
    for (DType dtype : {DType::kFloat64, DType::kFloat32, DType::kBFloat16}) {
      const Problem problem = make_problem(
          with(varlen ? varlen_spec({70, 1, 140}, 4, 2, 16, 8) : padded_spec(2, 140, 4, 2, 16, 8), tight_config(),
               dtype, true, 10));
      const Outputs base = reference_forward(problem);
      for (const auto& [in, out] : {std::pair{a, b}, std::pair{b, c}, std::pair{c, a}, std::pair{Layout{}, c}}) {
        RunOptions options;
        options.input_layout = in;
        options.output_layout = out;
        EXPECT_TRUE(outputs_identical(problem, reference_forward(problem, options), base))
            << (varlen ? "varlen " : "padded ") << nsa::dtype_name(dtype) << " in " << in.describe() << " out "
            << out.describe();
      }
    }
  }
}

// out_branch is optional; without it out and lse do not change.
TEST(ForwardProperties, OutBranchIsOptional) {
  const Problem problem = make_problem(with(padded_spec(1, 200, 4, 2, 16, 16), tight_config(), DType::kFloat32,
                                            false, 11));
  RunOptions no_branch;
  no_branch.with_out_branch = false;
  const Outputs without = reference_forward(problem, no_branch);
  EXPECT_TRUE(without.out_branch.empty());
  EXPECT_TRUE(outputs_identical(problem, without, reference_forward(problem)));
  EXPECT_TRUE(outputs_near(problem, without, oracle_forward(problem), tolerance_for(DType::kFloat32)));
}

// ------------------------------------------------------------------------------------------------
// Caller-supplied block indices.

std::vector<ProblemSpec> index_specs() {
  return {with(padded_spec(2, 260, 4, 2, 16, 16), tight_config(), DType::kFloat64, false, 20),
          with(varlen_spec({1, 100, 31, 300}, 6, 2, 16, 8), make_config(16, 8, 32, 5, 1, 1, 20), DType::kFloat64,
               true, 21),
          with(padded_spec(1, 300, 3, 1, 16, 16), nsa::Config{}, DType::kFloat32, false, 22)};
}

// Feeding the forward its own selection reproduces it bit for bit, and the given buffer is only read.
TEST(ForwardGivenIndices, OwnIndicesReproduceOutputs) {
  for (const ProblemSpec& spec : index_specs()) {
    const Problem problem = make_problem(spec);
    const Outputs scored = reference_forward(problem);
    ASSERT_FALSE(scored.indices.empty());
    RunOptions given;
    given.given_indices = &scored.indices;
    const Outputs replay = reference_forward(problem, given);
    EXPECT_TRUE(outputs_identical(problem, replay, scored));  // indices included: left untouched
  }
}

// Any valid index sets (any order, -1 anywhere) give what the oracle gives with those sets.
TEST(ForwardGivenIndices, RandomIndicesMatchOracle) {
  uint64_t seed = 30;
  for (const ProblemSpec& spec : index_specs()) {
    const Problem problem = make_problem(spec);
    const std::vector<int32_t> indices = random_block_indices(problem, ++seed);
    RunOptions given;
    given.given_indices = &indices;
    const Outputs got = reference_forward(problem, given);
    const Outputs want = oracle_forward(problem, &indices);
    // The backend reads the given indices (unsorted) and must leave them as they are; the oracle
    // reports the same sets sorted.
    EXPECT_EQ(got.indices, indices);
    Outputs got_sorted = got;
    got_sorted.indices = want.indices;  // the oracle reports the sets sorted
    EXPECT_TRUE(outputs_near(problem, got_sorted, want, tolerance_for(spec.dtype)));
    // And the sets really differ from the scored selection somewhere (the test has teeth).
    EXPECT_NE(want.indices, oracle_forward(problem).indices);
  }
}

// An empty selection (all -1) is valid: the slc branch sees no key, lse -inf, output 0.
TEST(ForwardGivenIndices, EmptySelection) {
  const Problem problem = make_problem(with(padded_spec(1, 100, 4, 2, 16, 16), tight_config(), DType::kFloat64,
                                            false, 40));
  const std::vector<int32_t> none(static_cast<size_t>(problem.rows() * 2 * 3), -1);
  RunOptions given;
  given.given_indices = &none;
  const Outputs got = reference_forward(problem, given);
  const Outputs want = oracle_forward(problem, &none);
  EXPECT_TRUE(outputs_well_formed(problem, got));
  EXPECT_TRUE(outputs_near(problem, got, want, tolerance_for(DType::kFloat64)));
  for (size_t i = 1; i < got.lse.size(); i += 3) EXPECT_EQ(got.lse[i], -INFINITY) << "lse entry " << i;
}

// ------------------------------------------------------------------------------------------------
// Causality: inputs a query at t must not see cannot change anything at positions <= t.

TEST(ForwardCausality, FutureInputsDoNotLeak) {
  const std::vector<ProblemSpec> specs = {
      with(padded_spec(2, 200, 4, 2, 16, 16), tight_config(), DType::kFloat64, true, 50),
      with(varlen_spec({150, 1, 200, 40}, 6, 3, 16, 8), make_config(16, 8, 32, 4, 1, 1, 24), DType::kFloat64, false,
           51),
      with(padded_spec(1, 200, 2, 1, 16, 16), make_config(64, 16, 32, 2, 0, 1, 40), DType::kFloat32, true, 52),
  };
  for (const ProblemSpec& spec : specs) {
    const Problem base = make_problem(spec);
    const Outputs before = reference_forward(base);
    ASSERT_FALSE(before.out.empty());
    for (int64_t t0 : {0, 14, 30, 31, 46, 47, 63, 64, 100, 127, 148}) {
      Problem changed = base;
      perturb_after(changed, t0, 1000 + static_cast<uint64_t>(t0));
      const Outputs after = reference_forward(changed);
      EXPECT_TRUE(outputs_identical(base, after, before, [t0](int64_t, int64_t t) { return t <= t0; }))
          << "perturbed after t0=" << t0;
      // The perturbation reached every later position (else the test proves nothing).
      for (int64_t r = 0; r < base.rows(); ++r) {
        const auto [b, t] = base.locate(r);
        if (t <= t0) continue;
        bool differs = false;
        for (int64_t e = 0; e < spec.hq * spec.dv; ++e)
          differs = differs || after.out[r * spec.hq * spec.dv + e] != before.out[r * spec.hq * spec.dv + e];
        EXPECT_TRUE(differs) << "output at seq " << b << " t " << t << " did not change, t0=" << t0;
      }
    }
  }
}

}  // namespace
}  // namespace nsa_test
