// Block scoring and top-n, fused (Eqs. 8-12), without any [T, Tc] or [T, T/l'] tensor in global
// memory.
//
// A CTA (4 warps) owns P = max(1, 64 / G) consecutive positions t0 .. t0+P-1 of one (sequence,
// kv head) with all G query heads of the group: P*G rows, in ceil(P*G / 64) chunks of 64. It
// streams the visible compressed keys in tiles of 64 (cp.async double buffer) and for each tile:
//   1. S = Q K_cmp^T on the tensor cores (mma.sync), p = 2^(S*scale*log2e - lse_cmp*log2e) with the
//      cmp branch's lse (written by the cmp kernel), 0 where the token is not visible (Eq. 8);
//   2. the sum over the G heads of each position (Eq. 10), then the Eq. 9 overlap weights
//      accumulate block scores in a small ring of W slots per position (a block needs the
//      compressed tokens first_cmp_in_block(j) .. last_cmp_in_block(j), which may straddle tiles);
//   3. blocks no later tile can touch are final: the eligible, non-forced ones are merged into a
//      per-position top-n list in shared memory (rank-based merge: each element counts who beats
//      it; ties go to the lower block index, so an older list entry beats an equal newcomer).
// At the end the forced blocks (initial, local) plus the best free ones are written sorted
// ascending and -1 padded to block_indices. Scores are fp32; the reference's are fp64, so the
// choice may differ where scores tie within rounding (DESIGN.md section 2).
#pragma once

#include "cuda/attention.cuh"
#include "cuda/common.cuh"

