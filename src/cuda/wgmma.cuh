// Hopper warpgroup MMA (wgmma, sm_90a) for the attention sweeps: the 128 threads of a warpgroup
// multiply their 64 rows (A: the Q tile in shared memory, or P from registers in the mma.sync A-fragment
// layout of each warp's 16 rows) with a 64-key tile in shared memory (B, read through a matrix
// descriptor), so a tile is read from shared memory once per warpgroup where four warps' ldmatrix
// passes read it four times.
//
// Shared-memory layout the descriptors describe (the 128-byte swizzle): a 64-row tile of D
// elements is stored as [D / 64][64 rows][64 elements]; the 16-byte chunk c (0..7) of a row r sits
// at chunk c ^ (r % 8) of the row's 128-byte line (tile_chunk_offset in tile_layout.h). Each
// [64 rows][64 elements] part is a stack of 8-row, 1024-byte swizzle atoms, so every part must
// start at a multiple of 1024 bytes.
//
// Accumulator layout (PTX ISA, wgmma .m64nNk16 with f32 accumulators): warp w of the warpgroup holds
// rows 16 w .. 16 w + 15, and within the warp the 8-column block nb of the tile is the mma.sync C
// fragment d[nb][0..3]. So a [NB][4] fragment array of the mma.sync code is the same registers.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"

namespace nsa::cuda_detail {

// The device pass for sm_90a is the only one that may emit wgmma.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
inline constexpr bool kHaveWgmma = true;
#else
inline constexpr bool kHaveWgmma = false;
#endif

// Matrix descriptor of a swizzled tile part starting at `start` (1024-byte aligned, or offset from
// such a start by the 32-byte k-steps inside the atom): leading_bytes = stride between 64-element
// parts along the operand's contiguous dimension (used when one instruction spans several parts),
// stride_bytes = stride between 8-row atoms (wgmma_desc_bits in tile_layout.h).
__device__ __forceinline__ uint64_t wgmma_desc(const void* start, uint32_t leading_bytes, uint32_t stride_bytes) {
  return wgmma_desc_bits(smem_addr(start), leading_bytes, stride_bytes);
}

// Traps unless the kernel's dynamic shared memory starts at a 1024-byte boundary (the swizzle
// atoms' alignment, which the extern declaration cannot guarantee: every kernel's `smem` is one
// symbol, declared 16-byte aligned in PTX) and holds `bytes` (the launch code sized it): a wrong
// layout would give wrong products, not a fault.
__device__ __forceinline__ void wgmma_check_smem(const void* smem, uint32_t bytes) {
  uint32_t size;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(size));
  if ((smem_addr(smem) & 1023u) != 0 || size < bytes) __trap();
}

// The CTA barrier after a thread's cp.async copies into shared memory have landed (cp_async_wait):
// the copied tiles are then visible to every thread, and with kForWgmma also to wgmma, which reads
// shared memory through the async proxy (fence.proxy.async before the barrier).
template <bool kForWgmma>
__device__ __forceinline__ void sync_copied_tiles() {
  if constexpr (kForWgmma) fence_proxy_async_smem();
  __syncthreads();
}

// Keeps the compiler from moving register reads or writes of `x` across the wgmma fence, issue
// and wait (which it sees as unrelated volatile statements).
template <int NB>
__device__ __forceinline__ void wgmma_pin(float (&x)[NB][4]) {
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(x[nb][e])::"memory");
}
__device__ __forceinline__ void wgmma_pin(uint32_t (&x)[4]) {
#pragma unroll
  for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(x[e])::"memory");
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

#define NSA_WGMMA_D_OPERANDS(d, o)                                                                                 \
  "+f"(d[o + 0][0]), "+f"(d[o + 0][1]), "+f"(d[o + 0][2]), "+f"(d[o + 0][3]), "+f"(d[o + 1][0]), "+f"(d[o + 1][1]), \
      "+f"(d[o + 1][2]), "+f"(d[o + 1][3]), "+f"(d[o + 2][0]), "+f"(d[o + 2][1]), "+f"(d[o + 2][2]),               \
      "+f"(d[o + 2][3]), "+f"(d[o + 3][0]), "+f"(d[o + 3][1]), "+f"(d[o + 3][2]), "+f"(d[o + 3][3]),               \
      "+f"(d[o + 4][0]), "+f"(d[o + 4][1]), "+f"(d[o + 4][2]), "+f"(d[o + 4][3]), "+f"(d[o + 5][0]),               \
      "+f"(d[o + 5][1]), "+f"(d[o + 5][2]), "+f"(d[o + 5][3]), "+f"(d[o + 6][0]), "+f"(d[o + 6][1]),               \
      "+f"(d[o + 6][2]), "+f"(d[o + 6][3]), "+f"(d[o + 7][0]), "+f"(d[o + 7][1]), "+f"(d[o + 7][2]), "+f"(d[o + 7][3])
