// The index arithmetic of the contract (include/nsa/semantics.h and the oracle's own counting)
// against hand-written tables, and the top-n rules (ties, forced blocks, few eligible blocks) on
// constructed inputs, checked on both the reference and the oracle.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "nsa/nsa.h"
#include "oracle.h"
#include "test_util.h"

namespace nsa_test {
namespace {

using nsa::DType;

// ------------------------------------------------------------------------------------------------
// Eq. 9 weights: |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d, written out by hand for blocks j = 0..3
// and compressed tokens i = 0..15.

struct WeightTable {
  int64_t l, d, l_sel;
  int64_t w[4][16];
  int64_t first[4], last[4];  // the nonzero range of row j (first clipped at 0)
};

const WeightTable kTables[] = {
    // (32, 16, 64): 1,2,2,2,1 over i = 4j-1 .. 4j+3 (token -1 does not exist for j = 0).
    {32, 16, 64,
     {{2, 2, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
      {0, 0, 0, 1, 2, 2, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0},
      {0, 0, 0, 0, 0, 0, 0, 1, 2, 2, 2, 1, 0, 0, 0, 0},
      {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 2, 2, 1}},
     {0, 3, 7, 11},
     {3, 7, 11, 15}},
    // (16, 8, 32): the same pattern at half the size.
    {16, 8, 32,
     {{2, 2, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
      {0, 0, 0, 1, 2, 2, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0},
      {0, 0, 0, 0, 0, 0, 0, 1, 2, 2, 2, 1, 0, 0, 0, 0},
      {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 2, 2, 1}},
     {0, 3, 7, 11},
     {3, 7, 11, 15}},
    // (64, 16, 64): 1,2,3,4,3,2,1 over i = 4j-3 .. 4j+3.
    {64, 16, 64,
     {{4, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
      {0, 1, 2, 3, 4, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0},
      {0, 0, 0, 0, 0, 1, 2, 3, 4, 3, 2, 1, 0, 0, 0, 0},
      {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 3, 2, 1}},
     {0, 1, 5, 9},
     {3, 7, 11, 15}},
    // (32, 32, 64): 1,1 over i = 2j .. 2j+1.
    {32, 32, 64,
     {{1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
      {0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
      {0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
      {0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0}},
     {0, 2, 4, 6},
     {1, 3, 5, 7}},
    // (64, 16, 32), l > l': 1,2,2,2,1 over i = 2j-3 .. 2j+1.
    {64, 16, 32,
     {{2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
      {2, 2, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
      {0, 1, 2, 2, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
      {0, 0, 0, 1, 2, 2, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0}},
     {0, 0, 1, 3},
     {1, 3, 5, 7}},
};

std::string table_name(const WeightTable& t) {
  return "(l, d, l') = (" + std::to_string(t.l) + ", " + std::to_string(t.d) + ", " + std::to_string(t.l_sel) + ")";
}

TEST(Semantics, OverlapWeightMatchesHandTables) {
  for (const WeightTable& tab : kTables) {
    nsa_oracle::Config oc;
    oc.l = tab.l;
    oc.d = tab.d;
    oc.l_sel = tab.l_sel;
    for (int64_t j = 0; j < 4; ++j) {
      for (int64_t i = 0; i < 16; ++i) {
        EXPECT_EQ(nsa::overlap_weight(i, j, tab.l, tab.d, tab.l_sel), tab.w[j][i])
            << table_name(tab) << " i=" << i << " j=" << j;
        EXPECT_EQ(nsa_oracle::overlap_weight(oc, i, j), static_cast<double>(tab.w[j][i]))
            << "oracle " << table_name(tab) << " i=" << i << " j=" << j;
      }
      // Beyond the table nothing overlaps blocks 0..3.
      for (int64_t i = 16; i < 40; ++i) EXPECT_EQ(nsa::overlap_weight(i, j, tab.l, tab.d, tab.l_sel), 0);
    }
    // A raw token is covered by l/d compressed tokens, so an interior block's weights sum to
    // l' * (l/d) / d; the hand tables must agree with that too.
    int64_t sum = 0;
    for (int64_t i = 0; i < 16; ++i) sum += tab.w[3][i];
    EXPECT_EQ(sum, tab.l_sel * (tab.l / tab.d) / tab.d) << table_name(tab);
  }
}

TEST(Semantics, FirstLastCmpInBlockBoundTheNonzeroRange) {
  for (const WeightTable& tab : kTables) {
    for (int64_t j = 0; j < 4; ++j) {
      EXPECT_EQ(nsa::first_cmp_in_block(j, tab.l, tab.d, tab.l_sel), tab.first[j]) << table_name(tab) << " j=" << j;
      EXPECT_EQ(nsa::last_cmp_in_block(j, tab.d, tab.l_sel), tab.last[j]) << table_name(tab) << " j=" << j;
      for (int64_t i = 0; i < 16; ++i) {
        const bool inside = i >= tab.first[j] && i <= tab.last[j];
        EXPECT_EQ(tab.w[j][i] != 0, inside) << "hand table " << table_name(tab) << " i=" << i << " j=" << j;
      }
    }
    // Further blocks, against the oracle's token-by-token count: first/last are exactly the
    // smallest and largest i with a nonzero overlap.
    nsa_oracle::Config oc;
    oc.l = tab.l;
    oc.d = tab.d;
    oc.l_sel = tab.l_sel;
    for (int64_t j = 0; j < 40; ++j) {
      int64_t lo = -1, hi = -1;
      for (int64_t i = 0; i < 400; ++i) {
        if (nsa_oracle::overlap_weight(oc, i, j) == 0.0) continue;
        if (lo < 0) lo = i;
        hi = i;
      }
      EXPECT_EQ(nsa::first_cmp_in_block(j, tab.l, tab.d, tab.l_sel), lo) << table_name(tab) << " j=" << j;
      EXPECT_EQ(nsa::last_cmp_in_block(j, tab.d, tab.l_sel), hi) << table_name(tab) << " j=" << j;
    }
  }
}

TEST(Semantics, CountingHelpers) {
  // num_cmp_tokens(T, l, d) = T >= l ? (T - l) / d + 1 : 0.
  EXPECT_EQ(nsa::num_cmp_tokens(0, 32, 16), 0);
  EXPECT_EQ(nsa::num_cmp_tokens(1, 32, 16), 0);
  EXPECT_EQ(nsa::num_cmp_tokens(31, 32, 16), 0);
  EXPECT_EQ(nsa::num_cmp_tokens(32, 32, 16), 1);
  EXPECT_EQ(nsa::num_cmp_tokens(47, 32, 16), 1);
  EXPECT_EQ(nsa::num_cmp_tokens(48, 32, 16), 2);
  EXPECT_EQ(nsa::num_cmp_tokens(1000, 32, 16), 61);
  EXPECT_EQ(nsa::num_cmp_tokens(15, 16, 8), 0);
  EXPECT_EQ(nsa::num_cmp_tokens(16, 16, 8), 1);
  EXPECT_EQ(nsa::num_cmp_tokens(33, 16, 8), 3);
  EXPECT_EQ(nsa::num_cmp_tokens(63, 64, 16), 0);
  EXPECT_EQ(nsa::num_cmp_tokens(64, 64, 16), 1);
  EXPECT_EQ(nsa::num_cmp_tokens(100, 32, 32), 3);
  EXPECT_EQ(nsa::num_cmp_tokens(127, 32, 32), 3);
  EXPECT_EQ(nsa::num_cmp_tokens(128, 32, 32), 4);
  // The oracle's own Tc.
  nsa_oracle::Config oc;
  EXPECT_EQ(nsa_oracle::num_cmp_tokens(31, oc), 0);
  EXPECT_EQ(nsa_oracle::num_cmp_tokens(32, oc), 1);
  EXPECT_EQ(nsa_oracle::num_cmp_tokens(1000, oc), 61);
  // Visible to t: i*d + l - 1 <= t.
  EXPECT_EQ(nsa::num_visible_cmp_tokens(0, 32, 16), 0);
  EXPECT_EQ(nsa::num_visible_cmp_tokens(30, 32, 16), 0);
  EXPECT_EQ(nsa::num_visible_cmp_tokens(31, 32, 16), 1);
  EXPECT_EQ(nsa::num_visible_cmp_tokens(46, 32, 16), 1);
  EXPECT_EQ(nsa::num_visible_cmp_tokens(47, 32, 16), 2);
  EXPECT_EQ(nsa::num_visible_cmp_tokens(286, 32, 16), 16);
  EXPECT_EQ(nsa::num_visible_cmp_tokens(287, 32, 16), 17);
  EXPECT_EQ(nsa::num_visible_cmp_tokens(15, 16, 8), 1);
  EXPECT_EQ(nsa::num_visible_cmp_tokens(22, 16, 8), 1);
  EXPECT_EQ(nsa::num_visible_cmp_tokens(23, 16, 8), 2);
  EXPECT_EQ(nsa::num_visible_cmp_tokens(62, 64, 16), 0);
  EXPECT_EQ(nsa::num_visible_cmp_tokens(63, 64, 16), 1);
  EXPECT_EQ(nsa::num_visible_cmp_tokens(63, 32, 32), 2);
  // Eligible blocks: j <= floor(t / l').
  EXPECT_EQ(nsa::num_eligible_blocks(0, 64), 1);
  EXPECT_EQ(nsa::num_eligible_blocks(63, 64), 1);
  EXPECT_EQ(nsa::num_eligible_blocks(64, 64), 2);
  EXPECT_EQ(nsa::num_eligible_blocks(999, 64), 16);
  EXPECT_EQ(nsa::num_eligible_blocks(95, 32), 3);
  EXPECT_EQ(nsa::num_eligible_blocks(96, 32), 4);
}

// ------------------------------------------------------------------------------------------------
// Selection on constructed inputs, checked on the reference and the oracle.

std::vector<int32_t> row_indices(const Problem& p, const Outputs& o, int64_t row, int64_t kv_head) {
  const int64_t n = p.spec.config.num_selected;
  const auto first = o.indices.begin() + (row * p.spec.hkv + kv_head) * n;
  return std::vector<int32_t>(first, first + n);
}

// Runs both and checks they agree (indices exactly) on the rows `exact` accepts (all when null).
// Elsewhere scores may tie only up to rounding, and summation order decides: there the
// reference's selection must be within ties of the oracle's scores and its outputs must equal the
// oracle's run with the reference's indices.
struct Both {
  Outputs ref, oracle;
};
Both run_both(const Problem& problem, const RowFilter& exact = nullptr) {
  Both b{reference_forward(problem), oracle_forward(problem)};
  const Tolerance tol = tolerance_for(problem.spec.dtype);
  EXPECT_TRUE(outputs_well_formed(problem, b.ref));
  EXPECT_TRUE(outputs_near(problem, b.ref, b.oracle, tol, exact));
  if (exact) {
    EXPECT_TRUE(indices_within_ties(problem, b.ref.indices, b.oracle));
    EXPECT_TRUE(outputs_near(problem, b.ref, oracle_forward(problem, &b.ref.indices), tol));
  }
  return b;
}

// Checks the selection of every kv head at position t (sequence 0) on both.
void expect_selection(const Problem& p, const Both& both, int64_t t, const std::vector<int32_t>& want) {
  for (int64_t h = 0; h < p.spec.hkv; ++h) {
    EXPECT_EQ(row_indices(p, both.ref, t, h), want) << "reference, t=" << t << " kv head " << h;
    EXPECT_EQ(row_indices(p, both.oracle, t, h), want) << "oracle, t=" << t << " kv head " << h;
  }
}

Problem random_problem(const nsa::Config& config, int64_t T, uint64_t seed, int64_t hq = 4, int64_t hkv = 2) {
  ProblemSpec s = padded_spec(1, T, hq, hkv, 16, 16);
  s.config = config;
  s.seed = seed;
  return make_problem(s);
}

// All compressed scores equal -> p_cmp uniform over the 16 visible tokens at t in [271, 286]
// (a power of two, so every product and sum is exact) -> P = (7, 8, 8, 8, 1) * G / 16 over
// blocks 0..4: blocks 1, 2, 3 tie exactly and the lower ones win.
// Elsewhere the number of visible tokens is not a power of two and blocks with mirrored weight
// patterns (e.g. 2,2,2,1 vs 1,2,2,2) tie only up to rounding.
void check_uniform_score_ties(Problem problem) {
  ASSERT_EQ(problem.spec.config.cmp_block, 32);
  const Both both = run_both(problem, [](int64_t, int64_t t) {
    const int64_t visible = nsa::num_visible_cmp_tokens(t, 32, 16);
    return (visible & (visible - 1)) == 0;  // 0, 1, 2, 4, 8, 16, ... visible tokens: exact arithmetic
  });
  const int64_t G = problem.spec.hq / problem.spec.hkv;
  for (int64_t t = 271; t <= 286; ++t) {
    const int64_t nb = problem.num_blocks();
    for (int64_t h = 0; h < problem.spec.hkv; ++h) {
      const double* P = &both.oracle.scores[(t * problem.spec.hkv + h) * nb];
      const double expected[5] = {7, 8, 8, 8, 1};
      for (int j = 0; j < 5; ++j) EXPECT_EQ(P[j], expected[j] * static_cast<double>(G) / 16.0) << "t=" << t;
    }
  }
  const int64_t n = problem.spec.config.num_selected;
  for (int64_t t = 271; t <= 286; ++t) {
    if (n == 1) expect_selection(problem, both, t, {1});
    if (n == 2) expect_selection(problem, both, t, {1, 2});
    if (n == 3) expect_selection(problem, both, t, {1, 2, 3});
  }
}

TEST(SelectionTies, ZeroQueriesTieAllScoresLowerBlockWins) {
  for (int64_t n : {1, 2, 3}) {
    Problem p = random_problem(make_config(32, 16, 64, n, 0, 0), 300, 60 + static_cast<uint64_t>(n));
    std::fill(p[kQ].begin(), p[kQ].end(), 0.0);  // every score 0: a constructed exact tie
    check_uniform_score_ties(p);
  }
}

TEST(SelectionTies, IdenticalCompressedKeysLowerBlockWins) {
  Problem p = random_problem(make_config(32, 16, 64, 2, 0, 0), 300, 70, 6, 2);
  const int64_t row = p.spec.hkv * p.spec.dk;  // every compressed token gets token 0's keys
  for (int64_t i = 1; i < p.cmp_rows(); ++i)
    std::copy(p[kKCmp].begin(), p[kKCmp].begin() + row, p[kKCmp].begin() + i * row);
  check_uniform_score_ties(p);
}

// l > l' and random inputs: for t in [32, 62] two blocks are eligible and no compressed token is
// visible (all P = 0); for t in [64, 78] only token 0 ([0, 64)) is visible and covers blocks 0 and
// 1 equally (P = 2G each, exactly). Lower block wins both ties.
TEST(SelectionTies, NaturalTiesWithLargeCompressionBlocks) {
  {
    const Problem p = random_problem(make_config(64, 16, 32, 1, 0, 0, 16), 100, 80);
    const Both both = run_both(p);
    for (int64_t t = 32; t <= 62; ++t) expect_selection(p, both, t, {0});
    for (int64_t t = 64; t <= 78; ++t) expect_selection(p, both, t, {0});
  }
  {
    const Problem p = random_problem(make_config(64, 16, 32, 2, 0, 1, 16), 100, 81);
    const Both both = run_both(p);
    for (int64_t t = 64; t <= 78; ++t) expect_selection(p, both, t, {0, 2});  // 2 is forced (local)
  }
}

// Scores concentrated on block 5: every query equals u and compressed token i is +a*u for the
// three tokens inside block 5 (i = 20, 21, 22) and -a*u elsewhere. Then at t = 600 (block 9)
// the forced blocks come first whatever the scores say.
Problem peaked_problem(const nsa::Config& config) {
  Problem p = random_problem(config, 640, 90, 4, 2);
  const int64_t dk = p.spec.dk;
  std::vector<double> u(p[kQ].begin(), p[kQ].begin() + dk);
  for (int64_t r = 0; r < p.rows() * p.spec.hq; ++r) std::copy(u.begin(), u.end(), p[kQ].begin() + r * dk);
  for (int64_t i = 0; i < p.cmp_rows(); ++i)
    for (int64_t h = 0; h < p.spec.hkv; ++h)
      for (int64_t x = 0; x < dk; ++x)
        p[kKCmp][(i * p.spec.hkv + h) * dk + x] = (i >= 20 && i <= 22 ? 3.0 : -3.0) * u[x];
  return p;
}

TEST(SelectionForced, ForcedBlocksBeatScores) {
  struct Expectation {
    int64_t n, n_init, n_local;
    std::vector<int32_t> want;
  };
  const Expectation cases[] = {
      {1, 0, 0, {5}},        // pure top-1: the peak
      {2, 0, 1, {5, 9}},     // local block of t plus the peak
      {3, 1, 1, {0, 5, 9}},  // init + local + the peak
      {3, 1, 2, {0, 8, 9}},  // n == n_init + n_local: no room for the peak
      {2, 2, 0, {0, 1}},     // n == n_init
      {3, 0, 3, {7, 8, 9}},  // n == n_local
  };
  for (const Expectation& e : cases) {
    const Problem p = peaked_problem(make_config(32, 16, 64, e.n, e.n_init, e.n_local, 64));
    // Before block 5's tokens are visible all scores are equal up to rounding: exact only later.
    const Both both = run_both(p, [](int64_t, int64_t t) { return t >= 400; });
    expect_selection(p, both, 600, e.want);
  }
}

TEST(SelectionForced, BlockForcedByBothRulesCountedOnce) {
  const Problem p = random_problem(make_config(32, 16, 64, 4, 2, 2), 200, 100);
  const Both both = run_both(p);
  for (int64_t t : {0, 10, 63}) expect_selection(p, both, t, {0, -1, -1, -1});  // block 1 is not eligible yet
  for (int64_t t : {64, 100, 127}) expect_selection(p, both, t, {0, 1, -1, -1});
  for (int64_t t : {128, 150, 191}) expect_selection(p, both, t, {0, 1, 2, -1});
  for (int64_t t : {192, 199}) expect_selection(p, both, t, {0, 1, 2, 3});
}

TEST(SelectionForced, FirstBlockOnlyInTheFirstBlock) {
  for (const nsa::Config& config : {make_config(32, 16, 64, 16, 1, 2), make_config(16, 8, 32, 3, 3, 0),
                                    make_config(64, 16, 64, 2, 0, 0), make_config(32, 32, 64, 1, 0, 1)}) {
    const Problem p = random_problem(config, config.sel_block, 110);
    const Both both = run_both(p);
    std::vector<int32_t> want(static_cast<size_t>(config.num_selected), -1);
    want[0] = 0;
    for (int64_t t = 0; t < config.sel_block; ++t) expect_selection(p, both, t, want);
  }
}

// Fewer eligible blocks than n: all of them, ascending, then -1.
TEST(SelectionForced, FewerEligibleThanNReturnsAll) {
  const Problem p = random_problem(nsa::Config{}, 700, 120);  // n = 16, at most 11 eligible
  const Both both = run_both(p);
  for (int64_t t = 0; t < 700; t += 13) {
    std::vector<int32_t> want(16, -1);
    for (int64_t j = 0; j <= t / 64; ++j) want[j] = static_cast<int32_t>(j);
    expect_selection(p, both, t, want);
  }
}

// With more eligible blocks than n, the free slots hold the highest-P non-forced blocks: check the
// reference's choice against the oracle's P directly (not only against the oracle's choice).
TEST(SelectionForced, FreeSlotsHoldTheHighestScores) {
  const nsa::Config config = make_config(16, 8, 32, 5, 1, 1, 30);
  const Problem p = random_problem(config, 400, 130, 6, 2);
  const Both both = run_both(p);
  const int64_t nb = p.num_blocks();
  int64_t checked = 0;
  for (int64_t t = 0; t < 400; ++t) {
    const int64_t last = t / config.sel_block;
    if (last + 1 <= config.num_selected) continue;
    for (int64_t h = 0; h < p.spec.hkv; ++h) {
      const std::vector<int32_t> sel = row_indices(p, both.ref, t, h);
      const double* P = &both.oracle.scores[(t * p.spec.hkv + h) * nb];
      std::vector<bool> in(static_cast<size_t>(last + 1), false);
      for (int32_t j : sel) {
        ASSERT_GE(j, 0) << "t=" << t;  // more eligible than n: every slot used
        in[j] = true;
      }
      ASSERT_TRUE(in[0] && in[last]) << "forced blocks missing at t=" << t;
      // Every unchosen block scores no higher than every chosen free one.
      for (int64_t a = 1; a < last; ++a) {
        if (!in[a]) continue;
        for (int64_t b = 1; b < last; ++b) {
          if (in[b]) continue;
          EXPECT_GE(P[a], P[b]) << "t=" << t << " chose " << a << " over " << b;
        }
      }
      ++checked;
    }
  }
  EXPECT_GT(checked, 400);
}

// The oracle's own consistency: given its own selection it reproduces itself bit for bit, and
// the selection it reports comes from select_blocks on the scores it reports.
TEST(OracleSelfCheck, GivenOwnIndicesAndSelectBlocks) {
  const Problem p = random_problem(make_config(16, 8, 32, 4, 1, 1, 20), 200, 140);
  const Outputs scored = oracle_forward(p);
  const Outputs replay = oracle_forward(p, &scored.indices);
  EXPECT_TRUE(outputs_identical(p, replay, scored));
  const nsa_oracle::Config oc = oracle_config(p.spec.config);
  const int64_t nb = p.num_blocks();
  for (int64_t t = 0; t < 200; ++t)
    for (int64_t h = 0; h < p.spec.hkv; ++h) {
      const std::vector<double> P(scored.scores.begin() + (t * p.spec.hkv + h) * nb,
                                  scored.scores.begin() + (t * p.spec.hkv + h + 1) * nb);
      EXPECT_EQ(nsa_oracle::select_blocks(oc, t, P), row_indices(p, scored, t, h));
    }
}

// select_blocks on hand-made score vectors.
TEST(OracleSelfCheck, SelectBlocksByHand) {
  nsa_oracle::Config oc;
  oc.l = 10;
  oc.d = 5;
  oc.l_sel = 10;
  oc.n = 3;
  oc.n_init = 1;
  oc.n_local = 1;
  // t = 59: blocks 0..5 eligible; forced 0 and 5; the best other is 3, ties 2 vs 4 -> 2.
  EXPECT_EQ(nsa_oracle::select_blocks(oc, 59, {0.0, 0.1, 0.5, 0.9, 0.5, 0.0}), (std::vector<int32_t>{0, 3, 5}));
  oc.n = 4;
  EXPECT_EQ(nsa_oracle::select_blocks(oc, 59, {0.0, 0.1, 0.5, 0.9, 0.5, 0.0}), (std::vector<int32_t>{0, 2, 3, 5}));
  // Ineligible entries are ignored.
  EXPECT_EQ(nsa_oracle::select_blocks(oc, 35, {0.0, 0.1, 0.5, 0.9, 9.0, 9.0}), (std::vector<int32_t>{0, 1, 2, 3}));
  oc.n = 5;
  EXPECT_EQ(nsa_oracle::select_blocks(oc, 35, {0.0, 0.1, 0.5, 0.9, 9.0, 9.0}),
            (std::vector<int32_t>{0, 1, 2, 3, -1}));
  oc.n_init = 0;
  oc.n_local = 0;
  oc.n = 1;
  EXPECT_EQ(nsa_oracle::select_blocks(oc, 59, {0.3, 0.3, 0.3, 0.3, 0.3, 0.3}), (std::vector<int32_t>{0}));
  oc.n = 2;
  EXPECT_EQ(nsa_oracle::select_blocks(oc, 59, {0.1, 0.3, 0.2, 0.3, 0.2, 0.3}), (std::vector<int32_t>{1, 3}));
}

}  // namespace
}  // namespace nsa_test
