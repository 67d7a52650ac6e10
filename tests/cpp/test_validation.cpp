// Every validation error of the API is reachable, returns kInvalidArgument with a message that
// names the argument, and leaves all outputs untouched.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "nsa/nsa.h"

namespace {

// A valid padded float32 problem (B=2, T=70, Hq=4, Hkv=2, Dk=8, Dv=6, l=16, d=8, l'=32, n=3,
// num_init=1, num_local=1, w=20) with forward and backward params pointing at its buffers.
struct ValidProblem {
  static constexpr int64_t B = 2, T = 70, Hq = 4, Hkv = 2, Dk = 8, Dv = 6;
  nsa::Config config;
  int64_t Tc = 0;
  std::vector<float> q, k, v, k_cmp, v_cmp, gates, out, out_branch, lse, grad_out;
  std::vector<float> grad_q, grad_k, grad_v, grad_k_cmp, grad_v_cmp, grad_gates;
  std::vector<int32_t> block_indices;
  nsa::ForwardParams fwd;
  nsa::BackwardParams bwd;

  static std::vector<float> random(size_t count, std::mt19937& rng) {
    std::normal_distribution<float> normal(0.f, 1.f);
    std::vector<float> values(count);
    for (float& value : values) value = normal(rng);
    return values;
  }
  static nsa::InputTensor in(const std::vector<float>& data, int64_t T_, int64_t H, int64_t D) {
    return {data.data(), T_ * H * D, H * D, D};
  }
  static nsa::OutputTensor out_of(std::vector<float>& data, int64_t T_, int64_t H, int64_t D) {
    return {data.data(), T_ * H * D, H * D, D};
  }

  ValidProblem() {
    config.cmp_block = 16;
    config.cmp_stride = 8;
    config.sel_block = 32;
    config.num_selected = 3;
    config.num_init = 1;
    config.num_local = 1;
    config.window = 20;
    Tc = nsa::num_cmp_tokens(T, config.cmp_block, config.cmp_stride);
    std::mt19937 rng(7);
    q = random(B * T * Hq * Dk, rng);
    k = random(B * T * Hkv * Dk, rng);
    v = random(B * T * Hkv * Dv, rng);
    k_cmp = random(B * Tc * Hkv * Dk, rng);
    v_cmp = random(B * Tc * Hkv * Dv, rng);
    gates = random(B * T * Hq * 3, rng);
    grad_out = random(B * T * Hq * Dv, rng);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    out.assign(B * T * Hq * Dv, nan);
    out_branch.assign(B * T * Hq * 3 * Dv, nan);
    lse.assign(B * T * Hq * 3, nan);
    block_indices.assign(B * T * Hkv * config.num_selected, -7);

    fwd.config = config;
    fwd.dtype = nsa::DType::kFloat32;
    fwd.shape = {B, T, Hq, Hkv, Dk, Dv};
    fwd.q = in(q, T, Hq, Dk);
    fwd.k = in(k, T, Hkv, Dk);
    fwd.v = in(v, T, Hkv, Dv);
    fwd.k_cmp = in(k_cmp, Tc, Hkv, Dk);
    fwd.v_cmp = in(v_cmp, Tc, Hkv, Dv);
    fwd.gates = in(gates, T, Hq, 3);
    fwd.block_indices = block_indices.data();
    fwd.out = out_of(out, T, Hq, Dv);
    fwd.out_branch = out_branch.data();
    fwd.lse = lse.data();
  }

