// Test helpers; see test_util.h.
#include "test_util.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iostream>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "cuda/stages.h"

#if NSA_TEST_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace nsa_test {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int32_t kIndexPoison = -12345;

uint16_t to_bf16(double value) {
  const float f = static_cast<float>(value);
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if (std::isnan(f)) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

double from_bf16(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// IEEE binary16, round to nearest even (the value goes through float first, like a cast on
// the device would).
uint16_t to_fp16(double value) {
  const float f = static_cast<float>(value);
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const float mag = std::fabs(f);
  if (std::isnan(f)) return static_cast<uint16_t>(sign | 0x7E00u);
  if (mag >= 65520.0f) return static_cast<uint16_t>(sign | 0x7C00u);
  if (mag < 6.103515625e-05f)  // subnormal: units of 2^-24
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(std::ldexp(mag, 24))));
  uint32_t bits;
  std::memcpy(&bits, &mag, sizeof bits);
  const uint32_t exponent = ((bits >> 23) & 0xFFu) - 127u + 15u;
  uint32_t half = (exponent << 10) | ((bits >> 13) & 0x3FFu);
  const uint32_t rest = bits & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;
  return static_cast<uint16_t>(sign | half);
}

double from_fp16(uint16_t bits) {
  const int exponent = (bits >> 10) & 0x1F, mantissa = bits & 0x3FF;
  double mag;
  if (exponent == 0) mag = std::ldexp(static_cast<double>(mantissa), -24);
  else if (exponent == 31) mag = mantissa ? kNaN : kInf;
  else mag = std::ldexp(static_cast<double>(mantissa | 0x400), exponent - 25);
  return (bits & 0x8000u) ? -mag : mag;
}

double round_value(double value, nsa::DType dtype) {
  switch (dtype) {
    case nsa::DType::kFloat64: return value;
    case nsa::DType::kFloat32: return static_cast<double>(static_cast<float>(value));
    case nsa::DType::kBFloat16: return from_bf16(to_bf16(value));
    case nsa::DType::kFloat16: return from_fp16(to_fp16(value));
  }
  return kNaN;
}

nsa::DType stats_dtype(nsa::DType dtype) {
  return dtype == nsa::DType::kFloat64 ? nsa::DType::kFloat64 : nsa::DType::kFloat32;
}

// One random value for tensor `arg`; never exactly zero.
double draw(int arg, std::mt19937_64& rng) {
  if (arg == kGates) return std::uniform_real_distribution<double>(0.05, 0.95)(rng);
  std::normal_distribution<double> normal(0.0, 1.0);
  double x = 0.0;
  while (x == 0.0) x = normal(rng);
  return x;
}

uint64_t bits_of(double x) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

// Offsets of packed logical rows for a tensor with `rows_per_seq[b]` rows per sequence.
StridedTensor make_tensor(const ProblemSpec& spec, const std::vector<int64_t>& begin, int64_t heads, int64_t dim,
                          const Layout& layout, nsa::DType dtype) {
  StridedTensor t;
  t.heads = heads;
  t.dim = dim;
  const int64_t num_seqs = static_cast<int64_t>(begin.size()) - 1;
  const int64_t total = begin.back();
  const int64_t row_len = dim + layout.dim_pad;
  // Rows one sequence (padded) or the whole packed tensor (varlen) is allocated with; never 0 so
  // that strides stay positive.
  const int64_t alloc_rows =
      std::max<int64_t>(1, (spec.varlen ? total : (num_seqs ? begin[1] - begin[0] : 0)) + layout.row_pad);
  if (layout.heads_outer) {
    t.seq_stride = row_len;
    t.head_stride = alloc_rows * row_len;
    t.batch_stride = heads * t.head_stride;
  } else {
    t.head_stride = row_len;
    t.seq_stride = heads * row_len;
    t.batch_stride = alloc_rows * t.seq_stride;
  }
  const int64_t numel = spec.varlen ? t.batch_stride : num_seqs * t.batch_stride;
  if (spec.varlen) t.batch_stride = 0;
  t.row_offset.resize(static_cast<size_t>(total));
  for (int64_t b = 0; b < num_seqs; ++b)
    for (int64_t r = begin[b]; r < begin[b + 1]; ++r)
      t.row_offset[r] = spec.varlen ? r * t.seq_stride : b * t.batch_stride + (r - begin[b]) * t.seq_stride;
  t.buf = TypedBuffer(dtype, total ? numel : 0);
  return t;
}

std::string where(const Problem& p, const char* name, int64_t row, int64_t head, int64_t branch, int64_t x) {
  const auto [b, t] = p.locate(row);
  std::ostringstream os;
  os << name << "[seq " << b << ", t " << t;
  if (head >= 0) os << ", head " << head;
  if (branch >= 0) os << ", branch " << branch;
  if (x >= 0) os << ", elem " << x;
  os << "]";
  return os.str();
}

// Shared comparison loop. bitwise: exact bits; else |got - want| <= tol (equal infinities pass).
::testing::AssertionResult compare(const Problem& p, const Outputs& got, const Outputs& want, Tolerance tol,
                                   bool bitwise, const RowFilter& filter) {
  std::ostringstream msg;
  int64_t failures = 0;
  double worst = 0.0;
  const int64_t rows = p.rows();
  auto report = [&](const std::string& what, double g, double w) {
    if (failures < 8) msg << "\n  " << what << ": got " << g << " want " << w << " (diff " << g - w << ")";
    ++failures;
  };
  auto check_array = [&](const char* name, const std::vector<double>& g, const std::vector<double>& w,
                         int64_t heads, int64_t branches, int64_t dim) {
    const int64_t per_row = heads * branches * dim;
    if (static_cast<int64_t>(g.size()) != rows * per_row || static_cast<int64_t>(w.size()) != rows * per_row) {
      msg << "\n  " << name << ": size " << g.size() << " vs " << w.size() << ", expected " << rows * per_row;
      ++failures;
      return;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const auto [b, t] = p.locate(r);
      if (filter && !filter(b, t)) continue;
      for (int64_t e = 0; e < per_row; ++e) {
        const double gv = g[r * per_row + e], wv = w[r * per_row + e];
        bool ok;
        if (bitwise) {
          ok = bits_of(gv) == bits_of(wv);
        } else if (std::isinf(wv) || std::isinf(gv)) {
          ok = gv == wv;
        } else {
          const double diff = std::fabs(gv - wv);
          ok = diff <= tol.abs + tol.rel * std::fabs(wv);  // false for NaN
          if (ok) worst = std::max(worst, diff);
        }
        if (!ok) {
          const int64_t x = e % dim, br = (e / dim) % branches, h = e / dim / branches;
          report(where(p, name, r, h, branches > 1 ? br : -1, dim > 1 ? x : -1), gv, wv);
        }
      }
    }
  };
  const int64_t hq = p.spec.hq, dv = p.spec.dv;
  check_array("out", got.out, want.out, hq, 1, dv);
  if (!got.out_branch.empty() && !want.out_branch.empty())
    check_array("out_branch", got.out_branch, want.out_branch, hq, 3, dv);
  check_array("lse", got.lse, want.lse, hq, 3, 1);
  // Indices: always exact.
  const int64_t hkv = p.spec.hkv, n = p.spec.config.num_selected;
  if (static_cast<int64_t>(got.indices.size()) != rows * hkv * n ||
      static_cast<int64_t>(want.indices.size()) != rows * hkv * n) {
    msg << "\n  indices: size " << got.indices.size() << " vs " << want.indices.size() << ", expected "
        << rows * hkv * n;
    ++failures;
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      const auto [b, t] = p.locate(r);
      if (filter && !filter(b, t)) continue;
      for (int64_t h = 0; h < hkv; ++h) {
        const int32_t* g = &got.indices[(r * hkv + h) * n];
        const int32_t* w = &want.indices[(r * hkv + h) * n];
        if (std::equal(g, g + n, w)) continue;
        if (failures < 8) {
          msg << "\n  " << where(p, "indices", r, h, -1, -1) << ": got";
          for (int64_t x = 0; x < n; ++x) msg << " " << g[x];
          msg << " want";
          for (int64_t x = 0; x < n; ++x) msg << " " << w[x];
        }
        ++failures;
      }
    }
  }
  if (failures) {
    return ::testing::AssertionFailure() << failures << " mismatch(es)" << (bitwise ? " (bitwise)" : "")
                                         << msg.str();
  }
  return ::testing::AssertionSuccess() << "max |diff| " << worst;
}

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

}  // namespace

