// Device building blocks shared by the forward kernels: 16-bit type traits, the sm_80+ PTX
// wrappers (cp.async, ldmatrix, mma.sync m16n8k16 with fp32 accumulation), the sm_90 chained
// launch's wait and trigger, fast exp2, and the per-sequence row arithmetic of the padded and
// packed layouts.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, lane = 4 * group + tig):
//   A (16x16, row major): a[0] = rows group,   cols 2*tig + {0,1};  a[1] = row group + 8, same cols;
//                         a[2] = rows group,   cols 8 + 2*tig + {0,1}; a[3] = row group + 8, same.
//   B (16x8, "col"):      b[0] = k 2*tig + {0,1}, n = group;  b[1] = k 8 + 2*tig + {0,1}, n = group.
//   C (16x8, fp32):       c[0..1] = row group, cols 2*tig + {0,1}; c[2..3] = row group + 8, same.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/forward_args.h"
#include "cuda/tile_layout.h"

namespace nsa::cuda_detail {

// ------------------------------------------------------------------------------------------------
// 16-bit element types.

template <class T>
struct TypeTraits;

template <>
struct TypeTraits<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t bits) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bits));
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct TypeTraits<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t bits) {
    return __half22float2(*reinterpret_cast<const __half2*>(&bits));
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// ------------------------------------------------------------------------------------------------
// PTX wrappers.

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared; zero-fills the destination when !valid. By default
// the .ca form (cached in L1 as well): on an H200 the .cg form moved about 1.5x the requested
// bytes through L2 and capped block gathers at 6.2 TB/s against 10 TB/s for .ca (tools/
// nsa_gather_ceiling.cu, docs/decisions/0003-selected-branch-floor.md). kStream: the .cg form
// (L2 only), for the decode sweeps, which read each row once from DRAM: their cmp + win kernel
// went from 203 to 180 us at B = 64, 64k on an H200 (docs/decisions/0005-decode-path.md). On
// sm_90 those sweeps use bulk copies instead (below; sweep_key_tiles in attention.cuh).
template <bool kStream = false>
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  if constexpr (kStream)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
// Asks L2 to fetch the 128-byte line holding `address` (no register, no wait): for data a kernel
// reads only in its epilogue, so that those loads find it in L2 instead of waiting for DRAM.
__device__ __forceinline__ void prefetch_l2(const void* address) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(address));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// sm_90 bulk copies (the copy engine) into shared memory, completing on an mbarrier: one
// instruction moves a whole row, where cp.async needs a 16-byte request per thread and chunk.
// Callers compile these only for __CUDA_ARCH__ >= 900.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals) : "memory");
}
// Makes barrier initializations visible to the copy engine (then a CTA barrier for the threads).
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// This thread's arrival, announcing `bytes` more to come from bulk copies in the current phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
// Waits until the phase with the given parity has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  }
}
// Orders this thread's earlier shared-memory accesses through the generic proxy (ordinary and
// cp.async stores, and the loads before the last barrier) with its later async-proxy ones: bulk
// copies into the same buffers, and (after a CTA barrier) wgmma reads of what it stored.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// bytes (a multiple of 16, 16-byte aligned ends) from global src to shared dst; completes on bar.
__device__ __forceinline__ void bulk_copy_to_smem(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

// *counter += v in shared memory, acquire-release at CTA scope; returns the old value.
__device__ __forceinline__ uint32_t atomic_add_acq_rel_cta(uint32_t* counter, uint32_t v) {
  uint32_t old;
  asm volatile("atom.acq_rel.cta.shared::cta.add.u32 %0, [%1], %2;\n" : "=r"(old) : "r"(smem_addr(counter)), "r"(v)
               : "memory");
  return old;
}
// An arrival on bar without bytes to wait for.
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// The box at coordinates (c0, c1, c2, c3), innermost first, of the tensor map `map` (a
// __grid_constant__ kernel parameter) into shared memory; completes on bar.
__device__ __forceinline__ void tma_load_4d(void* dst, const void* map, uint64_t* bar, int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(bar))
      : "memory");
}

