// nsa_bench_forward: times the CUDA forward and each of its stages with CUDA events (median of
// --iters runs after --warmup), on random inputs, and prints one line per (T, stage) with the
// nominal TFLOP/s (the FLOPs NSA needs, not the ones a kernel happens to do); with --backward
// also the backward and its stages.
//
//   nsa_bench_forward [--seqlens 8192,32768] [--batch 1] [--q-heads 64] [--kv-heads 4] [--dk 128]
//                     [--dv 128] [--dtype bf16|fp16] [--iters 20] [--warmup 3] [--no-out-branch] [--check]
//                     [--backward] [--selected-dq auto|query|key]
//
// Stages (src/cuda/stages.h): cmp = compressed attention, select = scores + top-n,
// slc = selected attention, win = window attention + gated combine; all = nsa::cuda::forward.
// Backward: bwd = nsa::cuda::backward (default mode), bwd-det = deterministic mode, bwd-prep =
// zeroing + dgates/delta + block -> query index, bwd-dq = dq of all branches, bwd-cmp / bwd-slc /
// bwd-win = dk, dv of a branch, bwd-conv = fp32 accumulators -> gradients. TFLOP/s of a backward
// stage counts the products it does (dq: S, dP, dQ; dk/dv: S, dP, dV, dK), of bwd and bwd-det the
// products a backward needs (S, dP, dV, dK, dQ once per attended key). --selected-dq: the selection
// branch's dq (nsa::SelectedDq; bwd-det always runs query-major); key-major moves its products from
// bwd-dq to bwd-slc (cuda_detail::backward_key_major_dq says where kAuto takes it).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/layout.h"
#include "cuda/stages.h"
#include "nsa/nsa.h"

namespace {

struct Options {
  std::vector<int64_t> seqlens = {8192, 32768};
  int64_t batch = 1, q_heads = 64, kv_heads = 4, dk = 128, dv = 128;
  nsa::DType dtype = nsa::DType::kBFloat16;
  int iters = 20, warmup = 3;
  bool out_branch = true;
  bool check = false;  // after the runs: every element of out finite (sanity at sizes the tests can't reach)
  bool backward = false;
  nsa::SelectedDq selected_dq = nsa::SelectedDq::kAuto;
};

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "nsa_bench_forward: %s\n", what.c_str());
  std::exit(1);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) fail(std::string(what) + ": " + cudaGetErrorString(err));
}

Options parse(int argc, char** argv) {
  Options o;
  for (int a = 1; a < argc; ++a) {
    const std::string flag = argv[a];
    if (flag == "--no-out-branch") {
      o.out_branch = false;
      continue;
    }
    if (flag == "--check") {
      o.check = true;
      continue;
    }
    if (flag == "--backward") {
      o.backward = true;
      continue;
    }
    if (a + 1 >= argc) fail("missing value for " + flag);
    const std::string value = argv[++a];
    if (flag == "--seqlens") {
      o.seqlens.clear();
      size_t pos = 0;
      while (pos < value.size()) {
        const size_t comma = value.find(',', pos);
        o.seqlens.push_back(std::atoll(value.substr(pos, comma - pos).c_str()));
        pos = comma == std::string::npos ? value.size() : comma + 1;
      }
    } else if (flag == "--selected-dq") {
      if (value == "auto") o.selected_dq = nsa::SelectedDq::kAuto;
      else if (value == "query") o.selected_dq = nsa::SelectedDq::kQueryMajor;
      else if (value == "key") o.selected_dq = nsa::SelectedDq::kKeyMajor;
      else fail("--selected-dq must be auto, query or key");
    } else if (flag == "--dtype") {
      if (value == "bf16") o.dtype = nsa::DType::kBFloat16;
      else if (value == "fp16") o.dtype = nsa::DType::kFloat16;
      else fail("--dtype must be bf16 or fp16");
    } else {
      const long long v = std::atoll(value.c_str());
      if (flag == "--batch") o.batch = v;
      else if (flag == "--q-heads") o.q_heads = v;
      else if (flag == "--kv-heads") o.kv_heads = v;
      else if (flag == "--dk") o.dk = v;
      else if (flag == "--dv") o.dv = v;
      else if (flag == "--iters") o.iters = static_cast<int>(v);
      else if (flag == "--warmup") o.warmup = static_cast<int>(v);
      else fail("unknown flag " + flag);
    }
  }
  return o;
}

uint16_t to_16bit(float x, nsa::DType dtype) {
  return dtype == nsa::DType::kBFloat16 ? nsa::cpu::float_to_bf16_bits(x) : nsa::cpu::float_to_fp16_bits(x);
}