// ------------------------------------------------------------------------------------------------

const char* arg_name(int arg) {
  static const char* names[kNumArgs] = {"q", "k", "v", "k_win", "v_win", "k_cmp", "v_cmp", "gates", "grad_out"};
  return arg >= 0 && arg < kNumArgs ? names[arg] : "?";
}

nsa::Config make_config(int64_t l, int64_t d, int64_t l_sel, int64_t n, int64_t n_init, int64_t n_local, int64_t w,
                        double scale) {
  return nsa::Config{l, d, l_sel, n, n_init, n_local, w, scale};
}

nsa::Config small_n_config() { return make_config(32, 16, 64, 5, 1, 2, 100); }

ProblemSpec padded_spec(int64_t batch, int64_t seqlen, int64_t hq, int64_t hkv, int64_t dk, int64_t dv) {
  ProblemSpec s;
  s.seqlens.assign(static_cast<size_t>(batch), seqlen);
  s.varlen = false;
  s.hq = hq;
  s.hkv = hkv;
  s.dk = dk;
  s.dv = dv;
  return s;
}

ProblemSpec varlen_spec(std::vector<int64_t> seqlens, int64_t hq, int64_t hkv, int64_t dk, int64_t dv) {
  ProblemSpec s = padded_spec(1, 1, hq, hkv, dk, dv);
  s.seqlens = std::move(seqlens);
  s.varlen = true;
  return s;
}

int64_t Problem::max_seqlen() const {
  int64_t m = 0;
  for (int64_t len : spec.seqlens) m = std::max(m, len);
  return m;
}

int64_t Problem::num_blocks() const {
  return (max_seqlen() + spec.config.sel_block - 1) / spec.config.sel_block;
}

int64_t Problem::heads(int arg) const {
  return (arg == kQ || arg == kGates || arg == kGradOut) ? spec.hq : spec.hkv;
}

int64_t Problem::dim(int arg) const {
  switch (arg) {
    case kQ: case kK: case kKWin: case kKCmp: return spec.dk;
    case kGates: return 3;
    default: return spec.dv;
  }
}

std::pair<int64_t, int64_t> Problem::locate(int64_t row) const {
  const auto it = std::upper_bound(row_begin.begin(), row_begin.end(), row);
  const int64_t b = static_cast<int64_t>(it - row_begin.begin()) - 1;
  return {b, row - row_begin[b]};
}

Problem make_problem(const ProblemSpec& spec) {
  if (spec.seqlens.empty()) throw std::invalid_argument("nsa_test: no sequences");
  for (int64_t len : spec.seqlens) {
    if (len < 0 || (!spec.varlen && len != spec.seqlens[0]))
      throw std::invalid_argument("nsa_test: padded problems need equal, non-negative lengths");
  }
  Problem p;
  p.spec = spec;
  p.row_begin = {0};
  p.cmp_begin = {0};
  for (int64_t len : spec.seqlens) {
    p.row_begin.push_back(p.row_begin.back() + len);
    p.cmp_begin.push_back(p.cmp_begin.back() +
                          nsa::num_cmp_tokens(len, spec.config.cmp_block, spec.config.cmp_stride));
  }
  std::mt19937_64 rng(spec.seed);
  for (int arg = 0; arg < kNumArgs; ++arg) {
    if (!p.has(arg)) continue;
    p.data[arg].resize(static_cast<size_t>(p.rows(arg) * p.heads(arg) * p.dim(arg)));
    for (double& x : p.data[arg]) x = draw(arg, rng);
  }
  round_to_dtype(p);
  return p;
}

void round_to_dtype(Problem& problem) {
  for (auto& values : problem.data)
    for (double& x : values) x = round_value(x, problem.spec.dtype);
}

double round_to_dtype(double value, nsa::DType dtype) { return round_value(value, dtype); }

Problem extract_sequence(const Problem& problem, int64_t b) {
  Problem p;
  p.spec = problem.spec;
  p.spec.seqlens = {problem.seqlen(b)};
  p.spec.varlen = false;
  p.row_begin = {0, problem.seqlen(b)};
  p.cmp_begin = {0, problem.cmp_begin[b + 1] - problem.cmp_begin[b]};
  for (int arg = 0; arg < kNumArgs; ++arg) {
    if (!problem.has(arg)) continue;
    const int64_t per_row = problem.heads(arg) * problem.dim(arg);
    const auto& begin = problem.is_cmp(arg) ? problem.cmp_begin : problem.row_begin;
    p.data[arg].assign(problem.data[arg].begin() + begin[b] * per_row,
                       problem.data[arg].begin() + begin[b + 1] * per_row);
  }
  return p;
}

void perturb_after(Problem& problem, int64_t t0, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const auto& c = problem.spec.config;
  for (int arg = 0; arg < kNumForwardInputs; ++arg) {
    if (!problem.has(arg)) continue;
    const int64_t per_row = problem.heads(arg) * problem.dim(arg);
    const auto& begin = problem.is_cmp(arg) ? problem.cmp_begin : problem.row_begin;
    for (int64_t b = 0; b < problem.num_seqs(); ++b) {
      for (int64_t r = begin[b]; r < begin[b + 1]; ++r) {
        const int64_t pos = r - begin[b];
        const bool hidden = problem.is_cmp(arg) ? pos * c.cmp_stride + c.cmp_block - 1 > t0 : pos > t0;
        if (!hidden) continue;
        for (int64_t e = 0; e < per_row; ++e) problem.data[arg][r * per_row + e] = draw(arg, rng);
      }
    }
  }
  round_to_dtype(problem);
}