#define NSA_WGMMA_M64N64K16(type)                                                                                 \
  asm volatile(                                                                                                   \
      "{\n .reg .pred p;\n setp.ne.b32 p, %37, 0;\n"                                                              \
      " wgmma.mma_async.sync.aligned.m64n64k16.f32" type type                                                     \
      " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28," \
      "%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, %38;\n}\n"                                                   \
      : NSA_WGMMA_D_OPERANDS(d, NB0)                                                                              \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(static_cast<int>(accumulate)), "n"(kTransB))

// ASM(".bf16") or ASM(".f16") after T; the passes without wgmma never reach it (callers test
// kHaveWgmma) and trap.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NSA_WGMMA_BY_TYPE(T, ASM)                    \
  if constexpr (std::is_same_v<T, __nv_bfloat16>) { \
    ASM(".bf16");                                    \
  } else {                                           \
    ASM(".f16");                                     \
  }
#else
#define NSA_WGMMA_BY_TYPE(T, ASM) __trap()
#endif

#define NSA_WGMMA_M64N64K16_SS(type)                                                                              \
  asm volatile(                                                                                                   \
      "{\n .reg .pred p;\n setp.ne.b32 p, %34, 0;\n"                                                              \
      " wgmma.mma_async.sync.aligned.m64n64k16.f32" type type                                                     \
      " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28," \
      "%29,%30,%31}, %32, %33, p, 1, 1, %35, %36;\n}\n"                                                            \
      : NSA_WGMMA_D_OPERANDS(d, NB0)                                                                              \
      : "l"(a_desc), "l"(b_desc), "r"(static_cast<int>(accumulate)), "n"(kTransA), "n"(kTransB))

// d[NB0 .. NB0 + 7] (+)= A B for the warpgroup's 64 rows, both operands in shared memory: A = the
// 64 x 16 operand a_desc points at, stored m-row by m-row ([m][k], k contiguous, like Q) or kTransA
// k-row by k-row ([k][m], m contiguous, like a dS^T tile); B = the 16 x 64 one b_desc points at,
// stored n-row by n-row ([n][k], k contiguous, like K: d = Q K^T) or kTransB k-row by k-row ([k][n],
// like K read as the B of dS K). Issues the instruction only, as below.
template <class T, bool kTransA = false, bool kTransB = false, int NB0 = 0, int NB>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[NB][4], uint64_t a_desc, uint64_t b_desc,
                                                   bool accumulate) {
  static_assert(NB0 + 8 <= NB, "the accumulator blocks exist");
  (void)d, (void)a_desc, (void)b_desc, (void)accumulate;  // (unused where wgmma is not compiled)
  NSA_WGMMA_BY_TYPE(T, NSA_WGMMA_M64N64K16_SS);
}

// d[NB0 .. NB0 + 7] (+)= A B for the warpgroup's 64 rows: A = a (16 columns of k), B = the 16 x 64 operand
// the descriptor points at (kTransB: stored k-row by k-row, i.e. [k][n] with n contiguous, like V;
// otherwise n-row by n-row, [n][k] with k contiguous, like K). accumulate = false overwrites d.
// Issues the instruction only: the caller fences before and commits and waits after.
template <class T, bool kTransB, int NB0, int NB>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[NB][4], const uint32_t (&a)[4], uint64_t b_desc,
                                                bool accumulate) {
  static_assert(NB0 + 8 <= NB, "the accumulator blocks exist");
  (void)d, (void)a, (void)b_desc, (void)accumulate;  // (unused where wgmma is not compiled)
  NSA_WGMMA_BY_TYPE(T, NSA_WGMMA_M64N64K16);
}
#undef NSA_WGMMA_BY_TYPE
#undef NSA_WGMMA_M64N64K16
#undef NSA_WGMMA_M64N64K16_SS
#undef NSA_WGMMA_D_OPERANDS

}  // namespace nsa::cuda_detail
