// The CUDA forward's host-side tiling (src/cuda/forward_args.h), checked on the CPU against the
// invariants its kernels rely on: the selection CTA's rows hold whole positions in whole warps and
// chunks, its shared memory fits or its positions are down to one; the attention CTAs' shared
// memory fits an H100 and keeps wgmma's 1024-byte tile alignment; the slc kernel's TMA ring keeps
// the swizzle's alignment, and its tensor maps encode for the layouts the API takes (that one needs
// a driver). In builds with CUDA (the header needs the toolkit's vector types); no device needed.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#if NSA_TEST_WITH_CUDA
#include <cuda_runtime.h>

#include "cuda/forward_args.h"
#include "cuda/kv_tensor_maps.h"

namespace nsa_test {
namespace {

using nsa::cuda_detail::AttentionSmem;
using nsa::cuda_detail::ctas_fit;
using nsa::cuda_detail::encode_kv_tensor_maps;
using nsa::cuda_detail::ForwardArgs;
using nsa::cuda_detail::KvTensorMaps;
using nsa::cuda_detail::kSlcRingMinKeysWgmma;
using nsa::cuda_detail::slc_gather_applies;
using nsa::cuda_detail::sweep_ring_applies;
using nsa::cuda_detail::tma_ring_smem;
using nsa::cuda_detail::tma_ring_stages;
using nsa::cuda_detail::prefill_sweep_wgmma;
using nsa::cuda_detail::prefill_warpgroups;
using nsa::cuda_detail::select_padded_group;
using nsa::cuda_detail::select_rows_per_position;
using nsa::cuda_detail::select_tiling;
using nsa::cuda_detail::SelectSmem;
using nsa::cuda_detail::SelectTiling;
using nsa::cuda_detail::sweep_stages;

constexpr int64_t kH100Smem = 227 * 1024;  // the opt-in dynamic shared memory of a CTA
constexpr int kHeadDims[][2] = {{64, 64}, {128, 128}, {192, 128}};
constexpr int kBranches[] = {nsa::kBranchCmp, nsa::kBranchSlc, nsa::kBranchWin};

TEST(ForwardTiling, SelectionRowsHoldWholePositions) {
  for (int group = 1; group <= 80; ++group)
    for (const auto& dims : kHeadDims)
      for (bool wgmma : {false, true})
        for (int blocks : {1, 32, 1024, 2048, 4096, 16384}) {
          SCOPED_TRACE("G " + std::to_string(group) + ", Dk " + std::to_string(dims[0]) + ", wgmma " +
                       std::to_string(wgmma) + ", blocks " + std::to_string(blocks));
          const SelectTiling t = select_tiling(group, dims[0], wgmma, blocks, kH100Smem);
          const int rows = select_rows_per_position(group), padded = select_padded_group(group);
          ASSERT_TRUE(t.threads == 128 || t.threads == 256) << t.threads;
          EXPECT_TRUE(t.threads == 128 || (wgmma && padded > 0 && dims[0] >= 128));
          ASSERT_GE(t.positions, 1);
          // Every row of the positions lies in a 64-row chunk of the Q tile.
          EXPECT_GE(t.chunks * 64, t.positions * rows);
          EXPECT_LT((t.chunks - 1) * 64, t.positions * rows);
          if (padded > 0) {
            // Shuffle path: a warp's 16 rows are whole positions, and the warps cover every row.
            EXPECT_EQ(16 % padded, 0);
            EXPECT_LE(t.positions * rows, t.threads / 2);
            EXPECT_EQ(t.threads / 2 % (t.positions * rows), 0) << "positions halved from 16 * warps / R";
          }
          // Fits, or is down to one position (the launch then reports the bytes).
          EXPECT_TRUE(t.smem_bytes <= kH100Smem || t.positions == 1) << t.smem_bytes;
          EXPECT_EQ(t.smem_bytes,
                    SelectSmem::bytes(dims[0], t.chunks, t.positions, blocks, padded > 0, t.threads / 32));
        }
}

TEST(ForwardTiling, SelectionHalvesOnlyWhatDoesNotFit) {
  // The paper's G = 16 at Dk = 128 on wgmma: 8 positions (two warpgroups) up to the blocks whose
  // scores fit, then 4, 2, 1.
  const SelectTiling fits = select_tiling(16, 128, true, 1024, kH100Smem);
  EXPECT_EQ(fits.threads, 256);
  EXPECT_EQ(fits.positions, 8);
  EXPECT_EQ(fits.chunks, 2);
  const SelectTiling halved = select_tiling(16, 128, true, 8192, kH100Smem);
  EXPECT_LT(halved.positions, 8);
  EXPECT_GT(select_tiling(16, 128, true, 8192, int64_t{1} << 40).smem_bytes, kH100Smem)
      << "the unhalved tiling of 8192 blocks does not fit";
  EXPECT_EQ(select_tiling(16, 128, true, 8192, int64_t{1} << 40).positions, 8);
  // Without wgmma (sm_80) one warpgroup: 4 positions.
  EXPECT_EQ(select_tiling(16, 128, false, 1024, kH100Smem).threads, 128);
  EXPECT_EQ(select_tiling(16, 128, false, 1024, kH100Smem).positions, 4);
}

TEST(ForwardTiling, AttentionWarpgroupsAndSharedMemory) {
  for (const auto& dims : kHeadDims)
    for (int branch : kBranches)
      for (bool device_wgmma : {false, true}) {
        SCOPED_TRACE("Dk " + std::to_string(dims[0]) + ", branch " + std::to_string(branch) + ", wgmma " +
                     std::to_string(device_wgmma));
        const bool wgmma = device_wgmma && prefill_sweep_wgmma(branch, dims[0]);
        const int warpgroups = prefill_warpgroups(branch, dims[0], wgmma);
        const int many = branch == nsa::kBranchWin && dims[0] == 128 ? 2 : 3;  // win at Dk 128: two CTAs per SM
        EXPECT_EQ(warpgroups, wgmma && branch != nsa::kBranchSlc && dims[0] >= 128 ? many : 1);
        const int64_t tiles = AttentionSmem::tiles_bytes(dims[0], dims[1], sweep_stages(false, dims[0], dims[1]));
        const int64_t sweep =
            AttentionSmem::sweep_bytes(dims[0], dims[1], sweep_stages(false, dims[0], dims[1]), wgmma, warpgroups);
        EXPECT_LE(sweep, kH100Smem);
        if (wgmma) {
          // The Q tile of each warpgroup starts on a 1024-byte boundary after the K / V buffers.
          EXPECT_EQ(tiles % 1024, 0);
          EXPECT_EQ(int64_t{64} * dims[0] * 2 % 1024, 0);
          EXPECT_EQ(sweep, tiles + int64_t{64} * warpgroups * dims[0] * 2);
        } else {
          EXPECT_EQ(sweep, tiles);
        }
      }
}

TEST(ForwardTiling, OneWarpgroupCmpAndWinCtasFitThreeToAnH100Sm) {
  // kAttnMinBlocks asks the registers for three such CTAs per SM up to Dk = 128; their shared memory
  // (plus 1 KB the SM reserves per CTA) must let three fit too, or the occupancy silently halves.
  for (const auto& dims : kHeadDims) {
    if (dims[0] > 128) continue;
    for (bool wgmma : {false, true}) {
      if (prefill_warpgroups(nsa::kBranchCmp, dims[0], wgmma) > 1) continue;  // one CTA of 12 warps
      const int64_t sweep = AttentionSmem::sweep_bytes(dims[0], dims[1], sweep_stages(false, dims[0], dims[1]), wgmma);
      EXPECT_TRUE(ctas_fit(3, sweep)) << "Dk " << dims[0] << ", wgmma " << wgmma << ": " << sweep;
    }
  }
}

TEST(ForwardTiling, TmaRingsKeepTheSwizzleAlignmentAndTheirCtasPerSm) {
  for (const auto& dims : kHeadDims) {
    SCOPED_TRACE("Dk " + std::to_string(dims[0]));
    // Every stage's K and V tile starts on a 1024-byte boundary (the TMA boxes' 128-byte swizzle).
    EXPECT_EQ(AttentionSmem::k_elems(dims[0]) * 2 % 1024, 0);
    EXPECT_EQ(AttentionSmem::v_elems(dims[1]) * 2 % 1024, 0);
    for (int branch : {nsa::kBranchCmp, nsa::kBranchSlc, nsa::kBranchWin}) {
      const int stages = tma_ring_stages(branch, dims[0], dims[1]);
      EXPECT_GE(AttentionSmem::kRingSyncBytes, stages * (8 + 4));
      // The Q tile of a wgmma ring after the stages starts on a 1024-byte boundary too.
      EXPECT_EQ(AttentionSmem::tiles_bytes(dims[0], dims[1], stages) % 1024, 0);
    }
    if (!prefill_sweep_wgmma(nsa::kBranchSlc, dims[0])) {  // the slc ring where it replaces mma.sync
      EXPECT_EQ(tma_ring_stages(nsa::kBranchSlc, dims[0], dims[1]), dims[0] <= 128 ? 3 : 2);
      // The paper config's union at 128k (4 positions of 16 blocks among 2048) leaves two CTAs per SM.
      EXPECT_TRUE(ctas_fit(2, tma_ring_smem(nsa::kBranchSlc, dims[0], dims[1], 2048 / 32, 64)));
    }
    // The cmp and win rings replace the CTAs of several warpgroups (Dk >= 128);
    // at Dk = 64 (three CTAs of one warpgroup) the cp.async kernels stay (decision 0016).
    for (int branch : {nsa::kBranchCmp, nsa::kBranchWin}) {
      EXPECT_EQ(sweep_ring_applies(branch, dims[0], dims[1], true), dims[0] >= 128);
      EXPECT_FALSE(sweep_ring_applies(branch, dims[0], dims[1], false)) << "no sm_90a code on the device";
      if (dims[0] >= 128) {
        EXPECT_TRUE(ctas_fit(1, tma_ring_smem(branch, dims[0], dims[1], 0, 0)));
      }
    }
    // The win ring of two warpgroups (Dk = 128) runs two CTAs per SM; three warpgroups, one.
    if (prefill_warpgroups(nsa::kBranchWin, dims[0], true) == 2) {
      EXPECT_EQ(tma_ring_stages(nsa::kBranchWin, dims[0], dims[1]), 2);
      EXPECT_TRUE(ctas_fit(2, tma_ring_smem(nsa::kBranchWin, dims[0], dims[1], 0, 0)));
    }
  }
  EXPECT_FALSE(sweep_ring_applies(nsa::kBranchSlc, 64, 64, true)) << "slc: slc_gather_applies";
}

TEST(ForwardTiling, SlcGatherAppliesWhereItKeepsTheCpAsyncKernelsOccupancy) {
  // Paper config (G = 16, l' = 64) at 64k: 4 positions' 64 blocks among 1024.
  EXPECT_TRUE(slc_gather_applies(128, 128, 64, 1024 / 32, 64, true, 65536));
  EXPECT_TRUE(slc_gather_applies(192, 128, 64, 1024 / 32, 64, true, 65536));
  EXPECT_TRUE(slc_gather_applies(128, 128, 128, 512 / 32, 64, true, 65536)) << "l' = 128: two whole tiles a block";
  EXPECT_FALSE(slc_gather_applies(128, 128, 64, 1024 / 32, 64, false, 65536)) << "no sm_90a code on the device";
  EXPECT_FALSE(slc_gather_applies(64, 64, 64, 64 / 32, 64, true, 2048)) << "Dk = 64 at 2k: the wgmma slc kernel";
  EXPECT_FALSE(slc_gather_applies(64, 64, 64, 1, 64, true, kSlcRingMinKeysWgmma - 1));
  EXPECT_TRUE(slc_gather_applies(64, 64, 64, 1024 / 32, 64, true, 65536)) << "Dk = 64 at 64k: the ring";
  EXPECT_FALSE(slc_gather_applies(128, 128, 32, 2048 / 32, 128, true, 65536)) << "l' = 32: every tile partial";
  // G = 1 at 64k: 64 positions of 16 blocks; the union would leave one CTA per SM.
  EXPECT_FALSE(ctas_fit(2, tma_ring_smem(nsa::kBranchSlc, 128, 128, 1024 / 32, 1024)));
  EXPECT_FALSE(slc_gather_applies(128, 128, 64, 1024 / 32, 1024, true, 65536));
}

TEST(ForwardTiling, KvTensorMapsEncodeTheLayoutsTheApiTakes) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) GTEST_SKIP() << "no CUDA driver or device";
  alignas(256) static unsigned char storage[256];  // never read: encoding takes the address only
  ForwardArgs a{};
  a.batch = 3;
  a.num_kv_heads = 4;
  a.key_rows = 1000;
  a.cmp_key_rows = 61;
  KvTensorMaps maps;
  for (const auto& dims : kHeadDims) {
    SCOPED_TRACE("Dk " + std::to_string(dims[0]));
    a.k = {storage, 1000 * 4 * dims[0], 4 * dims[0], dims[0]};  // [B, T, Hkv, Dk] contiguous
    a.v = {storage, 1000 * 4 * dims[1], 4 * dims[1], dims[1]};
    a.k_win = a.k;
    a.v_win = a.v;
    a.k_cmp = {storage, 61 * 4 * dims[0], 4 * dims[0], dims[0]};  // [B, Tc, Hkv, Dk]
    a.v_cmp = {storage, 61 * 4 * dims[1], 4 * dims[1], dims[1]};
    a.cu_seqlens = nullptr;
    for (int branch : {nsa::kBranchCmp, nsa::kBranchSlc, nsa::kBranchWin})
      EXPECT_TRUE(encode_kv_tensor_maps(a, branch, dims[0], dims[1], &maps)) << "branch " << branch;
    // Heads interleaved with other tensors (strides past the row), heads outer ([B, Hkv, T, D]:
    // the head stride above the row's), and the packed varlen layout.
    a.k.seq_stride = 3 * 4 * dims[0];
    a.k.batch_stride = 1000 * a.k.seq_stride;
    EXPECT_TRUE(encode_kv_tensor_maps(a, nsa::kBranchSlc, dims[0], dims[1], &maps));
    a.v = {storage, 4 * 1003 * dims[1], dims[1], 1003 * dims[1]};
    EXPECT_TRUE(encode_kv_tensor_maps(a, nsa::kBranchSlc, dims[0], dims[1], &maps)) << "heads outer";
    static const int32_t cu_seqlens[2] = {0, 1000};
    a.cu_seqlens = cu_seqlens;
    EXPECT_TRUE(encode_kv_tensor_maps(a, nsa::kBranchSlc, dims[0], dims[1], &maps));
    EXPECT_TRUE(encode_kv_tensor_maps(a, nsa::kBranchCmp, dims[0], dims[1], &maps));
    // Beyond the copies' 32-bit coordinates: the caller falls back to the cp.async kernel.
    a.key_rows = int64_t{1} << 31;
    EXPECT_FALSE(encode_kv_tensor_maps(a, nsa::kBranchSlc, dims[0], dims[1], &maps));
    EXPECT_FALSE(encode_kv_tensor_maps(a, nsa::kBranchWin, dims[0], dims[1], &maps));
    EXPECT_TRUE(encode_kv_tensor_maps(a, nsa::kBranchCmp, dims[0], dims[1], &maps)) << "cmp: its own rows";
    a.key_rows = 1000;
    a.cmp_key_rows = int64_t{1} << 31;
    EXPECT_FALSE(encode_kv_tensor_maps(a, nsa::kBranchCmp, dims[0], dims[1], &maps));
    a.cmp_key_rows = 61;
  }
  EXPECT_FALSE(encode_kv_tensor_maps(a, nsa::kBranchSlc, 96, 96, &maps)) << "boxes of 64 columns";
}

}  // namespace
}  // namespace nsa_test
#endif  // NSA_TEST_WITH_CUDA