nsa_oracle::Config oracle_config(const nsa::Config& config) {
  nsa_oracle::Config c;
  c.l = config.cmp_block;
  c.d = config.cmp_stride;
  c.l_sel = config.sel_block;
  c.n = config.num_selected;
  c.n_init = config.num_init;
  c.n_local = config.num_local;
  c.w = config.window;
  c.scale = config.scale;
  return c;
}

std::vector<int32_t> random_block_indices(const Problem& problem, uint64_t seed, int64_t min_count) {
  std::mt19937_64 rng(seed);
  const int64_t hkv = problem.spec.hkv, n = problem.spec.config.num_selected;
  std::vector<int32_t> idx(static_cast<size_t>(problem.rows() * hkv * n), -1);
  for (int64_t r = 0; r < problem.rows(); ++r) {
    const int64_t t = problem.locate(r).second;
    const int64_t eligible = t / problem.spec.config.sel_block + 1;
    for (int64_t h = 0; h < hkv; ++h) {
      std::vector<int32_t> blocks(static_cast<size_t>(eligible));
      for (int64_t j = 0; j < eligible; ++j) blocks[j] = static_cast<int32_t>(j);
      std::shuffle(blocks.begin(), blocks.end(), rng);
      const int64_t hi = std::min(n, eligible), lo = std::min(min_count, hi);
      const int64_t count = std::uniform_int_distribution<int64_t>(lo, hi)(rng);
      std::vector<int32_t> row(static_cast<size_t>(n), -1);
      std::copy(blocks.begin(), blocks.begin() + count, row.begin());
      std::shuffle(row.begin(), row.end(), rng);
      std::copy(row.begin(), row.end(), idx.begin() + (r * hkv + h) * n);
    }
  }
  return idx;
}

// ------------------------------------------------------------------------------------------------

std::string Layout::describe() const {
  std::ostringstream os;
  os << (heads_outer ? "heads_outer" : "rows_outer") << "_dimpad" << dim_pad << "_rowpad" << row_pad;
  return os.str();
}

TypedBuffer::TypedBuffer(nsa::DType dtype, int64_t numel)
    : dtype_(dtype), numel_(numel),
      storage_(static_cast<size_t>((numel * nsa::dtype_size(dtype) + 7) / 8 + 1), 0) {}

double TypedBuffer::get(int64_t i) const {
  const unsigned char* base = reinterpret_cast<const unsigned char*>(storage_.data());
  switch (dtype_) {
    case nsa::DType::kFloat64: { double x; std::memcpy(&x, base + 8 * i, 8); return x; }
    case nsa::DType::kFloat32: { float x; std::memcpy(&x, base + 4 * i, 4); return x; }
    case nsa::DType::kBFloat16: { uint16_t x; std::memcpy(&x, base + 2 * i, 2); return from_bf16(x); }
    case nsa::DType::kFloat16: { uint16_t x; std::memcpy(&x, base + 2 * i, 2); return from_fp16(x); }
  }
  return kNaN;
}

void TypedBuffer::set(int64_t i, double value) {
  unsigned char* base = reinterpret_cast<unsigned char*>(storage_.data());
  switch (dtype_) {
    case nsa::DType::kFloat64: std::memcpy(base + 8 * i, &value, 8); break;
    case nsa::DType::kFloat32: { const float x = static_cast<float>(value); std::memcpy(base + 4 * i, &x, 4); break; }
    case nsa::DType::kBFloat16: { const uint16_t x = to_bf16(value); std::memcpy(base + 2 * i, &x, 2); break; }
    case nsa::DType::kFloat16: { const uint16_t x = to_fp16(value); std::memcpy(base + 2 * i, &x, 2); break; }
  }
}

void TypedBuffer::fill(double value) {
  for (int64_t i = 0; i < numel_; ++i) set(i, value);
}

nsa::InputTensor StridedTensor::input() const {
  nsa::InputTensor t;
  t.data = rows() ? buf.data() : nullptr;
  t.batch_stride = batch_stride;
  t.seq_stride = seq_stride;
  t.head_stride = head_stride;
  return t;
}

nsa::OutputTensor StridedTensor::output() {
  nsa::OutputTensor t;
  t.data = rows() ? buf.data() : nullptr;
  t.batch_stride = batch_stride;
  t.seq_stride = seq_stride;
  t.head_stride = head_stride;
  return t;
}

void StridedTensor::upload(const std::vector<double>& packed) {
  if (static_cast<int64_t>(packed.size()) != rows() * heads * dim)
    throw std::invalid_argument("nsa_test: upload size mismatch");
  for (int64_t r = 0; r < rows(); ++r)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t x = 0; x < dim; ++x) buf.set(index(r, h, x), packed[(r * heads + h) * dim + x]);
}

std::vector<double> StridedTensor::download() const {
  std::vector<double> packed(static_cast<size_t>(rows() * heads * dim));
  for (int64_t r = 0; r < rows(); ++r)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t x = 0; x < dim; ++x) packed[(r * heads + h) * dim + x] = buf.get(index(r, h, x));
  return packed;
}

::testing::AssertionResult StridedTensor::gaps_untouched(const char* name) const {
  std::vector<bool> addressed(static_cast<size_t>(buf.numel()), false);
  for (int64_t r = 0; r < rows(); ++r)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t x = 0; x < dim; ++x) addressed[index(r, h, x)] = true;
  for (int64_t i = 0; i < buf.numel(); ++i) {
    if (!addressed[i] && !std::isnan(buf.get(i)))
      return ::testing::AssertionFailure() << name << ": element " << i << " outside the tensor was written ("
                                           << buf.get(i) << ")";
  }
  return ::testing::AssertionSuccess();
}

// ------------------------------------------------------------------------------------------------

Buffers make_buffers(const Problem& problem, const Layout& input_layout, const Layout& output_layout) {
  Buffers b;
  b.spec = problem.spec;
  b.row_begin = problem.row_begin;
  b.cmp_begin = problem.cmp_begin;
  b.input_layout = input_layout;
  b.output_layout = output_layout;
  if (problem.spec.varlen) {
    for (int64_t x : problem.row_begin) b.cu_seqlens.push_back(static_cast<int32_t>(x));
    for (int64_t x : problem.cmp_begin) b.cu_seqlens_cmp.push_back(static_cast<int32_t>(x));
  }
  const nsa::DType dtype = problem.spec.dtype;
  const std::vector<int64_t> no_rows(problem.row_begin.size(), 0);
  for (int arg = 0; arg < kNumArgs; ++arg) {
    const auto& begin = !problem.has(arg) ? no_rows : problem.is_cmp(arg) ? problem.cmp_begin : problem.row_begin;
    b.in[arg] = make_tensor(problem.spec, begin, problem.heads(arg), problem.dim(arg), input_layout, dtype);
    if (arg < kNumForwardInputs)
      b.grad[arg] = make_tensor(problem.spec, begin, problem.heads(arg), problem.dim(arg), output_layout, dtype);
  }
  b.out = make_tensor(problem.spec, problem.row_begin, problem.spec.hq, problem.spec.dv, output_layout, dtype);
  const int64_t rows = problem.rows();
  b.out_branch = TypedBuffer(dtype, rows * problem.spec.hq * 3 * problem.spec.dv);
  b.lse = TypedBuffer(stats_dtype(dtype), rows * problem.spec.hq * 3);
  b.block_indices.assign(static_cast<size_t>(rows * problem.spec.hkv * problem.spec.config.num_selected), -1);
  b.upload(problem);
  return b;
}

