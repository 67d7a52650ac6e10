// nsa_gather_ceiling: a floor for the selected-attention (slc) branch's K/V traffic. It only
// reads the selected blocks into the SMs (no math) and times it, so the slc kernel's time can be
// compared with the time the reads alone take on this GPU.
//
//   nsa_gather_ceiling [--seqlens 8192,65536] [--kv-heads 4] [--dim 128] [--num-selected 16]
//                      [--stages 2,3,4] [--iters 10] [--warmup 2] [--seed 1]
//                      [--copy-mb 2048] [--l2-mb 8] [--no-reference]
//
// Layout as in nsa: K and V [T, Hkv, D] bf16 (random bits; D in {64, 128, 256}), blocks of
// l' = 64 keys, so one (position t, kv head h, block) reads 64 rows of D*2 bytes from K and
// the same from V (32 KB at D = 128), rows strided by Hkv*D*2 bytes. Block indices
// [T, Hkv, n] (int32) are drawn on the host with the causal rule: block j in 0 .. t/64; the
// first block 0 and the last two blocks t/64, t/64-1 forced like NSA, the rest uniform without
// repeats; ascending, -1 padded when fewer than n blocks exist (what nsa's select kernel writes).
//
// CTAs as in the real slc kernel: grid (T/4, Hkv), 128 threads, 4 consecutive positions of one
// kv head per CTA; blockIdx.x varies fastest, so all CTAs of kv head 0 are dispatched first.
// Each CTA loads one tile list, in one of two modes:
//   pairs: every valid (position, block) pair of its 4 positions, in order (a block that two of
//          the positions selected is loaded twice);
//   union: the distinct blocks of its 4 positions, ascending (what the real kernel loads).
// Kernels:
//   A "cp.async": each tile's K and V rows go into a shared-memory ring of S stages (rows padded
//     to D+8 elements like the real kernel) with cp.async.cg 16 B; issue tile k+S-1, wait for
//     tile k, __syncthreads, fold 2 words of the tile into a register checksum, __syncthreads
//     (S = 2 is the real kernel's double buffer). "s2q" is S = 2 with the real kernel's other
//     shared memory (Q tile and union bookkeeping) also allocated, so the CTAs per SM match it.
//   A' "cp.async.ca": kernel A with cp.async.ca (allocating in L1) instead of .cg, 2 stages.
//   B "ld.global.v4": the same tiles with plain 16-byte __ldg loads (ld.global.nc.v4; L1 may
//     serve repeats), 32 per thread in flight (2 tiles at D = 128), every word xor-accumulated.
//   C "TMA" (sm_90): cp.async.bulk.tensor.3d over [T][Hkv][D] tensor maps, boxes of 64 keys x 64
//     elements (128-byte swizzle), issued by one thread into an S-stage ring, one mbarrier per
//     stage; the Hopper way to fill shared memory, for comparison with A.
// References: cudaMemcpy device-to-device of --copy-mb MB (GB/s counts read + write), a one-pass
// ld.global.nc.L1::no_allocate.v4 read of the copy's source ("dram_read"), and "l2_read": all SMs
// repeatedly reading an --l2-mb MB buffer with the same loads (L2-resident, not kept in L1).
//
// Output: a human-readable table per T, and one JSON line per measurement:
//   {"kind":"cpasync_pairs_s2","T":65536,"Hkv":4,"D":128,"n":16,"bytes":136432320512,"ms":21.9498,
//    "gbps":6215.6,"ctas_per_sm":3}   (one line; ctas_per_sm for the gather kernels)
// kinds: cpasync_{pairs,union}_s{2q,2,3,4}, cpasync_ca_{pairs,union}_s{2q,2}, ldg_{pairs,union},
// tma_{pairs,union}_s{2,3,4},
// memcpy_d2d, dram_read, l2_read
// (the last three with "T":0). bytes: what the kernel reads (pairs: 2*64*D*2 per valid pair;
// union: the same per distinct block per CTA); gbps = bytes / time (10^9 B/s). Timings: CUDA
// events, median of --iters after --warmup runs. Each kernel also counts the tiles it loaded,
// checked against the host's count (a mismatch is an error, exit code 2).
#include <cuda.h>  // CUtensorMap (types only; the encoder comes from the runtime entry point)
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int kThreads = 128;  // one CTA: 4 warps, as the real kernel
constexpr int kPos = 4;        // positions per CTA (64 rows / G = 16 query heads per kv head)
constexpr int kBlockKeys = 64; // l'
constexpr int kPad = 8;        // shared-memory row padding (elements), as the real kernel
constexpr int kMaxSelected = 32;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "nsa_gather_ceiling: %s\n", what.c_str());
  std::exit(1);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) fail(std::string(what) + ": " + cudaGetErrorString(err));
}

