// Every validation error of the API (prefill and the KV-cache params of decode / chunked
// prefill) is reachable, returns kInvalidArgument with a message that names the argument, and
// leaves all outputs untouched.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

#include "nsa/nsa.h"
#include "test_util.h"

namespace {

// The forward a ValidProblem sets up. kDecode: m = kDecodeM queries per sequence at the end of a
// KV cache of capacity T (the problem's length) and num_cmp_tokens(T) = 7 compressed rows, the
// two sequences holding kDecodeSeqlens tokens (ForwardParams::cache; the cache rows are NaN).
enum class Mode { kPrefill, kDecode };

// A valid padded float32 problem (B=2, T=70, Hq=4, Hkv=2, Dk=8, Dv=6, l=16, d=8, l'=32, n=3,
// num_init=1, num_local=1, w=20), outputs poisoned, with forward and backward params pointing at
// its buffers (tests/cpp/test_util.h). The backward params are for kPrefill only.
struct ValidProblem {
  static constexpr int64_t B = 2, T = 70, Hq = 4, Hkv = 2, Dk = 8, Dv = 6;
  static constexpr int64_t kDecodeM = 3, kDecodeCmpCapacity = 7;
  static constexpr int32_t kDecodeSeqlens[B] = {40, 70};
  nsa_test::Problem problem;
  nsa_test::Buffers buffers;
  std::vector<int32_t>& block_indices;
  nsa::ForwardParams fwd;
  nsa::BackwardParams bwd;

  static nsa_test::ProblemSpec spec() {
    nsa_test::ProblemSpec spec = nsa_test::padded_spec(B, T, Hq, Hkv, Dk, Dv);
    spec.config = nsa_test::make_config(16, 8, 32, 3, 1, 1, 20);
    spec.dtype = nsa::DType::kFloat32;
    spec.seed = 7;
    return spec;
  }

  explicit ValidProblem(Mode mode = Mode::kPrefill)
      : problem(nsa_test::make_problem(spec())),
        buffers(mode == Mode::kDecode
                    ? nsa_test::make_cache_buffers(problem, kDecodeM, T, kDecodeCmpCapacity)
                    : nsa_test::make_buffers(problem)),
        block_indices(buffers.block_indices) {
    if (mode == Mode::kDecode) buffers.cache_seqlens.assign(std::begin(kDecodeSeqlens), std::end(kDecodeSeqlens));
    buffers.poison_forward();
    fwd = buffers.forward_params();
  }