Buffers make_cache_buffers(const Problem& problem, int64_t m, int64_t capacity, int64_t cmp_capacity,
                           const Layout& input_layout, const Layout& output_layout) {
  Buffers b;
  b.spec = problem.spec;
  b.spec.seqlens.assign(static_cast<size_t>(problem.num_seqs()), m);
  b.spec.varlen = false;
  b.input_layout = input_layout;
  b.output_layout = output_layout;
  // Sequence b owns rows b*rows_per_seq .. of a tensor.
  auto every = [&](int64_t rows_per_seq) {
    std::vector<int64_t> begin;
    for (int64_t seq = 0; seq <= problem.num_seqs(); ++seq) begin.push_back(seq * rows_per_seq);
    return begin;
  };
  b.row_begin = every(m);
  b.cmp_begin = every(cmp_capacity);
  const std::vector<int64_t> no_rows = every(0), cache_rows = every(capacity);
  const nsa::DType dtype = problem.spec.dtype;
  for (int arg = 0; arg < kNumArgs; ++arg) {
    const bool query_rows = arg == kQ || arg == kGates || arg == kGradOut;
    const auto& begin = !problem.has(arg)     ? no_rows
                        : problem.is_cmp(arg) ? b.cmp_begin
                        : query_rows          ? b.row_begin
                                              : cache_rows;
    b.in[arg] = make_tensor(b.spec, begin, problem.heads(arg), problem.dim(arg), input_layout, dtype);
    b.in[arg].buf.fill(kNaN);
  }
  b.out = make_tensor(b.spec, b.row_begin, problem.spec.hq, problem.spec.dv, output_layout, dtype);
  const int64_t rows = b.rows();
  b.out_branch = TypedBuffer(dtype, rows * problem.spec.hq * 3 * problem.spec.dv);
  b.lse = TypedBuffer(stats_dtype(dtype), rows * problem.spec.hq * 3);
  b.block_indices.assign(static_cast<size_t>(rows * problem.spec.hkv * problem.spec.config.num_selected), -1);
  b.cache_seqlens.assign(static_cast<size_t>(problem.num_seqs()), static_cast<int32_t>(m));
  b.cache_capacity = capacity;
  b.cache_cmp_capacity = cmp_capacity;
  return b;
}

void Buffers::upload(const Problem& problem) {
  if (problem.row_begin != row_begin || problem.cmp_begin != cmp_begin)
    throw std::invalid_argument("nsa_test: Buffers::upload with a problem of another shape");
  for (int arg = 0; arg < kNumArgs; ++arg) {
    in[arg].buf.fill(kNaN);  // gaps hold NaN so that reading them shows up
    if (problem.has(arg)) in[arg].upload(problem.data[arg]);
  }
}

nsa::ForwardParams Buffers::forward_params() {
  nsa::ForwardParams p;
  p.config = spec.config;
  p.dtype = spec.dtype;
  p.shape.batch = static_cast<int64_t>(spec.seqlens.size());
  p.shape.seqlen = *std::max_element(spec.seqlens.begin(), spec.seqlens.end());
  p.shape.num_q_heads = spec.hq;
  p.shape.num_kv_heads = spec.hkv;
  p.shape.head_dim_qk = spec.dk;
  p.shape.head_dim_v = spec.dv;
  if (spec.varlen) {
    p.varlen.cu_seqlens = cu_seqlens.data();
    p.varlen.cu_seqlens_cmp = cu_seqlens_cmp.data();
    p.varlen.total_tokens = row_begin.back();
    p.varlen.total_cmp_tokens = cmp_begin.back();
  }
  p.q = in[kQ].input();
  p.k = in[kK].input();
  p.v = in[kV].input();
  if (spec.separate_window) {
    p.k_win = in[kKWin].input();
    p.v_win = in[kVWin].input();
  }
  p.k_cmp = in[kKCmp].input();
  p.v_cmp = in[kVCmp].input();
  p.gates = in[kGates].input();
  p.block_indices = block_indices.data();
  p.block_indices_given = block_indices_given;
  p.out = out.output();
  p.out_branch = with_out_branch ? out_branch.data() : nullptr;
  p.lse = lse.data();
  if (!cache_seqlens.empty()) p.cache = {cache_seqlens.data(), cache_capacity, cache_cmp_capacity};
  p.tokens_read = tokens_read.empty() ? nullptr : tokens_read.data();
  return p;
}

nsa::BackwardParams Buffers::backward_params() {
  const nsa::ForwardParams f = forward_params();
  nsa::BackwardParams p;
  p.config = f.config;
  p.dtype = f.dtype;
  p.shape = f.shape;
  p.varlen = f.varlen;
  p.q = f.q;
  p.k = f.k;
  p.v = f.v;
  p.k_win = f.k_win;
  p.v_win = f.v_win;
  p.k_cmp = f.k_cmp;
  p.v_cmp = f.v_cmp;
  p.gates = f.gates;
  p.block_indices = block_indices.data();
  p.out_branch = out_branch.data();
  p.lse = lse.data();
  p.grad_out = in[kGradOut].input();
  p.grad_q = grad[kQ].output();
  p.grad_k = grad[kK].output();
  p.grad_v = grad[kV].output();
  if (spec.separate_window) {
    p.grad_k_win = grad[kKWin].output();
    p.grad_v_win = grad[kVWin].output();
  }
  p.grad_k_cmp = grad[kKCmp].output();
  p.grad_v_cmp = grad[kVCmp].output();
  p.grad_gates = grad[kGates].output();
  return p;
}

void Buffers::poison_forward() {
  out.buf.fill(kNaN);
  out_branch.fill(kNaN);
  lse.fill(kNaN);
  if (!block_indices_given) std::fill(block_indices.begin(), block_indices.end(), kIndexPoison);
}

void Buffers::poison_backward() {
  for (auto& g : grad) g.buf.fill(kNaN);
}

Outputs Buffers::read_forward() const {
  Outputs o;
  o.out = out.download();
  if (with_out_branch) {
    o.out_branch.resize(static_cast<size_t>(out_branch.numel()));
    for (int64_t i = 0; i < out_branch.numel(); ++i) o.out_branch[i] = out_branch.get(i);
  }
  o.lse.resize(static_cast<size_t>(lse.numel()));
  for (int64_t i = 0; i < lse.numel(); ++i) o.lse[i] = lse.get(i);
  o.indices = block_indices;
  return o;
}

Grads Buffers::read_backward() const {
  Grads g;
  for (int arg = 0; arg < kNumForwardInputs; ++arg) g.data[arg] = grad[arg].download();
  return g;
}

::testing::AssertionResult Buffers::forward_gaps_untouched() const { return out.gaps_untouched("out"); }

::testing::AssertionResult Buffers::backward_gaps_untouched() const {
  for (int arg = 0; arg < kNumForwardInputs; ++arg) {
    const std::string name = std::string("grad_") + arg_name(arg);
    auto r = grad[arg].gaps_untouched(name.c_str());
    if (!r) return r;
  }
  return ::testing::AssertionSuccess();
}