// ------------------------------------------------------------------------------------------------
// Device side.

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// The real kernel's form (src-size operand, zero-fill when 0; here always 16). kCa: .ca (through
// L1) instead of the real kernel's .cg (L2 only).
template <bool kCa>
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
  if constexpr (kCa) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(16));
  } else {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(16));
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ uint32_t fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

// ld.global.nc.L1::no_allocate.v4: read through L2 without keeping the line in L1.
__device__ __forceinline__ uint4 ld_nc_no_l1(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// Checksum and tile count of a CTA into out[0] (xor) and out[1] (sum).
__device__ __forceinline__ void publish(uint32_t acc, int tiles, unsigned long long* out) {
  acc = __reduce_xor_sync(0xffffffffu, acc);
  if ((threadIdx.x & 31) == 0) atomicXor(out, static_cast<unsigned long long>(acc));
  if (threadIdx.x == 0) atomicAdd(out + 1, static_cast<unsigned long long>(tiles));
}

// The CTA's tile list (block indices) in list[0 .. return): pairs mode, the valid entries of its
// 4 positions in order; union mode, their distinct values ascending. One thread per entry, O(4n)
// each; raw and uniq are [4n] scratch.
template <bool kUnion>
__device__ __forceinline__ int build_list(const int* __restrict__ idx, int64_t t0, int h, int hkv, int n, int* raw,
                                          int* uniq, int* list) {
  const int tid = threadIdx.x, entries = kPos * n;
  int v = -1;
  if (tid < entries) {
    const int p = tid / n, j = tid % n;
    v = idx[((t0 + p) * hkv + h) * n + j];
    raw[tid] = v;
  }
  __syncthreads();
  bool keep = v >= 0;
  if (kUnion) {
    for (int e = 0; e < tid && e < entries; ++e) keep = keep && raw[e] != v;  // the first copy represents v
    if (tid < entries) uniq[tid] = keep ? v : -1;
    __syncthreads();
  }
  int rank = 0;
  if (keep) {
    for (int e = 0; e < entries; ++e) {
      if (kUnion) rank += uniq[e] >= 0 && uniq[e] < v;  // distinct smaller values: ascending
      else rank += e < tid && raw[e] >= 0;               // valid entries before this one: in order
    }
    list[rank] = v;
  }
  return __syncthreads_count(keep);
}

// Kernel A: cp.async into an S-stage shared-memory ring, K and V tiles of 64 x (D+8).
template <int D, int S, bool kUnion, bool kCa>
__global__ void __launch_bounds__(kThreads) gather_cpasync(const uint16_t* __restrict__ k, const uint16_t* __restrict__ v,
                                                           const int* __restrict__ idx, int hkv, int n,
                                                           unsigned long long* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int raw[kPos * kMaxSelected], uniq[kPos * kMaxSelected], list[kPos * kMaxSelected];
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kTileElems = kBlockKeys * (D + kPad);
  const int tid = threadIdx.x, h = blockIdx.y;
  const int64_t t0 = int64_t{blockIdx.x} * kPos;
  const int num = build_list<kUnion>(idx, t0, h, hkv, n, raw, uniq, list);
  uint16_t* ring = reinterpret_cast<uint16_t*>(smem);  // stage s: K at 2*s*tile, V after it
  const int64_t row_stride = int64_t{hkv} * D;

  auto issue = [&](int tile) {
    if (tile < num) {
      const int64_t key0 = int64_t{list[tile]} * kBlockKeys;
      uint16_t* sk = ring + (tile % S) * 2 * kTileElems;
      uint16_t* sv = sk + kTileElems;
#pragma unroll
      for (int c = tid; c < kBlockKeys * kChunks; c += kThreads) {
        const int r = c / kChunks, col = c % kChunks;
        const int64_t off = (key0 + r) * row_stride + int64_t{h} * D + col * 8;
        cp_async_16<kCa>(sk + r * (D + kPad) + col * 8, k + off);
        cp_async_16<kCa>(sv + r * (D + kPad) + col * 8, v + off);
      }
    }
    cp_async_commit();  // possibly empty: keeps the group count uniform
  };

  uint32_t acc = 0;
#pragma unroll
  for (int s = 0; s < S - 1; ++s) issue(s);
  for (int tile = 0; tile < num; ++tile) {
    issue(tile + S - 1);
    cp_async_wait<S - 1>();  // this thread's copies of `tile` landed
    __syncthreads();         // everyone's
    const uint16_t* sk = ring + (tile % S) * 2 * kTileElems;
    const int r = tid & 63, col = (tid >> 6) % kChunks;
    acc ^= fold(*reinterpret_cast<const uint4*>(sk + r * (D + kPad) + col * 8));
    acc ^= fold(*reinterpret_cast<const uint4*>(sk + kTileElems + r * (D + kPad) + col * 8));
    __syncthreads();  // the stage is refilled S-1 tiles later
  }
  cp_async_wait<0>();
  publish(acc, num, out);
}

// Kernel B: plain 16-byte loads, kLoads per thread in flight (kBatch tiles of K and V at a time).
template <int D, bool kUnion>
__global__ void __launch_bounds__(kThreads, 1) gather_ldg(const uint16_t* __restrict__ k, const uint16_t* __restrict__ v,
                                                       const int* __restrict__ idx, int hkv, int n,
                                                       unsigned long long* out) {
  __shared__ int raw[kPos * kMaxSelected], uniq[kPos * kMaxSelected], list[kPos * kMaxSelected];
  constexpr int kChunks = D / 8;
  constexpr int kPerThread = kBlockKeys * kChunks / kThreads;  // 16-byte loads per thread per tensor tile
  constexpr int kBatch = 32 / (2 * kPerThread) > 0 ? 32 / (2 * kPerThread) : 1;
  const int tid = threadIdx.x, h = blockIdx.y;
  const int64_t t0 = int64_t{blockIdx.x} * kPos;
  const int num = build_list<kUnion>(idx, t0, h, hkv, n, raw, uniq, list);
  const int64_t row_stride = int64_t{hkv} * D;
  const uint16_t* kb = k + int64_t{h} * D;
  const uint16_t* vb = v + int64_t{h} * D;
  // B tiles from `tile` on: all 2*B*kPerThread loads issued (no branch between them, so the
  // compiler keeps them in flight together), then folded.
  auto batch = [&](auto b_tag, int tile) {
    constexpr int B = decltype(b_tag)::value;
    uint4 rk[B][kPerThread], rv[B][kPerThread];
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const int64_t key0 = int64_t{list[tile + b]} * kBlockKeys;
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int c = tid + i * kThreads, r = c / kChunks, col = c % kChunks;
        const int64_t off = (key0 + r) * row_stride + col * 8;
        rk[b][i] = __ldg(reinterpret_cast<const uint4*>(kb + off));
        rv[b][i] = __ldg(reinterpret_cast<const uint4*>(vb + off));
      }
    }
    uint32_t x = 0;
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) x ^= fold(rk[b][i]) ^ fold(rv[b][i]);
    return x;
  };
  uint32_t acc = 0;
  int tile = 0;
  for (; tile + kBatch <= num; tile += kBatch) acc ^= batch(std::integral_constant<int, kBatch>{}, tile);
  for (; tile < num; ++tile) acc ^= batch(std::integral_constant<int, 1>{}, tile);
  publish(acc, num, out);
}