// A pool of random 16-bit values; tensors are filled from it at varying offsets.
struct Pool {
  std::vector<uint16_t> normal, gates;
  Pool(nsa::DType dtype, size_t size) : normal(size), gates(size) {
    uint64_t s = 0x9E3779B97F4A7C15ull;
    auto next = [&] {
      s ^= s << 13;
      s ^= s >> 7;
      s ^= s << 17;
      return static_cast<double>(s >> 11) * 0x1.0p-53;
    };
    for (size_t i = 0; i < size; ++i) {
      const double u1 = std::max(next(), 1e-12), u2 = next();
      normal[i] = to_16bit(static_cast<float>(std::sqrt(-2 * std::log(u1)) * std::cos(6.283185307179586 * u2)), dtype);
      gates[i] = to_16bit(static_cast<float>(0.05 + 0.9 * next()), dtype);
    }
  }
};

void* device_fill(const std::vector<uint16_t>& pool, size_t count, size_t salt) {
  void* ptr = nullptr;
  check(cudaMalloc(&ptr, std::max<size_t>(count, 1) * 2), "cudaMalloc");
  std::vector<uint16_t> host(std::min(count, pool.size() / 2));
  for (size_t done = 0, piece = 0; done < count; done += host.size(), ++piece) {
    const size_t n = std::min(host.size(), count - done);
    const size_t offset = ((salt + piece) * 2654435761ull) % (pool.size() - n);
    check(cudaMemcpy(static_cast<uint16_t*>(ptr) + done, pool.data() + offset, n * 2, cudaMemcpyHostToDevice),
          "cudaMemcpy");
  }
  return ptr;
}

