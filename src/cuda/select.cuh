// Block scoring and top-n, fused (Eqs. 8-12), without any [T, Tc] or [T, T/l'] tensor in global
// memory.
//
// A CTA (4 warps; 8 on the shuffle path at Dk >= 128 on sm_90a: select_threads) owns P positions
// t0 .. t0+P-1 of one (sequence, kv head) with all G query heads of the group: P*R rows of a Q tile,
// R = select_rows_per_position(G) (G, or G padded to 4, 8 or 16), in ceil(P*R / 64) chunks of 64
// (P = max(1, 16 * warps / R), halved by the host while the shared memory below does not fit).
// It keeps the Eq. 9 block scores of ALL its positions' eligible blocks in shared memory
// ([P][num_blocks] fp32, num_blocks = ceil(T / l')), streams the visible compressed keys in tiles
// of 64 (cp.async double buffer) and for each tile:
//   1. S = Q K_cmp^T on the tensor cores (mma.sync; on sm_90a wgmma with Q and K from shared
//      memory, as the cmp kernel's: docs/decisions/0006), p = 2^(S*scale*log2e - lse_cmp*log2e) with the
//      cmp branch's lse (written by the cmp kernel), 0 where the token is not visible (Eq. 8);
//   2. the sum over the G heads of each position (Eq. 10), then the Eq. 9 overlap weights add the
//      tile's tokens into the block scores (a block straddling two tiles gets both parts; each
//      (position, block) score has one writer per tile, so no atomics and a fixed order).
//      Shuffle path (3 <= G <= 16, kPaddedGroup = 4, 8 or 16): a warp's 16 rows are 16 / kPaddedGroup
//      whole positions, so the head sum is a shuffle reduce-scatter over the mma accumulators
//      (padding rows add 0) and the warp owns its positions' block scores: nothing but the K double
//      buffer is shared between warps (one barrier per tile). Its loop is a software pipeline: tile
//      k + 1's S runs on the tensor cores while tile k's steps 1 (exponentials) and 2 run
//      (docs/decisions/0017).
//      Otherwise (G <= 2 or G > 16) p goes through shared memory (chunks of 64 rows for G > 64).
// At the end one warp per position picks the top-n (top_n.cuh): the forced blocks (initial,
// local), then the best of the remaining eligible blocks by a radix select, ties to the lower block
// index (all of them when they fit), and writes the chosen blocks ascending, -1 padded.
// Scores are fp32; the reference's are fp64, so the choice may differ where scores tie within
// rounding (DESIGN.md section 2).
#pragma once

#include <type_traits>

#include "cuda/attention.cuh"
#include "cuda/common.cuh"
#include "cuda/fast_divider.h"
#include "cuda/top_n.cuh"

