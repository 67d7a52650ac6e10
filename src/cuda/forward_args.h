// The kernel-side view of one NSA forward: a POD built on the host from nsa::ForwardParams
// (src/cuda/forward.cu) and passed by value to every kernel of the forward. Pointers are device
// pointers; strides are in elements; every offset is computed in int64.
#pragma once

#include <vector_types.h>  // float2 (CUDA toolkit)

#include <cstdint>

#include "nsa/params.h"     // kBranchSlc
#include "nsa/semantics.h"  // NSA_HOST_DEVICE

namespace nsa::cuda_detail {

// A read-only [B, T, H, D] (or packed [total, H, D]) tensor.
struct TensorRef {
  const void* data;
  int64_t batch_stride;  // ignored in varlen layout
  int64_t seq_stride;
  int64_t head_stride;
};

struct ForwardArgs {
  // Shape. seqlen is T (padded) or the longest sequence (varlen).
  int batch, num_q_heads, num_kv_heads, group;  // group = G = Hq / Hkv
  int64_t seqlen;
  int64_t cmp_per_seq;              // Tc of a padded sequence (unused for varlen)
  const int32_t* cu_seqlens;        // [N+1] device; null: padded layout
  const int32_t* cu_seqlens_cmp;    // [N+1] device
  // Decode / chunked prefill (padded layout): keys held per sequence [B]; the seqlen = m queries of
  // sequence b sit at positions cache_seqlens[b] - m .. cache_seqlens[b] - 1. Null: prefill.
  const int32_t* cache_seqlens;
  int64_t cache_max_held;           // the most keys the cache's raw and compressed capacities allow
  int64_t key_extent;               // bound on key positions + 1: seqlen, or the cache capacity
  int64_t key_rows;                 // rows of k / v along their token axis: key_extent, or total_tokens (varlen)
  int64_t cmp_key_rows;             // rows of k_cmp / v_cmp: Tc, the cache's cmp_capacity, or total_cmp_tokens (varlen)
  int64_t* tokens_read;             // [B, 3] optional: key rows gathered per branch (atomics)

  // Config (validated and range-checked on the host).
  int cmp_block, cmp_stride, sel_block, num_selected, num_init, num_local;
  int64_t window;
  float scale_log2;  // softmax scale * log2(e): scores go through exp2

  TensorRef q, k, v, k_win, v_win, k_cmp, v_cmp, gates;  // k_win/v_win already defaulted to k/v

  int32_t* block_indices;  // [rows, Hkv, n]
  bool indices_given;

  void* out;  // [B, T, Hq, Dv] strided
  int64_t out_batch_stride, out_seq_stride, out_head_stride;

  // Branch outputs (dtype): out_branch slots 0, 1, 2 ([rows, Hq, 3, Dv]), or when out_branch is
  // null the workspace's two planes [2][rows, Hq, Dv] for cmp and slc (win_out null). The final
  // kernel reads o_cmp and o_slc back for the combine.
  void* cmp_out;
  void* slc_out;
  void* win_out;
  int64_t branch_row_stride, branch_head_stride;
  bool chunk_stores;  // out and the branch outputs are 16-byte aligned with strides of 8 elements
  float* lse;  // [rows, Hq, 3] contiguous

  // Decode path (src/cuda/decode.cuh): a KV cache with m * G <= 64, so one 64-row tile per
  // (sequence, kv head) holds all its queries. num_splits == 0: not taken (prefill kernels).
  int num_splits;            // CTAs per (kv head, sequence) and branch: the grid's x (flash-decoding)
  int branch_splits[3];      // of which each branch uses (its key tiles in as many ranges)
  bool warp_split;           // m * G <= 16: the four warps share the 16 rows, each takes 16 keys of a tile
  float* split_acc;          // [3][num_splits][rows][Hq][Dv] unnormalized partial outputs
  float2* split_ml;          // [3][num_splits][rows][Hq] (running max of scores * scale * log2 e, sum)
  float* cmp_scores;         // [rows][Hq][cmp_score_stride] cmp scores * scale * log2(e) (-inf: not visible)
  int64_t cmp_score_stride;  // num_cmp_tokens(cache capacity) rounded up to whole 64-key tiles
  float* block_scores;       // [rows][Hkv][decode_blocks] Eq. 10 scores, then marked by the top-n
  int decode_blocks;         // ceil(capacity / l')
  int score_blocks;          // blocks per decode scoring CTA (128 .. 2048 compressed tokens)
  int score_stage_tokens;    // tokens of the G heads' scores a scoring CTA stages per buffer (a multiple of 4)
  int* score_counters;       // [B][Hkv] scoring CTAs done (the last one runs the top-n); zeroed by the cmp kernel
  bool topn_in_smem;         // the top-n copies the block scores to shared memory (4 * decode_blocks bytes fit)

