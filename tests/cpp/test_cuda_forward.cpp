// The CUDA forward (nsa::cuda::forward) against the CPU reference, per DESIGN.md section 2.
//
// For every case: random inputs rounded to the dtype (bfloat16 or float16), device buffers
// poisoned with NaN (indices with -12345) before the run, then
//   - outputs well formed: no NaN/inf, lse -inf exactly where a branch has no key, every element
//     written, nothing outside the strided outputs written; two runs bitwise identical;
//   - top-n: the GPU's block_indices are a selection the contract allows up to score rounding
//     (indices_within_ties, against fp64 scores);
//   - outputs: the CPU reference in fp64 on the same dtype-rounded inputs, fed the GPU's indices
//     (block_indices_given), is `ref`; `naive` is the plain same-dtype implementation
//     (naive_forward in test_util.h); then max|gpu - ref| <= 2 max|naive - ref| + 1e-5 for out
//     and out_branch, cosine(gpu, ref) > 0.9999, and max|lse_gpu - lse_ref| <= 2 max|lse_naive -
//     lse_ref| + 1e-4 (fp32 statistics; the GPU uses ex2.approx / lg2.approx), -inf entries
//     identical (expect_16bit_forward_matches_reference).
//
// Without a CUDA device (or a build without CUDA) the GPU tests are skipped; the API checks
// that need no device still run.
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <ostream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda/stages.h"
#include "nsa/nsa.h"
#include "test_util.h"

