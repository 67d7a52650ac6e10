// Test helpers shared by the nsa test files.
//
// One mechanism, three layers:
//   Problem  - logical fp64 data of a random problem, packed per sequence ([rows, H, D], sequence b
//              owns rows row_begin[b] .. row_begin[b+1]-1), already rounded to the problem's dtype so
//              the oracle sees exactly the values the backend reads.
//   Buffers  - the problem copied into typed (f32 / f64 / bf16) buffers with a chosen physical layout
//              (contiguous, a slice of a wider buffer, heads-outer, extra rows), plus every output and
//              gradient buffer, typed by dtype and kept alive; builds nsa::ForwardParams and
//              nsa::BackwardParams pointing into itself.
//   Outputs  - results read back as doubles in the packed logical order, from the backend or from the
//              oracle, and compared with a tolerance or bit for bit.
#pragma once

#include <gtest/gtest.h>

#include <array>
#include <cctype>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "nsa/nsa.h"
#include "oracle.h"

namespace nsa_test {

// ------------------------------------------------------------------------------------------------
// The tensors of a problem. Inputs of the forward, then grad_out (an input of the backward).

enum Arg : int { kQ = 0, kK, kV, kKWin, kVWin, kKCmp, kVCmp, kGates, kGradOut, kNumArgs };
inline constexpr int kNumForwardInputs = kGradOut;  // q .. gates

const char* arg_name(int arg);

struct ProblemSpec {
  nsa::Config config;
  std::vector<int64_t> seqlens = {64};  // one entry per sequence
  bool varlen = false;                  // packed [total, H, D] with cu_seqlens; else padded (equal lengths)
  int64_t hq = 4, hkv = 2, dk = 32, dv = 32;
  bool separate_window = false;         // own k_win / v_win; else the window branch reads k / v
  nsa::DType dtype = nsa::DType::kFloat64;  // values are rounded to this type
  uint64_t seed = 1;
};

// A config from its fields in paper order (l, d, l', n, n_init, n_local, w, scale).
nsa::Config make_config(int64_t l, int64_t d, int64_t l_sel, int64_t n, int64_t n_init, int64_t n_local,
                        int64_t w = 512, double scale = 0.0);
// The paper's l, d and l' with a small n (5: 1 initial, 2 local) and window (100), so that top-n
// chooses and the window is shorter than T at the moderate lengths the GPU tests run.
nsa::Config small_n_config();

// Spec factories; adjust the other fields afterwards.
ProblemSpec padded_spec(int64_t batch, int64_t seqlen, int64_t hq, int64_t hkv, int64_t dk, int64_t dv);
ProblemSpec varlen_spec(std::vector<int64_t> seqlens, int64_t hq, int64_t hkv, int64_t dk, int64_t dv);

struct Problem {
  ProblemSpec spec;
  std::vector<int64_t> row_begin;  // [N+1] first packed raw row of each sequence
  std::vector<int64_t> cmp_begin;  // [N+1] first packed compressed row of each sequence
  std::array<std::vector<double>, kNumArgs> data;  // packed [rows, heads(arg), dim(arg)]; k_win/v_win
                                                   // empty unless spec.separate_window

  int64_t num_seqs() const { return static_cast<int64_t>(spec.seqlens.size()); }
  int64_t seqlen(int64_t b) const { return spec.seqlens[b]; }
  int64_t max_seqlen() const;
  int64_t rows() const { return row_begin.back(); }
  int64_t cmp_rows() const { return cmp_begin.back(); }
  int64_t num_blocks() const;  // selection blocks of the longest sequence (the scores' last dim)
  bool has(int arg) const { return !(arg == kKWin || arg == kVWin) || spec.separate_window; }
  bool is_cmp(int arg) const { return arg == kKCmp || arg == kVCmp; }
  int64_t heads(int arg) const;
  int64_t dim(int arg) const;
  int64_t rows(int arg) const { return is_cmp(arg) ? cmp_rows() : rows(); }
  // (sequence, position) of a packed raw row.
  std::pair<int64_t, int64_t> locate(int64_t row) const;
  std::vector<double>& operator[](int arg) { return data[arg]; }
  const std::vector<double>& operator[](int arg) const { return data[arg]; }
};

// gtest's name of a parameterized case: the case's `name` with every non-alphanumeric character
// replaced by '_'.
template <class Case>
std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  std::string name = info.param.name;
  for (char& ch : name)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return name;
}