namespace nsa::cuda_detail {

// Eq. 9 for one (position, block j) and the tokens of the tile [i0, i1): sum of weight * pg[i - i0].
// With d | l and d | l' (validated), token i = j*m + u (m = l'/d, q = l/d) overlaps block j for
// -q < u < m, with weight |[u, u+q) ∩ [0, m)| = min(u + q, m) - max(u, 0) (overlap_weight, no division).
// The weights are small integers, so the float arithmetic gives them exactly (and the sum is the one
// integer weights would give, in the same order).
__device__ __forceinline__ float block_tile_sum(const float* pg, int j, int i0, int i1, int m, int q) {
  const int base = j * m;
  const int ia = max(max(base - q + 1, 0), i0), ib = min(base + m - 1, i1 - 1);
  const float mf = static_cast<float>(m), qf = static_cast<float>(q);
  float sum = 0.f, u = static_cast<float>(ia - base);
  for (int i = ia; i <= ib; ++i, u += 1.f) sum += (fminf(u + qf, mf) - fmaxf(u, 0.f)) * pg[i - i0];
  return sum;
}

// The blocks a tile of compressed tokens [i0, i1) overlaps (Eq. 9): i0 * d / l' to ((i1 - 1) * d + l - 1) / l',
// which with m = l' / d and q = l / d are i0 / m and (i1 + q - 2) / m (with X = i1 - 1 + q,
// floor((d X - 1) / (d m)) = floor((X - 1) / m)).
struct TileBlocks {
  int lo, hi;
};
__device__ __forceinline__ TileBlocks tile_blocks(const FastDivider& div_m, int i0, int i1, int q) {
  return TileBlocks{div_m(i0), div_m(i1 + q - 2)};
}

// Reduce-scatter of h[0 .. N) over lane bits 4 << (kSteps - 1) down to 4 (the mma row group's low
// kSteps bits): each step halves the values, the lane with the bit set keeping (and receiving the
// other lanes' part of) the upper half, so the index's top bit comes to equal the lane bit.
template <int N, int kSteps>
__device__ __forceinline__ void head_reduce_scatter(float* h, int lane) {
  if constexpr (kSteps > 0) {
    constexpr int kBit = 4 << (kSteps - 1);
    const bool up = lane & kBit;
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const float lo = h[i], hi = h[i + N / 2];
      h[i] = (up ? hi : lo) + __shfl_xor_sync(0xffffffffu, up ? lo : hi, kBit);
    }
    head_reduce_scatter<N / 2, kSteps - 1>(h, lane);
  }
}