namespace nsa_test {
namespace {

using nsa::DType;

// A small problem's params with host pointers, for the checks that never reach a kernel.
struct HostParams {
  Problem problem;
  Buffers buffers;
  nsa::ForwardParams params;
  explicit HostParams(ProblemSpec spec)
      : problem(make_problem(spec)), buffers(make_buffers(problem)), params(buffers.forward_params()) {}
};

ProblemSpec small_spec(DType dtype, int64_t dk, int64_t dv) {
  ProblemSpec s = padded_spec(1, 40, 4, 2, dk, dv);
  s.dtype = dtype;
  return s;
}

TEST(CudaForwardApi, BuiltWithoutCudaReportsUnsupported) {
  if (nsa::cuda::built()) GTEST_SKIP() << "built with CUDA";
  HostParams h(small_spec(DType::kBFloat16, 64, 64));
  const nsa::Status st = nsa::cuda::forward(h.params, nullptr, 0, nullptr);
  EXPECT_EQ(st.code, nsa::StatusCode::kUnsupported);
  EXPECT_EQ(st.message, "nsa was built without CUDA");
}

TEST(CudaForwardApi, UnsupportedDtypeListsSupported) {
  if (!nsa::cuda::built()) GTEST_SKIP() << "built without CUDA";
  for (DType dtype : {DType::kFloat32, DType::kFloat64}) {
    HostParams h(small_spec(dtype, 64, 64));
    const nsa::Status st = nsa::cuda::forward(h.params, nullptr, 0, nullptr);
    EXPECT_EQ(st.code, nsa::StatusCode::kUnsupported);
    EXPECT_NE(st.message.find("bfloat16, float16"), std::string::npos) << st.message;
    EXPECT_NE(st.message.find(nsa::dtype_name(dtype)), std::string::npos) << st.message;
  }
}

TEST(CudaForwardApi, UnsupportedHeadDimsListsSupported) {
  if (!nsa::cuda::built()) GTEST_SKIP() << "built without CUDA";
  HostParams h(small_spec(DType::kBFloat16, 32, 48));
  const nsa::Status st = nsa::cuda::forward(h.params, nullptr, 0, nullptr);
  EXPECT_EQ(st.code, nsa::StatusCode::kUnsupported);
  EXPECT_NE(st.message.find("(64, 64), (128, 128), (192, 128)"), std::string::npos) << st.message;
  EXPECT_NE(st.message.find("(32, 48)"), std::string::npos) << st.message;
}

TEST(CudaForwardApi, InvalidParamsAndWorkspace) {
  if (!nsa::cuda::built()) GTEST_SKIP() << "built without CUDA";
  HostParams h(small_spec(DType::kBFloat16, 64, 64));
  nsa::ForwardParams p = h.params;
  p.q.data = nullptr;
  EXPECT_EQ(nsa::cuda::forward(p, nullptr, 0, nullptr).code, nsa::StatusCode::kInvalidArgument);
  p = h.params;
  p.out_branch = nullptr;
  const size_t need = nsa::cuda::forward_workspace_bytes(p);
  EXPECT_EQ(need, size_t{2 * 40 * 4 * 64 * 2});
  EXPECT_EQ(nsa::cuda::forward_workspace_bytes(h.params), 0u);
  const nsa::Status st = nsa::cuda::forward(p, nullptr, 0, nullptr);
  EXPECT_EQ(st.code, nsa::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message.find("workspace"), std::string::npos) << st.message;
}

// The test's own oracles against the CPU reference (no device needed): the naive same-dtype
// forward is close to the fp64 reference, and the reference's selection is exactly the top-n of
// reference_scores.
TEST(CudaForwardHarness, NaiveAndScoresAgreeWithReference) {
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    ProblemSpec spec = varlen_spec({1, 40, 300, 130}, 6, 2, 64, 64);
    spec.config = make_config(32, 16, 64, 3, 1, 1, 50);
    spec.dtype = dtype;
    spec.separate_window = true;
    const Problem problem = make_problem(spec);
    Problem p64 = problem;
    p64.spec.dtype = DType::kFloat64;
    const Outputs ref = reference_forward(p64);
    ASSERT_FALSE(ref.out.empty());
    EXPECT_TRUE(indices_within_ties(problem, ref.indices, reference_scores(problem), 1e-12));
    const Outputs naive = naive_forward(problem, ref.indices);
    // A few roundings to the dtype of values up to ~4: far below what a wrong key set gives.
    const double slack = dtype == DType::kBFloat16 ? 4e-2 : 5e-3;
    EXPECT_TRUE(within_rule("naive out", naive.out, ref.out, ref.out, slack, true));
    EXPECT_TRUE(within_rule("naive out_branch", naive.out_branch, ref.out_branch, ref.out_branch, slack, true));
    EXPECT_TRUE(within_rule("naive lse", naive.lse, ref.lse, ref.lse, 1e-4, false));
  }
}

#if NSA_TEST_WITH_CUDA

// ------------------------------------------------------------------------------------------------
// The check of one case.

struct GpuCase {
  std::string name;
  ProblemSpec spec;
  Layout input_layout, output_layout;
  bool with_out_branch = true;
  bool given_indices = false;
};

void PrintTo(const GpuCase& c, std::ostream* os) { *os << c.name; }

GpuCase make_gpu_case(std::string name, ProblemSpec spec, nsa::Config config, DType dtype, uint64_t seed) {
  spec.config = config;
  spec.dtype = dtype;
  spec.seed = seed;
  GpuCase c;
  c.name = std::move(name) + "_" + nsa::dtype_name(dtype);
  c.spec = std::move(spec);
  return c;
}

void check_case(const GpuCase& c) {
  const Problem problem = make_problem(c.spec);
  Buffers hb = make_buffers(problem, c.input_layout, c.output_layout);
  hb.with_out_branch = c.with_out_branch;
  std::vector<int32_t> given;
  if (c.given_indices) {
    given = random_block_indices(problem, c.spec.seed + 7, 0);
    hb.block_indices = given;
    hb.block_indices_given = true;
  }
  nsa::Status st;
  const Outputs gpu = run_cuda_forward(hb, &st);
  if (not_compiled(st)) GTEST_SKIP() << st.message;
  ASSERT_TRUE(st.ok()) << nsa::status_code_name(st.code) << ": " << st.message;
  ASSERT_FALSE(gpu.out.empty());
  {
    // Given indices may be in any order: check the rest with each row sorted and -1 padded.
    Outputs canonical = gpu;
    const int64_t n = c.spec.config.num_selected;
    for (size_t row = 0; row < canonical.indices.size(); row += static_cast<size_t>(n)) {
      auto first = canonical.indices.begin() + static_cast<std::ptrdiff_t>(row);
      std::sort(first, first + n, [](int32_t x, int32_t y) { return (x < 0 ? INT32_MAX : x) < (y < 0 ? INT32_MAX : y); });
    }
    EXPECT_TRUE(outputs_well_formed(problem, canonical));
  }

  // Deterministic: a second run gives the same bits.
  {
    nsa::Status st2;
    const Outputs again = run_cuda_forward(hb, &st2);
    ASSERT_TRUE(st2.ok()) << st2.message;
    EXPECT_TRUE(outputs_identical(problem, again, gpu));
  }

  expect_16bit_forward_matches_reference(problem, gpu, c.given_indices ? &given : nullptr);
}

class CudaForward : public ::testing::TestWithParam<GpuCase> {};

TEST_P(CudaForward, MatchesReference) {
  NSA_SKIP_WITHOUT_DEVICE();
  check_case(GetParam());
}

std::vector<GpuCase> gpu_cases() {
  std::vector<GpuCase> cases;
  const nsa::Config paper;
  uint64_t seed = 1000;
  // Sequence lengths: T < l, around block edges, odd, and long enough that top-16 chooses.
  for (int64_t T : {1, 17, 63, 64, 65, 1000, 4097}) {
    const int64_t B = T == 65 ? 2 : 1;
    cases.push_back(make_gpu_case("T" + std::to_string(T) + "_paper_G2", padded_spec(B, T, 4, 2, 64, 64), paper,
                                  DType::kBFloat16, ++seed));
  }
  // Group sizes (G > 64 too: selection rows in two chunks, attention tiles inside one position;
  // 3 <= G <= 16 take the selection's shuffle path with the heads padded to 4, 8 or 16 rows).
  for (int64_t G : {1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 72}) {
    const int64_t hkv = G >= 16 ? 1 : 2;
    cases.push_back(make_gpu_case("G" + std::to_string(G), padded_spec(1, G > 16 ? 130 : 777, G * hkv, hkv, 64, 64),
                                  small_n_config(), DType::kBFloat16, ++seed));
  }
  // Head dims x dtypes.
  for (DType dtype : {DType::kBFloat16, DType::kFloat16})
    for (auto [dk, dv] : {std::pair<int64_t, int64_t>{64, 64}, {128, 128}, {192, 128}})
      cases.push_back(make_gpu_case("Dk" + std::to_string(dk) + "_Dv" + std::to_string(dv),
                                    padded_spec(2, 300, 8, 2, dk, dv), small_n_config(), dtype, ++seed));
  // The selection's padded head sums over several key tiles (T = 2048: 127 compressed keys; the
  // showcase's G = 6), and its 4-row padding at G = 3.
  for (int64_t G : {3, 6, 12})
    cases.push_back(make_gpu_case("G" + std::to_string(G) + "_T2048", padded_spec(1, 2048, G * 2, 2, 64, 64),
                                  small_n_config(), DType::kBFloat16, ++seed));
  // A large n (45 free blocks to take of up to 61).
  cases.push_back(make_gpu_case("T4096_n48", padded_spec(1, 4096, 4, 2, 64, 64),
                                make_config(32, 16, 64, 48, 1, 2, 100), DType::kBFloat16, ++seed));
  // The paper's group (G = 16) with n = 16 where it chooses.
  cases.push_back(make_gpu_case("T2048_paper_G16_D128", padded_spec(1, 2048, 16, 1, 128, 128), paper,
                                DType::kBFloat16, ++seed));
  // Packed varlen with mixed lengths (0, 1, < l, block edges, long).
  const std::vector<int64_t> lengths = {1, 17, 300, 64, 0, 1000, 65, 31};
  cases.push_back(make_gpu_case("varlen_G3_D128", varlen_spec(lengths, 6, 2, 128, 128), small_n_config(),
                                DType::kBFloat16, ++seed));
  cases.push_back(make_gpu_case("varlen_paper_G4", varlen_spec(lengths, 8, 2, 64, 64), paper, DType::kFloat16,
                                ++seed));
  // Separate window keys / values.
  {
    GpuCase c = make_gpu_case("separate_window", padded_spec(1, 500, 8, 2, 64, 64), small_n_config(), DType::kBFloat16,
                              ++seed);
    c.spec.separate_window = true;
    c.name += "_sepwin";
    cases.push_back(c);
    GpuCase v = make_gpu_case("separate_window_varlen", varlen_spec({200, 33, 400}, 6, 3, 192, 128), small_n_config(),
                              DType::kFloat16, ++seed);
    v.spec.separate_window = true;
    cases.push_back(v);
  }
  // Caller-supplied block indices (any order, -1 anywhere, some rows empty).
  for (bool varlen : {false, true}) {
    GpuCase c = make_gpu_case(varlen ? "given_indices_varlen" : "given_indices",
                              varlen ? varlen_spec({130, 1, 600, 64}, 8, 2, 64, 64) : padded_spec(2, 600, 8, 2, 64, 64),
                              small_n_config(), DType::kBFloat16, ++seed);
    c.given_indices = true;
    cases.push_back(c);
  }
  // No out_branch: the cmp branch goes through the workspace.
  {
    GpuCase c = make_gpu_case("no_out_branch", padded_spec(2, 300, 8, 2, 128, 128), small_n_config(), DType::kBFloat16,
                              ++seed);
    c.with_out_branch = false;
    cases.push_back(c);
  }
  // Strided inputs and outputs (16-byte aligned rows).
  {
    Layout heads_outer;
    heads_outer.heads_outer = true;
    heads_outer.row_pad = 3;
    Layout dim_pad;
    dim_pad.dim_pad = 8;
    GpuCase c = make_gpu_case("strided", padded_spec(2, 257, 8, 2, 64, 64), small_n_config(), DType::kBFloat16, ++seed);
    c.input_layout = heads_outer;
    c.output_layout = dim_pad;
    cases.push_back(c);
    GpuCase v = make_gpu_case("strided_varlen", varlen_spec({100, 257, 3}, 4, 2, 128, 128), small_n_config(),
                              DType::kFloat16, ++seed);
    v.input_layout = dim_pad;
    v.output_layout = heads_outer;
    cases.push_back(v);
  }
  // Outputs with even strides that are not multiples of 8 elements: 4-byte stores, not 16-byte chunks.
  {
    Layout odd_rows;
    odd_rows.dim_pad = 2;
    GpuCase c = make_gpu_case("out_even_strides", padded_spec(2, 257, 8, 2, 64, 64), small_n_config(),
                              DType::kBFloat16, ++seed);
    c.output_layout = odd_rows;
    cases.push_back(c);
    GpuCase v = make_gpu_case("out_even_strides_varlen_D128", varlen_spec({100, 257, 3}, 32, 2, 128, 128),
                              small_n_config(), DType::kFloat16, ++seed);
    v.output_layout = odd_rows;
    cases.push_back(v);
  }
  // Other block geometries: l' < 64 (partial key tiles), l' = 128 (two tiles per block), l > l',
  // no forced blocks, window 1, explicit scale.
  cases.push_back(make_gpu_case("l16d8s32_n5_init0_local3", padded_spec(1, 400, 6, 2, 64, 64),
                                make_config(16, 8, 32, 5, 0, 3, 100), DType::kBFloat16, ++seed));
  cases.push_back(make_gpu_case("l32d16s128_n3_w1", padded_spec(1, 700, 4, 1, 64, 64),
                                make_config(32, 16, 128, 3, 1, 1, 1), DType::kBFloat16, ++seed));
  cases.push_back(make_gpu_case("l64d16s32_n4_init0_local0", padded_spec(1, 300, 4, 2, 64, 64),
                                make_config(64, 16, 32, 4, 0, 0, 7), DType::kBFloat16, ++seed));
  cases.push_back(make_gpu_case("l32d32s64_n2_scale0.05", padded_spec(1, 500, 6, 3, 128, 128),
                                make_config(32, 32, 64, 2, 0, 1, 64, 0.05), DType::kFloat16, ++seed));
  // At Dk = 128 on sm_90a the slc kernel's TMA ring (slc_gather_applies): l' = 128 (two boxes of
  // a block, the second partial at the sequence end), and heads-outer K / V of two sequences (the
  // tensor maps' head and batch strides).
  cases.push_back(make_gpu_case("l32d16s128_n3_D128", padded_spec(1, 700, 8, 2, 128, 128),
                                make_config(32, 16, 128, 3, 1, 1, 64), DType::kBFloat16, ++seed));
  {
    Layout heads_outer;
    heads_outer.heads_outer = true;
    heads_outer.row_pad = 3;
    GpuCase c = make_gpu_case("strided_D128", padded_spec(2, 257, 8, 2, 128, 128), small_n_config(), DType::kBFloat16,
                              ++seed);
    c.input_layout = heads_outer;
    cases.push_back(c);
  }
  // Isolating l (cmp), l' (selection blocks) and n_init.
  cases.push_back(make_gpu_case("l16d8s64_n5_init0_local3", padded_spec(1, 400, 6, 2, 64, 64),
                                make_config(16, 8, 64, 5, 0, 3, 100), DType::kBFloat16, ++seed));
  cases.push_back(make_gpu_case("l32d16s32_n5_init1_local2", padded_spec(1, 400, 6, 2, 64, 64),
                                make_config(32, 16, 32, 5, 1, 2, 100), DType::kBFloat16, ++seed));
  cases.push_back(make_gpu_case("l32d16s32_n5_init0_local3", padded_spec(1, 400, 6, 2, 64, 64),
                                make_config(32, 16, 32, 5, 0, 3, 100), DType::kBFloat16, ++seed));
  {
    GpuCase c = make_gpu_case("given_l32d16s32", padded_spec(1, 400, 6, 2, 64, 64),
                              make_config(32, 16, 32, 5, 1, 2, 100), DType::kBFloat16, ++seed);
    c.given_indices = true;
    cases.push_back(c);
  }
  // Three warpgroups per cmp / win CTA (Dk >= 128 on sm_90a): 192 positions of G = 1 in one CTA, and
  // G > 64 (a position's heads across the warpgroups' tiles).
  for (int64_t G : {1, 72})
    cases.push_back(make_gpu_case("G" + std::to_string(G) + "_D128",
                                  padded_spec(1, G > 16 ? 130 : 777, G, 1, 128, 128), small_n_config(),
                                  DType::kBFloat16, ++seed));
  // The TMA ring at Dk = 64 (from kSlcRingMinKeysWgmma keys; below, the wgmma slc sweep), G = 6.
  cases.push_back(make_gpu_case("ring_D64_T8200", padded_spec(1, 8200, 6, 1, 64, 64), small_n_config(),
                                DType::kBFloat16, ++seed));
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaForward, ::testing::ValuesIn(gpu_cases()),
                         case_name<GpuCase>);

// The first `len` positions of a one-sequence padded problem, with the compressed tokens made of them.
Problem prefix_of(const Problem& problem, int64_t len) {
  const nsa::Config& c = problem.spec.config;
  Problem p = problem;
  p.spec.seqlens = {len};
  p.row_begin = {0, len};
  p.cmp_begin = {0, nsa::num_cmp_tokens(len, c.cmp_block, c.cmp_stride)};
  for (int arg = 0; arg < kNumArgs; ++arg)
    if (p.has(arg)) p.data[arg].resize(static_cast<size_t>(p.rows(arg) * p.heads(arg) * p.dim(arg)));
  return p;
}

// Long enough that the selection CTA's positions are halved to fit their block scores in shared
// memory (select_tiling; beyond the CPU reference's reach): its first positions must come out
// bit for bit as in a short run, whose CTAs are not halved (the kernels are causal and sum in the
// same order whatever the positions per CTA). G = 1 (the shared-memory head sum, halved from
// T of about 35k at Dk = 128) and G = 4 (the shuffle path, on sm_90a two warpgroups with the
// second left without rows, from about 72k).
// On sm_90a at Dk >= 128 the cmp, slc and win kernels take their K / V tiles through TMA rings
// (decisions 0010, 0016) and each warp (slc) or warpgroup (cmp, win) its own pace, whole tiles up to
// the sequence's end; the arithmetic is the cp.async kernels', tile for tile (the rows past a CTA's
// keys meet P = 0), so the outputs are bitwise the same. (Elsewhere both runs take the cp.async
// kernels.)
TEST(CudaForwardProperties, RingsMatchCpAsyncKernels) {
  NSA_SKIP_WITHOUT_DEVICE();
  std::vector<GpuCase> cases;
  cases.push_back(make_gpu_case("paper_G16", padded_spec(1, 3000, 16, 1, 128, 128), nsa::Config{},
                                DType::kBFloat16, 4400));
  cases.push_back(make_gpu_case("varlen_G6", varlen_spec({1, 700, 64, 2500}, 12, 2, 128, 128), small_n_config(),
                                DType::kFloat16, 4401));
  cases.push_back(make_gpu_case("l128_Dk192", padded_spec(2, 1000, 8, 2, 192, 128),
                                make_config(32, 16, 128, 4, 1, 2, 100), DType::kBFloat16, 4402));
  for (const GpuCase& c : cases) {
    SCOPED_TRACE(c.name);
    const Problem problem = make_problem(c.spec);
    Buffers ring_buffers = make_buffers(problem), cp_buffers = make_buffers(problem);
    nsa::Status st_ring, st_cp;
    const Outputs ring = run_cuda_forward_stages(ring_buffers, nsa::cuda_detail::kStageAll, &st_ring);
    const Outputs cp = run_cuda_forward_stages(
        cp_buffers, nsa::cuda_detail::kStageAll | nsa::cuda_detail::kStageCpAsyncSweeps, &st_cp);
    if (not_compiled(st_ring) && not_compiled(st_cp)) continue;  // a build of fewer instances (NSA_CUDA_INSTANCES)
    ASSERT_TRUE(st_ring.ok()) << st_ring.message;
    ASSERT_TRUE(st_cp.ok()) << st_cp.message;
    ASSERT_FALSE(ring.out_branch.empty());
    EXPECT_EQ(ring.indices, cp.indices);
    for (const auto& [name, a, b] : {std::tuple<const char*, const std::vector<double>&, const std::vector<double>&>{
                                         "out", ring.out, cp.out},
                                     {"out_branch", ring.out_branch, cp.out_branch},
                                     {"lse", ring.lse, cp.lse}}) {
      ASSERT_EQ(a.size(), b.size()) << name;
      const auto diff = std::mismatch(a.begin(), a.end(), b.begin(),
                                      [](double x, double y) { return x == y || (std::isnan(x) && std::isnan(y)); });
      EXPECT_TRUE(diff.first == a.end()) << name << " element " << (diff.first - a.begin()) << ": " << *diff.first
                                         << " (ring) vs " << *diff.second << " (cp.async)";
    }
  }
}

TEST(CudaForwardProperties, HalvedSelectionMatchesShortRun) {
  NSA_SKIP_WITHOUT_DEVICE();
  for (auto [group, seqlen] : {std::pair<int64_t, int64_t>{1, 40000}, {4, 80000}}) {
    SCOPED_TRACE("G = " + std::to_string(group) + ", T = " + std::to_string(seqlen));
    ProblemSpec spec = padded_spec(1, seqlen, group, 1, 128, 128);
    spec.config = nsa::Config{};
    spec.dtype = DType::kBFloat16;
    spec.seed = 4300 + static_cast<uint64_t>(group);
    const Problem long_problem = make_problem(spec);
    const Problem short_problem = prefix_of(long_problem, 2048);
    Buffers long_buffers = make_buffers(long_problem), short_buffers = make_buffers(short_problem);
    nsa::Status st_long, st_short;
    const Outputs long_run = run_cuda_forward(long_buffers, &st_long);
    const Outputs short_run = run_cuda_forward(short_buffers, &st_short);
    if (not_compiled(st_long)) GTEST_SKIP() << st_long.message;
    ASSERT_TRUE(st_long.ok()) << st_long.message;
    ASSERT_TRUE(st_short.ok()) << st_short.message;
    ASSERT_FALSE(short_run.indices.empty());
    ASSERT_FALSE(short_run.out.empty());
    ASSERT_GE(long_run.indices.size(), short_run.indices.size());
    ASSERT_GE(long_run.out.size(), short_run.out.size());
    const auto indices_diff =
        std::mismatch(short_run.indices.begin(), short_run.indices.end(), long_run.indices.begin());
    EXPECT_TRUE(indices_diff.first == short_run.indices.end())
        << "block index " << (indices_diff.first - short_run.indices.begin()) << ": " << *indices_diff.first << " vs "
        << *indices_diff.second;
    const auto out_diff = std::mismatch(short_run.out.begin(), short_run.out.end(), long_run.out.begin());
    EXPECT_TRUE(out_diff.first == short_run.out.end())
        << "output element " << (out_diff.first - short_run.out.begin()) << ": " << *out_diff.first << " vs "
        << *out_diff.second;
  }
}

// A small case for compute-sanitizer (scripts/gpu_check.sh filters on it): varlen, computed and
// given indices, workspace path; G = 3 (selection heads padded to 4), and the computed indices
// also at G = 2 (the selection's shared-memory head sum), 6 (padded to 8) and 16, and at Dk = 128
// for G = 6 and 16 (the selection's two warpgroups).
TEST(CudaForwardSanitizer, Small) {
  NSA_SKIP_WITHOUT_DEVICE();
  GpuCase c = make_gpu_case("sanitizer", varlen_spec({130, 1, 70, 33}, 6, 2, 64, 64), small_n_config(),
                            DType::kBFloat16, 4242);
  check_case(c);
  c.given_indices = true;
  c.with_out_branch = false;
  check_case(c);
  for (int64_t G : {2, 6, 16}) {
    SCOPED_TRACE("G = " + std::to_string(G));
    check_case(make_gpu_case("sanitizer_G" + std::to_string(G), varlen_spec({130, 1, 70}, G, 1, 64, 64),
                             small_n_config(), DType::kBFloat16, 4243 + G));
  }
  for (int64_t G : {6, 16}) {
    SCOPED_TRACE("G = " + std::to_string(G) + ", Dk = 128");
    check_case(make_gpu_case("sanitizer_G" + std::to_string(G) + "_D128", varlen_spec({130, 1, 70}, G, 1, 128, 128),
                             small_n_config(), DType::kBFloat16, 4263 + G));
  }
}

#endif  // NSA_TEST_WITH_CUDA

}  // namespace
}  // namespace nsa_test
