// CPU reference backward: central finite differences in float64 for every differentiable input
// (with the selection held fixed, as the op does not differentiate through it), determinism
// across thread counts, varlen vs per-sequence runs, float32 vs float64.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "test_util.h"

namespace nsa_test {
namespace {

// Runs the forward (to get the selection and statistics) then the backward.
Grads reference_backward(const Problem& problem, int num_threads, std::vector<int32_t>* indices = nullptr) {
  Buffers buffers = make_buffers(problem);
  const nsa::Status forward = run_forward(buffers, num_threads);
  EXPECT_TRUE(forward.ok()) << forward.message;
  buffers.poison_backward();
  const nsa::Status backward = nsa::cpu::backward(buffers.backward_params(), num_threads);
  EXPECT_TRUE(backward.ok()) << backward.message;
  EXPECT_TRUE(buffers.backward_gaps_untouched());
  if (indices) *indices = buffers.block_indices;
  return buffers.read_backward();
}

// L = sum(out * grad_out) with the selection fixed to `indices`; dL/dx is what the backward computes.
double loss(const Problem& problem, const std::vector<int32_t>& indices) {
  RunOptions options;
  options.given_indices = &indices;
  const Outputs outputs = reference_forward(problem, options);
  double total = 0;
  for (size_t e = 0; e < outputs.out.size(); ++e) total += outputs.out[e] * problem[kGradOut][e];
  return total;
}

// Central difference of the loss along `direction` (same shape as problem[arg]).
double directional_difference(const Problem& problem, const std::vector<int32_t>& indices, int arg,
                              const std::vector<double>& direction, double step) {
  Problem plus = problem, minus = problem;
  for (size_t e = 0; e < direction.size(); ++e) {
    plus[arg][e] += step * direction[e];
    minus[arg][e] -= step * direction[e];
  }
  return (loss(plus, indices) - loss(minus, indices)) / (2 * step);
}

// Checks the analytic gradient of every input against finite differences: random directions
// (all elements at once) and single elements (to localize errors).
void check_gradients(const ProblemSpec& spec, int elements_per_arg) {
  const Problem problem = make_problem(spec);
  std::vector<int32_t> indices;
  const Grads grads = reference_backward(problem, 0, &indices);
  std::mt19937_64 rng(spec.seed + 99);
  std::normal_distribution<double> normal(0.0, 1.0);
  const double step = 1e-5;
  for (int arg = 0; arg < kNumForwardInputs; ++arg) {
    if (!problem.has(arg) || problem[arg].empty()) continue;
    const std::vector<double>& grad = grads[arg];
    ASSERT_EQ(grad.size(), problem[arg].size()) << arg_name(arg);
    double grad_norm = 0;
    for (double g : grad) grad_norm += g * g;
    EXPECT_GT(grad_norm, 0.0) << arg_name(arg) << ": gradient is identically zero";
    for (int trial = 0; trial < 3; ++trial) {
      std::vector<double> direction(grad.size());
      double analytic = 0;
      for (size_t e = 0; e < grad.size(); ++e) {
        direction[e] = normal(rng);
        analytic += grad[e] * direction[e];
      }
      const double numeric = directional_difference(problem, indices, arg, direction, step);
      EXPECT_NEAR(analytic, numeric, 1e-6 * (1 + std::fabs(numeric)))
          << arg_name(arg) << ", random direction " << trial;
    }
    std::uniform_int_distribution<size_t> pick(0, grad.size() - 1);
    for (int trial = 0; trial < elements_per_arg; ++trial) {
      const size_t e = pick(rng);
      std::vector<double> direction(grad.size(), 0.0);
      direction[e] = 1.0;
      const double numeric = directional_difference(problem, indices, arg, direction, step);
      EXPECT_NEAR(grad[e], numeric, 1e-7 * (1 + std::fabs(numeric))) << arg_name(arg) << ", element " << e;
    }
  }
}

ProblemSpec small_spec(int64_t T, int64_t hq, int64_t hkv, int64_t dk, int64_t dv, bool separate_window) {
  ProblemSpec spec = padded_spec(2, T, hq, hkv, dk, dv);
  spec.config = make_config(16, 8, 32, 3, 1, 1, 20);
  spec.separate_window = separate_window;
  spec.seed = static_cast<uint64_t>(T * 31 + hq);
  return spec;
}

TEST(BackwardFiniteDifferences, SharedWindowKeys) { check_gradients(small_spec(100, 6, 2, 8, 6, false), 25); }

TEST(BackwardFiniteDifferences, SeparateWindowKeys) { check_gradients(small_spec(77, 4, 4, 6, 6, true), 25); }

TEST(BackwardFiniteDifferences, SingleKvHeadLargeGroup) { check_gradients(small_spec(45, 16, 1, 4, 5, true), 15); }

TEST(BackwardFiniteDifferences, ShortSequenceWithoutCompressedTokens) {
  check_gradients(small_spec(12, 3, 1, 4, 4, true), 20);  // T < l: the cmp branch is empty everywhere
}

TEST(BackwardFiniteDifferences, PaperBlockSizes) {
  ProblemSpec spec = padded_spec(1, 150, 4, 2, 8, 8);
  spec.config.num_selected = 2;  // with l'=64, T=150 has 3 blocks: the top-n has a real choice
  spec.config.num_local = 1;
  spec.config.window = 40;
  check_gradients(spec, 20);
}

TEST(BackwardFiniteDifferences, Varlen) {
  ProblemSpec spec = small_spec(1, 4, 2, 6, 4, true);
  spec.varlen = true;
  spec.seqlens = {1, 40, 15, 70};
  check_gradients(spec, 25);
}

TEST(Backward, BitwiseIdenticalAcrossThreadCounts) {
  ProblemSpec spec = small_spec(300, 6, 2, 16, 8, true);
  const Problem problem = make_problem(spec);
  const Grads one = reference_backward(problem, 1);
  for (int threads : {2, 3, 8}) {
    const Grads many = reference_backward(problem, threads);
    for (int arg = 0; arg < kNumForwardInputs; ++arg) {
      ASSERT_EQ(one[arg].size(), many[arg].size());
      for (size_t e = 0; e < one[arg].size(); ++e)
        ASSERT_EQ(one[arg][e], many[arg][e]) << arg_name(arg) << " element " << e << " with " << threads << " threads";
    }
  }
}

TEST(Backward, VarlenMatchesEachSequenceAlone) {
  ProblemSpec spec = small_spec(1, 6, 3, 8, 8, false);
  spec.varlen = true;
  spec.seqlens = {33, 1, 90, 16, 15};
  const Problem problem = make_problem(spec);
  const Grads packed = reference_backward(problem, 0);
  for (int64_t b = 0; b < problem.num_seqs(); ++b) {
    const Problem alone = extract_sequence(problem, b);
    const Grads single = reference_backward(alone, 0);
    for (int arg = 0; arg < kNumForwardInputs; ++arg) {
      if (!problem.has(arg)) continue;
      const int64_t first = problem.is_cmp(arg) ? problem.cmp_begin[b] : problem.row_begin[b];
      const int64_t width = problem.heads(arg) * problem.dim(arg);
      ASSERT_EQ(static_cast<int64_t>(single[arg].size()), alone.rows(arg) * width) << arg_name(arg);
      for (size_t e = 0; e < single[arg].size(); ++e)
        ASSERT_EQ(packed[arg][first * width + static_cast<int64_t>(e)], single[arg][e])
            << arg_name(arg) << " sequence " << b << " element " << e;
    }
  }
}

TEST(Backward, Float32MatchesFloat64) {
  ProblemSpec spec = small_spec(130, 4, 2, 16, 16, true);
  spec.dtype = nsa::DType::kFloat32;  // values rounded to float32, so both runs see the same inputs
  const Problem problem32 = make_problem(spec);
  Problem problem64 = problem32;
  problem64.spec.dtype = nsa::DType::kFloat64;
  const Grads g32 = reference_backward(problem32, 0), g64 = reference_backward(problem64, 0);
  for (int arg = 0; arg < kNumForwardInputs; ++arg) {
    if (!problem32.has(arg)) continue;
    for (size_t e = 0; e < g64[arg].size(); ++e)
      ASSERT_NEAR(g32[arg][e], g64[arg][e], 1e-5 * (1 + std::fabs(g64[arg][e])))
          << arg_name(arg) << " element " << e;
  }
}

}  // namespace
}  // namespace nsa_test