  // Runs the forward for real and points the backward params at its results.
  void prepare_backward() {
    ASSERT_TRUE(nsa::cpu::forward(fwd).ok());
    grad_q.assign(q.size(), NAN);
    grad_k.assign(k.size(), NAN);
    grad_v.assign(v.size(), NAN);
    grad_k_cmp.assign(k_cmp.size(), NAN);
    grad_v_cmp.assign(v_cmp.size(), NAN);
    grad_gates.assign(gates.size(), NAN);
    bwd.config = config;
    bwd.dtype = fwd.dtype;
    bwd.shape = fwd.shape;
    bwd.q = fwd.q;
    bwd.k = fwd.k;
    bwd.v = fwd.v;
    bwd.k_cmp = fwd.k_cmp;
    bwd.v_cmp = fwd.v_cmp;
    bwd.gates = fwd.gates;
    bwd.block_indices = block_indices.data();
    bwd.out_branch = out_branch.data();
    bwd.lse = lse.data();
    bwd.grad_out = in(grad_out, T, Hq, Dv);
    bwd.grad_q = out_of(grad_q, T, Hq, Dk);
    bwd.grad_k = out_of(grad_k, T, Hkv, Dk);
    bwd.grad_v = out_of(grad_v, T, Hkv, Dv);
    bwd.grad_k_cmp = out_of(grad_k_cmp, Tc, Hkv, Dk);
    bwd.grad_v_cmp = out_of(grad_v_cmp, Tc, Hkv, Dv);
    bwd.grad_gates = out_of(grad_gates, T, Hq, 3);
  }
};

bool all_nan(const std::vector<float>& values) {
  for (float value : values)
    if (!std::isnan(value)) return false;
  return true;
}

// Applies `mutate` to a valid forward and expects the error `expected` (a message fragment).
void expect_forward_error(const std::function<void(ValidProblem&)>& mutate, const std::string& expected) {
  ValidProblem problem;
  ASSERT_TRUE(nsa::validate(problem.fwd).ok());
  mutate(problem);
  const nsa::Status status = nsa::cpu::forward(problem.fwd);
  EXPECT_EQ(status.code, nsa::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message.find(expected), std::string::npos)
      << "message \"" << status.message << "\" lacks \"" << expected << "\"";
  EXPECT_TRUE(all_nan(problem.out));
  EXPECT_TRUE(all_nan(problem.out_branch));
  EXPECT_TRUE(all_nan(problem.lse));
  if (!problem.fwd.block_indices_given) {
    for (int32_t index : problem.block_indices) ASSERT_EQ(index, -7);
  }
}

void expect_backward_error(const std::function<void(ValidProblem&)>& mutate, const std::string& expected) {
  ValidProblem problem;
  problem.prepare_backward();
  ASSERT_TRUE(nsa::validate(problem.bwd).ok());
  mutate(problem);
  const nsa::Status status = nsa::cpu::backward(problem.bwd);
  EXPECT_EQ(status.code, nsa::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message.find(expected), std::string::npos)
      << "message \"" << status.message << "\" lacks \"" << expected << "\"";
  for (const auto* grad : {&problem.grad_q, &problem.grad_k, &problem.grad_v, &problem.grad_k_cmp,
                           &problem.grad_v_cmp, &problem.grad_gates})
    EXPECT_TRUE(all_nan(*grad));
}

TEST(Validation, ValidProblemPasses) {
  ValidProblem problem;
  EXPECT_TRUE(nsa::cpu::forward(problem.fwd).ok());
  EXPECT_FALSE(all_nan(problem.out));
  problem.prepare_backward();
  const nsa::Status status = nsa::cpu::backward(problem.bwd);
  EXPECT_TRUE(status.ok()) << status.message;
}

TEST(Validation, NullPointers) {
  expect_forward_error([](ValidProblem& p) { p.fwd.q.data = nullptr; }, "q must not be null");
  expect_forward_error([](ValidProblem& p) { p.fwd.k.data = nullptr; }, "k must not be null");
  expect_forward_error([](ValidProblem& p) { p.fwd.v.data = nullptr; }, "v must not be null");
  expect_forward_error([](ValidProblem& p) { p.fwd.k_cmp.data = nullptr; }, "k_cmp must not be null");
  expect_forward_error([](ValidProblem& p) { p.fwd.v_cmp.data = nullptr; }, "v_cmp must not be null");
  expect_forward_error([](ValidProblem& p) { p.fwd.gates.data = nullptr; }, "gates must not be null");
  expect_forward_error([](ValidProblem& p) { p.fwd.out.data = nullptr; }, "out must not be null");
  expect_forward_error([](ValidProblem& p) { p.fwd.lse = nullptr; }, "lse must not be null");
  expect_forward_error([](ValidProblem& p) { p.fwd.block_indices = nullptr; }, "block_indices must not be null");
  expect_backward_error([](ValidProblem& p) { p.bwd.grad_out.data = nullptr; }, "grad_out must not be null");
  expect_backward_error([](ValidProblem& p) { p.bwd.out_branch = nullptr; }, "out_branch must not be null");
  expect_backward_error([](ValidProblem& p) { p.bwd.lse = nullptr; }, "lse must not be null");
  expect_backward_error([](ValidProblem& p) { p.bwd.block_indices = nullptr; }, "block_indices must not be null");
  expect_backward_error([](ValidProblem& p) { p.bwd.grad_q.data = nullptr; }, "grad_q must not be null");
  expect_backward_error([](ValidProblem& p) { p.bwd.grad_k.data = nullptr; }, "grad_k must not be null");
  expect_backward_error([](ValidProblem& p) { p.bwd.grad_v.data = nullptr; }, "grad_v must not be null");
  expect_backward_error([](ValidProblem& p) { p.bwd.grad_k_cmp.data = nullptr; }, "grad_k_cmp must not be null");
  expect_backward_error([](ValidProblem& p) { p.bwd.grad_v_cmp.data = nullptr; }, "grad_v_cmp must not be null");
  expect_backward_error([](ValidProblem& p) { p.bwd.grad_gates.data = nullptr; }, "grad_gates must not be null");
}

TEST(Validation, WindowGradientsFollowWindowInputs) {
  expect_backward_error([](ValidProblem& p) { p.bwd.grad_k_win = p.bwd.grad_k; }, "grad_k_win must be null");
  expect_backward_error([](ValidProblem& p) { p.bwd.grad_v_win = p.bwd.grad_v; }, "grad_v_win must be null");
  expect_backward_error([](ValidProblem& p) { p.bwd.k_win = p.bwd.k; }, "grad_k_win must not be null");
  expect_backward_error([](ValidProblem& p) { p.bwd.v_win = p.bwd.v; }, "grad_v_win must not be null");
}

TEST(Validation, NonPositiveSizes) {
  expect_forward_error([](ValidProblem& p) { p.fwd.shape.batch = 0; }, "shape.batch must be positive, got 0");
  expect_forward_error([](ValidProblem& p) { p.fwd.shape.seqlen = -3; }, "shape.seqlen must be positive, got -3");
  expect_forward_error([](ValidProblem& p) { p.fwd.shape.num_q_heads = 0; }, "shape.num_q_heads must be positive");
  expect_forward_error([](ValidProblem& p) { p.fwd.shape.num_kv_heads = 0; }, "shape.num_kv_heads must be positive");
  expect_forward_error([](ValidProblem& p) { p.fwd.shape.head_dim_qk = 0; }, "shape.head_dim_qk must be positive");
  expect_forward_error([](ValidProblem& p) { p.fwd.shape.head_dim_v = 0; }, "shape.head_dim_v must be positive");
  expect_backward_error([](ValidProblem& p) { p.bwd.shape.batch = 0; }, "shape.batch must be positive");
}

TEST(Validation, HeadsMustGroup) {
  expect_forward_error([](ValidProblem& p) { p.fwd.shape.num_kv_heads = 3; },
                       "shape.num_q_heads (4) must be a multiple of shape.num_kv_heads (3)");
}

TEST(Validation, Config) {
  expect_forward_error([](ValidProblem& p) { p.fwd.config.cmp_stride = 5; }, "must divide config.cmp_block (l)");
  expect_forward_error([](ValidProblem& p) { p.fwd.config.sel_block = 36; }, "must divide config.sel_block (l')");
  expect_forward_error([](ValidProblem& p) { p.fwd.config.cmp_block = 0; }, "config.cmp_block (l) must be positive");
  expect_forward_error([](ValidProblem& p) { p.fwd.config.cmp_stride = 0; }, "config.cmp_stride (d) must be positive");
  expect_forward_error([](ValidProblem& p) { p.fwd.config.sel_block = -1; }, "config.sel_block (l') must be positive");
  expect_forward_error([](ValidProblem& p) { p.fwd.config.num_selected = 1; },
                       "config.num_selected (n) must be >= num_init + num_local = 2, got n=1");
  expect_forward_error([](ValidProblem& p) { p.fwd.config.num_selected = 0; }, "config.num_selected (n) must be >= 1");
  expect_forward_error([](ValidProblem& p) { p.fwd.config.num_init = -1; }, "config.num_init must be >= 0");
  expect_forward_error([](ValidProblem& p) { p.fwd.config.num_local = -1; }, "config.num_local must be >= 0");
  expect_forward_error([](ValidProblem& p) { p.fwd.config.window = 0; }, "config.window (w) must be >= 1");
  expect_forward_error([](ValidProblem& p) { p.fwd.config.scale = std::nan(""); }, "config.scale must be finite");
  expect_forward_error([](ValidProblem& p) { p.fwd.config.scale = -1.0; }, "config.scale must be finite and >= 0");
  expect_forward_error([](ValidProblem& p) { p.fwd.dtype = static_cast<nsa::DType>(9); }, "dtype must be one of");
  expect_backward_error([](ValidProblem& p) { p.bwd.config.cmp_stride = 3; }, "must divide config.cmp_block");
}

TEST(Validation, Strides) {
  expect_forward_error([](ValidProblem& p) { p.fwd.q.seq_stride = -1; }, "q: strides must be >= 0");
  expect_forward_error([](ValidProblem& p) { p.fwd.k_cmp.head_stride = -8; }, "k_cmp: strides must be >= 0");
  expect_forward_error([](ValidProblem& p) { p.fwd.out.head_stride = 3; }, "out: output strides");
  expect_forward_error([](ValidProblem& p) { p.fwd.out.batch_stride = 0; }, "make elements overlap");
  expect_backward_error([](ValidProblem& p) { p.bwd.grad_k.seq_stride = 1; }, "grad_k: output strides");
  expect_backward_error([](ValidProblem& p) { p.bwd.grad_gates.head_stride = -3; }, "grad_gates: strides must be >= 0");
}

TEST(Validation, NonOverlappingPermutedOutputStridesAreAccepted) {
  // out stored physically as [B, Hq, T, Dv]: head stride T*Dv, seq stride Dv.
  ValidProblem problem;
  problem.fwd.out = {problem.out.data(), ValidProblem::Hq * ValidProblem::T * ValidProblem::Dv, ValidProblem::Dv,
                     ValidProblem::T * ValidProblem::Dv};
  EXPECT_TRUE(nsa::validate(problem.fwd).ok());
}

// Varlen: three sequences of lengths 20, 0 and 50 packed into the first 70 rows of the buffers.
struct VarlenProblem {
  std::vector<int32_t> cu_seqlens{0, 20, 20, 70};
  std::vector<int32_t> cu_seqlens_cmp{0, 1, 1, 6};  // Tc(20) = 1, Tc(0) = 0, Tc(50) = 5 (l=16, d=8)