// Kernel C: the Hopper tensor-memory accelerator. 3-D tensor maps over K and V ([T][Hkv][D]),
// box 64 keys x 1 head x 64 elements (128 B, 128-byte swizzle), D/64 boxes per tile and tensor,
// issued by one thread into an S-stage ring with one mbarrier per stage (expect_tx = K + V bytes).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar))
      : "memory");
}
#endif

template <int D, int S, bool kUnion>
__global__ void __launch_bounds__(kThreads) gather_tma(const __grid_constant__ CUtensorMap tk,
                                                       const __grid_constant__ CUtensorMap tv, const int* __restrict__ idx,
                                                       int hkv, int n, unsigned long long* out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // sm_90 instructions; the host launches it only there
#else
  extern __shared__ unsigned char smem_tma[];
  __shared__ int raw[kPos * kMaxSelected], uniq[kPos * kMaxSelected], list[kPos * kMaxSelected];
  __shared__ __align__(8) uint64_t bar[S];
  constexpr int kTileBytes = kBlockKeys * D * 2;  // one tensor's tile, dense (swizzled)
  const int tid = threadIdx.x, h = blockIdx.y;
  const int64_t t0 = int64_t{blockIdx.x} * kPos;
  // The 128-byte swizzle wants 1024-byte aligned boxes (the launch adds 1 KB for this).
  unsigned char* ring = smem_tma + ((1024 - (smem_u32(smem_tma) & 1023)) & 1023);
  if (tid == 0) {
    for (int s = 0; s < S; ++s) mbar_init(&bar[s], 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  const int num = build_list<kUnion>(idx, t0, h, hkv, n, raw, uniq, list);  // (synchronizes)

  auto issue = [&](int tile) {
    if (tid == 0 && tile < num) {
      const int s = tile % S;
      unsigned char* sk = ring + s * 2 * kTileBytes;
      mbar_expect_tx(&bar[s], 2 * kTileBytes);
      const int key0 = list[tile] * kBlockKeys;
#pragma unroll
      for (int c = 0; c < D / 64; ++c) {
        tma_load_3d(sk + c * 8192, &tk, &bar[s], c * 64, h, key0);
        tma_load_3d(sk + kTileBytes + c * 8192, &tv, &bar[s], c * 64, h, key0);
      }
    }
  };
  uint32_t acc = 0;
#pragma unroll
  for (int s = 0; s < S - 1; ++s) issue(s);
  for (int tile = 0; tile < num; ++tile) {
    issue(tile + S - 1);
    mbar_wait(&bar[tile % S], static_cast<uint32_t>(tile / S) & 1u);
    const unsigned char* sk = ring + (tile % S) * 2 * kTileBytes;
    acc ^= fold(*reinterpret_cast<const uint4*>(sk + tid * 16));
    acc ^= fold(*reinterpret_cast<const uint4*>(sk + kTileBytes + tid * 16));
    __syncthreads();  // the stage is refilled S-1 tiles later
  }
  publish(acc, num, out);
#endif
}

// Streaming read of `words` 16-byte words, `passes` times (index masked: words is a power of 2),
// ld.global.nc.L1::no_allocate (served by L2, not L1). 8 loads in flight per thread.
__global__ void __launch_bounds__(256, 1) read_kernel(const uint4* __restrict__ buf, int64_t words, int64_t passes,
                                                      unsigned long long* out) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t total = words * passes, mask = words - 1;
  uint32_t acc = 0;
  int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  for (; i + 7 * stride < total; i += 8 * stride) {
    uint4 r[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) r[u] = ld_nc_no_l1(buf + ((i + u * stride) & mask));
#pragma unroll
    for (int u = 0; u < 8; ++u) acc ^= fold(r[u]);
  }
  for (; i < total; i += stride) acc ^= fold(ld_nc_no_l1(buf + (i & mask)));
  acc = __reduce_xor_sync(0xffffffffu, acc);
  if ((threadIdx.x & 31) == 0) atomicXor(out, static_cast<unsigned long long>(acc));
}

__global__ void fill_kernel(uint32_t* p, int64_t words, uint32_t seed) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < words; i += int64_t{gridDim.x} * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 0x9E3779B1u ^ seed;
    x ^= x >> 15;
    x *= 0x2C1B3C6Du;
    x ^= x >> 12;
    p[i] = x;
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.

struct Options {
  std::vector<int64_t> seqlens = {8192, 65536};
  int kv_heads = 4, dim = 128, n = 16, iters = 10, warmup = 2;
  std::vector<int> stages = {2, 3, 4};
  uint64_t seed = 1;
  int64_t copy_mb = 2048, l2_mb = 8;
  bool reference = true;
};

std::vector<int64_t> parse_list(const std::string& value) {
  std::vector<int64_t> out;
  size_t pos = 0;
  while (pos < value.size()) {
    const size_t comma = value.find(',', pos);
    out.push_back(std::atoll(value.substr(pos, comma - pos).c_str()));
    pos = comma == std::string::npos ? value.size() : comma + 1;
  }
  return out;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int a = 1; a < argc; ++a) {
    const std::string flag = argv[a];
    if (flag == "--no-reference") {
      o.reference = false;
      continue;
    }
    if (flag == "--help" || flag == "-h") {
      std::printf(
          "nsa_gather_ceiling [--seqlens 8192,65536] [--kv-heads 4] [--dim 128] [--num-selected 16]\n"
          "                   [--stages 2,3,4] [--iters 10] [--warmup 2] [--seed 1] [--copy-mb 2048] [--l2-mb 8]\n"
          "                   [--no-reference]\n");
      std::exit(0);
    }
    if (a + 1 >= argc) fail("missing value for " + flag);
    const std::string value = argv[++a];
    const long long x = std::atoll(value.c_str());
    if (flag == "--seqlens") o.seqlens = parse_list(value);
    else if (flag == "--stages") {
      o.stages.clear();
      for (int64_t s : parse_list(value)) o.stages.push_back(static_cast<int>(s));
    } else if (flag == "--kv-heads") o.kv_heads = static_cast<int>(x);
    else if (flag == "--dim") o.dim = static_cast<int>(x);
    else if (flag == "--num-selected") o.n = static_cast<int>(x);
    else if (flag == "--iters") o.iters = static_cast<int>(x);
    else if (flag == "--warmup") o.warmup = static_cast<int>(x);
    else if (flag == "--seed") o.seed = static_cast<uint64_t>(x);
    else if (flag == "--copy-mb") o.copy_mb = x;
    else if (flag == "--l2-mb") o.l2_mb = x;
    else fail("unknown flag " + flag);
  }
  if (o.dim != 64 && o.dim != 128 && o.dim != 256) fail("--dim must be 64, 128 or 256");
  if (o.n < 3 || o.n > kMaxSelected) fail("--num-selected must be in 3 .. 32");
  if (o.kv_heads < 1) fail("--kv-heads must be >= 1");
  if (o.iters < 1 || o.warmup < 0) fail("--iters must be >= 1 and --warmup >= 0");
  for (int64_t t : o.seqlens)
    if (t < kBlockKeys || t % kBlockKeys != 0) fail("each seqlen must be a positive multiple of 64");
  for (int s : o.stages)
    if (s < 2 || s > 4) fail("--stages entries must be 2, 3 or 4");
  if (o.l2_mb < 1 || (o.l2_mb & (o.l2_mb - 1)) != 0) fail("--l2-mb must be a power of 2");
  if (o.copy_mb < 1 || (o.copy_mb & (o.copy_mb - 1)) != 0) fail("--copy-mb must be a power of 2");
  return o;
}