  // Runs the forward for real and points the backward params at its results.
  void prepare_backward() {
    ASSERT_TRUE(nsa::cpu::forward(fwd).ok());
    buffers.poison_backward();
    bwd = buffers.backward_params();
  }
};

bool all_nan(const nsa_test::TypedBuffer& values) {
  for (int64_t e = 0; e < values.numel(); ++e)
    if (!std::isnan(values.get(e))) return false;
  return true;
}

// Applies `mutate` to a valid forward and expects the error `expected` (a message fragment).
void expect_forward_error(const std::function<void(ValidProblem&)>& mutate, const std::string& expected,
                          Mode mode = Mode::kPrefill) {
  ValidProblem problem(mode);
  ASSERT_TRUE(nsa::validate(problem.fwd).ok());
  mutate(problem);
  const std::vector<int32_t> indices_before = problem.block_indices;
  const nsa::Status status = nsa::cpu::forward(problem.fwd);
  EXPECT_EQ(status.code, nsa::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message.find(expected), std::string::npos)
      << "message \"" << status.message << "\" lacks \"" << expected << "\"";
  EXPECT_TRUE(all_nan(problem.buffers.out.buf));
  EXPECT_TRUE(all_nan(problem.buffers.out_branch));
  EXPECT_TRUE(all_nan(problem.buffers.lse));
  EXPECT_EQ(problem.block_indices, indices_before);
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
  for (int arg : {nsa_test::kQ, nsa_test::kK, nsa_test::kV, nsa_test::kKCmp, nsa_test::kVCmp, nsa_test::kGates})
    EXPECT_TRUE(all_nan(problem.buffers.grad[arg].buf)) << nsa_test::arg_name(arg);
}

TEST(Validation, ValidProblemPasses) {
  ValidProblem problem;
  EXPECT_TRUE(nsa::cpu::forward(problem.fwd).ok());
  EXPECT_FALSE(all_nan(problem.buffers.out.buf));
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
  problem.fwd.out = {problem.buffers.out.buf.data(), ValidProblem::Hq * ValidProblem::T * ValidProblem::Dv, ValidProblem::Dv,
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

// ------------------------------------------------------------------------------------------------
// Decode / chunked prefill: the KV-cache params (ForwardParams::cache).

TEST(CacheValidation, ValidCachePasses) {
  ValidProblem problem(Mode::kDecode);
  const nsa::Status status = nsa::cpu::forward(problem.fwd);
  EXPECT_TRUE(status.ok()) << status.message;
}

TEST(CacheValidation, CacheParams) {
  auto expect_error = [](const std::function<void(ValidProblem&)>& mutate, const std::string& expected) {
    expect_forward_error(mutate, expected, Mode::kDecode);
  };
  expect_error(
      [](ValidProblem& p) {
        static const int32_t offsets[] = {0, 3, 6};
        static const int32_t cmp_offsets[] = {0, 0, 0};
        p.fwd.varlen = {offsets, cmp_offsets, 6, 0};
      },
      "cache.seqlens (decode / chunked prefill) needs the padded layout: varlen.cu_seqlens");
  expect_error([](ValidProblem& p) { p.buffers.cache_seqlens[1] = 2; },
               "cache.seqlens[1] must be >= shape.seqlen (m, the queries per sequence) = 3, got 2");
  expect_error([](ValidProblem& p) { p.buffers.cache_seqlens[0] = 71; },
               "cache.seqlens[0] must be <= cache.capacity = 70, got 71");
  // num_cmp_tokens(40) = (40 - 16) / 8 + 1 = 4.
  expect_error([](ValidProblem& p) { p.fwd.cache.cmp_capacity = 3; },
               "cache.cmp_capacity must hold the 4 compressed tokens of cache.seqlens[0] = 40, got 3");
  expect_error([](ValidProblem& p) { p.fwd.cache.capacity = 2; },
               "cache.capacity must be >= shape.seqlen (m, the queries per sequence) = 3, got 2");
  expect_error([](ValidProblem& p) { p.fwd.cache.cmp_capacity = -1; },
               "cache.cmp_capacity must be >= num_cmp_tokens(shape.seqlen) = 0");
  expect_error([](ValidProblem& p) { p.fwd.cache.seqlens = nullptr; },
               "cache.capacity or cache.cmp_capacity is set but cache.seqlens is null");
  expect_error([](ValidProblem& p) { p.fwd.k_cmp.data = nullptr; }, "k_cmp must not be null");
  expect_error([](ValidProblem& p) { p.fwd.v.seq_stride = -1; }, "v: strides must be >= 0");
}

// The host cannot check a device-resident seqlens: device validation accepts what host validation
// rejects.
TEST(CacheValidation, DeviceSpaceDoesNotReadSeqlens) {
  ValidProblem problem(Mode::kDecode);
  problem.buffers.cache_seqlens[0] = 1000;
  EXPECT_FALSE(nsa::validate(problem.fwd, nsa::MemorySpace::kHost).ok());
  const nsa::Status device = nsa::validate(problem.fwd, nsa::MemorySpace::kDevice);
  EXPECT_TRUE(device.ok()) << device.message;
}

// Given block indices are checked against each query's position, not its row: query 0 of
// sequence 0 sits at t = 40 - 3 = 37, where blocks 0 and 1 are eligible (l' = 32).
TEST(CacheValidation, GivenBlockIndicesByPosition) {
  const int64_t n = 3;
  // Block 0 in every (query row, kv head) row, and `second_block` in slot 1 of row `row`
  // (query row * Hkv + kv head).
  auto given = [](int64_t row, int32_t second_block) {
    return [row, second_block](ValidProblem& p) {
      for (size_t e = 0; e < p.block_indices.size(); ++e) p.block_indices[e] = e % n == 0 ? 0 : -1;
      p.block_indices[row * n + 1] = second_block;
      p.fwd.block_indices_given = true;
    };
  };
  {
    ValidProblem problem(Mode::kDecode);
    given(0, 1)(problem);
    const nsa::Status status = nsa::cpu::forward(problem.fwd);
    EXPECT_TRUE(status.ok()) << status.message;
  }
  expect_forward_error(given(0, 2), "block_indices[sequence 0, t=37, kv head 0, slot 1] = 2 is out of range",
                       Mode::kDecode);
  // Sequence 1, query 0 (query row 3; t = 67, blocks 0 .. 2 eligible): block 3 is out of range.
  const int64_t row = ValidProblem::kDecodeM * ValidProblem::Hkv;
  expect_forward_error(given(row, 3), "block_indices[sequence 1, t=67, kv head 0, slot 1] = 3 is out of range",
                       Mode::kDecode);
}

TEST(Validation, StatusNames) {
  EXPECT_STREQ(nsa::status_code_name(nsa::StatusCode::kInvalidArgument), "invalid argument");
  EXPECT_STREQ(nsa::dtype_name(nsa::DType::kBFloat16), "bfloat16");
  EXPECT_EQ(nsa::dtype_size(nsa::DType::kFloat64), 8);
}

}  // namespace
