// The CUDA forward (nsa::cuda::forward) against the CPU reference, per DESIGN.md section 2.
//
// For every case: random inputs rounded to the dtype (bfloat16 or float16), device buffers
// poisoned with NaN (indices with -12345) before the run, then
//   - outputs well formed: no NaN/inf, lse -inf exactly where a branch has no key, every element
//     written, nothing outside the strided outputs written; two runs bitwise identical;
//   - top-n: the GPU's block_indices are a selection the contract allows up to score rounding
//     (indices_within_ties, against fp64 scores computed here);
//   - outputs: the CPU reference in fp64 on the same dtype-rounded inputs, fed the GPU's indices
//     (block_indices_given), is `ref`; `naive` is the plain same-dtype implementation below; then
//     max|gpu - ref| <= 2 max|naive - ref| + 1e-5 for out and out_branch, cosine(gpu, ref) > 0.9999,
//     and max|lse_gpu - lse_ref| <= 2 max|lse_naive - lse_ref| + 1e-4 (fp32 statistics; the GPU
//     uses ex2.approx / lg2.approx), -inf entries identical.
//
// The naive implementation is what a bf16/fp16 kernel must compute at least: scores q.k in fp32
// from the 16-bit inputs, softmax in fp32 relative to the row max, the probabilities rounded to
// the dtype before they multiply V (the tensor-core P.V product takes 16-bit operands), fp32
// accumulation, each branch output rounded to the dtype (it is stored as such in out_branch),
// and the gated sum of the rounded branch outputs in fp32, rounded to the dtype.
//
// Without a CUDA device (or a build without CUDA) the GPU tests are skipped; the API checks
// that need no device still run.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <sstream>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "nsa/nsa.h"
#include "test_util.h"

