// Decode and chunked prefill on the CUDA forward (nsa::cuda::forward with a KvCacheView) against
// the CPU reference, DESIGN.md sections 1 and 2. The decode_util cases (test_decode.cpp runs them
// on the CPU) in bfloat16 with Dk = Dv = 64, the head dims every CUDA build has: each call runs on
// device copies of a cache that grows call by call (rows past the lengths NaN), and the outputs,
// assembled in prefill row order, are judged as a prefill's are in test_cuda_forward.cpp:
//   - the selection is one the contract allows up to score rounding (ties), or the given one;
//   - out, out_branch, lse against the fp64 reference fed the GPU's indices, by the rule
//     max|gpu - ref| <= 2 max|naive - ref| + slack (expect_16bit_forward_matches_reference);
//   - with m = 1 the key rows the GPU counts in tokens_read are the keys each softmax reads.
// Without a device the GPU tests skip; the API checks run in every build with CUDA.
#include <gtest/gtest.h>

#include <cctype>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "decode_util.h"
#include "nsa/nsa.h"
#include "test_util.h"

namespace nsa_test {
namespace {

using nsa::DType;

// A valid bfloat16 decode call (B = 2 sequences holding 40 and 64 tokens, m = 1) with host
// pointers, for the checks that never reach a kernel.
struct HostCacheCall {
  Problem problem;
  Buffers buffers;
  nsa::ForwardParams params;
  HostCacheCall()
      : problem(make_problem([] {
          ProblemSpec spec = padded_spec(2, 64, 4, 2, 64, 64);
          spec.dtype = DType::kBFloat16;
          return spec;
        }())),
        buffers(make_cache_buffers(problem, 1, 64, nsa::num_cmp_tokens(64, 32, 16))) {
    buffers.cache_seqlens = {40, 64};
    params = buffers.forward_params();
  }
};

// The cache params are validated before anything reaches the device (what needs seqlens' contents
// cannot be: the CUDA backend does not read device memory on the host).
TEST(CudaDecodeApi, InvalidCacheParams) {
  if (!nsa::cuda::built()) GTEST_SKIP() << "built without CUDA";
  {
    HostCacheCall call;
    static const int32_t offsets[] = {0, 1, 2};
    static const int32_t cmp_offsets[] = {0, 0, 0};
    call.params.varlen = {offsets, cmp_offsets, 2, 0};
    const nsa::Status st = nsa::cuda::forward(call.params, nullptr, 0, nullptr);
    EXPECT_EQ(st.code, nsa::StatusCode::kInvalidArgument);
    EXPECT_NE(st.message.find("cache.seqlens (decode / chunked prefill) needs the padded layout"), std::string::npos)
        << st.message;
  }
  {
    HostCacheCall call;
    call.params.cache.capacity = 0;
    const nsa::Status st = nsa::cuda::forward(call.params, nullptr, 0, nullptr);
    EXPECT_EQ(st.code, nsa::StatusCode::kInvalidArgument);
    EXPECT_NE(st.message.find("cache.capacity must be >= shape.seqlen"), std::string::npos) << st.message;
  }
}

#if NSA_TEST_WITH_CUDA

class CudaDecode : public ::testing::TestWithParam<DecodeCase> {};

TEST_P(CudaDecode, MatchesReference) {
  NSA_SKIP_WITHOUT_DEVICE();
  const DecodeCase& c = GetParam();
  const Problem problem = make_problem(c.spec);
  const CaseRun run = run_case(c, problem, run_cuda_forward);
  const DecodeResult& decoded = run.result;
  ASSERT_TRUE(decoded.ok);
  // Given indices come back in the caller's order; the rest of the form is checked by the rule.
  if (!c.given_indices) {
    EXPECT_TRUE(outputs_well_formed(problem, decoded.outputs));
  }
  expect_16bit_forward_matches_reference(problem, decoded.outputs, c.given_indices ? &run.given : nullptr);
  // With m > 1 the GPU counts each CTA's union of key rows (params.h), not per query.
  if (c.chunk == 1) {
    EXPECT_TRUE(tokens_read_as_expected(problem, run.schedule, decoded));
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaDecode, ::testing::ValuesIn(decode_cases(DType::kBFloat16, 64, 4096)),
                         case_name<DecodeCase>);

// Chunked prefill at Dk = 128: calls of m * G > 64 query rows run the prefill kernels on the cache,
// whose cmp and win CTAs take three warpgroups on sm_90a (prefill_warpgroups).
std::vector<DecodeCase> prefill_kernel_cases_d128() {
  std::vector<DecodeCase> cases;
  for (const DecodeCase& c : decode_cases(DType::kBFloat16, 128, 300))
    if (c.chunk * (c.spec.hq / c.spec.hkv) > 64) cases.push_back(c);
  return cases;
}

INSTANTIATE_TEST_SUITE_P(PrefillKernelsD128, CudaDecode, ::testing::ValuesIn(prefill_kernel_cases_d128()),
                         case_name<DecodeCase>);

// A small case for compute-sanitizer (scripts/gpu_check.sh filters on it): the decode path with
// the warps sharing rows (m = 1, G = 16) and without (m = 7, G = 3), a batch of two.
TEST(CudaDecodeSanitizer, Small) {
  NSA_SKIP_WITHOUT_DEVICE();
  const nsa::Config tight = make_config(32, 16, 64, 4, 1, 2, 100);
  for (const auto& [heads, chunk] : {std::pair<int64_t, int64_t>{16, 1}, std::pair<int64_t, int64_t>{3, 7}}) {
    SCOPED_TRACE("G " + std::to_string(heads) + " chunk " + std::to_string(chunk));
    ProblemSpec spec = padded_spec(2, 150, heads, 1, 64, 64);
    spec.config = tight;
    spec.dtype = DType::kBFloat16;
    spec.seed = 77;
    const Problem problem = make_problem(spec);
    const DecodeResult decoded = run_decode(problem, chunked_schedule(problem, chunk), run_cuda_forward);
    ASSERT_TRUE(decoded.ok);
    expect_16bit_forward_matches_reference(problem, decoded.outputs);
  }
}

// The prefill kernels on a cache at Dk = 128 (m * G = 200), for compute-sanitizer: on sm_90a the
// slc TMA ring, whose tiles reaching past the cache's length (NaN there, in both calls: the cache
// has rows past the sequence) a warp copies with zero fill (decision 0010 section 2b).
TEST(CudaDecodeSanitizer, ChunkedPrefillD128) {
  NSA_SKIP_WITHOUT_DEVICE();
  ProblemSpec spec = padded_spec(1, 200, 4, 2, 128, 128);
  spec.config = make_config(32, 16, 64, 4, 1, 2, 100);
  spec.dtype = DType::kBFloat16;
  spec.seed = 78;
  const Problem problem = make_problem(spec);
  DecodeOptions options;
  options.extra_capacity = 37;
  const DecodeResult decoded = run_decode(problem, chunked_schedule(problem, 100), run_cuda_forward, options);
  ASSERT_TRUE(decoded.ok);
  EXPECT_TRUE(outputs_well_formed(problem, decoded.outputs));
  expect_16bit_forward_matches_reference(problem, decoded.outputs);
}

// Cache lengths the device cannot validate (past the capacity, below m) are clamped to the cache
// in the kernels: the call stays inside the cache (compute-sanitizer runs this case) and a length
// past the capacity gives what the full cache gives.
TEST(CudaDecodeSanitizer, LengthsOutsideTheCacheAreClamped) {
  NSA_SKIP_WITHOUT_DEVICE();
  constexpr int64_t kLength = 300, kHeads = 16, kDv = 64;
  ProblemSpec spec = padded_spec(2, kLength, kHeads, 1, 64, kDv);
  spec.config = make_config(32, 16, 64, 4, 1, 2, 100);
  spec.dtype = DType::kBFloat16;
  const Problem problem = make_problem(spec);
  // One call on the whole cache querying its last position; the other rows are not queried.
  const std::vector<DecodeCall> full = {DecodeCall{1, {kLength, kLength}}};
  const auto last_rows = [&](const Outputs& outputs) {
    std::vector<double> values;
    for (int64_t b = 0; b < problem.num_seqs(); ++b) {
      const auto row = outputs.out.begin() + (problem.row_begin[b] + kLength - 1) * kHeads * kDv;
      values.insert(values.end(), row, row + kHeads * kDv);
    }
    return values;
  };
  DecodeOptions last_row_only;
  last_row_only.query_every_row = false;
  const DecodeResult reference = run_decode(problem, full, run_cuda_forward, last_row_only);
  ASSERT_TRUE(reference.ok);
  const std::vector<double> valid = last_rows(reference.outputs);
  for (const double x : valid) ASSERT_TRUE(std::isfinite(x));
  for (const int32_t bad_length : {static_cast<int32_t>(kLength + 1000), 0}) {
    SCOPED_TRACE("cache_seqlens " + std::to_string(bad_length));
    const auto tampered = [&](Buffers& buffers, nsa::Status* status) {
      for (int32_t& held : buffers.cache_seqlens) held = bad_length;
      return run_cuda_forward(buffers, status);
    };
    const DecodeResult result = run_decode(problem, full, tampered, last_row_only);
    ASSERT_TRUE(result.ok);
    const std::vector<double> clamped = last_rows(result.outputs);
    for (const double x : clamped) ASSERT_TRUE(std::isfinite(x));
    if (bad_length > kLength) {
      EXPECT_EQ(clamped, valid);
    }
  }
}

// The batches of the table (different cache lengths in every call) match the reference above;
// each of their sequences decoded alone does too, so batch and alone agree within the rule.
TEST(CudaDecodeProperties, EachSequenceAloneMatchesReference) {
  NSA_SKIP_WITHOUT_DEVICE();
  int64_t batches = 0;
  for (const DecodeCase& c : decode_cases(DType::kBFloat16, 64, 4096)) {
    if (c.stagger.empty()) continue;
    ++batches;
    const Problem problem = make_problem(c.spec);
    for (int64_t b = 0; b < problem.num_seqs(); ++b) {
      SCOPED_TRACE(c.name + " sequence " + std::to_string(b));
      const Problem alone = extract_sequence(problem, b);
      const DecodeResult single = run_decode(alone, chunked_schedule(alone, c.chunk), run_cuda_forward);
      ASSERT_TRUE(single.ok);
      expect_16bit_forward_matches_reference(alone, single.outputs);
    }
  }
  EXPECT_GE(batches, 2);
}

#endif  // NSA_TEST_WITH_CUDA

}  // namespace
}  // namespace nsa_test