// Block indices [T, Hkv, n]: causal, 0 and the last two blocks forced, the rest distinct uniform,
// ascending, -1 padded.
std::vector<int> make_indices(int64_t T, int hkv, int n, std::mt19937_64& rng) {
  std::vector<int> idx(static_cast<size_t>(T * hkv * n), -1);
  std::vector<int> chosen;
  for (int64_t t = 0; t < T; ++t) {
    const int last = static_cast<int>(t / kBlockKeys), eligible = last + 1;
    for (int h = 0; h < hkv; ++h) {
      chosen.clear();
      if (eligible <= n) {
        for (int j = 0; j < eligible; ++j) chosen.push_back(j);
      } else {
        chosen = {0, last, last - 1};  // eligible > n >= 3, so distinct
        std::uniform_int_distribution<int> pick(1, last - 2);
        while (static_cast<int>(chosen.size()) < n) {
          const int j = pick(rng);
          if (std::find(chosen.begin(), chosen.end(), j) == chosen.end()) chosen.push_back(j);
        }
        std::sort(chosen.begin(), chosen.end());
      }
      std::copy(chosen.begin(), chosen.end(), idx.begin() + (t * hkv + h) * n);
    }
  }
  return idx;
}

struct TileCounts {
  int64_t pairs = 0, unions = 0;
};
TileCounts count_tiles(const std::vector<int>& idx, int64_t T, int hkv, int n) {
  TileCounts c;
  std::vector<int> u;
  for (int64_t t0 = 0; t0 < T; t0 += kPos)
    for (int h = 0; h < hkv; ++h) {
      u.clear();
      for (int p = 0; p < kPos; ++p)
        for (int j = 0; j < n; ++j) {
          const int b = idx[static_cast<size_t>(((t0 + p) * hkv + h) * n + j)];
          if (b >= 0) u.push_back(b);
        }
      c.pairs += static_cast<int64_t>(u.size());
      std::sort(u.begin(), u.end());
      c.unions += std::unique(u.begin(), u.end()) - u.begin();
    }
  return c;
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5f * (v[m - 1] + v[m]);
}

