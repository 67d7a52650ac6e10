// nsa_demo: runs the CPU reference forward and backward on random inputs at a chosen size,
// after checking the reference against the brute-force oracle at a small size, and prints
// timings and selection statistics.
//
//   nsa_demo [--batch B] [--seqlen T] [--q-heads Hq] [--kv-heads Hkv] [--dk Dk] [--dv Dv]
//            [--threads N] [--seed S]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "nsa/nsa.h"
#include "oracle.h"

namespace {

struct Options {
  int64_t batch = 1, seqlen = 4096, q_heads = 16, kv_heads = 2, dk = 64, dv = 64;
  int threads = 0;
  uint64_t seed = 1;
};

[[noreturn]] void usage(const char* problem) {
  std::fprintf(stderr,
               "nsa_demo: %s\nusage: nsa_demo [--batch B] [--seqlen T] [--q-heads Hq] [--kv-heads Hkv] [--dk Dk] "
               "[--dv Dv] [--threads N] [--seed S]\n",
               problem);
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int a = 1; a < argc; ++a) {
    const std::string flag = argv[a];
    if (flag == "--help" || flag == "-h") usage("help");
    if (a + 1 >= argc) usage(("missing value for " + flag).c_str());
    char* end = nullptr;
    const long long value = std::strtoll(argv[++a], &end, 10);
    if (*end != '\0' || value < 0) usage(("bad value for " + flag + ": " + argv[a]).c_str());
    if (flag == "--batch") o.batch = value;
    else if (flag == "--seqlen") o.seqlen = value;
    else if (flag == "--q-heads") o.q_heads = value;
    else if (flag == "--kv-heads") o.kv_heads = value;
    else if (flag == "--dk") o.dk = value;
    else if (flag == "--dv") o.dv = value;
    else if (flag == "--threads") o.threads = static_cast<int>(value);
    else if (flag == "--seed") o.seed = static_cast<uint64_t>(value);
    else usage(("unknown flag " + flag).c_str());
  }
  return o;
}

// Random float64 inputs and output buffers of one padded problem, with params pointing at them.
struct Problem {
  std::vector<double> q, k, v, k_cmp, v_cmp, gates, grad_out;
  std::vector<double> out, out_branch, lse, grad_q, grad_k, grad_v, grad_k_cmp, grad_v_cmp, grad_gates;
  std::vector<int32_t> block_indices;
  nsa::ForwardParams fwd;
  nsa::BackwardParams bwd;