// ------------------------------------------------------------------------------------------------

nsa::Status run_forward(Buffers& buffers, int num_threads) {
  buffers.poison_forward();
  const nsa::ForwardParams params = buffers.forward_params();
  nsa::Status status = nsa::cpu::forward(params, num_threads);
  if (status.ok()) {
    EXPECT_TRUE(buffers.forward_gaps_untouched());
  }
  return status;
}

Outputs reference_forward(const Problem& problem, const RunOptions& options) {
  Buffers buffers = make_buffers(problem, options.input_layout, options.output_layout);
  buffers.with_out_branch = options.with_out_branch;
  if (options.given_indices) {
    buffers.block_indices = *options.given_indices;
    buffers.block_indices_given = true;
  }
  const nsa::Status status = run_forward(buffers, options.num_threads);
  if (!status.ok()) {
    ADD_FAILURE() << "nsa::cpu::forward failed: " << nsa::status_code_name(status.code) << ": " << status.message;
    return {};
  }
  return buffers.read_forward();
}

Outputs oracle_forward(const Problem& problem, const std::vector<int32_t>* given_indices) {
  const ProblemSpec& s = problem.spec;
  const nsa_oracle::Config cfg = oracle_config(s.config);
  const int64_t hq = s.hq, hkv = s.hkv, dk = s.dk, dv = s.dv, n = s.config.num_selected;
  const int64_t nb = problem.num_blocks();
  Outputs o;
  o.out.resize(static_cast<size_t>(problem.rows() * hq * dv));
  o.out_branch.resize(static_cast<size_t>(problem.rows() * hq * 3 * dv));
  o.lse.resize(static_cast<size_t>(problem.rows() * hq * 3));
  o.indices.resize(static_cast<size_t>(problem.rows() * hkv * n));
  o.scores.assign(static_cast<size_t>(problem.rows() * hkv * nb), -kInf);
  for (int64_t b = 0; b < problem.num_seqs(); ++b) {
    const int64_t r0 = problem.row_begin[b], c0 = problem.cmp_begin[b], T = problem.seqlen(b);
    nsa_oracle::Inputs in;
    in.T = T;
    in.Hq = hq;
    in.Hkv = hkv;
    in.Dk = dk;
    in.Dv = dv;
    auto at = [&](int arg, int64_t row) -> const double* {
      return problem.has(arg) ? problem.data[arg].data() + row * problem.heads(arg) * problem.dim(arg) : nullptr;
    };
    in.q = at(kQ, r0);
    in.k = at(kK, r0);
    in.v = at(kV, r0);
    in.k_win = at(kKWin, r0);
    in.v_win = at(kVWin, r0);
    in.k_cmp = at(kKCmp, c0);
    in.v_cmp = at(kVCmp, c0);
    in.gates = at(kGates, r0);
    const nsa_oracle::Outputs res =
        nsa_oracle::forward(cfg, in, given_indices ? given_indices->data() + r0 * hkv * n : nullptr);
    std::copy(res.out.begin(), res.out.end(), o.out.begin() + r0 * hq * dv);
    std::copy(res.out_branch.begin(), res.out_branch.end(), o.out_branch.begin() + r0 * hq * 3 * dv);
    std::copy(res.lse.begin(), res.lse.end(), o.lse.begin() + r0 * hq * 3);
    std::copy(res.indices.begin(), res.indices.end(), o.indices.begin() + r0 * hkv * n);
    const int64_t seq_nb = nsa_oracle::num_blocks(T, cfg);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < hkv; ++h)
        for (int64_t j = 0; j < seq_nb; ++j)
          o.scores[((r0 + t) * hkv + h) * nb + j] = res.scores[(t * hkv + h) * seq_nb + j];
  }
  return o;
}

// ------------------------------------------------------------------------------------------------

Tolerance tolerance_for(nsa::DType dtype) {
  switch (dtype) {
    // The oracle sees exactly the values the backend reads, and the CPU reference accumulates in
    // float64, so the error is float64 noise plus one rounding of each output to its dtype
    // (half an ulp: 2^-24 relative for float32, 2^-9 for bfloat16, 2^-11 for float16).
    case nsa::DType::kFloat64: return {1e-13, 1e-12};
    case nsa::DType::kFloat32: return {1e-12, 2.5e-7};
    case nsa::DType::kBFloat16: return {1e-12, 4e-3};
    case nsa::DType::kFloat16: return {1e-12, 1e-3};
  }
  return {};
}

::testing::AssertionResult outputs_near(const Problem& problem, const Outputs& got, const Outputs& want,
                                        Tolerance tol, const RowFilter& filter) {
  return compare(problem, got, want, tol, false, filter);
}

::testing::AssertionResult outputs_identical(const Problem& problem, const Outputs& got, const Outputs& want,
                                             const RowFilter& filter) {
  return compare(problem, got, want, {}, true, filter);
}