double median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  if (!nsa::cuda::built()) fail("built without CUDA");
  if (o.backward && !o.out_branch) fail("--backward needs the branch outputs (drop --no-out-branch)");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  const Pool pool(o.dtype, size_t{1} << 24);
  std::printf("device: %s (%d SMs), dtype %s, B=%lld Hq=%lld Hkv=%lld Dk=%lld Dv=%lld, out_branch %s\n", prop.name,
              prop.multiProcessorCount, nsa::dtype_name(o.dtype), static_cast<long long>(o.batch),
              static_cast<long long>(o.q_heads), static_cast<long long>(o.kv_heads), static_cast<long long>(o.dk),
              static_cast<long long>(o.dv), o.out_branch ? "yes" : "no");
  std::printf("%8s %-7s %10s %10s %12s\n", "T", "stage", "median_ms", "TFLOP/s", "nominal_GF");
  cudaStream_t stream;
  check(cudaStreamCreate(&stream), "cudaStreamCreate");
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");

  for (const int64_t T : o.seqlens) {
    nsa::ForwardParams p;
    p.dtype = o.dtype;
    p.shape = {o.batch, T, o.q_heads, o.kv_heads, o.dk, o.dv};
    const nsa::Config& c = p.config;
    const int64_t Tc = nsa::num_cmp_tokens(T, c.cmp_block, c.cmp_stride);
    const int64_t B = o.batch, Hq = o.q_heads, Hkv = o.kv_heads, Dk = o.dk, Dv = o.dv;
    auto input = [&](int64_t rows, int64_t heads, int64_t dim, size_t salt, bool gates = false) {
      nsa::InputTensor t;
      t.data = device_fill(gates ? pool.gates : pool.normal, static_cast<size_t>(B * rows * heads * dim), salt);
      t.batch_stride = rows * heads * dim;
      t.seq_stride = heads * dim;
      t.head_stride = dim;
      return t;
    };
    p.q = input(T, Hq, Dk, 1);
    p.k = input(T, Hkv, Dk, 2);
    p.v = input(T, Hkv, Dv, 3);
    p.k_cmp = input(Tc, Hkv, Dk, 4);
    p.v_cmp = input(Tc, Hkv, Dv, 5);
    p.gates = input(T, Hq, 3, 6, true);
    void *out = nullptr, *out_branch = nullptr, *lse = nullptr, *indices = nullptr, *workspace = nullptr;
    check(cudaMalloc(&out, static_cast<size_t>(B * T * Hq * Dv * 2)), "cudaMalloc out");
    if (o.out_branch) check(cudaMalloc(&out_branch, static_cast<size_t>(B * T * Hq * 3 * Dv * 2)), "cudaMalloc");
    check(cudaMalloc(&lse, static_cast<size_t>(B * T * Hq * 3 * 4)), "cudaMalloc lse");
    check(cudaMalloc(&indices, static_cast<size_t>(B * T * Hkv * c.num_selected * 4)), "cudaMalloc indices");
    p.out = {out, T * Hq * Dv, Hq * Dv, Dv};
    p.out_branch = out_branch;
    p.lse = lse;
    p.block_indices = static_cast<int32_t*>(indices);
    const size_t ws_bytes = nsa::cuda::forward_workspace_bytes(p);
    if (ws_bytes) check(cudaMalloc(&workspace, ws_bytes), "cudaMalloc workspace");

    // Nominal FLOPs: 2 per multiply-add, per query head and position.
    double f_cmp = 0, f_sel = 0, f_slc = 0, f_win = 0;
    for (int64_t t = 0; t < T; ++t) {
      const double nv = static_cast<double>(nsa::num_visible_cmp_tokens(t, c.cmp_block, c.cmp_stride));
      const double blocks = static_cast<double>(std::min<int64_t>(c.num_selected, t / c.sel_block + 1));
      const double slc_keys = std::min<double>(blocks * static_cast<double>(c.sel_block), static_cast<double>(t + 1));
      f_cmp += nv * 2.0 * static_cast<double>(Dk + Dv);
      f_sel += nv * 2.0 * static_cast<double>(Dk);
      f_slc += slc_keys * 2.0 * static_cast<double>(Dk + Dv);
      f_win += static_cast<double>(std::min<int64_t>(c.window, t + 1)) * 2.0 * static_cast<double>(Dk + Dv);
    }
    const double scale = static_cast<double>(B * Hq);
    const double dense = scale * 2.0 * static_cast<double>(Dk + Dv) * static_cast<double>(T) *
                         static_cast<double>(T + 1) / 2.0;
    namespace cd = nsa::cuda_detail;
    struct Stage {
      const char* name;
      unsigned mask;
      double flops;
    } stages[] = {{"all", cd::kStageAll, scale * (f_cmp + f_sel + f_slc + f_win)},
                  {"cmp", cd::kStageCmp, scale * f_cmp},
                  {"select", cd::kStageSelect, scale * f_sel},
                  {"slc", cd::kStageSlc, scale * f_slc},
                  {"win", cd::kStageWin, scale * f_win},
                  // ".cp": the cp.async kernels (at Dk = 64 the slc one on wgmma) where TMA rings run
                  // the rows above (sm_90a: slc_gather_applies, sweep_ring_applies).
                  {"all.cp", cd::kStageAll | cd::kStageCpAsyncSweeps, scale * (f_cmp + f_sel + f_slc + f_win)},
                  {"cmp.cp", cd::kStageCmp | cd::kStageCpAsyncSweeps, scale * f_cmp},
                  {"slc.cp", cd::kStageSlc | cd::kStageCpAsyncSweeps, scale * f_slc},
                  {"win.cp", cd::kStageWin | cd::kStageCpAsyncSweeps, scale * f_win}};
    auto time_runs = [&](const char* name, double flops, auto&& run) {
      std::vector<float> times;
      for (int it = 0; it < o.warmup + o.iters; ++it) {
        check(cudaEventRecord(start, stream), "cudaEventRecord");
        const nsa::Status status = run();
        if (!status.ok()) fail(std::string(name) + ": " + status.message);
        check(cudaEventRecord(stop, stream), "cudaEventRecord");
        check(cudaEventSynchronize(stop), "cudaEventSynchronize");
        float ms = 0;
        check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
        if (it >= o.warmup) times.push_back(ms);
      }
      const double ms = median(times);
      std::printf("%8lld %-7s %10.3f %10.1f %12.1f\n", static_cast<long long>(T), name, ms,
                  flops / (ms * 1e-3) / 1e12, flops / 1e9);
    };
    for (const Stage& st : stages)
      time_runs(st.name, st.flops, [&] { return nsa::cuda_detail::forward_stages(p, workspace, ws_bytes, stream, st.mask); });
    std::printf("%8lld %-7s %10s %10s %12.1f  (dense causal attention FLOPs, for the ratio)\n",
                static_cast<long long>(T), "dense", "-", "-", dense / 1e9);
    std::vector<void*> backward_buffers;
    if (o.backward) {  // on the forward's outputs (the last "all" run wrote them)
      nsa::BackwardParams bp;
      bp.config = p.config;
      bp.dtype = p.dtype;
      bp.shape = p.shape;
      bp.q = p.q, bp.k = p.k, bp.v = p.v, bp.k_cmp = p.k_cmp, bp.v_cmp = p.v_cmp, bp.gates = p.gates;
      bp.block_indices = p.block_indices;
      bp.out_branch = out_branch;
      bp.lse = lse;
      bp.grad_out = input(T, Hq, Dv, 7);
      auto output = [&](int64_t rows, int64_t heads, int64_t dim) {
        void* ptr = nullptr;
        check(cudaMalloc(&ptr, static_cast<size_t>(std::max<int64_t>(1, B * rows * heads * dim) * 2)), "cudaMalloc");
        backward_buffers.push_back(ptr);
        return nsa::OutputTensor{ptr, rows * heads * dim, heads * dim, dim};
      };
      bp.grad_q = output(T, Hq, Dk);
      bp.grad_k = output(T, Hkv, Dk);
      bp.grad_v = output(T, Hkv, Dv);
      bp.grad_k_cmp = output(Tc, Hkv, Dk);
      bp.grad_v_cmp = output(Tc, Hkv, Dv);
      bp.grad_gates = output(T, Hq, 3);
      bp.selected_dq = o.selected_dq;
      const size_t bwd_bytes = nsa::cuda::backward_workspace_bytes(bp);
      void* bwd_workspace = nullptr;
      check(cudaMalloc(&bwd_workspace, std::max<size_t>(bwd_bytes, 1)), "cudaMalloc backward workspace");
      backward_buffers.push_back(bwd_workspace);
      // Products per attended key (2 FLOPs per multiply-add): S and dQ over Dk, dP and dV over Dv,
      // dK over Dk; keys per branch from the forward's nominal counts.
      const double dk = static_cast<double>(Dk), dv = static_cast<double>(Dv);
      const double keys_cmp = scale * f_cmp / (2 * (dk + dv)), keys_slc = scale * f_slc / (2 * (dk + dv)),
                   keys_win = scale * f_win / (2 * (dk + dv)), keys = keys_cmp + keys_slc + keys_win;
      const bool key_major_dq = cd::backward_key_major_dq(bp);
      const double keys_dq = key_major_dq ? keys_cmp + keys_win : keys;
      const double slc_dq = key_major_dq ? dk : 0.0;
      const struct {
        const char* name;
        unsigned mask;
        bool deterministic;
        double flops;
      } bwd_stages[] = {{"bwd", cd::kBwdStageAll, false, keys * 2 * (3 * dk + 2 * dv)},
                        {"bwd-det", cd::kBwdStageAll, true, keys * 2 * (3 * dk + 2 * dv)},
                        {"bwd-prep", cd::kBwdStagePrep, false, 0},
                        {"bwd-dq", cd::kBwdStageDq, false, keys_dq * 2 * (2 * dk + dv)},
                        {"bwd-cmp", cd::kBwdStageCmp, false, keys_cmp * 2 * (2 * dk + 2 * dv)},
                        {"bwd-slc", cd::kBwdStageSlc, false, keys_slc * 2 * (2 * dk + 2 * dv + slc_dq)},
                        {"bwd-win", cd::kBwdStageWin, false, keys_win * 2 * (2 * dk + 2 * dv)},
                        {"bwd-conv", cd::kBwdStageConvert, false, 0}};
      for (const auto& st : bwd_stages) {
        bp.deterministic = st.deterministic;
        bp.selected_dq = st.deterministic ? nsa::SelectedDq::kAuto : o.selected_dq;
        time_runs(st.name, st.flops,
                  [&] { return cd::backward_stages(bp, bwd_workspace, bwd_bytes, stream, st.mask); });
      }
      backward_buffers.push_back(const_cast<void*>(bp.grad_out.data));
      if (o.check) {
        const size_t count = static_cast<size_t>(B * T * Hq * Dk);
        std::vector<uint16_t> host(count);
        check(cudaMemcpy(host.data(), bp.grad_q.data, count * 2, cudaMemcpyDeviceToHost), "cudaMemcpy grad_q");
        size_t bad = 0;
        for (uint16_t bits : host) bad += (bits & 0x7fffu) >= (o.dtype == nsa::DType::kBFloat16 ? 0x7f80u : 0x7c00u);
        std::printf("%8lld check   grad_q: %zu elements, %zu not finite\n", static_cast<long long>(T), count, bad);
      }
    }
    check(cudaGetLastError(), "after the runs");
    if (o.check) {  // out is written by the last run of the last stage ("win" includes the combine)
      const size_t count = static_cast<size_t>(B * T * Hq * Dv);
      std::vector<uint16_t> host(count);
      check(cudaMemcpy(host.data(), out, count * 2, cudaMemcpyDeviceToHost), "cudaMemcpy out");
      size_t bad = 0;
      double sum = 0;
      for (uint16_t bits : host) {
        const bool finite = (bits & 0x7fffu) < (o.dtype == nsa::DType::kBFloat16 ? 0x7f80u : 0x7c00u);
        bad += !finite;
      }
      for (size_t i = 0; i < count; i += 4099) sum += static_cast<double>(host[i]);
      std::printf("%8lld check   out: %zu elements (%s 2^31), %zu not finite, sample checksum %.0f\n",
                  static_cast<long long>(T), count, count > (size_t{1} << 31) ? ">" : "<=", bad, sum);
    }
    for (const void* ptr : {p.q.data, p.k.data, p.v.data, p.k_cmp.data, p.v_cmp.data, p.gates.data})
      cudaFree(const_cast<void*>(ptr));
    for (void* ptr : {out, out_branch, lse, indices, workspace}) cudaFree(ptr);
    for (void* ptr : backward_buffers) cudaFree(ptr);
  }
  return 0;
}