  Problem(const nsa::Config& config, const nsa::Shape& shape, uint64_t seed) {
    const int64_t B = shape.batch, T = shape.seqlen, Hq = shape.num_q_heads, Hkv = shape.num_kv_heads;
    const int64_t Dk = shape.head_dim_qk, Dv = shape.head_dim_v;
    const int64_t Tc = nsa::num_cmp_tokens(T, config.cmp_block, config.cmp_stride);
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    std::uniform_real_distribution<double> unit(0.05, 0.95);
    auto fill = [&](std::vector<double>& buffer, int64_t count, bool gate) {
      buffer.resize(static_cast<size_t>(count));
      for (double& value : buffer) value = gate ? unit(rng) : normal(rng);
    };
    fill(q, B * T * Hq * Dk, false);
    fill(k, B * T * Hkv * Dk, false);
    fill(v, B * T * Hkv * Dv, false);
    fill(k_cmp, B * Tc * Hkv * Dk, false);
    fill(v_cmp, B * Tc * Hkv * Dv, false);
    fill(gates, B * T * Hq * 3, true);
    fill(grad_out, B * T * Hq * Dv, false);
    out.assign(static_cast<size_t>(B * T * Hq * Dv), NAN);
    out_branch.assign(static_cast<size_t>(B * T * Hq * 3 * Dv), NAN);
    lse.assign(static_cast<size_t>(B * T * Hq * 3), NAN);
    block_indices.assign(static_cast<size_t>(B * T * Hkv * config.num_selected), -2);
    grad_q.assign(q.size(), NAN);
    grad_k.assign(k.size(), NAN);
    grad_v.assign(v.size(), NAN);
    grad_k_cmp.assign(k_cmp.size(), NAN);
    grad_v_cmp.assign(v_cmp.size(), NAN);
    grad_gates.assign(gates.size(), NAN);

    auto in = [](const std::vector<double>& d, int64_t rows, int64_t H, int64_t D) {
      return nsa::InputTensor{d.data(), rows * H * D, H * D, D};
    };
    auto out_of = [](std::vector<double>& d, int64_t rows, int64_t H, int64_t D) {
      return nsa::OutputTensor{d.data(), rows * H * D, H * D, D};
    };
    fwd.config = bwd.config = config;
    fwd.dtype = bwd.dtype = nsa::DType::kFloat64;
    fwd.shape = bwd.shape = shape;
    fwd.q = bwd.q = in(q, T, Hq, Dk);
    fwd.k = bwd.k = in(k, T, Hkv, Dk);
    fwd.v = bwd.v = in(v, T, Hkv, Dv);
    fwd.k_cmp = bwd.k_cmp = in(k_cmp, Tc, Hkv, Dk);
    fwd.v_cmp = bwd.v_cmp = in(v_cmp, Tc, Hkv, Dv);
    fwd.gates = bwd.gates = in(gates, T, Hq, 3);
    fwd.block_indices = block_indices.data();
    fwd.out = out_of(out, T, Hq, Dv);
    fwd.out_branch = out_branch.data();
    fwd.lse = lse.data();
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

bool check(const nsa::Status& status, const char* what) {
  if (status.ok()) return true;
  std::fprintf(stderr, "nsa_demo: %s failed: %s: %s\n", what, nsa::status_code_name(status.code),
               status.message.c_str());
  return false;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Reference vs brute-force oracle on one small padded problem; returns true when they agree.
bool check_against_oracle(const nsa::Config& config, uint64_t seed, int threads) {
  const nsa::Shape shape{1, 300, 6, 2, 32, 24};
  Problem problem(config, shape, seed);
  if (!check(nsa::cpu::forward(problem.fwd, threads), "reference forward")) return false;
  nsa_oracle::Config oc;
  oc.l = config.cmp_block;
  oc.d = config.cmp_stride;
  oc.l_sel = config.sel_block;
  oc.n = config.num_selected;
  oc.n_init = config.num_init;
  oc.n_local = config.num_local;
  oc.w = config.window;
  nsa_oracle::Inputs in;
  in.T = shape.seqlen;
  in.Hq = shape.num_q_heads;
  in.Hkv = shape.num_kv_heads;
  in.Dk = shape.head_dim_qk;
  in.Dv = shape.head_dim_v;
  in.q = problem.q.data();
  in.k = problem.k.data();
  in.v = problem.v.data();
  in.k_cmp = problem.k_cmp.data();
  in.v_cmp = problem.v_cmp.data();
  in.gates = problem.gates.data();
  const nsa_oracle::Outputs expected = nsa_oracle::forward(oc, in);
  double max_error = 0;
  for (size_t e = 0; e < expected.out.size(); ++e)
    max_error = std::max(max_error, std::fabs(expected.out[e] - problem.out[e]));
  const bool same_indices = expected.indices == problem.block_indices;
  std::printf("check vs brute force (T=%lld, Hq=%lld, Hkv=%lld, Dk=%lld, Dv=%lld, float64): max |out - oracle| = "
              "%.3g, selected blocks %s\n",
              static_cast<long long>(shape.seqlen), static_cast<long long>(shape.num_q_heads),
              static_cast<long long>(shape.num_kv_heads), static_cast<long long>(shape.head_dim_qk),
              static_cast<long long>(shape.head_dim_v), max_error, same_indices ? "identical" : "DIFFERENT");
  return max_error < 1e-10 && same_indices;
}

// How the selections split into forced and scored blocks, and how far back scored ones reach.
void print_selection_statistics(const nsa::Config& config, const nsa::Shape& shape,
                                const std::vector<int32_t>& block_indices) {
  int64_t forced = 0, scored = 0, rows_with_choice = 0;
  double distance_sum = 0;
  const int64_t n = config.num_selected;
  for (int64_t row = 0; row < shape.batch * shape.seqlen * shape.num_kv_heads; ++row) {
    const int64_t t = (row / shape.num_kv_heads) % shape.seqlen;
    const int64_t current = t / config.sel_block;
    if (nsa::num_eligible_blocks(t, config.sel_block) > n) ++rows_with_choice;
    for (int64_t slot = 0; slot < n; ++slot) {
      const int64_t j = block_indices[static_cast<size_t>(row * n + slot)];
      if (j < 0) continue;
      if (j < config.num_init || current - j < config.num_local) {
        ++forced;
      } else {
        ++scored;
        distance_sum += static_cast<double>(current - j);
      }
    }
  }
  std::printf("selection: %lld forced and %lld scored blocks; %.1f%% of (t, kv head) rows had more eligible blocks "
              "than n=%lld; mean distance of a scored block behind the query's block: %.1f blocks\n",
              static_cast<long long>(forced), static_cast<long long>(scored),
              100.0 * static_cast<double>(rows_with_choice) /
                  static_cast<double>(shape.batch * shape.seqlen * shape.num_kv_heads),
              static_cast<long long>(n), scored ? distance_sum / static_cast<double>(scored) : 0.0);
  // Keys attended per query, per branch, at the last position, against dense causal attention.
  const int64_t t = shape.seqlen - 1;
  const int64_t slc_keys = std::min<int64_t>(n, nsa::num_eligible_blocks(t, config.sel_block)) * config.sel_block;
  std::printf("keys attended at t=%lld: cmp %lld + slc <= %lld + win %lld, dense %lld\n", static_cast<long long>(t),
              static_cast<long long>(nsa::num_visible_cmp_tokens(t, config.cmp_block, config.cmp_stride)),
              static_cast<long long>(slc_keys), static_cast<long long>(std::min(config.window, t + 1)),
              static_cast<long long>(t + 1));
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  const nsa::Config config;  // paper defaults
  const bool agrees = check_against_oracle(config, options.seed, options.threads);

  const nsa::Shape shape{options.batch, options.seqlen, options.q_heads, options.kv_heads, options.dk, options.dv};
  std::printf("run: B=%lld T=%lld Hq=%lld Hkv=%lld Dk=%lld Dv=%lld, float64 inputs, l=%lld d=%lld l'=%lld n=%lld "
              "w=%lld\n",
              static_cast<long long>(shape.batch), static_cast<long long>(shape.seqlen),
              static_cast<long long>(shape.num_q_heads), static_cast<long long>(shape.num_kv_heads),
              static_cast<long long>(shape.head_dim_qk), static_cast<long long>(shape.head_dim_v),
              static_cast<long long>(config.cmp_block), static_cast<long long>(config.cmp_stride),
              static_cast<long long>(config.sel_block), static_cast<long long>(config.num_selected),
              static_cast<long long>(config.window));
  Problem problem(config, shape, options.seed + 1);
  auto start = std::chrono::steady_clock::now();
  if (!check(nsa::cpu::forward(problem.fwd, options.threads), "forward")) return 1;
  const double forward_s = seconds_since(start);
  start = std::chrono::steady_clock::now();
  if (!check(nsa::cpu::backward(problem.bwd, options.threads), "backward")) return 1;
  const double backward_s = seconds_since(start);
  std::printf("cpu reference on %d threads: forward %.2f s, backward %.2f s\n",
              nsa::cpu::resolve_num_threads(options.threads), forward_s, backward_s);
  print_selection_statistics(config, shape, problem.block_indices);
  if (!agrees) {
    std::printf("FAILED: the reference disagrees with the brute-force oracle\n");
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