// Median ms of `launch` over o.iters runs after o.warmup.
float time_ms(const Options& o, const std::function<void()>& launch) {
  cudaEvent_t e0, e1;
  check(cudaEventCreate(&e0), "cudaEventCreate");
  check(cudaEventCreate(&e1), "cudaEventCreate");
  for (int i = 0; i < o.warmup; ++i) launch();
  check(cudaGetLastError(), "launch");
  check(cudaDeviceSynchronize(), "warm-up");
  std::vector<float> ms;
  for (int i = 0; i < o.iters; ++i) {
    check(cudaEventRecord(e0), "cudaEventRecord");
    launch();
    check(cudaEventRecord(e1), "cudaEventRecord");
    check(cudaEventSynchronize(e1), "run");
    float x = 0.f;
    check(cudaEventElapsedTime(&x, e0, e1), "cudaEventElapsedTime");
    ms.push_back(x);
  }
  check(cudaGetLastError(), "launch");
  check(cudaEventDestroy(e0), "cudaEventDestroy");
  check(cudaEventDestroy(e1), "cudaEventDestroy");
  return median(ms);
}

void report(const char* kind, const char* label, int64_t T, const Options& o, int64_t bytes, float ms, int ctas_per_sm) {
  const double gbps = static_cast<double>(bytes) / (ms * 1e-3) / 1e9;
  std::printf("  %-24s %-52s %9.3f ms  %8.1f GB/s", kind, label, ms, gbps);
  if (ctas_per_sm > 0) std::printf("  (%d CTAs/SM)", ctas_per_sm);
  std::printf("\n");
  std::printf("{\"kind\":\"%s\",\"T\":%lld,\"Hkv\":%d,\"D\":%d,\"n\":%d,\"bytes\":%lld,\"ms\":%.4f,\"gbps\":%.1f", kind,
              static_cast<long long>(T), o.kv_heads, o.dim, o.n, static_cast<long long>(bytes), ms, gbps);
  if (ctas_per_sm > 0) std::printf(",\"ctas_per_sm\":%d", ctas_per_sm);
  std::printf("}\n");
  std::fflush(stdout);
}