  void apply(ValidProblem& p) {
    p.fwd.shape.batch = 3;
    p.fwd.shape.seqlen = 50;
    p.fwd.varlen = {cu_seqlens.data(), cu_seqlens_cmp.data(), 70, 6};
  }
};

TEST(Validation, VarlenValidPasses) {
  ValidProblem problem;
  VarlenProblem varlen;
  varlen.apply(problem);
  const nsa::Status status = nsa::validate(problem.fwd);
  EXPECT_TRUE(status.ok()) << status.message;
}

TEST(Validation, BadCuSeqlens) {
  VarlenProblem varlen;
  auto with = [&](std::function<void(VarlenProblem&, ValidProblem&)> edit) {
    return [&varlen, edit](ValidProblem& p) {
      varlen = VarlenProblem{};
      varlen.apply(p);
      edit(varlen, p);
    };
  };
  expect_forward_error(with([](VarlenProblem& v, ValidProblem&) { v.cu_seqlens[0] = 1; }),
                       "varlen.cu_seqlens[0] must be 0, got 1");
  expect_forward_error(with([](VarlenProblem& v, ValidProblem&) { v.cu_seqlens[2] = 10; }),
                       "varlen.cu_seqlens must be non-decreasing");
  expect_forward_error(with([](VarlenProblem& v, ValidProblem& p) {
                         v.cu_seqlens[3] = 65;
                         p.fwd.varlen.cu_seqlens = v.cu_seqlens.data();
                       }),
                       "varlen.cu_seqlens_cmp: sequence 2 of length 45 must have 4");
  expect_forward_error(with([](VarlenProblem&, ValidProblem& p) { p.fwd.varlen.total_tokens = 71; }),
                       "varlen.cu_seqlens[3] must equal varlen.total_tokens=71, got 70");
  expect_forward_error(with([](VarlenProblem&, ValidProblem& p) { p.fwd.varlen.total_cmp_tokens = 5; }),
                       "varlen.cu_seqlens_cmp[3] must equal varlen.total_cmp_tokens=5, got 6");
  expect_forward_error(with([](VarlenProblem& v, ValidProblem&) { v.cu_seqlens_cmp[1] = 2; }),
                       "sequence 0 of length 20 must have 1 compressed tokens");
  expect_forward_error(with([](VarlenProblem&, ValidProblem& p) { p.fwd.shape.seqlen = 40; }),
                       "sequence 2 has length 50 > shape.seqlen");
  expect_forward_error(with([](VarlenProblem&, ValidProblem& p) { p.fwd.varlen.cu_seqlens_cmp = nullptr; }),
                       "varlen.cu_seqlens_cmp must not be null");
  expect_forward_error(
      [](ValidProblem& p) {
        static const int32_t cmp_offsets[] = {0, 0};
        p.fwd.varlen.cu_seqlens_cmp = cmp_offsets;
      },
      "varlen.cu_seqlens_cmp is set but varlen.cu_seqlens is null");
}

TEST(Validation, GivenBlockIndices) {
  const int64_t n = 3;
  auto given = [](std::function<void(ValidProblem&)> edit) {
    return [edit](ValidProblem& p) {
      for (size_t e = 0; e < p.block_indices.size(); ++e) p.block_indices[e] = e % n == 0 ? 0 : -1;
      p.fwd.block_indices_given = true;
      edit(p);
    };
  };
  {  // The baseline of `given` (block 0 only, -1 padded) is valid.
    ValidProblem problem;
    given([](ValidProblem&) {})(problem);
    const nsa::Status status = nsa::cpu::forward(problem.fwd);
    EXPECT_TRUE(status.ok()) << status.message;
  }
  // Row of (b=0, t=40, kv head 1): t / l' = 1, so blocks 0 and 1 are eligible.
  const int64_t row = (0 * ValidProblem::T + 40) * ValidProblem::Hkv + 1;
  expect_forward_error(given([&](ValidProblem& p) { p.block_indices[row * n + 1] = 2; }),
                       "block_indices[sequence 0, t=40, kv head 1, slot 1] = 2 is out of range");
  expect_forward_error(given([&](ValidProblem& p) { p.block_indices[row * n + 2] = -2; }), "= -2 is out of range");
  expect_forward_error(given([&](ValidProblem& p) { p.block_indices[row * n + 2] = 0; }),
                       "block_indices[sequence 0, t=40, kv head 1] repeats block 0");
  // The backward checks the indices it is given too.
  expect_backward_error([](ValidProblem& p) { p.block_indices[5 * n] = 3; }, "is out of range");
}

TEST(Validation, StatusNames) {
  EXPECT_STREQ(nsa::status_code_name(nsa::StatusCode::kInvalidArgument), "invalid argument");
  EXPECT_STREQ(nsa::dtype_name(nsa::DType::kBFloat16), "bfloat16");
  EXPECT_EQ(nsa::dtype_size(nsa::DType::kFloat64), 8);
}

}  // namespace