// Random problem: N(0, 1) values (never exactly 0), gates uniform in (0.05, 0.95); seeded.
Problem make_problem(const ProblemSpec& spec);
// Rounds every value to spec.dtype (call after editing a problem's data by hand).
void round_to_dtype(Problem& problem);
// One value rounded to a dtype (through float, as a device cast would; float64: unchanged).
double round_to_dtype(double value, nsa::DType dtype);
// Sequence b alone as a padded batch of one (same values).
Problem extract_sequence(const Problem& problem, int64_t b);
// Redraws every value a query at position <= t0 must not see: raw rows at positions > t0 in every
// sequence (q, k, v, k_win, v_win, gates) and compressed tokens i with i*d + l - 1 > t0.
void perturb_after(Problem& problem, int64_t t0, uint64_t seed);

nsa_oracle::Config oracle_config(const nsa::Config& config);

// Random valid block_indices [rows, Hkv, n]: per (t, kv head) between min_count and
// min(n, eligible) distinct eligible blocks in random order, -1 in the remaining random slots.
std::vector<int32_t> random_block_indices(const Problem& problem, uint64_t seed, int64_t min_count = 1);

// ------------------------------------------------------------------------------------------------
// Typed buffers.

struct Layout {
  int64_t dim_pad = 0;       // head rows are D + dim_pad elements apart (a slice of a wider buffer)
  int64_t row_pad = 0;       // extra (unused) rows per sequence (padded) or at the end (varlen)
  bool heads_outer = false;  // physical [B, H, T, D] (varlen: [H, total, D]) instead of [B, T, H, D]
  std::string describe() const;
};

class TypedBuffer {
 public:
  TypedBuffer() = default;
  TypedBuffer(nsa::DType dtype, int64_t numel);
  nsa::DType dtype() const { return dtype_; }
  int64_t numel() const { return numel_; }
  void* data() { return numel_ ? storage_.data() : nullptr; }
  const void* data() const { return numel_ ? storage_.data() : nullptr; }
  double get(int64_t i) const;
  void set(int64_t i, double value);
  void fill(double value);

 private:
  nsa::DType dtype_ = nsa::DType::kFloat64;
  int64_t numel_ = 0;
  std::vector<uint64_t> storage_;  // 8-byte aligned for every dtype
};

// A [B, T, H, D] (or [total, H, D]) tensor with free strides and a contiguous last dim.
struct StridedTensor {
  TypedBuffer buf;
  int64_t heads = 0, dim = 0;
  int64_t batch_stride = 0, seq_stride = 0, head_stride = 0;
  std::vector<int64_t> row_offset;  // element offset of each packed logical row

  int64_t rows() const { return static_cast<int64_t>(row_offset.size()); }
  int64_t index(int64_t row, int64_t h, int64_t x) const { return row_offset[row] + h * head_stride + x; }
  nsa::InputTensor input() const;   // data == nullptr when the tensor has no rows
  nsa::OutputTensor output();
  void upload(const std::vector<double>& packed);  // packed [rows, heads, dim]
  std::vector<double> download() const;
  // Every element the logical tensor does not address still holds NaN (the poison).
  ::testing::AssertionResult gaps_untouched(const char* name) const;
};

struct Outputs {
  std::vector<double> out;         // [rows, Hq, Dv]
  std::vector<double> out_branch;  // [rows, Hq, 3, Dv]; empty when not requested
  std::vector<double> lse;         // [rows, Hq, 3]
  std::vector<int32_t> indices;    // [rows, Hkv, n]
  std::vector<double> scores;      // oracle only: [rows, Hkv, problem.num_blocks()], -inf if ineligible
};

