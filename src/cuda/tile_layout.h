// Shared-memory tile layouts of the attention kernels and the wgmma matrix descriptor that
// describes the swizzled one: plain arithmetic (no CUDA types), so that the host tests check the
// same functions the kernels use (tests/cpp/test_tile_layout.cpp).
#pragma once

#include <cstdint>

#include "nsa/semantics.h"  // NSA_HOST_DEVICE

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

}  // namespace nsa::cuda_detail