int g_status = 0;

void check_tiles(unsigned long long* d_out, int64_t expected, int runs, const char* kind) {
  unsigned long long h[2] = {0, 0};
  check(cudaMemcpy(h, d_out, sizeof h, cudaMemcpyDeviceToHost), "cudaMemcpy out");
  if (h[1] != static_cast<unsigned long long>(expected) * static_cast<unsigned long long>(runs)) {
    std::printf("  ERROR %s: loaded %llu tiles over %d runs, expected %lld per run\n", kind, h[1], runs,
                static_cast<long long>(expected));
    g_status = 2;
  }
}

// cuTensorMapEncodeTiled through the runtime's driver entry point (no -lcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  if (!fn) {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q),
          "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    if (q != cudaDriverEntryPointSuccess || !p) fail("cuTensorMapEncodeTiled not found");
    fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }
  return fn;
}

// [T][Hkv][D] bf16, box {64 elements, 1 head, 64 keys}, 128-byte swizzle.
CUtensorMap make_map(const uint16_t* base, int64_t T, int hkv, int d) {
  CUtensorMap map{};
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(d), static_cast<cuuint64_t>(hkv), static_cast<cuuint64_t>(T)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(d) * 2, static_cast<cuuint64_t>(hkv) * d * 2};
  const cuuint32_t box[3] = {64, 1, kBlockKeys};
  const cuuint32_t elem[3] = {1, 1, 1};
  const CUresult r = tensor_map_encoder()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<uint16_t*>(base), dims,
                                          strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                          CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) fail("cuTensorMapEncodeTiled failed with CUresult " + std::to_string(static_cast<int>(r)));
  return map;
}

