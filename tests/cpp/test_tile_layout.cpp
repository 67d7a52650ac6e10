// The shared-memory tile layouts of the CUDA kernels (src/cuda/tile_layout.h) on the host: the
// swizzled layout wgmma reads is a permutation of the tile that fits the padded tile's storage and
// is the 128-byte swizzle as PTX defines it (CuTe's Swizzle<3, 4, 3>: byte address bits 4-6 XOR
// bits 7-9, over [D / 64] parts of [Rows][64] elements), the wgmma descriptor bits sit where the
// PTX ISA's matrix descriptor format puts them, and TileChunks gives every chunk of a tile to one
// thread, with row state that stepping keeps equal to what the row's division would give. The GPU
// tests check the kernels that use them.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/tile_layout.h"

namespace nsa_test {
namespace {

using nsa::cuda_detail::GroupedRowCursor;
using nsa::cuda_detail::tile_chunk_offset;
using nsa::cuda_detail::TileChunks;
using nsa::cuda_detail::wgmma_desc_advance;
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

// Advancing a descriptor gives the descriptor of the advanced address, for every 16-byte step of the
// k-steps and 64-row parts the products take, from tiles anywhere in a 227 KB shared memory window.
TEST(TileLayout, WgmmaDescriptorAdvanceIsTheDescriptorOfTheAdvancedAddress) {
  constexpr uint32_t kSmemBytes = 227 * 1024;
  for (uint32_t base = 0; base < kSmemBytes; base += 1024)
    for (const uint32_t leading : {0u, 8192u})
      for (uint32_t offset = 0; offset < 32768 && base + offset < kSmemBytes; offset += 16)
        ASSERT_EQ(wgmma_desc_advance(wgmma_desc_bits(base, leading, 1024u), offset),
                  wgmma_desc_bits(base + offset, leading, 1024u))
            << "base " << base << ", offset " << offset;
}

// Every chunk (r, c) of a Rows x D tile goes to exactly one of the Threads threads, and a thread's
// GroupedRowCursor, sought at its first row and advanced by each step as the loaders do
// (load_head_rows_async, load_list_rows_async), holds ((m0 + r) / G, (m0 + r) % G) at every chunk
// it copies.
template <int D, int Rows, int Threads>
void check_tile_chunks() {
  using Chunks = TileChunks<D, Rows, Threads>;
  SCOPED_TRACE("D = " + std::to_string(D) + ", Rows = " + std::to_string(Rows) + ", Threads = " +
               std::to_string(Threads));
  EXPECT_EQ(Chunks::kFixedColumn, Threads % (D / 8) == 0);
  for (int unrolled = 0; unrolled < 2; ++unrolled)
    for (const int group : {1, 2, 3, 5, 6, 16, 72})
      for (const int m0 : {0, 7 * group + 3, 1000}) {
        std::vector<int> copies(Rows * (D / 8), 0);
        for (int tid = 0; tid < Threads; ++tid) {
          GroupedRowCursor row(group, Chunks::kRowStep);
          const auto start = [&](int r, int) { row.seek(m0 + r); };
          const auto body = [&](int r, int c) {
            ASSERT_GE(r, 0);
            ASSERT_LT(r, Rows);
            ASSERT_GE(c, 0);
            ASSERT_LT(c, D / 8);
            ++copies[r * (D / 8) + c];
            EXPECT_EQ(row.t, (m0 + r) / group) << "tid " << tid << ", row " << r << ", G " << group;
            EXPECT_EQ(row.g, (m0 + r) % group) << "tid " << tid << ", row " << r << ", G " << group;
          };
          const auto step = [&] { row.advance(); };
          if (unrolled)
            Chunks::template visit<true>(tid, start, body, step);
          else
            Chunks::template visit<false>(tid, start, body, step);
        }
        for (size_t i = 0; i < copies.size(); ++i)
          ASSERT_EQ(copies[i], 1) << "chunk " << i << ", G " << group << ", m0 " << m0;
      }
}

TEST(TileLayout, TileChunksCopyEveryChunkOnceAndStepRowsAsTheyDivide) {
  check_tile_chunks<64, 64, 128>();    // the K / V tiles of a one-warpgroup sweep
  check_tile_chunks<128, 64, 384>();   // three warpgroups: 24 rows a pass, the last partial
  check_tile_chunks<128, 192, 384>();  // their Q tile
  check_tile_chunks<64, 64, 32>();     // one warp (the slc ring's partial tiles)
  check_tile_chunks<128, 32, 128>();   // half row tiles
  check_tile_chunks<192, 64, 128>();   // no common column: one division a chunk
  check_tile_chunks<192, 64, 384>();
}

// The key-major backward's loads (load_list_rows_async): a thread's cursor at its first row of row
// tile 0, advanced by R rows per tile with advance_by, and copied into each tile's walk, holds
// (i R + r) / G and (i R + r) % G at every chunk of every tile.
TEST(TileLayout, GroupedRowCursorStepsFromRowTileToRowTile) {
  constexpr int kR = 64, kThreads = 128;
  using Chunks = TileChunks<128, kR, kThreads>;
  static_assert(Chunks::kFixedColumn, "the dkv kernel's Dk = 128 loads");
  for (const int group : {1, 2, 3, 5, 6, 7, 16, 24, 72})
    for (int tid = 0; tid < kThreads; ++tid) {
      GroupedRowCursor first(group, Chunks::kRowStep);
      const GroupedRowCursor tile_step(group, kR);
      first.seek(tid / (128 / 8));
      for (int i = 0; i < 40; ++i) {
        GroupedRowCursor row = first;
        Chunks::visit(
            tid, [](int, int) {},
            [&](int r, int) {
              ASSERT_EQ(row.t, (i * kR + r) / group) << "tile " << i << ", row " << r << ", G " << group;
              ASSERT_EQ(row.g, (i * kR + r) % group) << "tile " << i << ", row " << r << ", G " << group;
            },
            [&] { row.advance(); });
        first.advance_by(tile_step);
      }
    }
}

}  // namespace
}  // namespace nsa_test