template <class T, int Dk, int kPaddedGroup>
__global__ void __launch_bounds__(select_threads(kPaddedGroup, Dk, kHaveWgmma), 2) select_kernel(const ForwardArgs a) {
  constexpr int kSelectThreads = select_threads(kPaddedGroup, Dk, kHaveWgmma);
  check_block_threads<kSelectThreads>();
  // wgmma: each warpgroup's four warps issue a chunk's S together (warps without rows compute zeros).
  constexpr bool kWgmma = kHaveWgmma;
  using Mma = std::conditional_t<kWgmma, WgmmaTiles, MmaSyncTiles>;
  using QSource = std::conditional_t<kWgmma, QInSharedMemory<T>, QInRegisters<T, Dk>>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int b = blockIdx.z, kv_head = blockIdx.y;
  const SeqInfo seq = seq_info(a, b);
  const int G = a.group, tpc = a.select_t_per_cta, chunks = a.select_chunks, NBs = a.select_blocks;
  const int n = a.num_selected, ls = a.sel_block, lc = a.cmp_block, dc = a.cmp_stride;
  const int bm = ls / dc, bq = lc / dc;  // l' and l in units of d
  // First query row (of the sequence's), the heaviest tiles first (H100, paper config at 8k: 0.267 ->
  // 0.258 ms; docs/decisions/0018).
  const int q0 = heaviest_first_tile() * tpc;
  if (q0 >= seq.len) return;  // uniform over the CTA
  const int nt = static_cast<int>(min64(tpc, seq.len - q0));
  const int t0 = static_cast<int>(seq.pos0) + q0;  // its position
  // Q-tile rows per position: its G heads, padded to kPaddedGroup on the shuffle path.
  const int rows_per_pos = kPaddedGroup > 0 ? kPaddedGroup : G;
  const int t_hi = t0 + nt - 1, nrows = nt * rows_per_pos;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, group = lane >> 2, tig = lane & 3;
  constexpr int kPS = SelectSmem::kPStride;

  // Shared memory, in SelectSmem::bytes order.
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + int64_t{chunks} * 64 * (Dk + 8);
  float* sP = reinterpret_cast<float*>(sK + 2 * 64 * (Dk + 8));  // [64][kPS], generic path only
  float* sPg = sP + (kPaddedGroup > 0 ? 0 : 64 * kPS);              // [tpc][64]
  float* sLse2 = sPg + tpc * 64;                                    // [chunks * 64]
  float* const sBS = sLse2 + chunks * 64;                           // [tpc][NBs]
  TopNScratch* const sTopN = reinterpret_cast<TopNScratch*>(sBS + tpc * NBs);  // [warps]
  const int nb_cta = t_hi / ls + 1;                                 // blocks eligible for some position
  // Top-n, one warp per position.
  const auto pick_blocks = [&] {
    for (int tl = warp; tl < nt; tl += kSelectThreads / 32)
      pick_top_n<1>(a, sBS + tl * NBs, t0 + tl,
                    a.block_indices + ((seq.row0 + q0 + tl) * a.num_kv_heads + kv_head) * n, sTopN[warp]);
  };
  // No position of the CTA has more than n eligible blocks: each selects all of its own whatever
  // their scores (docs/semantics.md, section 2.5, step 3; pick_top_n then reads no score), so the
  // CTA scores nothing. Uniform over the CTA.
  if (nb_cta <= n) {
    pick_blocks();
    return;
  }
  if constexpr (kWgmma) wgmma_check_smem(smem, static_cast<uint32_t>((chunks + 2) * 64 * (Dk + 8) * 2));
  // Chunk c of the Q tile (64 rows; swizzled for wgmma, in its padded slot).
  const auto q_chunk = [&](int c) { return sQ + c * 64 * (Dk + 8); };

  constexpr float kLog2e = 1.4426950408889634f;
  {
    const T* qbase = seq_head_ptr<T>(a.q, a, b, seq.row0, kv_head * G);
    constexpr int kChunks = Dk / 8;
    for (int idx = tid; idx < chunks * 64 * kChunks; idx += kSelectThreads) {
      const int r = idx / kChunks, c = idx % kChunks;
      const bool valid = r < nrows && r % rows_per_pos < G;
      const T* src = valid ? qbase + int64_t{q0 + r / rows_per_pos} * a.q.seq_stride +
                                 int64_t{r % rows_per_pos} * a.q.head_stride + c * 8
                           : qbase;
      cp_async_16(q_chunk(r / 64) + tile_chunk_offset<Dk, 64, kWgmma>(r % 64, c), src, valid);
    }
    cp_async_commit();
    for (int r = tid; r < chunks * 64; r += kSelectThreads) {
      float v = pos_inf();  // rows that are no (position, head): p = 2^(S - inf) = 0
      if (r < nrows && r % rows_per_pos < G) {
        const int64_t grow = seq.row0 + q0 + r / rows_per_pos;
        v = a.lse[(grow * a.num_q_heads + kv_head * G + r % rows_per_pos) * 3 + 0] * kLog2e;
      }
      sLse2[r] = v;
    }
    for (int e = tid; e < nt * nb_cta; e += kSelectThreads) sBS[(e / nb_cta) * NBs + e % nb_cta] = 0.f;
  }

  const int nk = num_visible_cmp(t_hi, lc, dc);
  const int num_tiles = (nk + 63) / 64;
  const T* kbase = seq_head_ptr<T>(a.k_cmp, a, b, seq.cmp_row0, kv_head);
  auto issue = [&](int k) {
    load_rows_async<T, Dk, 64, kSelectThreads, false, kWgmma>(sK + (k & 1) * 64 * (Dk + 8), kbase, a.k_cmp.seq_stride,
                                                              k * 64, min(64, nk - k * 64), tid);
    cp_async_commit();
  };
  if (num_tiles > 0) issue(0);
  const FastDivider div_bm(bm);  // Eq. 9's block range of each tile (tile_blocks)

  if constexpr (kPaddedGroup > 0) {
    // Warp w: rows 16w .. 16w+15, positions w*kPosPerWarp .. (w+1)*kPosPerWarp - 1 (local), the heads
    // of each in kPaddedGroup consecutive rows. In the mma layout a lane holds rows group and group + 8;
    // the heads of a position are the low kSteps bits of group (and, for 16, both row halves).
    constexpr int kPosPerWarp = 16 / kPaddedGroup;
    constexpr int kSteps = kPaddedGroup == 4 ? 2 : 3;
    constexpr int kValues = kPaddedGroup == 16 ? 16 : 32;  // per lane before the head sum
    cp_async_wait<0>();  // Q (and tile 0, issued after it)
    sync_copied_tiles<kWgmma>();
    if (num_tiles > 1) issue(1);
    const int tl_first = warp * kPosPerWarp;
    const bool active = tl_first < nt;
    const int tl_last = min(tl_first + kPosPerWarp, nt) - 1;
    const int nv_warp = active ? num_visible_cmp(t0 + tl_last, lc, dc) : 0;  // the most any of its positions see
    const int row_lo = warp * 16 + group;
    const int tl_lo = row_lo / kPaddedGroup, tl_hi = (row_lo + 8) / kPaddedGroup;
    const int nv_lo = tl_lo < nt ? num_visible_cmp(t0 + tl_lo, lc, dc) : 0;
    const int nv_hi = kPaddedGroup == 16 ? nv_lo : tl_hi < nt ? num_visible_cmp(t0 + tl_hi, lc, dc) : 0;
    // wgmma: a warpgroup's four warps issue the product together, on its chunk, every tile: a product
    // issued under a condition while another is in flight makes ptxas serialize the kernel's wgmma
    // (C7514). With two warpgroups and the positions halved to fit, the second has no chunk of its own:
    // it multiplies the first's, and its warps, which have no positions, read no lse and use nothing.
    const bool has_chunk = kSelectThreads == 128 || (warp >> 2) < chunks;  // the warp's rows lie in a chunk
    QSource qf;
    if (kWgmma || active) qf.load(kWgmma && kSelectThreads > 128 ? q_chunk(min(warp >> 2, chunks - 1)) : sQ, warp * 16);
    const float lse_lo = has_chunk ? sLse2[row_lo] : pos_inf();  // +inf on padding rows: p = 0
    const float lse_hi = has_chunk ? sLse2[row_lo + 8] : pos_inf();
    const float scale_log2 = a.scale_log2;
    // The last block each of the warp's positions may select (t / l'), and the first position's
    // visible compressed tokens (the fewest of the warp's rows: a tile below them needs no mask).
    int pos_block_hi[kPosPerWarp];
#pragma unroll
    for (int i = 0; i < kPosPerWarp; ++i) pos_block_hi[i] = (t0 + tl_first + i) / ls;
    const int nv_first = active ? num_visible_cmp(t0 + tl_first, lc, dc) : 0;
    // The block scores of tile k's keys from its S.
    const auto add_tile = [&](int k, const float (&s)[8][4]) {
      const int i0 = k * 64, i1 = min(i0 + 64, nk);
      if (!active || i0 >= nv_warp) return;
      // p of key nb*8 + 2*tig + c in h[nb*4 + half*2 + c] (row group + 8*half), the halves summed
      // into h[nb*2 + c] for 16 heads. nb is the top index bit: each reduce-scatter step below
      // trades one nb bit for one head bit of group, so that a lane ends with the head sums of its
      // key pairs nb*8 + 2*tig + {0, 1}, nb's top kSteps bits being group's head bits.
      float h[kValues];
      const int kv_lo = nv_lo - i0, kv_hi = nv_hi - i0;  // keys < kv are visible
      // (Masks after the exps: masking them instead predicates each exp, with a reload of the scale.)
      const auto probabilities = [&](auto masked) {
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int key = nb * 8 + tig * 2 + c;
            const float p_lo = fast_exp2(s[nb][c] * scale_log2 - lse_lo);
            const float p_hi = fast_exp2(s[nb][c + 2] * scale_log2 - lse_hi);
            constexpr bool kMasked = decltype(masked)::value;
            const bool see_lo = !kMasked || key < kv_lo;
            if constexpr (kPaddedGroup == 16) {  // both rows of a lane are one position
              h[nb * 2 + c] = see_lo ? p_lo + p_hi : 0.f;
            } else {
              h[nb * 4 + c] = see_lo ? p_lo : 0.f;
              h[nb * 4 + 2 + c] = !kMasked || key < kv_hi ? p_hi : 0.f;
            }
          }
      };
      // Every row of the warp sees the whole tile (nk >= nv_first, so it holds 64 keys): no masks.
      if (i0 + 64 <= nv_first)
        probabilities(std::false_type{});
      else
        probabilities(std::true_type{});
      head_reduce_scatter<kValues, kSteps>(h, lane);
      // Left: h[2*pair + c], pair = nb_low * 2 + half for 4 heads, half for 8, 0 for 16.
      const TileBlocks blocks = tile_blocks(div_bm, i0, i1, bq);
      if (kPaddedGroup == 16 && bm == 4 && bq == 2) {
        // l = 2d, l' = 4d (the paper's 32, 16, 64): lane L holds the tile's tokens 2L and 2L + 1 of the
        // warp's position, and block blocks.lo + r takes tokens 4r - 1 .. 4r + 3 with weights 1, 2, 2, 2,
        // 1 (Eq. 9): lanes 2r - 1, 2r and 2r + 1. Even lane 2r adds block r (its token 4r - 1 from lane
        // 2r - 1, or for r = 0 from the tile before, whose lane 31 added it), lane 31 the first token of
        // block 16. No shared memory, one writer per (position, block). (kPaddedGroup 8 has the same
        // form for each of a lane's two positions: docs/experiments/0037, not yet run on a GPU.)
        const float v0 = h[0], v1 = h[1];
        const float odd_part = __shfl_down_sync(0xffffffffu, 2.f * v0 + v1, 1);
        const float before = __shfl_up_sync(0xffffffffu, v1, 1);
        const int j = blocks.lo + (lane == 31 ? 16 : lane >> 1);
        if (tl_first <= tl_last && j <= min(blocks.hi, pos_block_hi[0]) && (!(lane & 1) || lane == 31))
          sBS[tl_first * NBs + j] += lane == 31 ? v1 : 2.f * (v0 + v1) + odd_part + (lane > 0 ? before : 0.f);
        __syncwarp();
        return;
      }
      const int head_bits = group & ((1 << kSteps) - 1);
#pragma unroll
      for (int pair = 0; pair < (kValues >> kSteps) / 2; ++pair) {
        const int half = kPaddedGroup == 16 ? 0 : pair & 1, nb_low = kPaddedGroup == 16 ? 0 : pair >> 1;
        const int tl = (row_lo + 8 * half) / kPaddedGroup;
        const int key = ((head_bits << (3 - kSteps)) | nb_low) * 8 + tig * 2;
        if (kPaddedGroup == 16 || tl < nt)
          *reinterpret_cast<float2*>(sPg + tl * 64 + key) = make_float2(h[2 * pair], h[2 * pair + 1]);
      }
      __syncwarp();
      // Eq. 9: blocks overlapped by this tile's tokens (tokens a position does not see have p = 0).
#pragma unroll
      for (int i = 0; i < kPosPerWarp; ++i) {
        const int tl = tl_first + i;
        if (tl > tl_last) break;
        const int j_hi = min(blocks.hi, pos_block_hi[i]);
        for (int j = blocks.lo + lane; j <= j_hi; j += 32)
          sBS[tl * NBs + j] += block_tile_sum(sPg + tl * 64, j, i0, i1, bm, bq);
      }
      __syncwarp();
    };
    // Software pipeline: tile k + 1's S runs on the tensor cores while tile k's exponentials and sums
    // run (where the kernel's time goes at 64k: docs/decisions/0017).
    float s[8][4];
    if (num_tiles > 0 && (kWgmma || nv_warp > 0)) {
      Mma::template scores_async<T, Dk>(qf, sK, s);
      Mma::wait_scores(s);
    }
    for (int k = 0; k + 1 < num_tiles; ++k) {
      cp_async_wait<0>();
      sync_copied_tiles<kWgmma>();  // tile k + 1 visible to all, and every warp is done with tile k's buffer
      if (k + 2 < num_tiles) issue(k + 2);
      float s_next[8][4];
      const bool next_computes = active && (k + 1) * 64 < nv_warp;
      if (kWgmma || next_computes) Mma::template scores_async<T, Dk>(qf, sK + ((k + 1) & 1) * 64 * (Dk + 8), s_next);
      add_tile(k, s);
      Mma::wait_scores(s_next);
      if (kWgmma || next_computes) {
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[nb][e] = s_next[nb][e];
      }
    }
    if (num_tiles > 0) add_tile(num_tiles - 1, s);
  } else {
    cp_async_wait<0>();
    sync_copied_tiles<kWgmma>();
    for (int k = 0; k < num_tiles; ++k) {
      if (k > 0) {
        if (k + 1 < num_tiles) issue(k + 1);
        cp_async_wait_older(k + 1 < num_tiles);
        sync_copied_tiles<kWgmma>();
      } else if (num_tiles > 1) {
        issue(1);
      }
      const int i0 = k * 64, i1 = min(i0 + 64, nk);
      const T* tk = sK + (k & 1) * 64 * (Dk + 8);
      for (int c = 0; c < chunks; ++c) {
        // 1. Probabilities of the chunk's rows.
        const int r_lo = c * 64 + warp * 16 + group, r_hi = r_lo + 8;
        const int kv_lo = r_lo < nrows ? num_visible_cmp(t0 + r_lo / G, lc, dc) - i0 : 0;
        const int kv_hi = r_hi < nrows ? num_visible_cmp(t0 + r_hi / G, lc, dc) - i0 : 0;
        const bool has_rows = c * 64 + warp * 16 < nrows;
        float s[8][4];
        if (kWgmma || has_rows) {
          QSource qf;
          qf.load(kWgmma ? q_chunk(c) : sQ, c * 64 + warp * 16);
          Mma::template scores<T, Dk, 8>(qf, tk, 0, s);
        }
        if (has_rows) {
          const float l_lo = sLse2[r_lo], l_hi = sLse2[r_hi];
#pragma unroll
          for (int nb = 0; nb < 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int key = nb * 8 + tig * 2 + (e & 1);
              const bool hi = e >= 2;
              const float p = fast_exp2(s[nb][e] * a.scale_log2 - (hi ? l_hi : l_lo));
              sP[(warp * 16 + group + 8 * (e >> 1)) * kPS + key] = key < (hi ? kv_hi : kv_lo) ? p : 0.f;
            }
        }
        __syncthreads();
        // 2a. Sum over the heads of each position (rows tl*G .. tl*G+G-1), in head order.
        for (int e = tid; e < nt * 64; e += kSelectThreads) {
          const int tl = e >> 6, key = e & 63;
          const int r_begin = max(tl * G, c * 64), r_end = min(min((tl + 1) * G, c * 64 + 64), nrows);
          if (r_begin >= r_end) continue;
          float sum = c == 0 || r_begin == tl * G ? 0.f : sPg[e];
          for (int r = r_begin; r < r_end; ++r) sum += sP[(r - c * 64) * kPS + key];
          sPg[e] = sum;
        }
        __syncthreads();
      }
      // 2b. Eq. 9: blocks overlapped by tokens i0 .. i1-1.
      const TileBlocks blocks = tile_blocks(div_bm, i0, i1, bq);
      const int j_hi = min(blocks.hi, t_hi / ls);
      const int nj = j_hi - blocks.lo + 1;
      for (int e = tid; e < nt * nj; e += kSelectThreads) {
        const int tl = e / nj, j = blocks.lo + e % nj;
        sBS[tl * NBs + j] += block_tile_sum(sPg + tl * 64, j, i0, i1, bm, bq);
      }
      __syncthreads();
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  pick_blocks();
}

}  // namespace nsa::cuda_detail
