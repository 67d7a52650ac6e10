// How the backward's key-major kernels split a key tile's query list over CTAs in the default mode
// (key_major_split_positions, src/cuda/backward_split.h), on the host: rows per CTA between the
// floor and the cap, small grids split up to about the target CTA count, large ones left whole, and
// never more CTAs per key tile than the grid's z dimension holds. The GPU tests run the kernels
// with the splits this gives their shapes (and the deterministic mode with none).
#include <gtest/gtest.h>

#include <cstdint>

#include "cuda/backward_split.h"

namespace nsa_test {
namespace {

using nsa::cuda_detail::key_major_split_positions;
using nsa::cuda_detail::selected_dq_key_major_pays;
using nsa::cuda_detail::selected_dq_union_factor;

TEST(BackwardSplit, SmallGridsSplitToTheRowFloor) {
  // The showcase's cmp dk/dv: B = 16, 2 key tiles, Hkv = 2, G = 6, T = 2048, lists ~1024 positions.
  const int64_t split = key_major_split_positions(16 * 2 * 2, 1024, 6, 2048);
  EXPECT_EQ(split, (1024 + 5) / 6);  // 1024 rows: the floor
}

TEST(BackwardSplit, MediumGridsSpreadTheirWorkOverTheTarget) {
  // The paper config's slc dk/dv at 8k: 512 key-tile CTAs, lists of ~1024 positions, G = 16:
  // 8.4M rows over ~2048 CTAs, 4096 rows (256 positions) each.
  EXPECT_EQ(key_major_split_positions(512, 1024, 16, 8192), 256);
}

TEST(BackwardSplit, LargeGridsKeepTheRowCap) {
  // The paper config's cmp dk/dv at 64k: 256 key-tile CTAs, lists of ~32k positions, G = 16.
  EXPECT_EQ(key_major_split_positions(256, 32768, 16, 65536), 16384 / 16);
}

TEST(BackwardSplit, GridZLimitAndDegenerateShapes) {
  // G = 1, T = 2^27: 1024 rows would need 131072 CTAs per tile; the z dimension holds 65535.
  const int64_t T = int64_t{1} << 27;
  const int64_t split = key_major_split_positions(1, T, 1, T);
  EXPECT_LE((T + split - 1) / split, 65535);
  EXPECT_GE(key_major_split_positions(0, 0, 1, 1), 1);          // no key tiles
  EXPECT_EQ(key_major_split_positions(1, 1, 64, 1), 1024 / 64);  // G = 64: the floor in positions
  EXPECT_EQ(key_major_split_positions(1, 1, 3000, 1), 1);        // G above the floor: one position
  // Estimates whose product passes 2^63 (2^40 * 2^29 * 16; a varlen batch is sized by its longest
  // sequence): the row cap, not an overflow.
  EXPECT_EQ(key_major_split_positions(int64_t{1} << 40, int64_t{1} << 29, 16, int64_t{1} << 20), 16384 / 16);
}

// The selection branch's dq (SelectedDq::kAuto): the union factor of the measured shapes
// (docs/decisions/0012), its edge cases, and the choice on each side of the thresholds.
TEST(SelectedDqPolicy, UnionFactorAndChoice) {
  constexpr int64_t kForced = 3;  // the paper's n_init + n_local
  EXPECT_NEAR(selected_dq_union_factor(16, 65536, 64, 16, kForced), 3.31, 0.01);  // paper 64k: ~53 blocks a tile
  EXPECT_NEAR(selected_dq_union_factor(16, 8192, 64, 16, kForced), 2.54, 0.01);   // paper 8k
  EXPECT_NEAR(selected_dq_union_factor(6, 32768, 64, 16, kForced), 6.99, 0.01);   // long
  EXPECT_DOUBLE_EQ(selected_dq_union_factor(6, 2048, 64, 16, kForced), 1.0);     // m7c-125m: every visible block
  EXPECT_DOUBLE_EQ(selected_dq_union_factor(128, 65536, 64, 16, kForced), 1.0);  // G > 64: one position a tile
  EXPECT_DOUBLE_EQ(selected_dq_union_factor(2, 1000, 64, 16, kForced), 1.0);     // T < n l'
  EXPECT_DOUBLE_EQ(selected_dq_union_factor(2, 1 << 20, 64, 16, 16), 1.0);       // all forced: shared by all
  EXPECT_NEAR(selected_dq_union_factor(6, 8192, 64, 16, kForced), 3.70, 0.01);    // long at 8k
  EXPECT_NEAR(selected_dq_union_factor(16, 32768, 64, 16, kForced), 3.20, 0.01);  // paper 32k
  EXPECT_FALSE(selected_dq_key_major_pays(128, 16, 65536, 64, 16, kForced)) << "a tie at 3.3: query-major";
  EXPECT_FALSE(selected_dq_key_major_pays(128, 16, 8192, 64, 16, kForced));
  EXPECT_TRUE(selected_dq_key_major_pays(128, 6, 32768, 64, 16, kForced));
  EXPECT_FALSE(selected_dq_key_major_pays(64, 16, 8192, 64, 16, kForced));
  EXPECT_FALSE(selected_dq_key_major_pays(64, 16, 32768, 64, 16, kForced));
  EXPECT_TRUE(selected_dq_key_major_pays(64, 6, 8192, 64, 16, kForced));
  EXPECT_TRUE(selected_dq_key_major_pays(64, 6, 32768, 64, 16, kForced));
  EXPECT_FALSE(selected_dq_key_major_pays(64, 6, 2048, 64, 16, kForced));
  EXPECT_FALSE(selected_dq_key_major_pays(192, 16, 65536, 64, 16, kForced)) << "key-major dq stops at Dk = 128";
}

}  // namespace
}  // namespace nsa_test