// Gradients, packed like Problem::data (index by Arg, q .. gates; k_win/v_win empty when shared).
struct Grads {
  std::array<std::vector<double>, kNumForwardInputs> data;
  const std::vector<double>& operator[](int arg) const { return data[arg]; }
};

struct Buffers {
  ProblemSpec spec;
  std::vector<int64_t> row_begin, cmp_begin;
  Layout input_layout, output_layout;
  std::vector<int32_t> cu_seqlens, cu_seqlens_cmp;  // varlen only

  std::array<StridedTensor, kNumArgs> in;               // input_layout; k_win/v_win without rows if shared
  StridedTensor out;                                    // [rows, Hq, Dv], output_layout
  TypedBuffer out_branch;                               // [rows, Hq, 3, Dv] contiguous, dtype
  TypedBuffer lse;                                      // [rows, Hq, 3] contiguous, f64 for f64 else f32
  std::vector<int32_t> block_indices;                   // [rows, Hkv, n]
  bool block_indices_given = false;
  bool with_out_branch = true;                          // false: out_branch = nullptr in the params
  std::array<StridedTensor, kNumForwardInputs> grad;    // output_layout; grad[kKWin] etc. only if separate

  // Decode / chunked prefill (make_cache_buffers): tokens held per sequence, set by the caller
  // before each run; empty: prefill.
  std::vector<int32_t> cache_seqlens;
  int64_t cache_capacity = 0, cache_cmp_capacity = 0;
  std::vector<int64_t> tokens_read;  // [B, 3]; empty: params.tokens_read = nullptr (the forward adds to it)

  nsa::DType dtype() const { return spec.dtype; }
  int64_t rows() const { return row_begin.back(); }
  // Rewrites the inputs (and grad_out) from a problem of the same shape.
  void upload(const Problem& problem);
  nsa::ForwardParams forward_params();
  nsa::BackwardParams backward_params();
  void poison_forward();   // NaN in out (gaps included), out_branch, lse; -12345 in indices unless given
  void poison_backward();  // NaN in every grad buffer
  Outputs read_forward() const;
  Grads read_backward() const;
  // The unaddressed elements of out (resp. the grads) are still NaN.
  ::testing::AssertionResult forward_gaps_untouched() const;
  ::testing::AssertionResult backward_gaps_untouched() const;
};

Buffers make_buffers(const Problem& problem, const Layout& input_layout = {}, const Layout& output_layout = {});
// Buffers of a decode / chunked-prefill forward over the sequences of `problem` (its lengths only
// bound what fits): q, gates, grad_out and the outputs hold m rows per sequence (row b*m + i);
// k, v, k_win, v_win are caches of `capacity` rows per sequence (row b*capacity + s) and k_cmp,
// v_cmp of `cmp_capacity` (row b*cmp_capacity + i), all in input_layout and all NaN: the caller
// writes the rows a call holds (tests/cpp/decode_util.h) and sets cache_seqlens. No grads (the
// backward has no cache).
Buffers make_cache_buffers(const Problem& problem, int64_t m, int64_t capacity, int64_t cmp_capacity,
                           const Layout& input_layout = {}, const Layout& output_layout = {});

// ------------------------------------------------------------------------------------------------
// Running.

struct RunOptions {
  Layout input_layout, output_layout;
  int num_threads = 0;
  const std::vector<int32_t>* given_indices = nullptr;  // [rows, Hkv, n]: block_indices_given
  bool with_out_branch = true;
};

// Poisons, runs nsa::cpu::forward; on success checks the gaps of out were left alone.
nsa::Status run_forward(Buffers& buffers, int num_threads = 0);
// make_buffers + run_forward + read_forward. Records a test failure (and returns empty outputs)
// when the backend fails.
Outputs reference_forward(const Problem& problem, const RunOptions& options = {});
// The oracle, sequence by sequence.
Outputs oracle_forward(const Problem& problem, const std::vector<int32_t>* given_indices = nullptr);