namespace nsa_test {
namespace {

using nsa::DType;

constexpr double kInf = std::numeric_limits<double>::infinity();

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

// ------------------------------------------------------------------------------------------------
// Host-side comparisons.

template <class Fn>
void parallel_rows(int64_t rows, Fn fn) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(rows, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (int64_t w = 0; w < threads; ++w)
    pool.emplace_back([&, w] {
      for (int64_t r = w; r < rows; r += threads) fn(r);
    });
  for (auto& th : pool) th.join();
}

const double* row_ptr(const Problem& p, int arg, int64_t row, int64_t head) {
  return p.data[arg].data() + (row * p.heads(arg) + head) * p.dim(arg);
}

// The plain same-dtype forward described at the top of this file, on the given indices.
Outputs naive_forward(const Problem& p, const std::vector<int32_t>& indices) {
  const ProblemSpec& s = p.spec;
  const nsa::Config& c = s.config;
  const DType dt = s.dtype;
  const int64_t hq = s.hq, hkv = s.hkv, G = hq / hkv, dk = s.dk, dv = s.dv, n = c.num_selected;
  const float scale = static_cast<float>(c.scale > 0 ? c.scale : 1.0 / std::sqrt(static_cast<double>(dk)));
  Outputs o;
  o.out.assign(static_cast<size_t>(p.rows() * hq * dv), 0.0);
  o.out_branch.assign(static_cast<size_t>(p.rows() * hq * 3 * dv), 0.0);
  o.lse.assign(static_cast<size_t>(p.rows() * hq * 3), -kInf);
  o.indices = indices;
  const int kwin = p.has(kKWin) ? kKWin : kK, vwin = p.has(kVWin) ? kVWin : kV;
  parallel_rows(p.rows(), [&](int64_t row) {
    const auto [b, t] = p.locate(row);
    std::vector<float> q(static_cast<size_t>(dk)), scores, acc(static_cast<size_t>(dv));
    std::vector<int64_t> keys;  // packed rows of the branch's keys
    for (int64_t h = 0; h < hq; ++h) {
      const int64_t kvh = h / G;
      for (int64_t e = 0; e < dk; ++e) q[e] = static_cast<float>(row_ptr(p, kQ, row, h)[e]);
      float branch_out[3][256];
      for (int br = 0; br < 3; ++br) {
        keys.clear();
        int karg = kK, varg = kV;
        if (br == nsa::kBranchCmp) {
          karg = kKCmp;
          varg = kVCmp;
          const int64_t vis = nsa::num_visible_cmp_tokens(t, c.cmp_block, c.cmp_stride);
          for (int64_t i = 0; i < vis; ++i) keys.push_back(p.cmp_begin[b] + i);
        } else if (br == nsa::kBranchSlc) {
          std::vector<int64_t> blocks;
          for (int64_t x = 0; x < n; ++x) {
            const int32_t j = indices[(row * hkv + kvh) * n + x];
            if (j >= 0) blocks.push_back(j);
          }
          std::sort(blocks.begin(), blocks.end());
          for (int64_t j : blocks)
            for (int64_t k = j * c.sel_block; k < std::min((j + 1) * c.sel_block, t + 1); ++k)
              keys.push_back(p.row_begin[b] + k);
        } else {
          karg = kwin;
          varg = vwin;
          for (int64_t k = std::max<int64_t>(0, t - c.window + 1); k <= t; ++k) keys.push_back(p.row_begin[b] + k);
        }
        scores.assign(keys.size(), 0.f);
        float mx = -std::numeric_limits<float>::infinity();
        for (size_t x = 0; x < keys.size(); ++x) {
          const double* kr = row_ptr(p, karg, keys[x], kvh);
          float dot = 0.f;
          for (int64_t e = 0; e < dk; ++e) dot += q[e] * static_cast<float>(kr[e]);
          scores[x] = dot * scale;
          mx = std::max(mx, scores[x]);
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        float sum = 0.f;
        for (size_t x = 0; x < keys.size(); ++x) {
          const float pr = std::exp(scores[x] - mx);
          sum += pr;
          const float pr16 = static_cast<float>(round_to_dtype(pr, dt));
          const double* vr = row_ptr(p, varg, keys[x], kvh);
          for (int64_t e = 0; e < dv; ++e) acc[e] += pr16 * static_cast<float>(vr[e]);
        }
        const int64_t stat = (row * hq + h) * 3 + br;
        for (int64_t e = 0; e < dv; ++e) {
          const float v = keys.empty() ? 0.f : static_cast<float>(round_to_dtype(acc[e] / sum, dt));
          branch_out[br][e] = v;
          o.out_branch[stat * dv + e] = v;
        }
        o.lse[stat] = keys.empty() ? -kInf : static_cast<double>(mx + std::log(sum));
      }
      const double* gate = row_ptr(p, kGates, row, h);
      const float g0 = static_cast<float>(gate[0]), g1 = static_cast<float>(gate[1]), g2 = static_cast<float>(gate[2]);
      for (int64_t e = 0; e < dv; ++e)
        o.out[(row * hq + h) * dv + e] =
            round_to_dtype(g0 * branch_out[0][e] + g1 * branch_out[1][e] + g2 * branch_out[2][e], dt);
    }
  });
  return o;
}

// P(t, j, kv head) of Eqs. 8-10 in fp64 (section 2.4), -inf for ineligible blocks; laid out as
// Outputs::scores for indices_within_ties.
Outputs reference_scores(const Problem& p) {
  const ProblemSpec& s = p.spec;
  const nsa::Config& c = s.config;
  const int64_t hq = s.hq, hkv = s.hkv, G = hq / hkv, dk = s.dk, nb = p.num_blocks();
  const double scale = c.scale > 0 ? c.scale : 1.0 / std::sqrt(static_cast<double>(dk));
  Outputs o;
  o.scores.assign(static_cast<size_t>(p.rows() * hkv * nb), -kInf);
  parallel_rows(p.rows(), [&](int64_t row) {
    const auto [b, t] = p.locate(row);
    const int64_t vis = nsa::num_visible_cmp_tokens(t, c.cmp_block, c.cmp_stride);
    std::vector<double> z(static_cast<size_t>(vis));
    for (int64_t kvh = 0; kvh < hkv; ++kvh) {
      double* P = &o.scores[(row * hkv + kvh) * nb];
      for (int64_t j = 0; j <= t / c.sel_block; ++j) P[j] = 0.0;
      for (int64_t g = 0; g < G; ++g) {
        if (vis == 0) break;
        double mx = -kInf;
        for (int64_t i = 0; i < vis; ++i) {
          const double* q = row_ptr(p, kQ, row, kvh * G + g);
          const double* k = row_ptr(p, kKCmp, p.cmp_begin[b] + i, kvh);
          double dot = 0;
          for (int64_t e = 0; e < dk; ++e) dot += q[e] * k[e];
          z[i] = scale * dot;
          mx = std::max(mx, z[i]);
        }
        double sum = 0;
        for (int64_t i = 0; i < vis; ++i) sum += std::exp(z[i] - mx);
        for (int64_t i = 0; i < vis; ++i) {
          const double pr = std::exp(z[i] - mx) / sum;
          for (int64_t j = i * c.cmp_stride / c.sel_block; j <= (i * c.cmp_stride + c.cmp_block - 1) / c.sel_block; ++j)
            P[j] += pr * static_cast<double>(nsa::overlap_weight(i, j, c.cmp_block, c.cmp_stride, c.sel_block));
        }
      }
    }
  });
  return o;
}

// Names element i of an output for messages, e.g. "[seq 0, t 17, head 3, branch 1, elem 5]".
using Describe = std::function<std::string(size_t)>;

// DESIGN.md section 2: max|gpu - ref| <= 2 max|naive - ref| + slack (and cosine for outputs).
::testing::AssertionResult within_rule(const char* name, const std::vector<double>& gpu,
                                       const std::vector<double>& naive, const std::vector<double>& ref, double slack,
                                       bool check_cosine, const Describe& describe = nullptr) {
  if (gpu.size() != ref.size() || naive.size() != ref.size())
    return ::testing::AssertionFailure() << name << ": sizes " << gpu.size() << " / " << naive.size() << " / "
                                         << ref.size();
  const ErrorStats g = error_stats(gpu, ref), nv = error_stats(naive, ref);
  const double bound = 2 * nv.max_abs + slack;
  auto msg = [&](::testing::AssertionResult r) {
    r << name << ": max|gpu-ref| " << g.max_abs << ", max|naive-ref| " << nv.max_abs << ", bound " << bound
      << ", cosine " << g.cosine() << ", inf/NaN mismatches " << g.mismatched_inf;
    if (describe && g.max_abs > bound)
      r << "; worst at " << describe(g.worst) << ": gpu " << gpu[g.worst] << " ref " << ref[g.worst] << " naive "
        << naive[g.worst];
    return r;
  };
  if (g.mismatched_inf != 0 || !(g.max_abs <= bound) || (check_cosine && !(g.cosine() > 0.9999)))
    return msg(::testing::AssertionFailure());
  return msg(::testing::AssertionSuccess());
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

  const nsa::Config& cfg = c.spec.config;
  if (c.given_indices) {
    EXPECT_EQ(gpu.indices, given) << "given block_indices must be left alone";
  } else {
    const double eps = 2e-5 * static_cast<double>(c.spec.hq / c.spec.hkv) *
                           static_cast<double>(cfg.cmp_block / cfg.cmp_stride) + 1e-7;
    EXPECT_TRUE(indices_within_ties(problem, gpu.indices, reference_scores(problem), eps));
  }

  // The reference in fp64 on the same (rounded) values and the GPU's indices.
  Problem p64 = problem;
  p64.spec.dtype = DType::kFloat64;
  RunOptions ro;
  ro.given_indices = &gpu.indices;
  const Outputs ref = reference_forward(p64, ro);
  ASSERT_FALSE(ref.out.empty());
  const Outputs naive = naive_forward(problem, gpu.indices);
  const int64_t hq = c.spec.hq, hkv = c.spec.hkv, dv = c.spec.dv, n = cfg.num_selected;
  // Element names: index -> (row, head, branch, elem), with the row's selected blocks.
  auto describe = [&](size_t i, int64_t branches, int64_t dim) {
    const int64_t e = static_cast<int64_t>(i);
    const int64_t x = e % dim, br = (e / dim) % branches, h = e / dim / branches % hq, row = e / dim / branches / hq;
    const auto [b, t] = problem.locate(row);
    std::ostringstream os;
    os << "[seq " << b << ", t " << t << ", head " << h;
    if (branches > 1) os << ", branch " << br;
    if (dim > 1) os << ", elem " << x;
    os << "] blocks";
    for (int64_t k = 0; k < n; ++k) os << " " << gpu.indices[(row * hkv + h / (hq / hkv)) * n + k];
    return os.str();
  };
  const auto out_ok = within_rule("out", gpu.out, naive.out, ref.out, 1e-5, true,
                                  [&](size_t i) { return describe(i, 1, dv); });
  const auto branch_ok = c.with_out_branch ? within_rule("out_branch", gpu.out_branch, naive.out_branch,
                                                         ref.out_branch, 1e-5, true)
                                           : ::testing::AssertionSuccess();
  const auto lse_ok = within_rule("lse", gpu.lse, naive.lse, ref.lse, 1e-4, false);
  EXPECT_TRUE(out_ok);
  EXPECT_TRUE(branch_ok);
  EXPECT_TRUE(lse_ok);
  if (out_ok && branch_ok && lse_ok) return;
  // Diagnostics: the same rule per branch, naming the worst element and its row's blocks.
  for (int br = 0; br < 3; ++br) {
    auto slice = [&](const std::vector<double>& v, int64_t dim) {
      std::vector<double> part;
      if (v.empty()) return part;
      for (int64_t row = 0; row < problem.rows() * hq; ++row)
        part.insert(part.end(), v.begin() + (row * 3 + br) * dim, v.begin() + (row * 3 + br + 1) * dim);
      return part;
    };
    const std::string tag = std::string("[") + (br == 0 ? "cmp" : br == 1 ? "slc" : "win") + "]";
    if (c.with_out_branch) {
      std::cout << "  diagnostic "
                << within_rule(("out_branch" + tag).c_str(), slice(gpu.out_branch, dv), slice(naive.out_branch, dv),
                               slice(ref.out_branch, dv), 1e-5, true, [&](size_t i) { return describe(i, 1, dv); })
                       .message()
                << "\n";
    }
    std::cout << "  diagnostic "
              << within_rule(("lse" + tag).c_str(), slice(gpu.lse, 1), slice(naive.lse, 1), slice(ref.lse, 1), 1e-4,
                             false, [&](size_t i) { return describe(i, 1, 1); })
                     .message()
              << "\n";
  }
}

class CudaForward : public ::testing::TestWithParam<GpuCase> {};

TEST_P(CudaForward, MatchesReference) {
  NSA_SKIP_WITHOUT_DEVICE();
  check_case(GetParam());
}

// Paper defaults except a small n and window, so that top-n chooses at moderate T.
nsa::Config tight_config() { return make_config(32, 16, 64, 5, 1, 2, 100); }

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
  // Group sizes (G > 64 too: selection rows in two chunks, attention tiles inside one position).
  for (int64_t G : {1, 2, 3, 4, 6, 8, 16, 72}) {
    const int64_t hkv = G >= 16 ? 1 : 2;
    cases.push_back(make_gpu_case("G" + std::to_string(G), padded_spec(1, G > 16 ? 130 : 777, G * hkv, hkv, 64, 64),
                                  tight_config(), DType::kBFloat16, ++seed));
  }
  // Head dims x dtypes.
  for (DType dtype : {DType::kBFloat16, DType::kFloat16})
    for (auto [dk, dv] : {std::pair<int64_t, int64_t>{64, 64}, {128, 128}, {192, 128}})
      cases.push_back(make_gpu_case("Dk" + std::to_string(dk) + "_Dv" + std::to_string(dv),
                                    padded_spec(2, 300, 8, 2, dk, dv), tight_config(), dtype, ++seed));
  // The paper's group (G = 16) with n = 16 where it chooses.
  cases.push_back(make_gpu_case("T2048_paper_G16_D128", padded_spec(1, 2048, 16, 1, 128, 128), paper,
                                DType::kBFloat16, ++seed));
  // Packed varlen with mixed lengths (0, 1, < l, block edges, long).
  const std::vector<int64_t> lengths = {1, 17, 300, 64, 0, 1000, 65, 31};
  cases.push_back(make_gpu_case("varlen_G3_D128", varlen_spec(lengths, 6, 2, 128, 128), tight_config(),
                                DType::kBFloat16, ++seed));
  cases.push_back(make_gpu_case("varlen_paper_G4", varlen_spec(lengths, 8, 2, 64, 64), paper, DType::kFloat16,
                                ++seed));
  // Separate window keys / values.
  {
    GpuCase c = make_gpu_case("separate_window", padded_spec(1, 500, 8, 2, 64, 64), tight_config(), DType::kBFloat16,
                              ++seed);
    c.spec.separate_window = true;
    c.name += "_sepwin";
    cases.push_back(c);
    GpuCase v = make_gpu_case("separate_window_varlen", varlen_spec({200, 33, 400}, 6, 3, 192, 128), tight_config(),
                              DType::kFloat16, ++seed);
    v.spec.separate_window = true;
    cases.push_back(v);
  }
  // Caller-supplied block indices (any order, -1 anywhere, some rows empty).
  for (bool varlen : {false, true}) {
    GpuCase c = make_gpu_case(varlen ? "given_indices_varlen" : "given_indices",
                              varlen ? varlen_spec({130, 1, 600, 64}, 8, 2, 64, 64) : padded_spec(2, 600, 8, 2, 64, 64),
                              tight_config(), DType::kBFloat16, ++seed);
    c.given_indices = true;
    cases.push_back(c);
  }
  // No out_branch: the cmp branch goes through the workspace.
  {
    GpuCase c = make_gpu_case("no_out_branch", padded_spec(2, 300, 8, 2, 128, 128), tight_config(), DType::kBFloat16,
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
    GpuCase c = make_gpu_case("strided", padded_spec(2, 257, 8, 2, 64, 64), tight_config(), DType::kBFloat16, ++seed);
    c.input_layout = heads_outer;
    c.output_layout = dim_pad;
    cases.push_back(c);
    GpuCase v = make_gpu_case("strided_varlen", varlen_spec({100, 257, 3}, 4, 2, 128, 128), tight_config(),
                              DType::kFloat16, ++seed);
    v.input_layout = dim_pad;
    v.output_layout = heads_outer;
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
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaForward, ::testing::ValuesIn(gpu_cases()),
                         [](const ::testing::TestParamInfo<GpuCase>& param_info) {
                           std::string name = param_info.param.name;
                           for (char& ch : name)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return name;
                         });

// A small case for compute-sanitizer (scripts/gpu_check.sh filters on it): varlen, G = 3,
// computed and given indices, workspace path.
TEST(CudaForwardSanitizer, Small) {
  NSA_SKIP_WITHOUT_DEVICE();
  GpuCase c = make_gpu_case("sanitizer", varlen_spec({130, 1, 70, 33}, 6, 2, 64, 64), tight_config(),
                            DType::kBFloat16, 4242);
  check_case(c);
  c.given_indices = true;
  c.with_out_branch = false;
  check_case(c);
}

#endif  // NSA_TEST_WITH_CUDA

}  // namespace
}  // namespace nsa_test