namespace nsa::cuda_detail {

inline constexpr int kSelectThreads = 128;

template <class T, int Dk>
__global__ void __launch_bounds__(kSelectThreads, 1) select_kernel(const ForwardArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int b = blockIdx.z, kv_head = blockIdx.y;
  const SeqInfo seq = seq_info(a, b);
  const int G = a.group, tpc = a.select_t_per_cta, chunks = a.select_chunks, W = a.score_ring;
  const int n = a.num_selected, ls = a.sel_block, lc = a.cmp_block, dc = a.cmp_stride;
  const int t0 = blockIdx.x * tpc;
  if (t0 >= seq.len) return;  // uniform over the CTA
  const int nt = static_cast<int>(min64(tpc, seq.len - t0));
  const int t_hi = t0 + nt - 1, nrows = nt * G;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, group = lane >> 2, tig = lane & 3;
  constexpr int kPS = SelectSmem::kPStride;

  // Shared memory, in SelectSmem::bytes order.
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + int64_t{chunks} * 64 * (Dk + 8);
  float* sP = reinterpret_cast<float*>(sK + 2 * 64 * (Dk + 8));
  float* sPg = sP + 64 * kPS;
  float* sRing = sPg + tpc * 64;
  float* sLse2 = sRing + tpc * W;
  float* const sScores = sLse2 + chunks * 64;                         // [2][tpc][n]
  int* const sBlocks = reinterpret_cast<int*>(sScores + 2 * tpc * n);  // [2][tpc][n]
  int* const sCount = sBlocks + 2 * tpc * n;
  const int list_elems = tpc * n;

  // Q rows r -> (tl, g) = (r / G, r % G), zero past nrows; lse of the cmp branch in log2 units.
  constexpr float kLog2e = 1.4426950408889634f;
  {
    const T* qbase = seq_head_ptr<T>(a.q, a, b, seq.row0, kv_head * G);
    constexpr int kChunks = Dk / 8;
    for (int idx = tid; idx < chunks * 64 * kChunks; idx += kSelectThreads) {
      const int r = idx / kChunks, c = idx % kChunks;
      const bool valid = r < nrows;
      const T* src = valid ? qbase + int64_t{t0 + r / G} * a.q.seq_stride + int64_t{r % G} * a.q.head_stride + c * 8
                           : qbase;
      cp_async_16(sQ + r * (Dk + 8) + c * 8, src, valid);
    }
    cp_async_commit();
    for (int r = tid; r < chunks * 64; r += kSelectThreads) {
      float v = neg_inf();
      if (r < nrows) {
        const int64_t grow = seq.row0 + t0 + r / G;
        v = a.lse[(grow * a.num_q_heads + kv_head * G + r % G) * 3 + 0] * kLog2e;
      }
      sLse2[r] = v;
    }
    for (int e = tid; e < tpc * W; e += kSelectThreads) sRing[e] = 0.f;
    for (int e = tid; e < tpc; e += kSelectThreads) sCount[e] = 0;
    __syncthreads();
  }

  int cur = 0;  // which list buffer is current (uniform)
  // Merges the final blocks ja .. jb-1 (jb - ja <= W) into every position's top-n list.
  auto finalize = [&](int ja, int jb) {
    const int C = jb - ja;
    const int span = n + C;
    for (int e = tid; e < nt * span; e += kSelectThreads) {
      const int tl = e / span, x = e % span;
      const int last = (t0 + tl) / ls;
      const int cnt = sCount[tl];
      const float* sc = sScores + cur * list_elems + tl * n;
      const int* bl = sBlocks + cur * list_elems + tl * n;
      const float* ring = sRing + tl * W;
      float score;
      int block, rank;
      if (x < n) {  // an existing entry keeps its order; newcomers that beat it push it down
        if (x >= cnt) continue;
        score = sc[x];
        block = bl[x];
        rank = x;
        for (int c = 0; c < C; ++c) {
          const int j = ja + c;
          if (j <= last && !is_forced(j, last, a.num_init, a.num_local) && ring[j % W] > score) ++rank;
        }
      } else {  // a newcomer: beaten by entries with score >= its own, and by better newcomers
        const int c = x - n;
        block = ja + c;
        if (block > last || is_forced(block, last, a.num_init, a.num_local)) continue;
        score = ring[block % W];
        rank = 0;
        for (int y = 0; y < cnt; ++y) rank += sc[y] >= score;
        for (int c2 = 0; c2 < C; ++c2) {
          const int j = ja + c2;
          if (j <= last && !is_forced(j, last, a.num_init, a.num_local)) {
            const float s2 = ring[j % W];
            rank += s2 > score || (s2 == score && c2 < c);
          }
        }
      }
      if (rank < n) {
        sScores[(cur ^ 1) * list_elems + tl * n + rank] = score;
        sBlocks[(cur ^ 1) * list_elems + tl * n + rank] = block;
      }
    }
    __syncthreads();
    for (int tl = tid; tl < nt; tl += kSelectThreads) {
      const int last = (t0 + tl) / ls;
      int added = 0;
      for (int j = ja; j < jb; ++j) added += j <= last && !is_forced(j, last, a.num_init, a.num_local);
      sCount[tl] = min(n, sCount[tl] + added);
    }
    for (int e = tid; e < nt * C; e += kSelectThreads) sRing[(e / C) * W + (ja + e % C) % W] = 0.f;
    cur ^= 1;
    __syncthreads();
  };

  const int nk = num_visible_cmp(t_hi, lc, dc);
  const int num_tiles = (nk + 63) / 64;
  const T* kbase = seq_head_ptr<T>(a.k_cmp, a, b, seq.cmp_row0, kv_head);
  auto issue = [&](int k) {
    load_rows_async<T, Dk, 64, kSelectThreads>(sK + (k & 1) * 64 * (Dk + 8), kbase, a.k_cmp.seq_stride,
                                               k * 64, min(64, nk - k * 64), tid);
    cp_async_commit();
  };
  if (num_tiles > 0) issue(0);
  int j_done = 0;  // blocks < j_done are merged
  for (int k = 0; k < num_tiles; ++k) {
    if (k + 1 < num_tiles) {
      issue(k + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    for (int e = tid; e < nt * 64; e += kSelectThreads) sPg[e] = 0.f;
    __syncthreads();
    const int i0 = k * 64, i1 = min(i0 + 64, nk);
    const T* tk = sK + (k & 1) * 64 * (Dk + 8);

    for (int c = 0; c < chunks; ++c) {
      // 1. Probabilities of the chunk's rows.
      QInRegisters<T, Dk> qf;
      qf.load(sQ, c * 64 + warp * 16);
      float s[8][4];
      qk_tile<T, Dk>(qf, tk, s);
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int lr = warp * 16 + group + 8 * (e >> 1);  // row within the chunk
          const int r = c * 64 + lr, key = nb * 8 + tig * 2 + (e & 1);
          float p = 0.f;
          if (r < nrows && i0 + key < num_visible_cmp(t0 + r / G, lc, dc))
            p = fast_exp2(s[nb][e] * a.scale_log2 - sLse2[r]);
          sP[lr * kPS + key] = p;
        }
      __syncthreads();
      // 2a. Sum over the heads of each position (rows tl*G .. tl*G+G-1), in head order.
      for (int e = tid; e < nt * 64; e += kSelectThreads) {
        const int tl = e >> 6, key = e & 63;
        const int r_begin = max(tl * G, c * 64), r_end = min(min((tl + 1) * G, c * 64 + 64), nrows);
        if (r_begin >= r_end) continue;
        float sum = 0.f;
        for (int r = r_begin; r < r_end; ++r) sum += sP[(r - c * 64) * kPS + key];
        sPg[e] += sum;
      }
      __syncthreads();
    }

    // 2b. Eq. 9: blocks overlapped by tokens i0 .. i1-1.
    const int j_lo = i0 * dc / ls;
    const int j_hi = min(((i1 - 1) * dc + lc - 1) / ls, t_hi / ls);
    const int nj = j_hi - j_lo + 1;
    for (int e = tid; e < nt * nj; e += kSelectThreads) {
      const int tl = e / nj, j = j_lo + e % nj;
      const int first = j * ls - lc < 0 ? 0 : (j * ls - lc) / dc + 1;
      const int last_i = ((j + 1) * ls - 1) / dc;
      const int ia = max(first, i0), ib = min(last_i, i1 - 1);
      float sum = 0.f;
      for (int i = ia; i <= ib; ++i) sum += static_cast<float>(overlap_weight(i, j, lc, dc, ls)) * sPg[tl * 64 + i - i0];
      sRing[tl * W + j % W] += sum;
    }
    __syncthreads();

    // 3. Blocks before the one holding raw token i1*d get nothing from later tiles.
    const int j_new = min(i1 * dc / ls, t_hi / ls + 1);
    if (j_new > j_done) {
      finalize(j_done, j_new);
      j_done = j_new;
    }
  }
  cp_async_wait<0>();  // no copy left in flight (Q when there was no tile)
  // Remaining eligible blocks (partial or zero scores), W at a time.
  const int last_hi = t_hi / ls;
  while (j_done <= last_hi) {
    const int jb = min(j_done + W, last_hi + 1);
    finalize(j_done, jb);
    j_done = jb;
  }

  // Forced blocks plus the best free ones, ascending, -1 padded.
  for (int tl = tid; tl < nt; tl += kSelectThreads) {
    const int t = t0 + tl, last = t / ls, eligible = last + 1;
    int* sel = sBlocks + (cur ^ 1) * list_elems + tl * n;  // scratch
    int k = 0;
    for (int j = 0; j < min(a.num_init, eligible); ++j) sel[k++] = j;
    for (int j = max(a.num_init, eligible - a.num_local); j < eligible; ++j) sel[k++] = j;
    const int take = min(sCount[tl], n - k);
    for (int x = 0; x < take; ++x) sel[k++] = sBlocks[cur * list_elems + tl * n + x];
    for (int x = 1; x < k; ++x) {  // insertion sort, k <= n
      const int v = sel[x];
      int y = x - 1;
      while (y >= 0 && sel[y] > v) {
        sel[y + 1] = sel[y];
        --y;
      }
      sel[y + 1] = v;
    }
    int32_t* out = a.block_indices + ((seq.row0 + t) * a.num_kv_heads + kv_head) * n;
    for (int x = 0; x < n; ++x) out[x] = x < k ? sel[x] : -1;
  }
}

}  // namespace nsa::cuda_detail