template <int D>
void run_T(const Options& o, int64_t T, const cudaDeviceProp& prop) {
  const int hkv = o.kv_heads, n = o.n;
  const int64_t elems = T * hkv * D;
  uint16_t *k = nullptr, *v = nullptr;
  int* d_idx = nullptr;
  unsigned long long* d_out = nullptr;
  check(cudaMalloc(&k, elems * 2), "cudaMalloc K");
  check(cudaMalloc(&v, elems * 2), "cudaMalloc V");
  check(cudaMalloc(&d_out, 16), "cudaMalloc out");
  fill_kernel<<<1024, 256>>>(reinterpret_cast<uint32_t*>(k), elems / 2, 0x1234u);
  fill_kernel<<<1024, 256>>>(reinterpret_cast<uint32_t*>(v), elems / 2, 0x5678u);
  check(cudaGetLastError(), "fill");

  std::mt19937_64 rng(o.seed + static_cast<uint64_t>(T));
  const std::vector<int> idx = make_indices(T, hkv, n, rng);
  const TileCounts tc = count_tiles(idx, T, hkv, n);
  check(cudaMalloc(&d_idx, idx.size() * sizeof(int)), "cudaMalloc idx");
  check(cudaMemcpy(d_idx, idx.data(), idx.size() * sizeof(int), cudaMemcpyHostToDevice), "cudaMemcpy idx");

  const int64_t tile_bytes = int64_t{2} * kBlockKeys * D * 2;  // K and V
  const int64_t pair_bytes = tc.pairs * tile_bytes, union_bytes = tc.unions * tile_bytes;
  const int64_t nominal = T * hkv * n * tile_bytes;
  const int64_t ctas = (T / kPos) * hkv;
  std::printf(
      "\nT=%lld Hkv=%d D=%d n=%d l'=64: K,V %.1f MB each; pairs %lld (%.2f GB requested; nominal T*Hkv*n*%lld KB = "
      "%.2f GB); union %lld blocks (%.2f GB, %.2f per CTA of 4 positions, %.1f%% of pairs)\n",
      static_cast<long long>(T), hkv, D, n, elems * 2 / 1e6, static_cast<long long>(tc.pairs), pair_bytes / 1e9,
      static_cast<long long>(tile_bytes / 1024), nominal / 1e9, static_cast<long long>(tc.unions), union_bytes / 1e9,
      static_cast<double>(tc.unions) / static_cast<double>(ctas), 100.0 * tc.unions / static_cast<double>(tc.pairs));

  const dim3 grid(static_cast<unsigned>(T / kPos), static_cast<unsigned>(hkv));
  const int tile_smem = kBlockKeys * (D + kPad) * 2;  // one K or V stage, bytes
  // The real slc kernel's other shared memory: Q tile [64][D+8] and the union bookkeeping.
  const int64_t max_blocks = T / kBlockKeys;
  const int real_extra = tile_smem + static_cast<int>(8 * ((max_blocks + 31) / 32) +
                                                      16 * std::min<int64_t>(int64_t{5} * n, max_blocks));
  const int runs = o.warmup + o.iters;

  auto run_cpasync = [&](auto stages_tag, bool union_mode, int extra, const char* tag, bool ca = false) {
    constexpr int S = decltype(stages_tag)::value;
    const int smem = S * 2 * tile_smem + extra;
    if (smem > static_cast<int>(prop.sharedMemPerBlockOptin)) {
      std::printf("  cp.async %s: %d B of shared memory > %zu, skipped\n", tag, smem, prop.sharedMemPerBlockOptin);
      return;
    }
    auto kernel = ca ? (union_mode ? gather_cpasync<D, S, true, true> : gather_cpasync<D, S, false, true>)
                     : (union_mode ? gather_cpasync<D, S, true, false> : gather_cpasync<D, S, false, false>);
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "cudaFuncSetAttribute");
    int occ = 0;
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, kThreads, smem), "occupancy");
    check(cudaMemset(d_out, 0, 16), "cudaMemset");
    const float ms = time_ms(o, [&] { kernel<<<grid, kThreads, smem>>>(k, v, d_idx, hkv, n, d_out); });
    const std::string kind = std::string(ca ? "cpasync_ca_" : "cpasync_") + (union_mode ? "union_s" : "pairs_s") + tag;
    const std::string label = std::string(ca ? "A' cp.async.ca " : "A cp.async.cg ") + (union_mode ? "union" : "pairs") + ", " +
                              std::to_string(S) + " stages" + (extra ? " + real smem" : "");
    check_tiles(d_out, union_mode ? tc.unions : tc.pairs, runs, kind.c_str());
    report(kind.c_str(), label.c_str(), T, o, union_mode ? union_bytes : pair_bytes, ms, occ);
  };
  auto run_ldg = [&](bool union_mode) {
    auto kernel = union_mode ? gather_ldg<D, true> : gather_ldg<D, false>;
    int occ = 0;
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, kThreads, 0), "occupancy");
    check(cudaMemset(d_out, 0, 16), "cudaMemset");
    const float ms = time_ms(o, [&] { kernel<<<grid, kThreads>>>(k, v, d_idx, hkv, n, d_out); });
    const char* kind = union_mode ? "ldg_union" : "ldg_pairs";
    check_tiles(d_out, union_mode ? tc.unions : tc.pairs, runs, kind);
    report(kind, union_mode ? "B ld.global.nc.v4 union" : "B ld.global.nc.v4 pairs", T, o,
           union_mode ? union_bytes : pair_bytes, ms, occ);
  };
  const CUtensorMap map_k = make_map(k, T, hkv, D), map_v = make_map(v, T, hkv, D);
  auto run_tma = [&](auto stages_tag, bool union_mode) {
    constexpr int S = decltype(stages_tag)::value;
    const int smem = S * 2 * kBlockKeys * D * 2 + 1024;  // + alignment slack
    if (smem > static_cast<int>(prop.sharedMemPerBlockOptin)) {
      std::printf("  tma %d stages: %d B of shared memory > %zu, skipped\n", S, smem, prop.sharedMemPerBlockOptin);
      return;
    }
    auto kernel = union_mode ? gather_tma<D, S, true> : gather_tma<D, S, false>;
    cudaFuncAttributes attributes{};
    check(cudaFuncGetAttributes(&attributes, kernel), "cudaFuncGetAttributes");
    if (attributes.binaryVersion < 90) {  // a build without sm_90 code (e.g. sm_80 only): the kernel traps
      std::printf("  tma %d stages: this build's code is sm_%d, TMA needs sm_90, skipped\n", S,
                  attributes.binaryVersion);
      return;
    }
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "cudaFuncSetAttribute");
    int occ = 0;
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, kThreads, smem), "occupancy");
    check(cudaMemset(d_out, 0, 16), "cudaMemset");
    const float ms = time_ms(o, [&] { kernel<<<grid, kThreads, smem>>>(map_k, map_v, d_idx, hkv, n, d_out); });
    const std::string kind = std::string("tma_") + (union_mode ? "union_s" : "pairs_s") + std::to_string(S);
    const std::string label = std::string("C TMA 3-D tiles ") + (union_mode ? "union" : "pairs") + ", " +
                              std::to_string(S) + " stages";
    check_tiles(d_out, union_mode ? tc.unions : tc.pairs, runs, kind.c_str());
    report(kind.c_str(), label.c_str(), T, o, union_mode ? union_bytes : pair_bytes, ms, occ);
  };
  using S2 = std::integral_constant<int, 2>;
  using S3 = std::integral_constant<int, 3>;
  using S4 = std::integral_constant<int, 4>;
  for (bool union_mode : {false, true}) {
    run_cpasync(S2{}, union_mode, real_extra, "2q");
    for (int s : o.stages) {
      if (s == 2) run_cpasync(S2{}, union_mode, 0, "2");
      if (s == 3) run_cpasync(S3{}, union_mode, 0, "3");
      if (s == 4) run_cpasync(S4{}, union_mode, 0, "4");
    }
    run_cpasync(S2{}, union_mode, real_extra, "2q", true);
    run_cpasync(S2{}, union_mode, 0, "2", true);
    run_ldg(union_mode);
    if (prop.major >= 9) {
      for (int s : o.stages) {
        if (s == 2) run_tma(S2{}, union_mode);
        if (s == 3) run_tma(S3{}, union_mode);
        if (s == 4) run_tma(S4{}, union_mode);
      }
    }
  }
  check(cudaFree(k), "cudaFree");
  check(cudaFree(v), "cudaFree");
  check(cudaFree(d_idx), "cudaFree");
  check(cudaFree(d_out), "cudaFree");
}