  // Derived tiling (host-computed).
  int select_t_per_cta;   // positions per selection CTA (select_tiling; set by launch_forward)
  int select_chunks;      // 64-row chunks per selection CTA (select_tiling; set by launch_forward)
  int select_blocks;      // block scores per position in the selection kernel: ceil(key_extent / l')
  int union_words;        // 32-bit words of the selected-block bitmap (ceil(ceil(key_extent/l')/32))
  int union_capacity;     // max distinct selected blocks per attention CTA
};

// The decode path's most splits per branch (the combine kernel keeps a weight per split).
inline constexpr int kDecodeMaxSplits = 256;

// Shared-memory scratch of one top-n (src/cuda/top_n.cuh): a histogram of 8-bit digits, the
// per-warp counts of the output pass, the chosen digit and rank.
struct TopNScratch {
  static constexpr int kBins = 256;
  uint32_t hist[kBins];
  int warp_counts[2][32];  // per warp: blocks chosen outright, blocks tied at the threshold
  int digit, rank;
  int whole;  // the digit's bin holds exactly the keys still wanted: the select stops there
};

// Shared-memory layout sizes, shared by the host (launch) and the kernels.
struct AttentionSmem {
  // K ring buffer [stages][64][Dk+8] and V ring buffer [stages][64][Dv+8] (elements of 2 bytes;
  // two stages in prefill, decode_stages() in decode); without wgmma the Q tile [64][Dk+8] lives
  // in a K buffer until its fragments are in registers (it fits: q_elems == k_elems),
  // which keeps a prefill CTA at 70 KB for D = 128 so that three fit on an SM (sweep_bytes: with
  // wgmma the Q tile follows the buffers).
  // Then, for the slc kernel, the selected-block union: row masks [union_capacity] uint64, bitmap
  // and per-word prefix [union_words] uint32 each, blocks [union_capacity] int32, its size (int32).
  static constexpr int kRows = 64, kKeys = 64, kPad = 8;
  NSA_HOST_DEVICE static constexpr int64_t q_elems(int dk) { return int64_t{kRows} * (dk + kPad); }
  NSA_HOST_DEVICE static constexpr int64_t k_elems(int dk) { return int64_t{kKeys} * (dk + kPad); }
  NSA_HOST_DEVICE static constexpr int64_t v_elems(int dv) { return int64_t{kKeys} * (dv + kPad); }
  NSA_HOST_DEVICE static constexpr int64_t stage_bytes(int dk, int dv) { return 2 * (k_elems(dk) + v_elems(dv)); }
  NSA_HOST_DEVICE static constexpr int64_t tiles_bytes(int dk, int dv, int stages) {
    return stages * stage_bytes(dk, dv);
  }
  // The tiles of a sweep: the K / V buffers, then with wgmma (sm_90a) the Q tile [64 * warpgroups][Dk]
  // (prefill_warpgroups), which wgmma reads from shared memory for every key tile. The slc kernel's
  // union follows.
  NSA_HOST_DEVICE static constexpr int64_t sweep_bytes(int dk, int dv, int stages, bool wgmma, int warpgroups = 1) {
    return tiles_bytes(dk, dv, stages) + (wgmma ? int64_t{kRows} * warpgroups * dk * 2 : 0);
  }
  // A TMA ring (tma_ring_kernel): a full barrier (uint64) and a count of the warps
  // done with its tile (uint32) per stage, between the tiles and the union.
  static constexpr int64_t kRingSyncBytes = 64;
  NSA_HOST_DEVICE static constexpr int64_t union_bytes(int words, int capacity) {
    return int64_t{8} * capacity + int64_t{8} * words + int64_t{4} * capacity + 4;
  }
};

// Whether `ctas` CTAs of `smem_bytes` dynamic shared memory fit an H100 SM (228 KB, 1 KB reserved
// per CTA), as a minimum of that many CTAs in __launch_bounds__ asks (kAttnMinBlocks, kBackwardMinBlocks).
NSA_HOST_DEVICE constexpr bool ctas_fit(int ctas, int64_t smem_bytes) { return ctas * (smem_bytes + 1024) <= 233472; }

// Key/value stages of the decode path's sweeps (attention.cuh, sweep_key_tiles): as many (up to
// four) as keep two CTAs on an SM (<= 112 KB of tiles each). A decode sweep is one long stream of
// tiles per CTA: on an H200 (B = 64, 64k, D = 128) the cmp + win kernel took 239 us with two
// stages and 203 us with three (docs/decisions/0005). Prefill sweeps stay double-buffered
// (docs/decisions/0003: three stages slowed them).
NSA_HOST_DEVICE constexpr int decode_stages(int dk, int dv) {
  return 4 * AttentionSmem::stage_bytes(dk, dv) <= 112 * 1024   ? 4
         : 3 * AttentionSmem::stage_bytes(dk, dv) <= 112 * 1024 ? 3
                                                                 : 2;
}
// The stages of an attention sweep: the decode path's (kSplit) or the prefill's two.
NSA_HOST_DEVICE constexpr int sweep_stages(bool decode, int dk, int dv) { return decode ? decode_stages(dk, dv) : 2; }

// Whether the prefill attention kernel of `branch` runs wgmma where the library and the device
// allow it (sm_90a): cmp and win always, slc at Dk <= 64. The slc kernel's four warps then take
// every tile of the CTA's block union, where with mma.sync a warp skips the blocks none of its
// positions selected: on an H100 wgmma was faster at Dk = 64 (slc 0.86 -> 0.64 ms for G = 6 at 2k,
// 17.7 -> 16.9 ms for G = 16 at 64k) and slower at Dk = 128 (26.7 -> 30.2 ms in the paper config
// at 64k): docs/decisions/0007.
NSA_HOST_DEVICE constexpr bool prefill_sweep_wgmma(int branch, int dk) { return branch != kBranchSlc || dk <= 64; }

// Keys from which the ring replaces the wgmma slc sweep (Dk = 64): a long sequence's CTAs have long
// unions, which pay for the ring's per-warp products. On an H100 (Hq 12, Hkv 2, B * T = 32k) the ring
// against wgmma took 0.766 / 0.633 ms at T = 2048, 1.203 / 1.176 at 4096, 1.693 / 1.911 at 8192 and
// 2.519 / 3.400 at 32k (decision 0010, section 3c).
inline constexpr int64_t kSlcRingMinKeysWgmma = 8192;

// Warpgroups of a prefill attention CTA, each on its own 64 rows of the Q tile, all sharing every K / V
// tile: three for the cmp sweep on wgmma at Dk >= 128, which cuts its K / V bytes per row to a third
// at the same 12 warps per SM (paper config at 64k: cmp 17.1 -> 12.8 ms, win 7.0 -> 6.0; two
// warpgroups at one CTA per SM gained less: docs/decisions/0009). The win sweep at Dk = 128 takes two,
// at two CTAs per SM (tma_ring_stages, kAttnCtaMinBlocks), so that one CTA's prologue and combine
// epilogue overlap the other's sweep (H100, paper config: win 0.575 -> 0.541 ms at 8k, 4.94 -> 4.45
// at 64k: docs/decisions/0018); at Dk = 192 two such CTAs do not fit, and it keeps three. Else one.
// The decode sweeps keep one.
NSA_HOST_DEVICE constexpr int prefill_warpgroups(int branch, int dk, bool wgmma) {
  if (!wgmma || branch == kBranchSlc || dk < 128) return 1;
  return branch == kBranchWin && dk <= 128 ? 2 : 3;
}

// A TMA ring (tma_ring_kernel, sm_90): the prefill sweep of one branch with its K / V tiles loaded
// by the copy engine, whole 64-key tiles as one box per 64 columns, into a ring of stages that the
// warps leave one by one (attention.cuh, sweep_tma_ring). The slc ring's warps multiply on their
// own (mma.sync), each taking only the blocks its positions selected; the cmp and win rings
// multiply with wgmma, in the warpgroups of prefill_warpgroups.
NSA_HOST_DEVICE constexpr bool tma_ring_wgmma(int branch) { return branch != kBranchSlc; }
// Stages: the slc ring's three while two CTAs of it still fit an SM (Dk <= 128: 102 KB of tiles at
// D = 128), else two; the cmp ring's three; the win ring's two where its CTA has two warpgroups (two
// CTAs per SM: 96 KB each at D = 128), else three.
NSA_HOST_DEVICE constexpr int tma_ring_stages(int branch, int dk, int dv) {
  if (branch == kBranchWin) return prefill_warpgroups(branch, dk, true) == 2 ? 2 : 3;
  if (branch != kBranchSlc) return 3;
  return 3 * AttentionSmem::stage_bytes(dk, dv) <= 110 * 1024 ? 3 : 2;
}
// Dynamic shared memory of a ring kernel: the stages, the Q tile (wgmma), the stages' barriers and
// counts (tma_ring_sweep_bytes: where the slc union starts), the slc block union.
NSA_HOST_DEVICE constexpr int64_t tma_ring_sweep_bytes(int branch, int dk, int dv) {
  return AttentionSmem::sweep_bytes(dk, dv, tma_ring_stages(branch, dk, dv), tma_ring_wgmma(branch),
                                    prefill_warpgroups(branch, dk, tma_ring_wgmma(branch))) +
         AttentionSmem::kRingSyncBytes;
}
NSA_HOST_DEVICE constexpr int64_t tma_ring_smem(int branch, int dk, int dv, int union_words, int union_capacity) {
  return tma_ring_sweep_bytes(branch, dk, dv) +
         (branch == kBranchSlc ? AttentionSmem::union_bytes(union_words, union_capacity) : 0);
}

// Whether the prefill slc sweep takes the TMA ring (tma_ring_kernel) on a device that runs the
// sm_90a code (wgmma_sweeps), before its tensor maps are encoded: where the sweep multiplies with
// mma.sync (Dk >= 128, prefill_sweep_wgmma), or with wgmma from kSlcRingMinKeysWgmma keys
// (key_extent) on; where the blocks are whole 64-key tiles (other l' would send most tiles through
// the ring's one-warp cp.async path); and where two CTAs still fit an SM (a large union, e.g.
// G = 1 at Dk = 128 from about 56k tokens, would leave one where the cp.async kernel keeps two;
// kAttnMinBlocks).
NSA_HOST_DEVICE constexpr bool slc_gather_applies(int dk, int dv, int sel_block, int union_words, int union_capacity,
                                                  bool wgmma_sweeps, int64_t key_extent) {
  return wgmma_sweeps && (!prefill_sweep_wgmma(kBranchSlc, dk) || key_extent >= kSlcRingMinKeysWgmma) &&
         sel_block % 64 == 0 && ctas_fit(2, tma_ring_smem(kBranchSlc, dk, dv, union_words, union_capacity));
}

// Whether a ring kernel of `branch` is compiled at head dim dk (and may run): slc's at every Dk
// (slc_gather_applies decides), cmp's and win's where their CTAs have several warpgroups.
NSA_HOST_DEVICE constexpr bool tma_ring_compiled(int branch, int dk) {
  return branch == kBranchSlc || prefill_warpgroups(branch, dk, true) > 1;
}

// Whether the prefill cmp or win sweep takes its TMA ring on a device that runs the sm_90a code,
// before its tensor maps are encoded: where its CTA has three warpgroups (Dk >= 128), which the ring
// lets run apart instead of meeting at a CTA barrier per tile, and the ring's CTA fits an SM. On an
// H100 (decision 0016) the paper config's forward took 2.55 ms against 2.71 at 8k (cmp 0.296 / 0.317,
// win 0.582 / 0.637) and 37.9 against 40.2 at 64k (cmp 9.4 / 11.0, win 5.3 / 4.9); at Dk = 64, three
// CTAs of one warpgroup per SM, the ring lost (m7c-125m cmp 0.094 / 0.075, win 0.255 / 0.231).
NSA_HOST_DEVICE constexpr bool sweep_ring_applies(int branch, int dk, int dv, bool wgmma_sweeps) {
  return wgmma_sweeps && branch != kBranchSlc && tma_ring_compiled(branch, dk) && dk % 64 == 0 && dv % 64 == 0 &&
         ctas_fit(1, tma_ring_smem(branch, dk, dv, 0, 0));
}

// Buffers of staged scores in a decode scoring CTA (decode_scoring.cuh): three chunks in flight
// while one is summed.
inline constexpr int kDecodeScoreStages = 4;

// One decode scoring CTA per (kv head, sequence) (its range covers every block): its block scores
// stay in shared memory and it picks each query's blocks itself (decode.cuh).
NSA_HOST_DEVICE inline bool score_alone(const ForwardArgs& a) { return a.score_blocks >= a.decode_blocks; }

// Compressed tokens of one decode scoring CTA's block range (src/cuda/decode_scoring.cuh): its
// score_blocks blocks' tokens and the l / d - 1 before them that overlap the first block.
NSA_HOST_DEVICE inline int score_tokens(const ForwardArgs& a) {
  return a.score_blocks * (a.sel_block / a.cmp_stride) + a.cmp_block / a.cmp_stride;
}

// The selection kernel's shuffle path (src/cuda/select.cuh) pads a position's G heads to 4, 8 or
// 16 Q-tile rows for 3 <= G <= 16, so that a warp's 16 rows hold whole positions; 0 for the other
// G, whose head sums go through shared memory. (G = 1, 2 padded to 4 would spend 2-4x the exps.)
NSA_HOST_DEVICE constexpr int select_padded_group(int group) {
  return group < 3 || group > 16 ? 0 : group <= 4 ? 4 : group <= 8 ? 8 : 16;
}
// Threads of a selection CTA. On the shuffle path at Dk >= 128 with wgmma (sm_90a), two warpgroups
// (128 Q-tile rows) share each K tile, halving the K bytes per position (decision 0009: paper config
// at 64k, select -14%); at Dk = 64 the second warpgroup lost (m7c shape +18%), the shared-memory path
// keeps one, and so does mma.sync (not measured there).
NSA_HOST_DEVICE constexpr int select_threads(int padded_group, int dk, bool wgmma) {
  return padded_group > 0 && dk >= 128 && wgmma ? 256 : 128;
}
// R: the selection CTA's Q-tile rows per position.
NSA_HOST_DEVICE constexpr int select_rows_per_position(int group) {
  return select_padded_group(group) > 0 ? select_padded_group(group) : group;
}
// The selection CTA's 64-row chunks for `positions` positions.
NSA_HOST_DEVICE constexpr int select_chunk_count(int positions, int group) {
  return (positions * select_rows_per_position(group) + 63) / 64;
}

struct SelectSmem {
  // Q [chunks*64][Dk+8] and K double buffer [2][64][Dk+8] (2-byte elements); P [64][68] float (not
  // on the shuffle path); pg [tpc][64] float; lse2 [chunks*64] float; block scores
  // [tpc][blocks] float; a top-n scratch per warp that picks [min(warps, tpc)] TopNScratch.
  static constexpr int kRows = 64, kKeys = 64, kPad = 8, kPStride = 68;
  NSA_HOST_DEVICE static constexpr int64_t bytes(int dk, int chunks, int tpc, int blocks, bool shuffle_path,
                                                 int warps) {
    return 2 * (int64_t{chunks} * kRows * (dk + kPad) + 2 * int64_t{kKeys} * (dk + kPad)) +
           4 * ((shuffle_path ? 0 : int64_t{kRows} * kPStride) + int64_t{tpc} * kKeys +
                int64_t{chunks} * kRows + int64_t{tpc} * blocks) +
           (warps < tpc ? warps : tpc) * static_cast<int64_t>(sizeof(TopNScratch));
  }
};

// The selection CTA's tiling (src/cuda/select.cuh): its threads, P positions with all G heads in R
// rows each (select_rows_per_position) in 64-row chunks, and its shared memory for `blocks` block
// scores per position. P = max(1, 16 * warps / R), halved (down to 1) while the shared memory
// exceeds max_smem (the launch then reports what does not fit).
struct SelectTiling {
  int threads, positions, chunks;
  int64_t smem_bytes;
};
NSA_HOST_DEVICE constexpr SelectTiling select_tiling(int group, int dk, bool wgmma, int blocks, int64_t max_smem) {
  const int padded_group = select_padded_group(group);
  const int threads = select_threads(padded_group, dk, wgmma);
  const int first = threads / 2 / select_rows_per_position(group);
  SelectTiling t{threads, first > 1 ? first : 1, 0, 0};
  for (;;) {
    t.chunks = select_chunk_count(t.positions, group);
    t.smem_bytes = SelectSmem::bytes(dk, t.chunks, t.positions, blocks, padded_group > 0, threads / 32);
    if (t.positions == 1 || t.smem_bytes <= max_smem) return t;
    t.positions = (t.positions + 1) / 2;
  }
}

}  // namespace nsa::cuda_detail