// Waits until the older of the (at most two) cp.async groups in flight has landed; the newer one
// (the next tile, when it was issued) may stay pending.
__device__ __forceinline__ void cp_async_wait_older(bool newer_in_flight) {
  if (newer_in_flight) cp_async_wait<1>();
  else cp_async_wait<0>();
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// Traps unless the CTA has kThreads threads. The host picks the selection and attention kernels'
// thread counts from the device it runs on (select_threads, prefill_warpgroups: wgmma_sweeps), the
// kernel from the architecture it was compiled for (kHaveWgmma); launched with fewer threads than
// it was compiled for, a kernel would skip rows without a fault.
template <int kThreads>
__device__ __forceinline__ void check_block_threads() {
  if (blockDim.x != kThreads) __trap();
}

// The tile of a query-major prefill grid (x: tiles of positions) that this CTA takes: the last
// first. The CTAs start in blockIdx order and a causal tile's work grows with its positions, so the
// heaviest start first and the last wave holds the lightest, instead of the heaviest running on
// while the other SMs idle (FlashAttention-2 orders its causal grids so too).
__device__ __forceinline__ int heaviest_first_tile() { return static_cast<int>(gridDim.x - 1 - blockIdx.x); }

// Programmatic dependent launch (sm_90+; nothing on older targets, where launch_chained does not
// ask for it). A kernel launched with launch_chained may start while the kernel before it in the
// stream still runs: it must call wait_for_previous_kernel() before it reads anything that kernel
// (or one before it) writes, and before it writes anything those read. The wait returns once the
// previous kernel has completed and its writes are visible; without a previous kernel at once.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
// Lets the next kernel, if launched with launch_chained, start once every CTA of this one has
// called this or exited: call it after the CTA's main loop, so that the next kernel's CTAs do not
// take the SM slots that this kernel's later CTAs need. Changes no memory ordering.
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// 2^x (ex2.approx; 2^-inf = 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

// ------------------------------------------------------------------------------------------------
// Sequences and offsets.

// Query rows row0 .. row0+len-1 hold positions pos0 .. pos0+len-1 (pos0 = 0 but with a KV cache).
struct SeqInfo {
  int64_t row0;      // first packed query row (padded: b * T)
  int64_t len;       // query rows (prefill: the raw tokens)
  int64_t cmp_row0;  // first packed compressed row
  int64_t num_cmp;   // compressed tokens
  int64_t pos0;      // position of query row row0
};

__device__ __forceinline__ SeqInfo seq_info(const ForwardArgs& a, int b) {
  SeqInfo s;
  s.pos0 = 0;
  if (a.cu_seqlens != nullptr) {
    s.row0 = a.cu_seqlens[b];
    s.len = int64_t{a.cu_seqlens[b + 1]} - s.row0;
    s.cmp_row0 = a.cu_seqlens_cmp[b];
    s.num_cmp = int64_t{a.cu_seqlens_cmp[b + 1]} - s.cmp_row0;
  } else {
    s.row0 = int64_t{b} * a.seqlen;
    s.len = a.seqlen;
    s.cmp_row0 = int64_t{b} * a.cmp_per_seq;
    s.num_cmp = a.cmp_per_seq;
    if (a.cache_seqlens != nullptr) {
      // Clamped to what the cache can hold (m <= held <= max_held, params.h): a length the host
      // could not validate without a sync gives wrong values, never reads outside the cache.
      const int64_t held = min64(max64(a.cache_seqlens[b], a.seqlen), a.cache_max_held);
      s.pos0 = held - a.seqlen;
      s.num_cmp = held >= a.cmp_block ? (held - a.cmp_block) / a.cmp_stride + 1 : 0;
    }
  }
  return s;
}

// Element pointer of (sequence b starting at packed row `row0`, position 0, head h) of a tensor.
template <class T>
__device__ __forceinline__ const T* seq_head_ptr(const TensorRef& ref, const ForwardArgs& a, int b, int64_t row0,
                                                 int head) {
  const int64_t base = a.cu_seqlens != nullptr ? row0 * ref.seq_stride : int64_t{b} * ref.batch_stride;
  return static_cast<const T*>(ref.data) + base + int64_t{head} * ref.head_stride;
}

// Branch output row (packed row grow, query head) in out_branch or the workspace.
template <class T>
__device__ __forceinline__ T* branch_row(void* base, const ForwardArgs& a, int64_t grow, int head) {
  return static_cast<T*>(base) + grow * a.branch_row_stride + int64_t{head} * a.branch_head_stride;
}

// Compressed tokens visible to query t: i*d + l - 1 <= t.
__device__ __forceinline__ int num_visible_cmp(int t, int l, int d) { return t + 1 >= l ? (t + 1 - l) / d + 1 : 0; }

// Eq. 9 weight |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d.
__device__ __forceinline__ int overlap_weight(int i, int j, int l, int d, int ls) {
  const int lo = max(i * d, j * ls), hi = min(i * d + l, (j + 1) * ls);
  return hi > lo ? (hi - lo) / d : 0;
}

// Forced blocks (Eqs. 11-12): the initial ones and the local ones ending at t / l'.
__device__ __forceinline__ bool is_forced(int j, int last_block, int num_init, int num_local) {
  return j < num_init || (last_block - j >= 0 && last_block - j < num_local);
}

// Loads rows [key0, key0 + count) of a [*, D] tile (row stride `stride` elements) into a shared
// memory tile of Rows rows (layout: tile_chunk_offset) with cp.async (kStream: as cp_async_16),
// zero-filling rows >= count. The Threads threads tid = 0 .. Threads - 1 call it (the CTA's, or a
// warp's); kUnrolled: as TileChunks::visit.
template <class T, int D, int Rows, int Threads, bool kStream = false, bool kSwizzled = false, bool kUnrolled = true>
__device__ __forceinline__ void load_rows_async(T* smem, const T* base, int64_t stride, int key0, int count,
                                                int tid) {
  using Chunks = TileChunks<D, Rows, Threads>;
  const T* src = base;
  Chunks::template visit<kUnrolled>(
      tid, [&](int r, int c) { src = base + int64_t{key0 + r} * stride + c * 8; },
      [&](int r, int c) {
        const bool valid = r < count;
        cp_async_16<kStream>(smem + tile_chunk_offset<D, Rows, kSwizzled>(r, c), valid ? src : base, valid);
      },
      [&] { src += int64_t{Chunks::kRowStep} * stride; });
}

}  // namespace nsa::cuda_detail