// ------------------------------------------------------------------------------------------------
// Comparing.

struct Tolerance {
  double abs = 0.0, rel = 0.0;  // |got - want| <= abs + rel * |want|
};
Tolerance tolerance_for(nsa::DType dtype);

using RowFilter = std::function<bool(int64_t seq, int64_t t)>;  // rows to compare; null: all

// out, out_branch (when both have it), lse (infinities must match exactly) within tol; indices
// exactly. Reports the first mismatches by (seq, t, head, branch, element).
::testing::AssertionResult outputs_near(const Problem& problem, const Outputs& got, const Outputs& want,
                                        Tolerance tol, const RowFilter& filter = nullptr);
// Top-n with a tie allowance (DESIGN.md section 2): each (row, kv head) selection in `indices`
// ([rows, Hkv, n], any order) is one the contract allows up to score rounding, judged by the
// oracle's scores P: forced blocks present, min(n, eligible) distinct eligible blocks, and every
// chosen free block scores >= every unchosen eligible block minus eps. Then feed `indices` to the
// oracle (oracle_forward(problem, &indices)) to check the outputs.
::testing::AssertionResult indices_within_ties(const Problem& problem, const std::vector<int32_t>& indices,
                                               const Outputs& oracle, double eps = 1e-12);
// Bit for bit.
::testing::AssertionResult outputs_identical(const Problem& problem, const Outputs& got, const Outputs& want,
                                             const RowFilter& filter = nullptr);
// No NaN or inf in out / out_branch; lse finite except -inf exactly where the branch has no key
// (cmp at t < l-1; slc with an empty selection); indices ascending, distinct, eligible, -1 padded.
::testing::AssertionResult outputs_well_formed(const Problem& problem, const Outputs& outputs);
// The rows of sequence b (scores dropped).
Outputs slice_sequence(const Problem& problem, const Outputs& outputs, int64_t b);
// max |got - want| over out and out_branch (for reporting).
double max_abs_diff(const Outputs& got, const Outputs& want);

// Error statistics of `got` against `ref` (same size): max |got - ref| and its index over the
// entries where both are finite, dot product and squared norms for the cosine; every other entry
// (inf or NaN on either side) counts in mismatched_inf unless both are the same infinity.
struct ErrorStats {
  double max_abs = 0, dot = 0, norm_got = 0, norm_ref = 0;
  int64_t mismatched_inf = 0;
  size_t worst = 0;  // index of max_abs
  double cosine() const;  // 1 when either norm is 0
};
ErrorStats error_stats(const std::vector<double>& got, const std::vector<double>& ref);

// ------------------------------------------------------------------------------------------------
// Gradients.

// nsa::cpu::forward then nsa::cpu::backward on make_buffers(problem, options' layouts), the forward
// fed options.given_indices when set (block_indices_given); checks the grads' gaps. Records a test
// failure (and returns empty grads) when a backend call fails. `indices` receives the selection.
Grads reference_gradients(const Problem& problem, const RunOptions& options = {},
                          std::vector<int32_t>* indices = nullptr);
// Names element i of the gradient of `arg` (packed like Problem::data), e.g.
// "grad_k_cmp[seq 1, cmp token 3, head 0, elem 5]" or "grad_gates[seq 0, t 17, head 2, branch 1]".
std::string describe_grad_element(const Problem& problem, int arg, size_t i);
// Every gradient bit for bit (k_win / v_win only when the problem has them).
::testing::AssertionResult grads_identical(const Problem& problem, const Grads& got, const Grads& want);

// ------------------------------------------------------------------------------------------------
// The CUDA backend (test_cuda_forward.cpp, test_cuda_backward.cpp). Declared in every build; in a
// test binary built without CUDA the runners return kUnsupported, and the GPU tests skip through
// NSA_SKIP_WITHOUT_DEVICE before they get there.

// The CUDA backend is built into this binary and a device is present.
bool cuda_device_available();