void run_references(const Options& o, const cudaDeviceProp& prop) {
  std::printf("\nreferences:\n");
  const int64_t copy_bytes = o.copy_mb << 20;
  void *src = nullptr, *dst = nullptr;
  unsigned long long* d_out = nullptr;
  check(cudaMalloc(&d_out, 16), "cudaMalloc out");
  check(cudaMalloc(&src, copy_bytes), "cudaMalloc copy src");
  check(cudaMalloc(&dst, copy_bytes), "cudaMalloc copy dst");
  fill_kernel<<<1024, 256>>>(static_cast<uint32_t*>(src), copy_bytes / 4, 0x9abcu);
  check(cudaGetLastError(), "fill");
  float ms = time_ms(o, [&] { check(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice), "memcpy"); });
  report("memcpy_d2d", "cudaMemcpy D2D (GB/s counts read + write)", 0, o, 2 * copy_bytes, ms, 0);

  const int grid = prop.multiProcessorCount * 8;  // 256 threads: 2048 per SM
  ms = time_ms(o, [&] {
    read_kernel<<<grid, 256>>>(static_cast<const uint4*>(src), copy_bytes / 16, 1, d_out);
  });
  report("dram_read", "ld.global.nc.v4 (no L1), one pass over the copy source", 0, o, copy_bytes, ms, 0);
  check(cudaFree(dst), "cudaFree");

  const int64_t l2_bytes = o.l2_mb << 20;
  const int64_t passes = std::max<int64_t>(1, (int64_t{8} << 30) / l2_bytes);  // about 8 GB read
  ms = time_ms(o, [&] {
    read_kernel<<<grid, 256>>>(static_cast<const uint4*>(src), l2_bytes / 16, passes, d_out);
  });
  const std::string label = "ld.global.nc.v4 (no L1), " + std::to_string(o.l2_mb) + " MB x " + std::to_string(passes) +
                            " passes (L2-resident)";
  report("l2_read", label.c_str(), 0, o, l2_bytes * passes, ms, 0);
  check(cudaFree(src), "cudaFree");
  check(cudaFree(d_out), "cudaFree");
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
  int mem_clock_khz = 0, bus_width = 0;
  cudaDeviceGetAttribute(&mem_clock_khz, cudaDevAttrMemoryClockRate, dev);
  cudaDeviceGetAttribute(&bus_width, cudaDevAttrGlobalMemoryBusWidth, dev);
  std::printf("nsa_gather_ceiling: %s, %d SMs, L2 %.1f MB, smem/block opt-in %zu B, HBM bus %d bit at %.0f MHz "
              "(theoretical %.0f GB/s)\n",
              prop.name, prop.multiProcessorCount, prop.l2CacheSize / 1048576.0, prop.sharedMemPerBlockOptin, bus_width,
              mem_clock_khz / 1e3, 2.0 * mem_clock_khz * 1e3 * (bus_width / 8) / 1e9);
  std::printf("median of %d runs after %d warm-up; GB/s = bytes the kernel reads / time (10^9 B/s)\n", o.iters,
              o.warmup);
  if (o.reference) run_references(o, prop);
  for (int64_t T : o.seqlens) {
    if (o.dim == 64) run_T<64>(o, T, prop);
    else if (o.dim == 128) run_T<128>(o, T, prop);
    else run_T<256>(o, T, prop);
  }
  return g_status;
}
