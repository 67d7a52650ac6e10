// Shared-memory tile layouts of the attention kernels, the wgmma matrix descriptor that describes
// the swizzled one and the threads' share of a tile's copies (TileChunks): plain arithmetic (no CUDA
// types), so that the host tests check the same functions the kernels use
// (tests/cpp/test_tile_layout.cpp).
#pragma once

#include <cstdint>

#include "nsa/semantics.h"  // NSA_HOST_DEVICE

// Loop unrolling hints for nvcc's device pass in code the host compiler sees too (which does not
// know them, and warns).
#if defined(__CUDA_ARCH__)
#define NSA_UNROLL _Pragma("unroll")
#define NSA_NO_UNROLL _Pragma("unroll 1")
#else
#define NSA_UNROLL
#define NSA_NO_UNROLL
#endif

namespace nsa::cuda_detail {

// Element offset of the 16-byte chunk `chunk` (elements 8 chunk .. 8 chunk + 7) of row `row` in a
// shared-memory tile of Rows rows of D 2-byte elements. Padded: rows of D + 8 elements (ldmatrix
// reads them without bank conflicts). kSwizzled: the 128-byte swizzle that wgmma reads
// ([D / 64][Rows][64], chunk c of a row at c ^ (row % 8) of its 128-byte line: src/cuda/wgmma.cuh),
// which takes no more room than the padded layout.
template <int D, int Rows, bool kSwizzled>
NSA_HOST_DEVICE constexpr int tile_chunk_offset(int row, int chunk) {
  if constexpr (kSwizzled) {
    static_assert(D % 64 == 0 && Rows % 8 == 0, "swizzled tiles are made of 8-row, 64-element atoms");
    return ((chunk >> 3) * Rows + row) * 64 + (((chunk & 7) ^ (row & 7)) << 3);
  } else {
    return row * (D + 8) + chunk * 8;
  }
}

// The 16-byte chunks (row r, column c) of a Rows x D tile (row-major, D / 8 chunks a row) that
// thread tid of Threads copies: chunks tid, tid + Threads, ... Where Threads is a multiple of the
// chunks per row, they share the column c = tid % (D / 8) and step by kRowStep rows, so the loop
// has a compile-time trip count and a caller keeps its per-row state (a source pointer, a head
// index) by stepping it. The form with idx / (D / 8) per chunk (a trip count that depends on tid,
// and a division by G per chunk where rows are (t, g) pairs) compiled to 35 to 40 instructions per
// copy on sm_90a (nvcc 13.0), a third of the prefill sweeps' instructions per key tile
// (docs/decisions/0013). Calls start(r, c) for the thread's first chunk, then per chunk body(r, c)
// and step() (advance the state by kRowStep rows); without a common column, start(r, c) and
// body(r, c) per chunk. kUnrolled false keeps the loop rolled (a rare load that should not cost
// registers).
template <int D, int Rows, int Threads>
struct TileChunks {
  static constexpr int kChunks = D / 8;
  static constexpr bool kFixedColumn = Threads % kChunks == 0;
  static constexpr int kRowStep = kFixedColumn ? Threads / kChunks : 0;

  template <bool kUnrolled = true, class Start, class Body, class Step>
  NSA_HOST_DEVICE static inline void visit(int tid, Start&& start, Body&& body, Step&& step) {
    if constexpr (kFixedColumn && kUnrolled) {
      const int row0 = tid / kChunks, c = tid % kChunks;
      start(row0, c);
      NSA_UNROLL
      for (int pass = 0; pass < (Rows + kRowStep - 1) / kRowStep; ++pass) {
        const int r = row0 + pass * kRowStep;
        if (Rows % kRowStep == 0 || r < Rows) body(r, c);
        step();
      }
    } else {
      const auto chunk = [&](int idx) {
        const int r = idx / kChunks, c = idx % kChunks;
        start(r, c);
        body(r, c);
      };
      if constexpr (kUnrolled) {
        NSA_UNROLL
        for (int idx = tid; idx < Rows * kChunks; idx += Threads) chunk(idx);
      } else {
        NSA_NO_UNROLL
        for (int idx = tid; idx < Rows * kChunks; idx += Threads) chunk(idx);
      }
    }
  }
};

// Row R of a space of (t, g) pairs, R = t * group + g (a tile's query rows: position t, head g of
// the kv head's group), as a TileChunks caller walks it: seek(R) divides once, advance() moves
// `step` rows on (TileChunks::kRowStep) without a division.
struct GroupedRowCursor {
  const int group, t_step, g_step;
  int t = 0, g = 0;
  NSA_HOST_DEVICE GroupedRowCursor(int group_size, int step)
      : group(group_size), t_step(step / group_size), g_step(step % group_size) {}
  NSA_HOST_DEVICE void seek(int row) {
    t = row / group;
    g = row % group;
  }
  NSA_HOST_DEVICE void advance() { advance_by(*this); }
  // Moves on by another cursor's step (the same group).
  NSA_HOST_DEVICE void advance_by(const GroupedRowCursor& step) {
    t += step.t_step;
    g += step.g_step;
    if (g >= group) {
      g -= group;
      ++t;
    }
  }
};

// The 64-bit wgmma shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start
// address >> 4 in bits 0-13, leading-dimension byte offset >> 4 in bits 16-29, stride-dimension
// byte offset >> 4 in bits 32-45, base offset 0 (1024-byte aligned atoms), swizzle mode 1 (128
// bytes) in bits 62-63.
NSA_HOST_DEVICE constexpr uint64_t wgmma_desc_bits(uint32_t smem_address, uint32_t leading_bytes,
                                                   uint32_t stride_bytes) {
  constexpr uint64_t kSwizzle128 = 1ull << 62;
  return uint64_t{(smem_address & 0x3FFFFu) >> 4} | (uint64_t{(leading_bytes >> 4) & 0x3FFFu} << 16) |
         (uint64_t{(stride_bytes >> 4) & 0x3FFFu} << 32) | kSwizzle128;
}

// The descriptor of the matrix byte_offset bytes (a multiple of 16) past the one desc describes, in
// the same layout: one add to the start address field, which does not carry out of it (shared memory
// addresses stay below 256 KB). The products' k-steps take their operands this way from one
// descriptor per tile, instead of building each from its address.
NSA_HOST_DEVICE constexpr uint64_t wgmma_desc_advance(uint64_t desc, uint32_t byte_offset) {
  return desc + (byte_offset >> 4);
}

}  // namespace nsa::cuda_detail