#define NSA_SKIP_WITHOUT_DEVICE()                                                   \
  do {                                                                              \
    if (!::nsa_test::cuda_device_available()) GTEST_SKIP() << "no CUDA device";     \
  } while (0)

// The (dtype, head dims) of the call is not compiled in this build (NSA_CUDA_INSTANCES or
// NSA_CUDA_FAST_BUILD compiles a subset): the cases that need it skip.
bool not_compiled(const nsa::Status& st);

// Runs nsa::cuda::forward on device copies of `buffers` (inputs, offsets, cache seqlens and
// tokens_read; out, out_branch, lse and, unless given, block_indices poisoned first; workspace
// filled with 0xFF bytes), copies the outputs (and tokens_read) back into `buffers`, checks the
// gaps of out and returns them. `status` receives the forward's status (a launch error found by
// the synchronization after it included).
Outputs run_cuda_forward(Buffers& buffers, nsa::Status* status);
// The same through nsa::cuda_detail::forward_stages with `stages` (src/cuda/stages.h): every stage,
// with kStageCpAsyncSweeps among them to run the cp.async kernels where the TMA rings would.
Outputs run_cuda_forward_stages(Buffers& buffers, unsigned stages, nsa::Status* status);
// Runs nsa::cuda::backward (with `deterministic` and `selected_dq`) on device copies of `buffers`:
// inputs, grad_out, and block_indices / out_branch / lse as they are in `buffers` (run_cuda_forward
// leaves the GPU forward's there); every grad poisoned with NaN, the workspace with 0xFF bytes.
// Copies the grads back, checks their gaps and that no read-only buffer changed, and returns them.
Grads run_cuda_backward(Buffers& buffers, bool deterministic, nsa::Status* status,
                        nsa::SelectedDq selected_dq = nsa::SelectedDq::kAuto);

// ------------------------------------------------------------------------------------------------
// Judging a 16-bit forward (the CUDA backend's) by DESIGN.md section 2. No device needed.
//
// The naive implementation is what a bf16/fp16 kernel must compute at least: scores q.k in fp32
// from the 16-bit inputs, softmax in fp32 relative to the row max, the probabilities rounded to
// the dtype before they multiply V (the tensor-core P.V product takes 16-bit operands), fp32
// accumulation, each branch output rounded to the dtype (it is stored as such in out_branch),
// and the gated sum of the rounded branch outputs in fp32, rounded to the dtype.

// The naive same-dtype forward of `problem` on the given indices ([rows, Hkv, n]).
Outputs naive_forward(const Problem& problem, const std::vector<int32_t>& indices);
// P(t, j, kv head) of Eqs. 8-10 in fp64, -inf for ineligible blocks; laid out as Outputs::scores
// for indices_within_ties.
Outputs reference_scores(const Problem& problem);

// Names element i of an output for messages, e.g. "[seq 0, t 17, head 3, branch 1, elem 5]".
using Describe = std::function<std::string(size_t)>;
// max|got - ref| <= 2 max|naive - ref| + slack, no inf/NaN mismatch, and (check_cosine)
// cosine(got, ref) > 0.9999.
::testing::AssertionResult within_rule(const char* name, const std::vector<double>& got,
                                       const std::vector<double>& naive, const std::vector<double>& ref, double slack,
                                       bool check_cosine, const Describe& describe = nullptr);

// Section 2 for 16-bit forward outputs `got` of `problem` (all rows): the selection is one the
// contract allows up to score rounding (or equals `given`, the block_indices the forward was
// given); then, with `ref` the fp64 CPU reference fed got.indices and `naive` naive_forward on
// them, within_rule for out and out_branch (slack 1e-5, cosine) and lse (slack 1e-4: fp32
// statistics from approximate exp2/log2). Records failures, with per-branch diagnostics.
void expect_16bit_forward_matches_reference(const Problem& problem, const Outputs& got,
                                            const std::vector<int32_t>* given = nullptr);

}  // namespace nsa_test
