// The shared-memory tile layouts of the CUDA kernels (src/cuda/tile_layout.h) on the host: the
// swizzled layout wgmma reads is a permutation of the tile that fits the padded tile's storage and
// is the 128-byte swizzle as PTX defines it (CuTe's Swizzle<3, 4, 3>: byte address bits 4-6 XOR
// bits 7-9, over [D / 64] parts of [Rows][64] elements), and the wgmma descriptor bits sit where the
// PTX ISA's matrix descriptor format puts them. The GPU tests check the kernels that use them.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/tile_layout.h"

namespace nsa_test {
namespace {

using nsa::cuda_detail::tile_chunk_offset;
using nsa::cuda_detail::wgmma_desc_bits;

// Byte offset of element (row, col) in the unswizzled [D / 64][Rows][64] layout, then the 128-byte
// swizzle applied to it.
int swizzle128_reference(int row, int col, int rows) {
  const int linear = ((col / 64) * rows + row) * 128 + (col % 64) * 2;
  return linear ^ (((linear >> 7) & 7) << 4);
}

template <int D, int Rows>
void check_swizzled_layout() {
  SCOPED_TRACE("D = " + std::to_string(D) + ", Rows = " + std::to_string(Rows));
  std::vector<int> seen(Rows * D / 8, 0);
  for (int row = 0; row < Rows; ++row)
    for (int chunk = 0; chunk < D / 8; ++chunk) {
      const int offset = tile_chunk_offset<D, Rows, true>(row, chunk);
      ASSERT_EQ(offset % 8, 0) << "row " << row << " chunk " << chunk;
      ASSERT_GE(offset, 0);
      ASSERT_LT(offset, Rows * D) << "row " << row << " chunk " << chunk;
      ++seen[offset / 8];
      for (int e = 0; e < 8; ++e)
        EXPECT_EQ((offset + e) * 2, swizzle128_reference(row, chunk * 8 + e, Rows))
            << "row " << row << " column " << chunk * 8 + e;
    }
  for (size_t i = 0; i < seen.size(); ++i) EXPECT_EQ(seen[i], 1) << "16-byte slot " << i;
  // It fits where the padded layout keeps the same tile.
  const int padded_end = tile_chunk_offset<D, Rows, false>(Rows - 1, D / 8 - 1) + 8;
  EXPECT_LE(Rows * D, padded_end);
}

TEST(TileLayout, SwizzledIsThe128ByteSwizzleAndAPermutation) {
  check_swizzled_layout<64, 64>();
  check_swizzled_layout<128, 64>();
  check_swizzled_layout<192, 64>();
  check_swizzled_layout<128, 32>();
}

TEST(TileLayout, PaddedRowsHaveEightSpareElements) {
  EXPECT_EQ((tile_chunk_offset<64, 64, false>(0, 0)), 0);
  EXPECT_EQ((tile_chunk_offset<64, 64, false>(1, 0)), 72);
  EXPECT_EQ((tile_chunk_offset<128, 64, false>(3, 5)), 3 * 136 + 40);
}

TEST(TileLayout, WgmmaDescriptorFields) {
  const uint64_t desc = wgmma_desc_bits(0x5400u, 8192u, 1024u);
  EXPECT_EQ(desc & 0x3FFFu, 0x5400u >> 4);                // start address >> 4, bits 0-13
  EXPECT_EQ((desc >> 16) & 0x3FFFu, 8192u >> 4);          // leading byte offset >> 4, bits 16-29
  EXPECT_EQ((desc >> 32) & 0x3FFFu, 1024u >> 4);          // stride byte offset >> 4, bits 32-45
  EXPECT_EQ((desc >> 49) & 0x7u, 0u);                     // base offset
  EXPECT_EQ(desc >> 62, 1u);                              // 128-byte swizzle
  EXPECT_EQ(desc & ((0x3ull << 14) | (0x3ull << 30) | (0x7FFull << 51)), 0u);  // reserved bits clear
  // Only the 18 address bits of the shared window count; k-steps move the start by 32 bytes.
  EXPECT_EQ(wgmma_desc_bits(0x40000u + 0x20u, 0u, 1024u) & 0x3FFFu, 0x20u >> 4);
  EXPECT_EQ(wgmma_desc_bits(0x5400u + 32u, 0u, 1024u) - wgmma_desc_bits(0x5400u, 0u, 1024u), 2u);
}

}  // namespace
}  // namespace nsa_test