::testing::AssertionResult outputs_well_formed(const Problem& p, const Outputs& o) {
  const int64_t rows = p.rows(), hq = p.spec.hq, hkv = p.spec.hkv, dv = p.spec.dv;
  const auto& c = p.spec.config;
  const int64_t n = c.num_selected;
  if (static_cast<int64_t>(o.out.size()) != rows * hq * dv || static_cast<int64_t>(o.lse.size()) != rows * hq * 3 ||
      static_cast<int64_t>(o.indices.size()) != rows * hkv * n)
    return ::testing::AssertionFailure() << "outputs have the wrong size";
  for (size_t i = 0; i < o.out.size(); ++i)
    if (!std::isfinite(o.out[i]))
      return ::testing::AssertionFailure() << where(p, "out", static_cast<int64_t>(i) / (hq * dv), -1, -1, -1)
                                           << " is " << o.out[i];
  for (size_t i = 0; i < o.out_branch.size(); ++i)
    if (!std::isfinite(o.out_branch[i]))
      return ::testing::AssertionFailure()
             << where(p, "out_branch", static_cast<int64_t>(i) / (hq * 3 * dv), -1, -1, -1) << " is "
             << o.out_branch[i];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = p.locate(r).second;
    for (int64_t h = 0; h < hq; ++h) {
      // A branch has no key: cmp for t < l-1; slc when the kv head's selection is empty.
      bool slc_empty = true;
      for (int64_t x = 0; x < n; ++x) slc_empty = slc_empty && o.indices[(r * hkv + h / (hq / hkv)) * n + x] < 0;
      const bool empty[3] = {t < c.cmp_block - 1, slc_empty, false};
      for (int br = 0; br < 3; ++br) {
        const double v = o.lse[(r * hq + h) * 3 + br];
        const bool ok = empty[br] ? (std::isinf(v) && v < 0) : std::isfinite(v);
        if (!ok) return ::testing::AssertionFailure() << where(p, "lse", r, h, br, -1) << " is " << v;
        if (empty[br] && !o.out_branch.empty()) {
          for (int64_t x = 0; x < dv; ++x)
            if (o.out_branch[((r * hq + h) * 3 + br) * dv + x] != 0.0)
              return ::testing::AssertionFailure() << where(p, "out_branch", r, h, br, x) << " of an empty branch is "
                                                   << o.out_branch[((r * hq + h) * 3 + br) * dv + x];
        }
      }
    }
    for (int64_t h = 0; h < hkv; ++h) {
      const int32_t* idx = &o.indices[(r * hkv + h) * n];
      bool padding = false, ok = true;
      for (int64_t x = 0; x < n; ++x) {
        if (idx[x] == -1) {
          padding = true;
        } else if (padding || idx[x] < 0 || idx[x] > t / c.sel_block || (x > 0 && idx[x] <= idx[x - 1])) {
          ok = false;
        }
      }
      if (!ok) {
        std::ostringstream os;
        for (int64_t y = 0; y < n; ++y) os << " " << idx[y];
        return ::testing::AssertionFailure() << where(p, "indices", r, h, -1, -1)
                                             << " not ascending/distinct/eligible/-1 padded:" << os.str();
      }
    }
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult indices_within_ties(const Problem& p, const std::vector<int32_t>& indices,
                                               const Outputs& oracle, double eps) {
  const auto& c = p.spec.config;
  const int64_t hkv = p.spec.hkv, n = c.num_selected, nb = p.num_blocks();
  if (static_cast<int64_t>(indices.size()) != p.rows() * hkv * n ||
      static_cast<int64_t>(oracle.scores.size()) != p.rows() * hkv * nb)
    return ::testing::AssertionFailure() << "indices or oracle scores have the wrong size";
  for (int64_t r = 0; r < p.rows(); ++r) {
    const int64_t t = p.locate(r).second, last = t / c.sel_block;
    for (int64_t h = 0; h < hkv; ++h) {
      const int32_t* row = &indices[(r * hkv + h) * n];
      const double* P = &oracle.scores[(r * hkv + h) * nb];
      std::vector<bool> chosen(static_cast<size_t>(last + 1), false);
      int64_t count = 0;
      std::string problem_text;
      for (int64_t x = 0; x < n; ++x) {
        if (row[x] == -1) continue;
        if (row[x] < 0 || row[x] > last || chosen[row[x]]) {
          problem_text = "invalid or repeated entry";
          break;
        }
        chosen[row[x]] = true;
        ++count;
      }
      if (problem_text.empty() && count != std::min(n, last + 1)) problem_text = "wrong number of blocks";
      auto forced = [&](int64_t j) { return j < c.num_init || (last - j >= 0 && last - j < c.num_local); };
      double min_chosen = kInf, max_unchosen = -kInf;
      for (int64_t j = 0; j <= last && problem_text.empty(); ++j) {
        if (forced(j) && !chosen[j]) problem_text = "forced block " + std::to_string(j) + " missing";
        if (forced(j)) continue;
        if (chosen[j]) min_chosen = std::min(min_chosen, P[j]);
        else max_unchosen = std::max(max_unchosen, P[j]);
      }
      if (problem_text.empty() && min_chosen < max_unchosen - eps)
        problem_text = "a chosen block scores " + std::to_string(max_unchosen - min_chosen) + " below an unchosen one";
      if (!problem_text.empty()) {
        std::ostringstream os;
        for (int64_t x = 0; x < n; ++x) os << " " << row[x];
        os << " | P:";
        for (int64_t j = 0; j <= last; ++j) os << " " << P[j];
        return ::testing::AssertionFailure() << where(p, "indices", r, h, -1, -1) << ": " << problem_text << ":"
                                             << os.str();
      }
    }
  }
  return ::testing::AssertionSuccess();
}

Outputs slice_sequence(const Problem& p, const Outputs& o, int64_t b) {
  const int64_t r0 = p.row_begin[b], r1 = p.row_begin[b + 1];
  auto slice = [&](const auto& v, int64_t per_row) {
    using V = std::decay_t<decltype(v)>;
    if (v.empty()) return V{};
    return V(v.begin() + r0 * per_row, v.begin() + r1 * per_row);
  };
  const int64_t hq = p.spec.hq, dv = p.spec.dv;
  Outputs s;
  s.out = slice(o.out, hq * dv);
  s.out_branch = slice(o.out_branch, hq * 3 * dv);
  s.lse = slice(o.lse, hq * 3);
  s.indices = slice(o.indices, p.spec.hkv * p.spec.config.num_selected);
  return s;
}

double max_abs_diff(const Outputs& got, const Outputs& want) {
  double m = 0.0;
  auto scan = [&](const std::vector<double>& a, const std::vector<double>& b) {
    if (a.size() != b.size()) {
      m = kInf;
      return;
    }
    for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  };
  scan(got.out, want.out);
  if (!got.out_branch.empty() && !want.out_branch.empty()) scan(got.out_branch, want.out_branch);
  return m;
}

double ErrorStats::cosine() const {
  return norm_got > 0 && norm_ref > 0 ? dot / std::sqrt(norm_got * norm_ref) : 1.0;
}

ErrorStats error_stats(const std::vector<double>& got, const std::vector<double>& ref) {
  ErrorStats e;
  for (size_t i = 0; i < ref.size() && i < got.size(); ++i) {
    if (!std::isfinite(ref[i]) || !std::isfinite(got[i])) {
      if (!(got[i] == ref[i])) ++e.mismatched_inf;  // NaN never equals
      continue;
    }
    if (std::fabs(got[i] - ref[i]) > e.max_abs) {
      e.max_abs = std::fabs(got[i] - ref[i]);
      e.worst = i;
    }
    e.dot += got[i] * ref[i];
    e.norm_got += got[i] * got[i];
    e.norm_ref += ref[i] * ref[i];
  }
  return e;
}

// ------------------------------------------------------------------------------------------------

Grads reference_gradients(const Problem& problem, const RunOptions& options, std::vector<int32_t>* indices) {
  Buffers buffers = make_buffers(problem, options.input_layout, options.output_layout);
  if (options.given_indices) {
    buffers.block_indices = *options.given_indices;
    buffers.block_indices_given = true;
  }
  const nsa::Status forward = run_forward(buffers, options.num_threads);
  if (!forward.ok()) {
    ADD_FAILURE() << "nsa::cpu::forward failed: " << nsa::status_code_name(forward.code) << ": " << forward.message;
    return {};
  }
  buffers.poison_backward();
  const nsa::Status backward = nsa::cpu::backward(buffers.backward_params(), options.num_threads);
  if (!backward.ok()) {
    ADD_FAILURE() << "nsa::cpu::backward failed: " << nsa::status_code_name(backward.code) << ": "
                  << backward.message;
    return {};
  }
  EXPECT_TRUE(buffers.backward_gaps_untouched());
  if (indices) *indices = buffers.block_indices;
  return buffers.read_backward();
}

std::string describe_grad_element(const Problem& p, int arg, size_t i) {
  const int64_t heads = p.heads(arg), dim = p.dim(arg), e = static_cast<int64_t>(i);
  const int64_t x = e % dim, h = e / dim % heads, row = e / dim / heads;
  std::ostringstream os;
  os << "grad_" << arg_name(arg) << "[";
  if (p.is_cmp(arg)) {
    const auto it = std::upper_bound(p.cmp_begin.begin(), p.cmp_begin.end(), row);
    const int64_t b = static_cast<int64_t>(it - p.cmp_begin.begin()) - 1;
    os << "seq " << b << ", cmp token " << row - p.cmp_begin[b];
  } else {
    const auto [b, t] = p.locate(row);
    os << "seq " << b << ", t " << t;
  }
  os << ", head " << h << (arg == kGates ? ", branch " : ", elem ") << x << "]";
  return os.str();
}

::testing::AssertionResult grads_identical(const Problem& p, const Grads& got, const Grads& want) {
  for (int arg = 0; arg < kNumForwardInputs; ++arg) {
    const std::vector<double>& g = got[arg];
    const std::vector<double>& w = want[arg];
    const size_t expected = p.has(arg) ? p.data[arg].size() : 0;
    if (g.size() != expected || w.size() != expected)
      return ::testing::AssertionFailure() << "grad_" << arg_name(arg) << ": sizes " << g.size() << " and "
                                           << w.size() << ", expected " << expected;
    int64_t differ = 0;
    size_t first = 0;
    for (size_t i = 0; i < g.size(); ++i) {
      if (bits_of(g[i]) != bits_of(w[i]) && differ++ == 0) first = i;
    }
    if (differ)
      return ::testing::AssertionFailure() << describe_grad_element(p, arg, first) << ": " << g[first] << " vs "
                                           << w[first] << " (" << differ << " of " << g.size()
                                           << " elements differ in their bits)";
  }
  return ::testing::AssertionSuccess();
}

// ------------------------------------------------------------------------------------------------
// Judging a 16-bit forward.

Outputs naive_forward(const Problem& p, const std::vector<int32_t>& indices) {
  const ProblemSpec& s = p.spec;
  const nsa::Config& c = s.config;
  const nsa::DType dt = s.dtype;
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

::testing::AssertionResult within_rule(const char* name, const std::vector<double>& gpu,
                                       const std::vector<double>& naive, const std::vector<double>& ref, double slack,
                                       bool check_cosine, const Describe& describe) {
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

void expect_16bit_forward_matches_reference(const Problem& problem, const Outputs& gpu,
                                            const std::vector<int32_t>* given) {
  const nsa::Config& cfg = problem.spec.config;
  const bool with_out_branch = !gpu.out_branch.empty();
  if (given) {
    EXPECT_EQ(gpu.indices, *given) << "given block_indices must be left alone";
  } else {
    // Scores summed in fp32 over G heads and l/d compressed tokens per block.
    const double eps = 2e-5 * static_cast<double>(problem.spec.hq / problem.spec.hkv) *
                           static_cast<double>(cfg.cmp_block / cfg.cmp_stride) + 1e-7;
    EXPECT_TRUE(indices_within_ties(problem, gpu.indices, reference_scores(problem), eps));
  }

  // The reference in fp64 on the same (rounded) values and the GPU's indices.
  Problem p64 = problem;
  p64.spec.dtype = nsa::DType::kFloat64;
  RunOptions ro;
  ro.given_indices = &gpu.indices;
  const Outputs ref = reference_forward(p64, ro);
  ASSERT_FALSE(ref.out.empty());
  const Outputs naive = naive_forward(problem, gpu.indices);
  const int64_t hq = problem.spec.hq, hkv = problem.spec.hkv, dv = problem.spec.dv, n = cfg.num_selected;
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
  const auto branch_ok = with_out_branch ? within_rule("out_branch", gpu.out_branch, naive.out_branch,
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
    if (with_out_branch) {
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

// ------------------------------------------------------------------------------------------------
// CUDA runners.

bool not_compiled(const nsa::Status& st) {
  return st.code == nsa::StatusCode::kUnsupported && st.message.find("not compiled in this build") != std::string::npos;
}

#if NSA_TEST_WITH_CUDA

namespace {

// One device allocation.
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  bool allocate(size_t n) {
    bytes = n;
    return n == 0 || cudaMalloc(&ptr, n) == cudaSuccess;
  }
};

// Device copies of host buffers; translates host addresses inside them to device addresses, so
// that params built by Buffers (host pointers) can be pointed at the copies.
class DeviceMirror {
 public:
  // Allocates a device copy of [host, host + bytes) and copies it; false on a CUDA error.
  bool add(const void* host, size_t bytes) {
    if (host == nullptr || bytes == 0) return true;
    auto entry = std::make_unique<Entry>();
    entry->host = static_cast<const unsigned char*>(host);
    if (!entry->dev.allocate(bytes) ||
        cudaMemcpy(entry->dev.ptr, host, bytes, cudaMemcpyHostToDevice) != cudaSuccess)
      return false;
    entries_.push_back(std::move(entry));
    return true;
  }
  // Every host buffer of `hb`: inputs, grad_out, outputs, statistics, indices, grads, offsets,
  // cache seqlens, tokens_read.
  bool add_all(const Buffers& hb) {
    bool ok = true;
    for (const StridedTensor& t : hb.in) ok = ok && add(t.buf.data(), bytes_of(t.buf));
    for (const StridedTensor& t : hb.grad) ok = ok && add(t.buf.data(), bytes_of(t.buf));
    ok = ok && add(hb.out.buf.data(), bytes_of(hb.out.buf)) && add(hb.out_branch.data(), bytes_of(hb.out_branch)) &&
         add(hb.lse.data(), bytes_of(hb.lse)) &&
         add(hb.block_indices.data(), hb.block_indices.size() * sizeof(int32_t)) &&
         add(hb.cu_seqlens.data(), hb.cu_seqlens.size() * sizeof(int32_t)) &&
         add(hb.cu_seqlens_cmp.data(), hb.cu_seqlens_cmp.size() * sizeof(int32_t)) &&
         add(hb.cache_seqlens.data(), hb.cache_seqlens.size() * sizeof(int32_t)) &&
         add(hb.tokens_read.data(), hb.tokens_read.size() * sizeof(int64_t));
    return ok;
  }
  // The device address of a host address inside a mirrored buffer (null stays null). An address
  // outside every buffer is a bug of the test: recorded as a failure, returned unchanged.
  template <class T>
  T* device(T* host) const {
    if (host == nullptr) return nullptr;
    const auto* h = reinterpret_cast<const unsigned char*>(host);
    for (const auto& e : entries_)
      if (h >= e->host && h < e->host + e->dev.bytes)
        return reinterpret_cast<T*>(static_cast<unsigned char*>(e->dev.ptr) + (h - e->host));
    ADD_FAILURE() << "DeviceMirror: a host pointer outside every mirrored buffer";
    return host;
  }
  // Copies the device copy of the buffer at `host` back; false on a CUDA error.
  bool download(void* host) const {
    if (host == nullptr) return true;
    for (const auto& e : entries_)
      if (e->host == host)
        return cudaMemcpy(host, e->dev.ptr, e->dev.bytes, cudaMemcpyDeviceToHost) == cudaSuccess;
    return true;  // never mirrored: empty
  }
  // The device copy of the buffer at `host` still holds the host's bytes.
  bool unchanged(const void* host) const {
    if (host == nullptr) return true;
    for (const auto& e : entries_) {
      if (e->host != host) continue;
      std::vector<unsigned char> bytes(e->dev.bytes);
      return cudaMemcpy(bytes.data(), e->dev.ptr, e->dev.bytes, cudaMemcpyDeviceToHost) == cudaSuccess &&
             std::memcmp(bytes.data(), host, e->dev.bytes) == 0;
    }
    return true;
  }

  template <class Params>
  void retarget_common(Params& p) const {
    for (nsa::InputTensor* t : {&p.q, &p.k, &p.v, &p.k_win, &p.v_win, &p.k_cmp, &p.v_cmp, &p.gates})
      t->data = device(t->data);
    p.varlen.cu_seqlens = device(p.varlen.cu_seqlens);
    p.varlen.cu_seqlens_cmp = device(p.varlen.cu_seqlens_cmp);
    p.block_indices = device(p.block_indices);
    p.out_branch = device(p.out_branch);
    p.lse = device(p.lse);
  }
  void retarget(nsa::ForwardParams& p) const {
    retarget_common(p);
    p.out.data = device(p.out.data);
    p.cache.seqlens = device(p.cache.seqlens);
    p.tokens_read = device(p.tokens_read);
  }
  void retarget(nsa::BackwardParams& p) const {
    retarget_common(p);
    p.grad_out.data = device(p.grad_out.data);
    for (nsa::OutputTensor* t : {&p.grad_q, &p.grad_k, &p.grad_v, &p.grad_k_win, &p.grad_v_win, &p.grad_k_cmp,
                                 &p.grad_v_cmp, &p.grad_gates})
      t->data = device(t->data);
  }

  static size_t bytes_of(const TypedBuffer& b) {
    return static_cast<size_t>(b.numel() * nsa::dtype_size(b.dtype()));
  }

 private:
  struct Entry {
    const unsigned char* host = nullptr;
    DeviceBuffer dev;
  };
  std::vector<std::unique_ptr<Entry>> entries_;
};

// A workspace of `bytes` filled with 0xFF (NaN as float): a backend must not rely on its contents.
bool make_workspace(DeviceBuffer& workspace, size_t bytes) {
  return workspace.allocate(bytes) && (bytes == 0 || cudaMemset(workspace.ptr, 0xFF, bytes) == cudaSuccess);
}

nsa::Status synchronize(const char* after) {
  const cudaError_t sync = cudaDeviceSynchronize();
  if (sync != cudaSuccess)
    return {nsa::StatusCode::kBackendError, std::string("after the ") + after + ": " + cudaGetErrorString(sync)};
  return nsa::Status::Ok();
}

// Copies hb to the device, allocates the workspace and points p at the device copies; records a
// failure (and sets *status) when an allocation or copy fails.
template <class Params>
bool stage_on_device(Buffers& hb, Params& p, size_t ws_bytes, DeviceMirror& mirror, DeviceBuffer& workspace,
                     nsa::Status* status) {
  if (!mirror.add_all(hb) || !make_workspace(workspace, ws_bytes)) {
    ADD_FAILURE() << "device allocation or copy failed";
    *status = {nsa::StatusCode::kBackendError, "device allocation or copy failed"};
    return false;
  }
  mirror.retarget(p);
  return true;
}

}  // namespace

bool cuda_device_available() {
  int count = 0;
  return nsa::cuda::built() && cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

Outputs run_cuda_forward(Buffers& hb, nsa::Status* status) {
  return run_cuda_forward_stages(hb, nsa::cuda_detail::kStageAll, status);
}

Outputs run_cuda_forward_stages(Buffers& hb, unsigned stages, nsa::Status* status) {
  hb.poison_forward();
  DeviceMirror mirror;
  DeviceBuffer workspace;
  nsa::ForwardParams p = hb.forward_params();
  const size_t ws_bytes = nsa::cuda::forward_workspace_bytes(p);
  if (!stage_on_device(hb, p, ws_bytes, mirror, workspace, status)) return {};
  *status = nsa::cuda_detail::forward_stages(p, workspace.ptr, ws_bytes, nullptr, stages);
  if (status->ok()) *status = synchronize("forward");
  if (!status->ok()) return {};
  bool ok = mirror.download(hb.out.buf.data()) && mirror.download(hb.lse.data()) &&
            mirror.download(hb.block_indices.data());
  if (p.out_branch != nullptr) ok = ok && mirror.download(hb.out_branch.data());
  ok = ok && mirror.download(hb.tokens_read.data());
  if (!ok) {
    ADD_FAILURE() << "device to host copy failed";
    return {};
  }
  EXPECT_TRUE(hb.forward_gaps_untouched());
  return hb.read_forward();
}

Grads run_cuda_backward(Buffers& hb, bool deterministic, nsa::Status* status, nsa::SelectedDq selected_dq) {
  hb.poison_backward();
  DeviceMirror mirror;
  DeviceBuffer workspace;
  nsa::BackwardParams p = hb.backward_params();
  p.deterministic = deterministic;
  p.selected_dq = selected_dq;
  const size_t ws_bytes = nsa::cuda::backward_workspace_bytes(p);
  if (!stage_on_device(hb, p, ws_bytes, mirror, workspace, status)) return {};
  *status = nsa::cuda::backward(p, workspace.ptr, ws_bytes, nullptr);
  if (status->ok()) *status = synchronize("backward");
  if (!status->ok()) return {};
  bool ok = true;
  for (StridedTensor& g : hb.grad) ok = ok && mirror.download(g.buf.data());
  if (!ok) {
    ADD_FAILURE() << "device to host copy failed";
    return {};
  }
  // The backward reads these and must leave them alone.
  for (int arg = 0; arg < kNumArgs; ++arg)
    EXPECT_TRUE(mirror.unchanged(hb.in[arg].buf.data())) << "the backward wrote into " << arg_name(arg);
  EXPECT_TRUE(mirror.unchanged(hb.out_branch.data())) << "the backward wrote into out_branch";
  EXPECT_TRUE(mirror.unchanged(hb.lse.data())) << "the backward wrote into lse";
  EXPECT_TRUE(mirror.unchanged(hb.block_indices.data())) << "the backward wrote into block_indices";
  EXPECT_TRUE(hb.backward_gaps_untouched());
  return hb.read_backward();
}

#else  // !NSA_TEST_WITH_CUDA

bool cuda_device_available() { return false; }

Outputs run_cuda_forward(Buffers&, nsa::Status* status) {
  *status = nsa::Status::Unsupported("the test binary was built without CUDA");
  return {};
}

Outputs run_cuda_forward_stages(Buffers&, unsigned, nsa::Status* status) {
  *status = nsa::Status::Unsupported("the test binary was built without CUDA");
  return {};
}

Grads run_cuda_backward(Buffers&, bool, nsa::Status* status, nsa::SelectedDq) {
  *status = nsa::Status::Unsupported("the test binary was built without CUDA");
  return {};
}

#endif  // NSA_TEST_WITH_CUDA

}  // namespace nsa_test
