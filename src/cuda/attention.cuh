// The tile attention kernel: FlashAttention-2 style, tensor cores (mma.sync m16n8k16, or on sm_90a
// wgmma for the cmp and win sweeps; bf16/fp16 in, fp32 accumulation, online softmax in the exp2
// domain) for the three NSA branches.
//
// Rows. A CTA (W warpgroups of 4 warps, 16 rows each: kAttnWarpgroups, three for the prefill cmp
// and win sweeps at Dk >= 128 on sm_90a, else one) owns 64 W consecutive rows of the flattened
// (t, g) space of one (sequence, kv head): row R = t * G + g reads query head kv_head * G + g. So
// the G heads of a group share every K/V tile the CTA loads (any G >= 1), and the CTA covers the
// positions t_lo .. t_hi (64 W / G of them when G <= 64 W, a part of one position's heads when
// G is larger).
//
// Keys come in tiles of 64 rows, loaded with cp.async into a double buffer. Which tiles and
// which (row, key) pairs are valid is the branch's business (the *Tiles structs below):
//   cmp: compressed tokens 0 .. N(t_hi)-1, valid iff i < N(t) (visible: i*d + l - 1 <= t);
//   win: raw keys max(0, t_lo - w + 1) .. t_hi, valid iff t - w < s <= t;
//   slc: the union of the blocks selected for t_lo .. t_hi (built in shared memory from
//        block_indices), valid iff the row's position selected the block and s <= t.
//
// One kernel per branch (kBranch), each one sweep, launched in this order after selection:
//   cmp: writes o_cmp (out_branch slot 0, or the workspace) and lse[0];
//   slc: writes o_slc (out_branch slot 1, or the workspace) and lse[1];
//   win: the window branch, then the gated combine (Eq. 5) of the dtype-rounded branch outputs
//        (o_cmp and o_slc read back) in its epilogue; writes out, out_branch slot 2 and lse[2].
#pragma once

#include "cuda/common.cuh"
#include "cuda/decode_merge.cuh"
#include "cuda/kv_tensor_maps.h"
#include "cuda/wgmma.cuh"
#include "nsa/params.h"

namespace nsa::cuda_detail {

inline constexpr int kAttnThreads = 128;

// One of the thread's two rows (group and group + 8 of its warp's 16).
struct RowState {
  int t;     // position in the sequence, -1 past the sequence end (query row: t - SeqInfo::pos0)
  int tl;    // t - t_lo: the row's bit in the slc masks
  int nvis;  // compressed tokens visible to t
  int head;  // query head
};

// A tile is masked element by element unless every row of the warp sees every key of it
// (softmax_tile). That test evaluates valid() itself, at the warp's first and last keys: v0's
// shortcut, `full = count == 64 && ...`, was evaluated as true for tiles with count < 64 by the
// compiled code on sm_90 / nvcc 13.0 (docs/decisions/0001-cuda-forward-v0.md).
struct TileInfo {
  int key0;       // first key of the tile (position within the branch's key sequence)
  int count;      // keys of the tile that exist (rows >= count are zero-filled)
  uint64_t rows;  // slc: positions (bits tl) that selected the tile's block
};

// key_end (each tile set): the sequence's keys end there (exclusive; for cmp its compressed keys).
// A TMA ring copies the tiles that lie before it whole (sweep_tma_ring).
struct CmpTiles {
  int num_keys;  // N(t_hi)
  int key_end;   // N(the sequence's last position)
  __device__ int num_tiles() const { return (num_keys + 63) / 64; }
  __device__ TileInfo info(int k) const {
    TileInfo ti;
    ti.key0 = k * 64;
    ti.count = min(64, num_keys - k * 64);
    ti.rows = 0;
    return ti;
  }
  __device__ bool valid(const TileInfo& ti, const RowState& r, int key) const {
    return r.t >= 0 && ti.key0 + key < r.nvis;
  }
  __device__ bool warp_skips(const TileInfo&, uint64_t) const { return false; }
};

struct WinTiles {
  int lo;  // max(0, t_lo - w + 1)
  int t_hi;
  int window;  // clamped to the key extent on the host
  int key_end;
  __device__ int num_tiles() const { return (t_hi + 1 - lo + 63) / 64; }
  __device__ TileInfo info(int k) const {
    TileInfo ti;
    ti.key0 = lo + k * 64;
    ti.count = min(64, t_hi + 1 - ti.key0);
    ti.rows = 0;
    return ti;
  }
  __device__ bool valid(const TileInfo& ti, const RowState& r, int key) const {
    const int s = ti.key0 + key;
    return r.t >= 0 && s <= r.t && s > r.t - window;
  }
  __device__ bool warp_skips(const TileInfo&, uint64_t) const { return false; }
};

struct SlcTiles {
  const int* blocks;       // union of selected blocks, ascending (shared memory)
  const uint64_t* masks;   // per union entry: bit tl set iff position t_lo + tl selected it
  int num_blocks;          // union size
  int chunks_per_block;    // ceil(l' / 64)
  int sel_block;           // l'
  int t_hi;
  int key_end;
  __device__ int num_tiles() const { return num_blocks * chunks_per_block; }
  __device__ TileInfo info(int k) const {
    // (l' = 64, the usual block, without the integer division: about 5% of the TMA ring's stall
    // samples sat in it at l' = 64, ncu on an H100.)
    const int u = chunks_per_block == 1 ? k : k / chunks_per_block, c = k - u * chunks_per_block;
    TileInfo ti;
    ti.key0 = blocks[u] * sel_block + c * 64;
    ti.count = max(0, min(64, min(sel_block - c * 64, t_hi + 1 - ti.key0)));
    ti.rows = masks[u];
    return ti;
  }
  __device__ bool valid(const TileInfo& ti, const RowState& r, int key) const {
    return r.t >= 0 && key < ti.count && ti.key0 + key <= r.t && ((ti.rows >> r.tl) & 1u);
  }
  // No position of the warp's rows selected the tile's block: the warp leaves it to the others
  // (its rows would mask every key), so with G >= 16 a warp computes only its own selection. Only
  // where the warps multiply on their own (MmaSyncTiles); with wgmma every warp takes every tile.
  __device__ bool warp_skips(const TileInfo& ti, uint64_t warp_positions) const {
    return (ti.rows & warp_positions) == 0;
  }
};

// The key tiles begin .. begin+count-1 of a branch's tile set: one split of the decode path.
template <class Tiles>
struct SplitTiles {
  Tiles all;
  int begin, count;
  __device__ int num_tiles() const { return count; }
  __device__ TileInfo info(int k) const { return all.info(begin + k); }
  __device__ bool valid(const TileInfo& ti, const RowState& r, int key) const { return all.valid(ti, r, key); }
  __device__ bool warp_skips(const TileInfo& ti, uint64_t warp_positions) const {
    return all.warp_skips(ti, warp_positions);
  }
};

// Split `split` of `num_splits` of a tile set (consecutive, near-equal ranges; may be empty).
template <class Tiles>
__device__ __forceinline__ SplitTiles<Tiles> split_tiles(const Tiles& tiles, int split, int num_splits) {
  const int n = tiles.num_tiles(), per = (n + num_splits - 1) / num_splits;
  const int begin = min(n, split * per);
  return SplitTiles<Tiles>{tiles, begin, min(per, n - begin)};
}

// Where softmax_tile hands each tile's masked scaled scores (S[NB][4] in C-fragment layout, -inf
// where a row does not see a key; key0: the absolute key of the warp's first column): nowhere
// (prefill), or the decode path's cmp score buffer.
struct NoScoreSink {
  template <int NB>
  __device__ void operator()(const float (&)[NB][4], int) const {}
};

// A fragment (k-step ks) of the warp's 16 query rows starting at row `row0` of a shared-memory
// [*][Dk+8] tile.
template <class T, int Dk>
__device__ __forceinline__ void load_q_fragment(uint32_t (&a)[4], const T* tile, int row0, int ks) {
  const int lane = threadIdx.x & 31;
  const int row = row0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int dim = ks * 16 + (lane >> 4) * 8;
  ldmatrix_x4(a, tile + row * (Dk + 8) + dim);
}

// The warp's Q fragments, loaded once from the Q tile (its shared memory is free afterwards).
template <class T, int Dk>
struct QInRegisters {
  uint32_t f[Dk / 16][4];
  __device__ __forceinline__ void load(const T* tile, int row0) {
#pragma unroll
    for (int ks = 0; ks < Dk / 16; ++ks) load_q_fragment<T, Dk>(f[ks], tile, row0, ks);
  }
  __device__ __forceinline__ void fragment(int ks, uint32_t (&a)[4]) const {
#pragma unroll
    for (int e = 0; e < 4; ++e) a[e] = f[ks][e];
  }
};

// The CTA's Q tile, kept in shared memory in wgmma's swizzled layout (WgmmaTiles reads it through
// descriptors; no Q registers).
template <class T>
struct QInSharedMemory {
  const T* tile;
  __device__ __forceinline__ void load(const T* q_tile, int) { tile = q_tile; }
};

// Element offset of (row, column `dim`, a multiple of 8) in a shared-memory tile read by ldmatrix:
// padded [*][D+8], or kSwizzled a 64-row tile in the 128-byte swizzle (tile_chunk_offset).
template <int D, bool kSwizzled>
__device__ __forceinline__ int ldmatrix_offset(int row, int dim) {
  if constexpr (kSwizzled) return tile_chunk_offset<D, 64, true>(row, dim >> 3);
  else return row * (D + 8) + dim;
}

// S = A B^T for the warp's 16 rows of A (a fragment source: Q, or dO, or in the backward K / V)
// and the NB * 8 rows of a shared-memory tile B ([NB*8][D+8]: K, V, or in the backward Q / dO; or
// kSwizzled a whole swizzled 64-row tile).
template <class T, int D, int NB = 8, bool kSwizzled = false, class Source>
__device__ __forceinline__ void qk_tile(const Source& src, const T* tile, float (&s)[NB][4]) {
  static_assert(NB % 2 == 0, "n-blocks come in pairs");
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nb][e] = 0.f;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t a[4];
    src.fragment(ks, a);
#pragma unroll
    for (int nb = 0; nb < NB; nb += 2) {
      uint32_t b[4];
      const int key = nb * 8 + (lane & 7) + (lane >> 4) * 8;
      const int dim = ks * 16 + ((lane >> 3) & 1) * 8;
      ldmatrix_x4(b, tile + ldmatrix_offset<D, kSwizzled>(key, dim));
      TypeTraits<T>::mma(s[nb], a, b[0], b[1]);
      TypeTraits<T>::mma(s[nb + 1], a, b[2], b[3]);
    }
  }
}

// acc += P X for the warp's 16 rows: P is a C-fragment tile [16][NB*8] in registers (rounded to
// T here: the tensor cores take 16-bit operands), X a shared-memory tile [NB*8][D+8] (kSwizzled: a
// whole swizzled 64-row tile). The forward's P V; the backward's dS K, P^T dO and dS^T Q.
template <class T, int D, int NB = 8, bool kSwizzled = false>
__device__ __forceinline__ void accumulate_ptile(float (&acc)[D / 8][4], const float (&p)[NB][4], const T* tile) {
  using Tr = TypeTraits<T>;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int kk = 0; kk < NB / 2; ++kk) {
    const uint32_t a[4] = {Tr::pack(p[2 * kk][0], p[2 * kk][1]), Tr::pack(p[2 * kk][2], p[2 * kk][3]),
                           Tr::pack(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                           Tr::pack(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int nb = 0; nb < D / 8; nb += 2) {
      uint32_t b[4];
      const int key = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
      const int dim = nb * 8 + (lane >> 4) * 8;
      ldmatrix_x4_trans(b, tile + ldmatrix_offset<D, kSwizzled>(key, dim));
      Tr::mma(acc[nb], a, b[0], b[1]);
      Tr::mma(acc[nb + 1], a, b[2], b[3]);
    }
  }
}

// How a sweep multiplies its rows with the shared-memory K and V tiles. MmaSyncTiles: each warp on
// its own 16 rows (ldmatrix + mma.sync, padded tiles; every architecture), so a warp may skip a
// tile its rows do not see (kEveryWarp false); MmaSyncTilesT<true> reads whole swizzled tiles (the
// TMA slc sweep's). WgmmaTiles: a warpgroup's 64 rows at once (wgmma,
// swizzled tiles; sm_90a), which every warp of the warpgroup must issue together, so every warp takes
// every tile, whole (NB = 8, key0 = 0): the prefill's cmp and win sweeps (and slc at Dk = 64:
// prefill_sweep_wgmma), the selection kernel's scores, the backward's dq kernel and dK / dV kernel.
template <bool kSwizzledTiles>
struct MmaSyncTilesT {
  static constexpr bool kSwizzled = kSwizzledTiles, kEveryWarp = false, kGroups = false;
  template <class T, int Dk, int NB, class QSource>
  static __device__ __forceinline__ void scores(const QSource& qf, const T* tk, int key0, float (&s)[NB][4]) {
    static_assert(!kSwizzled || NB == 8, "swizzled: whole 64-key tiles");
    qk_tile<T, Dk, NB, kSwizzled>(qf, kSwizzled ? tk : tk + key0 * (Dk + 8), s);
  }
  template <class T, int Dv, int NB>
  static __device__ __forceinline__ void accumulate(float (&acc)[Dv / 8][4], const float (&p)[NB][4], const T* tv,
                                                    int key0) {
    accumulate_ptile<T, Dv, NB, kSwizzled>(acc, p, kSwizzled ? tv : tv + key0 * (Dv + 8));
  }
  // The pipelined form of scores (WgmmaTiles'): mma.sync has finished when it returns.
  template <class T, int Dk, class QSource>
  static __device__ __forceinline__ void scores_async(const QSource& qf, const T* tk, float (&s)[8][4]) {
    scores<T, Dk, 8>(qf, tk, 0, s);
  }
  static __device__ __forceinline__ void wait_scores(float (&)[8][4]) {}
};
using MmaSyncTiles = MmaSyncTilesT<false>;

struct WgmmaTiles {
  static constexpr bool kSwizzled = true, kEveryWarp = true, kGroups = true;
  static constexpr uint32_t kAtomBytes = 8 * 128;     // 8 rows of 128 bytes
  static constexpr uint32_t kPartBytes = 64 * 128;    // 64 rows of 64 elements
  // S = Q K^T, both from shared memory (issue_scores). Q comes from shared memory, not registers:
  // with the loop-invariant Q fragments as the register operand, ptxas (CUDA 13.0) gave the P
  // fragments of the same tile those registers at Dk = 64 (the PV HGMMA read the registers LDSM had
  // loaded Q into), and fresh per-tile copies serialized the HGMMAs at Dk = 128.
  template <class T, int Dk, int NB>
  static __device__ __forceinline__ void scores(const QInSharedMemory<T>& qs, const T* tk, int, float (&s)[NB][4]) {
    static_assert(NB == 8, "whole 64-key tiles");
    one_group([&] { issue_scores<T, Dk>(qs, tk, s); }, s);
  }
  // S = Q K^T as one group, issued without waiting: s is written by the tensor cores until
  // wait_scores(s), and nothing that reads or writes it may run before.
  template <class T, int Dk>
  static __device__ __forceinline__ void scores_async(const QInSharedMemory<T>& qs, const T* tk, float (&s)[8][4]) {
    wgmma_pin(s);
    wgmma_fence();
    issue_scores<T, Dk>(qs, tk, s);
    wgmma_commit();
  }
  static __device__ __forceinline__ void wait_scores(float (&s)[8][4]) {
    wgmma_wait<0>();
    wgmma_pin(s);
  }
  // O += P V, P from registers (issue_accumulate).
  template <class T, int Dv, int NB>
  static __device__ __forceinline__ void accumulate(float (&acc)[Dv / 8][4], const float (&p)[NB][4], const T* tv,
                                                    int) {
    static_assert(NB == 8, "whole 64-key tiles");
    uint32_t a[NB / 2][4];
    pack_p<T>(p, a);
    one_group([&] { issue_accumulate<T, Dv>(acc, a, tv); }, acc);
  }
  // Two independent products as one wgmma group (scores_pair / accumulate_pair below).
  template <class T, int Da, int Db, int NB>
  static __device__ __forceinline__ void scores_one_group(const QInSharedMemory<T>& qa, const T* ta,
                                                          float (&sa)[NB][4], const QInSharedMemory<T>& qb,
                                                          const T* tb, float (&sb)[NB][4]) {
    static_assert(NB == 8, "whole 64-key tiles");
    const auto issue = [&] {
      issue_scores<T, Da>(qa, ta, sa);
      issue_scores<T, Db>(qb, tb, sb);
    };
    one_group(issue, sa, sb);
  }
  template <class T, int Da, int Db, int NB>
  static __device__ __forceinline__ void accumulate_one_group(float (&acc_a)[Da / 8][4], const float (&pa)[NB][4],
                                                              const T* ta, float (&acc_b)[Db / 8][4],
                                                              const float (&pb)[NB][4], const T* tb) {
    static_assert(NB == 8, "whole 64-key tiles");
    uint32_t a[NB / 2][4], b[NB / 2][4];
    pack_p<T>(pa, a);
    pack_p<T>(pb, b);
    const auto issue = [&] {
      issue_accumulate<T, Da>(acc_a, a, ta);
      issue_accumulate<T, Db>(acc_b, b, tb);
    };
    one_group(issue, acc_a, acc_b);
  }
  // acc = A B for the warpgroup's 64 rows, both operands stored k-row by k-row in swizzled 64-row
  // tiles: a_t [64 k][64 m] (the backward's dS^T, written to shared memory by the key-major kernel)
  // and b [64 k][D n] (its K tile): the key-major dq = dS K. Overwrites acc.
  template <class T, int D>
  static __device__ __forceinline__ void product_of_transposed(float (&acc)[D / 8][4], const T* a_t, const T* b) {
    static_assert(D == 64 || D == 128, "one or two 64-column parts");
    const uint64_t a_desc = wgmma_desc(a_t, kPartBytes, kAtomBytes), b_desc = wgmma_desc(b, kPartBytes, kAtomBytes);
    const auto issue = [&] {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        constexpr uint32_t kStepBytes = 16 * 64 * sizeof(T);  // 16 k rows of 64 elements
        const uint64_t a_step = wgmma_desc_advance(a_desc, kk * kStepBytes);
        const uint64_t b_step = wgmma_desc_advance(b_desc, kk * kStepBytes);
        wgmma_m64n64k16_ss<T, true, true, 0>(acc, a_step, b_step, kk > 0);
        if constexpr (D == 128)
          wgmma_m64n64k16_ss<T, true, true, 8>(acc, a_step, wgmma_desc_advance(b_step, kPartBytes), kk > 0);
      }
    };
    one_group(issue, acc);
  }

 private:
  // Runs `issue` (wgmma instructions writing `outputs`) as one group: fence, issue, commit, wait,
  // with the output registers pinned on both sides so that the compiler moves no access to them
  // across the asynchronous products.
  template <class Issue, class... Outputs>
  static __device__ __forceinline__ void one_group(const Issue& issue, Outputs&... outputs) {
    (wgmma_pin(outputs), ...);
    wgmma_fence();
    issue();
    wgmma_commit();
    wgmma_wait<0>();
    (wgmma_pin(outputs), ...);
  }
  // S = Q K^T, both from shared memory: the k-step ks reads columns 16 ks .. 16 ks + 15 of the Q
  // and K tiles, 32 bytes into the swizzle atoms of their part ks / 4. Issues only.
  template <class T, int Dk>
  static __device__ __forceinline__ void issue_scores(const QInSharedMemory<T>& qs, const T* tk, float (&s)[8][4]) {
    const uint64_t q_desc = wgmma_desc(qs.tile, 0, kAtomBytes), k_desc = wgmma_desc(tk, 0, kAtomBytes);
#pragma unroll
    for (int ks = 0; ks < Dk / 16; ++ks) {
      const uint32_t offset_bytes = ((ks / 4) * 64 * 64 + (ks % 4) * 16) * sizeof(T);
      wgmma_m64n64k16_ss<T>(s, wgmma_desc_advance(q_desc, offset_bytes), wgmma_desc_advance(k_desc, offset_bytes),
                            ks > 0);
    }
  }
  // P (fp32 C fragments) -> the bf16 / f16 A fragments of its four 16-key k-steps.
  template <class T>
  static __device__ __forceinline__ void pack_p(const float (&p)[8][4], uint32_t (&a)[4][4]) {
    using Tr = TypeTraits<T>;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      a[kk][0] = Tr::pack(p[2 * kk][0], p[2 * kk][1]);
      a[kk][1] = Tr::pack(p[2 * kk][2], p[2 * kk][3]);
      a[kk][2] = Tr::pack(p[2 * kk + 1][0], p[2 * kk + 1][1]);
      a[kk][3] = Tr::pack(p[2 * kk + 1][2], p[2 * kk + 1][3]);
      wgmma_pin(a[kk]);
    }
  }
  // acc += P V with P's A fragments a: the k-step kk reads keys 16 kk .. 16 kk + 15 (two atoms) of
  // the V tile, transposed; one instruction per 64 columns of acc. Issues only.
  template <class T, int Dv>
  static __device__ __forceinline__ void issue_accumulate(float (&acc)[Dv / 8][4], const uint32_t (&a)[4][4],
                                                          const T* tv) {
    static_assert(Dv == 64 || Dv == 128, "one or two 64-column parts");
    const uint64_t v_desc = wgmma_desc(tv, kPartBytes, kAtomBytes);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint64_t rows = wgmma_desc_advance(v_desc, kk * 16 * 64 * sizeof(T));  // keys 16 kk ..
      wgmma_m64n64k16<T, true, 0>(acc, a[kk], rows, true);
      if constexpr (Dv == 128) wgmma_m64n64k16<T, true, 8>(acc, a[kk], wgmma_desc_advance(rows, kPartBytes), true);
    }
  }
};

// Two independent products of one tile (the backward's S and dP, dV and dK): with kOneGroup on
// wgmma as one group (the second runs while the first drains, where two groups wait for each in
// turn; it holds both products' registers at once, which decides where it pays: backward.cuh,
// kBackwardPairedProducts), otherwise one after the other.
template <class Mma, class T, int Da, int Db, int NB, bool kOneGroup, class SourceA, class SourceB>
__device__ __forceinline__ void scores_pair(const SourceA& qa, const T* ta, float (&sa)[NB][4], const SourceB& qb,
                                            const T* tb, float (&sb)[NB][4]) {
  if constexpr (kOneGroup && Mma::kGroups) {
    Mma::template scores_one_group<T, Da, Db, NB>(qa, ta, sa, qb, tb, sb);
  } else {
    Mma::template scores<T, Da, NB>(qa, ta, 0, sa);
    Mma::template scores<T, Db, NB>(qb, tb, 0, sb);
  }
}
template <class Mma, class T, int Da, int Db, int NB, bool kOneGroup>
__device__ __forceinline__ void accumulate_pair(float (&acc_a)[Da / 8][4], const float (&pa)[NB][4], const T* ta,
                                                float (&acc_b)[Db / 8][4], const float (&pb)[NB][4], const T* tb) {
  if constexpr (kOneGroup && Mma::kGroups) {
    Mma::template accumulate_one_group<T, Da, Db, NB>(acc_a, pa, ta, acc_b, pb, tb);
  } else {
    Mma::template accumulate<T, Da, NB>(acc_a, pa, ta, 0);
    Mma::template accumulate<T, Db, NB>(acc_b, pb, tb, 0);
  }
}

// One key tile of a sweep for the warp's 16 rows: S = Q K^T, mask, online softmax, O += P V. The
// warp takes the NB * 8 keys key0 .. key0 + NB*8 - 1 of the 64-key tile (all of them, or a quarter
// when the warps of a decode CTA share its 16 rows).
template <class T, int Dk, int Dv, int NB = 8, class Mma = MmaSyncTiles, class Tiles, class QSource,
          class ScoreSink = NoScoreSink>
__device__ __forceinline__ void softmax_tile(const Tiles& tiles, const TileInfo& ti, const T* tk, const T* tv,
                                             const QSource& qf, float scale_log2, const RowState (&rows)[2],
                                             float (&acc)[Dv / 8][4], float (&m)[2], float (&l)[2],
                                             const ScoreSink& sink = {}, int key0 = 0) {
  const int lane = threadIdx.x & 31, tig = lane & 3;
  float s[NB][4];
  Mma::template scores<T, Dk, NB>(qf, tk, key0, s);
  // The keys a row sees form an interval (in every branch), so a warp whose rows all see its first
  // and its last key sees all of them and skips the per-element mask. On an H100 (paper config)
  // this took the slc kernel from 2.80 to 2.54 ms at 8k and from 28.9 to 26.7 ms at 64k; the
  // same test in the backward's dq tiles slowed them (docs/decisions/0003). Two loops, not one with
  // `all_valid || valid()`: a form that folded them (a lambda over the masked flag) measured slower.
  const int last = key0 + NB * 8 - 1;
  const bool all_valid = __all_sync(0xffffffffu, tiles.valid(ti, rows[0], key0) && tiles.valid(ti, rows[0], last) &&
                                                     tiles.valid(ti, rows[1], key0) && tiles.valid(ti, rows[1], last));
  if (all_valid) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nb][e] *= scale_log2;
  } else {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + nb * 8 + tig * 2 + (e & 1);
        s[nb][e] = tiles.valid(ti, rows[e >> 1], key) ? s[nb][e] * scale_log2 : neg_inf();
      }
  }
  sink(s, ti.key0 + key0);

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = neg_inf();
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * r], s[nb][2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m[r], mx);
    const float m_use = m_new == neg_inf() ? 0.f : m_new;
    const float alpha = fast_exp2(m[r] - m_use);
    m[r] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      s[nb][2 * r] = fast_exp2(s[nb][2 * r] - m_use);
      s[nb][2 * r + 1] = fast_exp2(s[nb][2 * r + 1] - m_use);
      sum += s[nb][2 * r] + s[nb][2 * r + 1];
    }
    l[r] = l[r] * alpha + sum;
#pragma unroll
    for (int nb = 0; nb < Dv / 8; ++nb) {
      acc[nb][2 * r] *= alpha;
      acc[nb][2 * r + 1] *= alpha;
    }
  }

  Mma::template accumulate<T, Dv, NB>(acc, s, tv, key0);
}

// Adds the key rows of a CTA's tiles to *keys_read (optional: ForwardArgs::tokens_read).
template <class Tiles>
__device__ __forceinline__ void count_keys_read(const Tiles& tiles, int64_t* keys_read) {
  if (keys_read == nullptr || threadIdx.x != 0) return;
  long long keys = 0;
  for (int k = 0; k < tiles.num_tiles(); ++k) keys += tiles.info(k).count;
  if (keys > 0) atomicAdd(reinterpret_cast<unsigned long long*>(keys_read), static_cast<unsigned long long>(keys));
}

// The key-tile loop of a branch: tiles k = 0 .. num_tiles-1 of K ([*, Dk], row stride kstride)
// and V are loaded into the Stages-deep ring buffers sK / sV (Stages - 1 tiles in flight while one
// is computed), and body(tiles, ti, tile_k, tile_v) runs on each tile the warp does not skip (a
// warp-uniform test; every tile when Mma::kEveryWarp). Every thread of the CTA calls it (it synchronizes). keys_read (optional):
// gets the key rows the CTA loads added. The loads: cp.async (16 bytes a request); kStream (the
// decode sweeps, which stream each row once from DRAM) past L1 (cp_async_16), and on sm_90 as one
// bulk copy per K or V row (a thread each) completing on the stage's mbarrier: with cp.async
// requests the decode cmp + win kernel held the DRAM at 78% on an H200 (ncu). Mma: the body's
// product policy; kSwizzled, the tiles in wgmma's layout (tile_chunk_offset), made visible to the
// async proxy (wgmma's reads) before use; kEveryWarp, no warp skips a tile. kThreads: the CTA's.
template <class T, int Dk, int Dv, int Stages, bool kStream, class Mma, int kThreads, class Tiles, class Body>
__device__ __forceinline__ void sweep_key_tiles(const Tiles& tiles, const T* kbase, int64_t kstride, const T* vbase,
                                                int64_t vstride, T* sK, T* sV, uint64_t warp_positions,
                                                int64_t* keys_read, Body&& body) {
  static_assert(Stages >= 2, "at least double buffering");
  constexpr bool kSwizzled = Mma::kSwizzled;
  static_assert(!(kStream && kSwizzled), "the decode sweeps' bulk copies write padded rows");
  constexpr int64_t kKElems = AttentionSmem::k_elems(Dk), kVElems = AttentionSmem::v_elems(Dv);
  const int tid = threadIdx.x;
  const int num_tiles = tiles.num_tiles();
  count_keys_read(tiles, keys_read);
  if (num_tiles <= 0) {
    cp_async_wait<0>();  // the caller's Q tile copies (attention_cta with wgmma does not wait for them)
    return;
  }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (kStream) {
    static_assert(kThreads == 128, "a thread per K row and per V row of a 64-row tile");
    static_assert(!Mma::kEveryWarp, "the decode sweeps' warps may skip tiles");
    __shared__ uint64_t bars[Stages];  // stage s: the bulk copies of tiles s, s + Stages, ...
    if (tid == 0) {
      for (int st = 0; st < Stages; ++st) mbarrier_init(&bars[st], 1);
      mbarrier_init_fence();
    }
    __syncthreads();
    // Threads 0-63 copy K row tid, 64-127 V row tid - 64; rows past the tile's keys are zeroed
    // (P V must not meet NaN garbage).
    const bool is_k = tid < 64;
    const int row = tid & 63;
    const int row_bytes = (is_k ? Dk : Dv) * static_cast<int>(sizeof(T));
    const auto issue = [&](int k) {
      if (k >= num_tiles) return;
      const TileInfo ti = tiles.info(k);
      uint64_t* bar = &bars[k % Stages];
      T* dst = is_k ? sK + (k % Stages) * kKElems + row * (Dk + 8) : sV + (k % Stages) * kVElems + row * (Dv + 8);
      if (tid == 0) mbarrier_arrive_expect_tx(bar, static_cast<uint32_t>(ti.count * (Dk + Dv) * sizeof(T)));
      if (row < ti.count) {
        const T* src = (is_k ? kbase + int64_t{ti.key0 + row} * kstride : vbase + int64_t{ti.key0 + row} * vstride);
        fence_proxy_async_smem();
        bulk_copy_to_smem(dst, src, static_cast<uint32_t>(row_bytes), bar);
      } else {
        for (int off = 0; off < row_bytes; off += 16) *reinterpret_cast<uint4*>(reinterpret_cast<char*>(dst) + off) = {};
      }
    };
#pragma unroll
    for (int k = 0; k < Stages - 1; ++k) issue(k);
    for (int k = 0; k < num_tiles; ++k) {
      issue(k + Stages - 1);
      mbarrier_wait(&bars[k % Stages], static_cast<uint32_t>((k / Stages) & 1));
      __syncthreads();  // the zeroed rows too
      const TileInfo ti = tiles.info(k);
      if (!tiles.warp_skips(ti, warp_positions))
        body(tiles, ti, sK + (k % Stages) * kKElems, sV + (k % Stages) * kVElems);
      __syncthreads();  // buffer k % Stages is refilled by the issue of tile k + Stages
    }
    return;
  }
#endif
  // One commit group per tile index, empty past the last tile, so that wait<Stages - 1> always
  // means "tile k has landed".
  auto issue = [&](int k) {
    if (k < num_tiles) {
      const TileInfo ti = tiles.info(k);
      load_rows_async<T, Dk, 64, kThreads, kStream, kSwizzled>(sK + (k % Stages) * kKElems, kbase, kstride, ti.key0,
                                                               ti.count, tid);
      load_rows_async<T, Dv, 64, kThreads, kStream, kSwizzled>(sV + (k % Stages) * kVElems, vbase, vstride, ti.key0,
                                                               ti.count, tid);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int k = 0; k < Stages - 1; ++k) issue(k);
  for (int k = 0; k < num_tiles; ++k) {
    issue(k + Stages - 1);
    cp_async_wait<Stages - 1>();
    sync_copied_tiles<kSwizzled>();
    const TileInfo ti = tiles.info(k);
    if (Mma::kEveryWarp || !tiles.warp_skips(ti, warp_positions))
      body(tiles, ti, sK + (k % Stages) * kKElems, sV + (k % Stages) * kVElems);
    __syncthreads();  // buffer k % Stages is refilled by the issue of tile k + Stages
  }
  cp_async_wait<0>();  // (only empty groups remain)
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// A branch's sweep on sm_90 (tma_ring_kernel): the warps wait for the tiles to land, not for each
// other. Stage st of the Stages-deep ring holds tiles st, st + Stages, ...; full[st] completes a
// phase when its tile has landed: a whole tile as one TMA box per 64 columns of K and
// of V, issued by one thread; a tile that reaches past the sequence's keys (its end) as cp.async by
// a warp, which zero-fills the rows past the tile's keys (P V must not meet what lies there) and
// arrives on the barrier once they have landed (after a proxy fence where wgmma reads them:
// kWgmma). Every warp waits for every tile (a warp that skipped a wait could take a later phase
// of that stage for an earlier one), computes those it does not skip (Tiles::warp_skips: the slc
// blocks its positions did not select), and counts itself out in released[st]; the last of the
// kThreads / 32 to leave a tile refills its stage with tile k + Stages. So a warp runs up to
// Stages - 1 tiles ahead of the slowest, where sweep_key_tiles' CTA barriers hold every warp on
// every tile until the one that computes it is done (docs/decisions/0003: the barriers were the slc
// kernel's largest stall; 0013: 18-19% of the cmp and win kernels' warp cycles). thread 0
// initializes the barriers and counts before the call. kWgmma (the cmp and win rings): the readers
// are wgmma, and the caller's cp.async copies of their Q tile in shared memory are waited for, and
// the barriers published, by a CTA barrier after the first refills; else (the slc ring, mma.sync
// with Q in registers) the caller publishes them. q_ready, which every thread calls after the first
// refills, takes the caller's Q tile: with kQInLastStage (the slc ring) that tile lies in the last
// stage's K buffer, which is refilled only after q_ready, so that the first Stages - 1 tiles load
// while the Q tile does. map_row0, map_batch: the sequence's (row0, batch) in the maps' [B][rows]
// (varlen: (first row, 0); padded: (0, b)); kbase / vbase as in sweep_key_tiles.
template <class T, int Dk, int Dv, int Stages, int kThreads, bool kWgmma, bool kQInLastStage, class Tiles, class Body,
          class QReady>
__device__ __forceinline__ void sweep_tma_ring(const Tiles& tiles, const KvTensorMaps& maps, int kv_head,
                                               int map_row0, int map_batch, const T* kbase, int64_t kstride,
                                               const T* vbase, int64_t vstride, T* sK, T* sV, uint64_t* full,
                                               uint32_t* released, uint64_t warp_positions, Body&& body,
                                               QReady&& q_ready) {
  constexpr int64_t kKElems = AttentionSmem::k_elems(Dk), kVElems = AttentionSmem::v_elems(Dv);
  constexpr uint32_t kTileBytes = 64 * (Dk + Dv) * sizeof(T);
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_tiles = tiles.num_tiles();
  // Tile k into its stage; every lane of the calling warp calls it.
  const auto refill = [&](int k) {
    if (k >= num_tiles) return;
    const TileInfo ti = tiles.info(k);
    uint64_t* bar = &full[k % Stages];
    T* k_dst = sK + (k % Stages) * kKElems;
    T* v_dst = sV + (k % Stages) * kVElems;
    // Whole where its 64 rows are keys of the sequence (the slc ring takes l' a multiple of 64:
    // slc_gather_applies): rows past the CTA's last key are then later keys of the same call, finite,
    // and the mask gives them P = 0, where past the sequence's end lie a cache's unwritten rows (NaN
    // in the chunked-prefill tests) or a padded batch's padding, which P V must not meet. Not a test
    // of `ti.count == 64`: ptxas (nvcc 13.0, sm_90a) fused that test of a clamped min into the
    // predicate of VIMNMX.RELU, true wherever the clamp did not bite (docs/decisions/0001, 0010).
    if (ti.key0 + 64 <= tiles.key_end) {
      if (lane == 0) {
        fence_proxy_async_smem();  // the stage's earlier generic-proxy reads and cp.async writes
        mbarrier_arrive_expect_tx(bar, kTileBytes);
#pragma unroll
        for (int c = 0; c < Dk / 64; ++c)
          tma_load_4d(k_dst + c * 64 * 64, &maps.k, bar, c * 64, kv_head, map_row0 + ti.key0, map_batch);
#pragma unroll
        for (int c = 0; c < Dv / 64; ++c)
          tma_load_4d(v_dst + c * 64 * 64, &maps.v, bar, c * 64, kv_head, map_row0 + ti.key0, map_batch);
      }
    } else {
      // Rolled loops: such a tile holds the sequence's end, in its last CTAs only.
      load_rows_async<T, Dk, 64, 32, false, true, false>(k_dst, kbase, kstride, ti.key0, ti.count, lane);
      load_rows_async<T, Dv, 64, 32, false, true, false>(v_dst, vbase, vstride, ti.key0, ti.count, lane);
      // The warp waits for its copies, then announces the tile.
      cp_async_commit();
      cp_async_wait<0>();
      if constexpr (kWgmma) fence_proxy_async_smem();  // wgmma reads them through the async proxy
      __syncwarp();
      if (lane == 0) mbarrier_arrive(bar);
    }
  };
  constexpr int kFirstRefills = kQInLastStage ? Stages - 1 : Stages;
  if (warp == 0)
#pragma unroll
    for (int k = 0; k < kFirstRefills; ++k) refill(k);
  q_ready();
  if (kQInLastStage && warp == 0) refill(Stages - 1);
  for (int k = 0; k < num_tiles; ++k) {
    const int st = k % Stages;
    mbarrier_wait(&full[st], static_cast<uint32_t>((k / Stages) & 1));
    const TileInfo ti = tiles.info(k);
    if (!tiles.warp_skips(ti, warp_positions)) body(tiles, ti, sK + st * kKElems, sV + st * kVElems);
    __syncwarp();  // the warp's reads of the stage are done
    uint32_t before = 0;
    // Release: the warp's reads before the count; acquire: the other warps' reads before the refill.
    if (lane == 0) before = atomic_add_acq_rel_cta(&released[st], 1u);
    before = __shfl_sync(0xffffffffu, before, 0);
    if (before % kWarps == kWarps - 1) {
      __syncwarp();  // the lanes of a cp.async refill after lane 0's acquire
      refill(k + Stages);
    }
  }
}
#endif

// The Rows rows m0 .. m0+Rows-1 (64 per warpgroup) of the flattened (t, g) space of one
// (sequence, kv head): row R = t * G + g is query head kv_head * G + g at position t. The thread's two
// rows (group and group + 8 of its warp's 16) and the positions (bits t - t_lo < 64) of its warp's
// rows, which only the slc sweep reads (warp_skips; 64-row tiles, so at most 64 positions).
struct RowTile {
  int t_lo, t_hi;
  RowState rows[2];
  uint64_t warp_positions;
};

// row_warp: the warp whose 16 rows the thread computes (its own, or 0 when the warps share rows).
__device__ __forceinline__ RowTile make_row_tile(const ForwardArgs& a, int kv_head, int m0, const SeqInfo& seq,
                                                 int row_warp, int rows = 64) {
  const int G = a.group, lane = threadIdx.x & 31, warp = row_warp, group = lane >> 2;
  const int len = static_cast<int>(seq.len), pos0 = static_cast<int>(seq.pos0);
  const int i_lo = m0 / G, i_hi = min(len - 1, (m0 + rows - 1) / G);  // query rows of the tile
  RowTile rt;
  rt.t_lo = pos0 + i_lo;
  rt.t_hi = pos0 + i_hi;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int R = m0 + warp * 16 + group + 8 * r;
    const int i = R / G;
    rt.rows[r].t = i < len ? pos0 + i : -1;
    rt.rows[r].tl = pos0 + i - rt.t_lo;
    rt.rows[r].nvis = num_visible_cmp(pos0 + min(i, len - 1), a.cmp_block, a.cmp_stride);
    rt.rows[r].head = kv_head * G + R % G;
  }
  // Rows past the sequence end have no position.
  rt.warp_positions = 0;
  const int first = (m0 + warp * 16) / G - i_lo, last = min((m0 + warp * 16 + 15) / G, i_hi) - i_lo;
  for (int tl = first; tl <= (rows > 64 ? min(last, 63) : last); ++tl) rt.warp_positions |= 1ull << tl;
  return rt;
}

// cp.async of rows m0 .. m0+Rows-1 (as in RowTile) of a per-query-head tensor (Q, or dO in the
// backward) into Rows / 64 shared-memory tiles of 64 rows, one after the other (layout:
// tile_chunk_offset); rows past the sequence are zeros. Not committed. kThreads: the CTA's.
template <class T, int D, bool kSwizzled = false, int Rows = 64, int kThreads = kAttnThreads>
__device__ __forceinline__ void load_head_rows_async(T* tile, const TensorRef& ref, const ForwardArgs& a, int b,
                                                     const SeqInfo& seq, int kv_head, int m0) {
  static_assert(Rows % 64 == 0, "whole 64-row tiles");
  const int G = a.group, len = static_cast<int>(seq.len);
  const T* base = seq_head_ptr<T>(ref, a, b, seq.row0, kv_head * G);
  constexpr int kTileElems = 64 * (kSwizzled ? D : D + 8);
  // Row m0 + r is position t, head g of the group (GroupedRowCursor).
  using Chunks = TileChunks<D, Rows, kThreads>;
  GroupedRowCursor row(G, Chunks::kRowStep);
  Chunks::visit(
      static_cast<int>(threadIdx.x), [&](int r, int) { row.seek(m0 + r); },
      [&](int r, int c) {
        const bool valid = row.t < len;
        const T* src =
            valid ? base + int64_t{row.t} * ref.seq_stride + int64_t{row.g} * ref.head_stride + c * 8 : base;
        // (One 64-row tile: the offset as it was, so that the code of those kernels stays the same.)
        const int offset = Rows == 64 ? tile_chunk_offset<D, 64, kSwizzled>(r, c)
                                      : (r / 64) * kTileElems + tile_chunk_offset<D, 64, kSwizzled>(r % 64, c);
        cp_async_16(tile + offset, src, valid);
      },
      [&] { row.advance(); });
}

// Row sums over the quad, normalization factor and natural-log lse of row r after a sweep.
__device__ __forceinline__ void finish_row(float m, float l, float* inv, float* lse) {
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  constexpr float kLn2 = 0.69314718055994531f;
  *inv = l > 0.f ? 1.f / l : 0.f;
  *lse = l > 0.f ? (m + log2f(l)) * kLn2 : neg_inf();
}

// Union of the blocks selected for positions t_lo .. t_hi (query rows t - seq.pos0) of kv head kv_head: ascending in
// blocks[0 .. *count), with masks[u] bit tl set iff position t_lo + tl selected blocks[u].
// Entries outside [0, t / l'] (and -1 padding) are ignored; repeats count once.
__device__ __forceinline__ void build_block_union(const ForwardArgs& a, const SeqInfo& seq, int kv_head, int t_lo,
                                                  int t_hi, unsigned char* smem, int* blocks_out,
                                                  uint64_t** masks_out, int** list_out) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n = a.num_selected, ls = a.sel_block;
  uint64_t* masks = reinterpret_cast<uint64_t*>(smem);
  uint32_t* bits = reinterpret_cast<uint32_t*>(masks + a.union_capacity);
  uint32_t* prefix = bits + a.union_words;
  int* list = reinterpret_cast<int*>(prefix + a.union_words);
  // The count in the union's own (dynamic) shared memory: a static __shared__ variable would move
  // the dynamic shared memory off the 1024-byte boundary that the wgmma tiles need.
  int* count = list + a.union_capacity;
  const int nt = t_hi - t_lo + 1;
  const int words = (t_hi / ls) / 32 + 1;
  for (int w = tid; w < words; w += kAttnThreads) bits[w] = 0u;
  __syncthreads();
  const int64_t row_stride = int64_t{a.num_kv_heads} * n;
  const int32_t* idx = a.block_indices + ((seq.row0 + t_lo - seq.pos0) * a.num_kv_heads + kv_head) * n;
  for (int e = tid; e < nt * n; e += kAttnThreads) {
    const int tl = e / n, slot = e % n;
    const int j = idx[tl * row_stride + slot];
    if (j >= 0 && j <= (t_lo + tl) / ls) atomicOr(&bits[j >> 5], 1u << (j & 31));
  }
  __syncthreads();
  if (warp == 0) {
    int run = 0;
    for (int w0 = 0; w0 < words; w0 += 32) {
      const int w = w0 + lane;
      uint32_t word = w < words ? bits[w] : 0u;
      const int c = __popc(word);
      int incl = c;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += y;
      }
      if (w < words) {
        int pos = run + incl - c;
        prefix[w] = static_cast<uint32_t>(pos);
        while (word) {
          const int bit = __ffs(static_cast<int>(word)) - 1;
          list[pos] = w * 32 + bit;
          masks[pos] = 0ull;
          ++pos;
          word &= word - 1u;
        }
      }
      run += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) *count = run;
  }
  __syncthreads();
  for (int e = tid; e < nt * n; e += kAttnThreads) {
    const int tl = e / n, slot = e % n;
    const int j = idx[tl * row_stride + slot];
    if (j >= 0 && j <= (t_lo + tl) / ls) {
      const int w = j >> 5;
      const int pos = static_cast<int>(prefix[w]) + __popc(bits[w] & ((1u << (j & 31)) - 1u));
      atomicOr(reinterpret_cast<unsigned long long*>(&masks[pos]), 1ull << tl);
    }
  }
  __syncthreads();
  *blocks_out = *count;
  *masks_out = masks;
  *list_out = list;
}

// The slc tile set of the rows of `rt`: the union of their selected blocks, built in union_smem
// (every thread calls it; it synchronizes); key_end as in SlcTiles.
__device__ __forceinline__ SlcTiles slc_tiles(const ForwardArgs& a, const SeqInfo& seq, int kv_head, const RowTile& rt,
                                              unsigned char* union_smem, int key_end) {
  int union_size = 0;
  uint64_t* union_masks = nullptr;
  int* union_blocks = nullptr;
  build_block_union(a, seq, kv_head, rt.t_lo, rt.t_hi, union_smem, &union_size, &union_masks, &union_blocks);
  return SlcTiles{union_blocks, union_masks, union_size, (a.sel_block + 63) / 64, a.sel_block, rt.t_hi,
                  key_end};
}

// Calls f(tiles, kbase, kstride, vbase, vstride, key_row0) with branch kBranch's tile set for the
// rows of `rt` (sequence b, kv head kv_head; for slc built from the selected-block union in
// `union_smem`, which every thread must reach) and its keys and values: kbase / vbase at the
// sequence's first key row (key_row0 in the branch's packed rows; 0 in the padded layout).
template <class T, int kBranch, class F>
__device__ __forceinline__ void with_branch_tiles(const ForwardArgs& a, int b, const SeqInfo& seq, int kv_head,
                                                  const RowTile& rt, unsigned char* union_smem, F&& f) {
  const bool varlen = a.cu_seqlens != nullptr;
  const int key_end = static_cast<int>(seq.pos0 + seq.len);  // past the sequence's last position
  if constexpr (kBranch == kBranchCmp) {
    f(CmpTiles{num_visible_cmp(rt.t_hi, a.cmp_block, a.cmp_stride),
               num_visible_cmp(key_end - 1, a.cmp_block, a.cmp_stride)},
      seq_head_ptr<T>(a.k_cmp, a, b, seq.cmp_row0, kv_head), a.k_cmp.seq_stride,
      seq_head_ptr<T>(a.v_cmp, a, b, seq.cmp_row0, kv_head), a.v_cmp.seq_stride,
      varlen ? static_cast<int>(seq.cmp_row0) : 0);
  } else if constexpr (kBranch == kBranchSlc) {
    f(slc_tiles(a, seq, kv_head, rt, union_smem, key_end), seq_head_ptr<T>(a.k, a, b, seq.row0, kv_head), a.k.seq_stride,
      seq_head_ptr<T>(a.v, a, b, seq.row0, kv_head), a.v.seq_stride, varlen ? static_cast<int>(seq.row0) : 0);
  } else {
    f(WinTiles{max(0, rt.t_lo - static_cast<int>(a.window) + 1), rt.t_hi, static_cast<int>(a.window), key_end},
      seq_head_ptr<T>(a.k_win, a, b, seq.row0, kv_head), a.k_win.seq_stride,
      seq_head_ptr<T>(a.v_win, a, b, seq.row0, kv_head), a.v_win.seq_stride, varlen ? static_cast<int>(seq.row0) : 0);
  }
}

// The key-tile loop of branch kBranch for the rows of `rt` (with_branch_tiles) through
// sweep_key_tiles. keys_read: as there. kSplit: only the tiles of split `split` of the branch's
// a.branch_splits (the decode path), in decode_stages(Dk, Dv) stages and bypassing L1 (the prefill
// sweeps double-buffer through L1: docs/decisions/0003). Mma: the body's product policy
// (sweep_key_tiles). kThreads: the CTA's.
template <class T, int Dk, int Dv, int kBranch, bool kSplit = false, class Mma = MmaSyncTiles,
          int kThreads = kAttnThreads, class Body>
__device__ __forceinline__ void sweep_branch(const ForwardArgs& a, int b, const SeqInfo& seq, int kv_head,
                                             const RowTile& rt, unsigned char* union_smem, T* sK, T* sV,
                                             int64_t* keys_read, Body&& body, int split = 0) {
  static_assert(kBranch != kBranchSlc || kThreads == kAttnThreads, "the block union is built by one warpgroup");
  with_branch_tiles<T, kBranch>(a, b, seq, kv_head, rt, union_smem, [&](const auto& tiles, const T* kbase,
                                                                         int64_t kstride, const T* vbase,
                                                                         int64_t vstride, int) {
    if constexpr (kSplit) {
      static_assert(!Mma::kSwizzled, "the decode path keeps mma.sync on padded tiles");
      sweep_key_tiles<T, Dk, Dv, sweep_stages(true, Dk, Dv), true, Mma, kThreads>(
          split_tiles(tiles, split, a.branch_splits[kBranch]), kbase, kstride, vbase, vstride, sK, sV,
          rt.warp_positions, keys_read, body);
    } else {
      sweep_key_tiles<T, Dk, Dv, sweep_stages(false, Dk, Dv), false, Mma, kThreads>(
          tiles, kbase, kstride, vbase, vstride, sK, sV, rt.warp_positions, keys_read, body);
    }
  });
}

// CTAs of one warpgroup per SM the register allocation must allow (the decode path, slc, and
// sm_80's cmp and win; kAttnCtaMinBlocks). cmp and win: three up to Dk = 128 (<= 170
// registers per thread, 70 KB of shared memory at D = 128): measured 0.51 -> 0.46 ms (cmp, 8k)
// and 22.5 -> 20.2 ms (cmp, 64k) on an H200. slc: two; with three it slowed from 2.8 to 3.1 ms
// at 8k (its cp.async.ca gathers compete for the L1 that more shared memory leaves).
template <int Dk, int kBranch>
inline constexpr int kAttnMinBlocks = (Dk > 128 || kBranch == kBranchSlc) ? 2 : 3;

// Whether an attention CTA runs wgmma in this device pass: where the architecture has it, the
// prefill sweeps that prefill_sweep_wgmma names; not the decode path, whose warps may split a
// tile's keys.
template <int Dk, int kBranch, bool kSplit>
inline constexpr bool kAttnWgmma = kHaveWgmma && !kSplit && prefill_sweep_wgmma(kBranch, Dk);
// Warpgroups of an attention CTA in this device pass (prefill_warpgroups; one without wgmma, so
// on the decode path). Three warpgroups ask for one CTA per SM (384 threads of up to 168 registers,
// 12 warps, as three CTAs of one warpgroup), two (the win sweep at Dk = 128) for two (up to 128
// registers: the sweep fits, a few of the epilogue's spill).
template <int Dk, int kBranch, bool kSplit>
inline constexpr int kAttnWarpgroups = prefill_warpgroups(kBranch, Dk, kAttnWgmma<Dk, kBranch, kSplit>);
template <int Dk, int kBranch, bool kSplit>
inline constexpr int kAttnCtaMinBlocks = kAttnWarpgroups<Dk, kBranch, kSplit> == 1   ? kAttnMinBlocks<Dk, kBranch>
                                         : kAttnWarpgroups<Dk, kBranch, kSplit> == 2 ? 2
                                                                                     : 1;


// With kWarpSplit (m * G <= 16, so the first warp's 16 rows hold every query) the four warps
// compute those rows against a quarter of each tile's keys each, instead of three warps computing
// rows that do not exist; fold_warps then merges their states into the first warp's registers.
// Every thread calls it (it synchronizes; the tile buffers must be free).
template <int Dv>
__device__ __forceinline__ void fold_warps(unsigned char* smem, float (&acc)[Dv / 8][4], float (&m)[2],
                                           float (&l)[2]) {
  constexpr int kPerThread = Dv / 2 + 4;  // acc, m, l
  float* state = reinterpret_cast<float*>(smem);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (warp > 0) {
    float* dst = state + ((warp - 1) * 32 + lane) * kPerThread;
#pragma unroll
    for (int nb = 0; nb < Dv / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[nb * 4 + e] = acc[nb][e];
    dst[Dv / 2 + 0] = m[0];
    dst[Dv / 2 + 1] = m[1];
    dst[Dv / 2 + 2] = l[0];
    dst[Dv / 2 + 3] = l[1];
  }
  __syncthreads();
  if (warp == 0) {
    for (int w = 0; w < 3; ++w) {
      const float* src = state + (w * 32 + lane) * kPerThread;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float m_other = src[Dv / 2 + r], m_new = fmaxf(m[r], m_other);
        const float ref = m_new == neg_inf() ? 0.f : m_new;
        const float self_scale = fast_exp2(m[r] - ref), other_scale = fast_exp2(m_other - ref);
        l[r] = l[r] * self_scale + src[Dv / 2 + 2 + r] * other_scale;
#pragma unroll
        for (int nb = 0; nb < Dv / 8; ++nb)
#pragma unroll
          for (int c = 0; c < 2; ++c)
            acc[nb][2 * r + c] = acc[nb][2 * r + c] * self_scale + src[nb * 4 + 2 * r + c] * other_scale;
        m[r] = m_new;
      }
    }
  }
  __syncthreads();  // the states are read before the buffers are reused
}

// 16 bytes of a row: one vector access where the buffers allow it (ForwardArgs::chunk_stores).
template <class T>
__device__ __forceinline__ uint4 load_chunk(const T* src, bool whole) {
  if (whole) return *reinterpret_cast<const uint4*>(src);
  const uint32_t* w = reinterpret_cast<const uint32_t*>(src);
  return make_uint4(w[0], w[1], w[2], w[3]);
}
template <class T>
__device__ __forceinline__ void store_chunk(T* dst, const uint4& v, bool whole) {
  if (whole) {
    *reinterpret_cast<uint4*>(dst) = v;
    return;
  }
  uint32_t* w = reinterpret_cast<uint32_t*>(dst);
  w[0] = v.x;
  w[1] = v.y;
  w[2] = v.z;
  w[3] = v.w;
}

// The prefill epilogue's stores: a warp's 16 rows (row0 .. row0 + 15 as in RowTile) of the branch
// output, normalized and rounded to T, staged in shared memory [16][stride]. Each lane takes 16-byte
// chunks, so that a store covers whole rows (2 or 4 per instruction) instead of 16 bytes of each of 8
// rows as the accumulator layout would. The win kernel also combines (Eq. 5) its rows with o_cmp and
// o_slc read back from their buffers, each batch's loads before its stores (a store may alias them).
template <class T, int Dv, int kBranch>
__device__ __forceinline__ void store_staged_rows(const ForwardArgs& a, int b, const SeqInfo& seq, int kv_head,
                                                  int row0, const T* stage, int stage_stride) {
  using Tr = TypeTraits<T>;
  constexpr int kChunks = Dv / 8, kRowsPerPass = 32 / kChunks, kPasses = 16 / kRowsPerPass;
  constexpr int kBatch = kPasses < 4 ? kPasses : 4;
  static_assert(32 % kChunks == 0 && kPasses % kBatch == 0, "a row's chunks within one warp");
  const int lane = threadIdx.x & 31, col = (lane % kChunks) * 8, len = static_cast<int>(seq.len);
  const bool whole = a.chunk_stores;
  const int64_t out_base = a.cu_seqlens != nullptr ? seq.row0 * a.out_seq_stride : int64_t{b} * a.out_batch_stride;
  GroupedRowCursor row(a.group, kRowsPerPass);
  row.seek(row0 + lane / kChunks);
#pragma unroll
  for (int p0 = 0; p0 < kPasses; p0 += kBatch) {
    int t[kBatch], head[kBatch];
    uint4 own[kBatch], cmp[kBatch], slc[kBatch];
    float gate[kBatch][3];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      t[k] = row.t < len ? row.t : -1;  // the query row within the sequence
      head[k] = kv_head * a.group + row.g;
      own[k] = *reinterpret_cast<const uint4*>(stage + ((p0 + k) * kRowsPerPass + lane / kChunks) * stage_stride + col);
      if constexpr (kBranch == kBranchWin) {
        if (t[k] >= 0) {
          const int64_t grow = seq.row0 + t[k];
          cmp[k] = load_chunk(branch_row<T>(a.cmp_out, a, grow, head[k]) + col, whole);
          slc[k] = load_chunk(branch_row<T>(a.slc_out, a, grow, head[k]) + col, whole);
          const T* g = seq_head_ptr<T>(a.gates, a, b, seq.row0, head[k]) + int64_t{t[k]} * a.gates.seq_stride;
#pragma unroll
          for (int br = 0; br < 3; ++br) gate[k][br] = Tr::to_float(g[br]);
        }
      }
      row.advance();
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      if (t[k] < 0) continue;
      const int64_t grow = seq.row0 + t[k];
      if constexpr (kBranch != kBranchWin) {
        store_chunk(branch_row<T>(kBranch == kBranchCmp ? a.cmp_out : a.slc_out, a, grow, head[k]) + col, own[k], whole);
      } else {
        const uint32_t ow[4] = {own[k].x, own[k].y, own[k].z, own[k].w};
        const uint32_t oc[4] = {cmp[k].x, cmp[k].y, cmp[k].z, cmp[k].w};
        const uint32_t os[4] = {slc[k].x, slc[k].y, slc[k].z, slc[k].w};
        uint32_t o[4];
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const float2 fw = Tr::unpack(ow[w]), fc = Tr::unpack(oc[w]), fs = Tr::unpack(os[w]);
          o[w] = Tr::pack(gate[k][0] * fc.x + gate[k][1] * fs.x + gate[k][2] * fw.x,
                          gate[k][0] * fc.y + gate[k][1] * fs.y + gate[k][2] * fw.y);
        }
        T* out = static_cast<T*>(a.out) + out_base + int64_t{t[k]} * a.out_seq_stride +
                 int64_t{head[k]} * a.out_head_stride + col;
        store_chunk(out, make_uint4(o[0], o[1], o[2], o[3]), whole);
        if (a.win_out != nullptr) store_chunk(branch_row<T>(a.win_out, a, grow, head[k]) + col, own[k], whole);
      }
    }
  }
}

// kSplit (the decode path, src/cuda/decode.cuh; one row tile per (sequence, kv head)): the CTA
// sweeps split tile_x of the branch's key tiles and writes its unnormalized partial
// output and (max, sum) to split_acc / split_ml for the decode kernels to merge (the slc kernel
// merges itself when every branch ran one split, decode_merge.cuh); the cmp kernel also stores
// its scaled scores to cmp_scores.
// The CTA (tile_x: its row tile, or with kSplit its split; kv head kv_head of sequence b) of
// attention_kernel (grid: tile_x, kv head, sequence), also run by the decode path's cmp + win
// kernel (decode.cuh). kTmaRing (tma_ring_kernel, sm_90): the K / V tiles come through a TMA ring
// described by `maps` (sweep_tma_ring).
template <class T, int Dk, int Dv, int kBranch, bool kSplit, bool kWarpSplit, bool kTmaRing = false>
__device__ __forceinline__ void attention_cta(const ForwardArgs& a, int tile_x, int kv_head, int b,
                                              unsigned char* smem, const KvTensorMaps* maps = nullptr) {
  static_assert(Dk % 16 == 0 && Dv % 16 == 0, "head dims");
  static_assert(kBranch == kBranchCmp || kBranch == kBranchSlc || kBranch == kBranchWin, "branch");
  static_assert(kSplit || !kWarpSplit, "the warps share rows only in the decode path");
  using Tr = TypeTraits<T>;
  // With wgmma (kAttnWgmma) every warp takes every tile; with mma.sync a warp skips the slc blocks
  // its positions did not select.
  // The slc ring multiplies with mma.sync at every Dk (at Dk = 64 it replaces the wgmma sweep on long
  // sequences: slc_gather_applies); the cmp and win rings with wgmma (tma_ring_wgmma).
  constexpr bool kWgmma = kAttnWgmma<Dk, kBranch, kSplit> && (!kTmaRing || tma_ring_wgmma(kBranch));
  static_assert(!kTmaRing || !kSplit, "the TMA rings: prefill");
  using Mma = std::conditional_t<kWgmma, WgmmaTiles, MmaSyncTilesT<kTmaRing>>;
  // Warpgroups, each on its 64 rows of the Q tile (the Q tile stays in shared memory only with wgmma).
  constexpr int kWarpgroups = kAttnWarpgroups<Dk, kBranch, kSplit>;
  static_assert(kWarpgroups == 1 || kWgmma, "several warpgroups keep the Q tile in shared memory (wgmma)");
  constexpr int kThreads = kAttnThreads * kWarpgroups, kRows = 64 * kWarpgroups;
  check_block_threads<kThreads>();
  constexpr int kStages = kTmaRing ? tma_ring_stages(kBranch, Dk, Dv) : sweep_stages(kSplit, Dk, Dv);
  constexpr int64_t kSweepBytes = kTmaRing ? tma_ring_sweep_bytes(kBranch, Dk, Dv)
                                           : AttentionSmem::sweep_bytes(Dk, Dv, kStages, kWgmma, kWarpgroups);
  static_assert(!kTmaRing || kSweepBytes == AttentionSmem::sweep_bytes(Dk, Dv, kStages, kWgmma, kWarpgroups) +
                                                AttentionSmem::kRingSyncBytes,
                "the ring's layout as the host sizes it");
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kStages * AttentionSmem::k_elems(Dk);
  // The Q tile: in the first K buffer until its fragments are in registers (the slc ring: the last,
  // which the ring fills last: sweep_tma_ring), or (wgmma) after the K / V buffers for the whole sweep
  // (AttentionSmem::sweep_bytes, as the launch code sizes it).
  constexpr bool kQInLastStage = kTmaRing && !kWgmma;
  T* sQ = kWgmma          ? reinterpret_cast<T*>(smem + AttentionSmem::tiles_bytes(Dk, Dv, kStages))
          : kQInLastStage ? sK + (kStages - 1) * AttentionSmem::k_elems(Dk)
                          : sK;
  if constexpr (kWgmma || kTmaRing) wgmma_check_smem(smem, static_cast<uint32_t>(kSweepBytes));

  const SeqInfo seq = seq_info(a, b);
  // 32-bit row arithmetic (the host checks seqlen * G < 2^31 - 256): no 64-bit divisions.
  const int m0 = kSplit ? 0 : tile_x * kRows;
  if (int64_t{m0} >= seq.len * a.group) return;  // uniform over the CTA
  if (kSplit && tile_x >= a.branch_splits[kBranch]) return;
  const int warp = threadIdx.x >> 5, tig = threadIdx.x & 3;
  const int row_warp = kWarpSplit ? 0 : warp;

  load_head_rows_async<T, Dk, kWgmma, kRows, kThreads>(sQ, a.q, a, b, seq, kv_head, m0);
  cp_async_commit();
  const RowTile rt = make_row_tile(a, kv_head, m0, seq, row_warp, kRows);
  const RowState(&rows)[2] = rt.rows;
  if constexpr (kBranch == kBranchWin && !kSplit) {
    // The combine's inputs (o_cmp, o_slc: each row's Dv elements) into L2 while the sweep runs, so
    // that the epilogue's loads do not wait for DRAM (measured when the win kernel ran one CTA per SM,
    // whose epilogue nothing else hid: docs/decisions/0017).
    constexpr int kRowBytes = Dv * static_cast<int>(sizeof(T));
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (rows[r].t < 0) continue;
      const int64_t grow = seq.row0 + rows[r].t - seq.pos0;
#pragma unroll
      for (int line = tig; line * 128 < kRowBytes; line += 4) {
        prefetch_l2(reinterpret_cast<const char*>(branch_row<T>(a.cmp_out, a, grow, rows[r].head)) + line * 128);
        prefetch_l2(reinterpret_cast<const char*>(branch_row<T>(a.slc_out, a, grow, rows[r].head)) + line * 128);
      }
    }
  }
  // The decode slc kernel is chained to the scoring kernel (forward_launch.cuh): the Q tile loads
  // while that one finishes; the selected blocks and the other branches' partials are read after.
  // (Split 0 always gets here: the chain's completion order rests on that, decode.cuh.)
  if constexpr (kSplit) wait_for_previous_kernel();

  // With wgmma the Q tile stays in its own buffer and the sweep's first wait for a K / V tile
  // (sweep_key_tiles; a wgmma ring's, sweep_tma_ring) covers its (earlier) copy group too, so its loads
  // overlap those of the first tiles.
  // The slc ring takes its Q tile once its first tiles are on their way (q_ready below).
  std::conditional_t<kWgmma, QInSharedMemory<T>, QInRegisters<T, Dk>> qf;
  const auto load_q = [&] {
    if constexpr (!kWgmma) {
      cp_async_wait<0>();
      sync_copied_tiles<false>();
    }
    qf.load(kWarpgroups > 1 ? sQ + (warp / 4) * 64 * Dk : sQ, row_warp * 16);  // the warpgroup's 64 rows
    if constexpr (!kWgmma) __syncthreads();  // a K tile overwrites the Q tile
  };
  if constexpr (!kQInLastStage) load_q();

  float acc[Dv / 8][4], m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};
#pragma unroll
  for (int nb = 0; nb < Dv / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nb][e] = 0.f;
  int64_t* keys_read = a.tokens_read != nullptr ? a.tokens_read + int64_t{b} * kNumBranches + kBranch : nullptr;
  const int H = a.num_q_heads;
  // The decode cmp kernel stores every tile's masked scores of its rows (whole tiles: the rows'
  // stride is a multiple of 64; the scoring reads only the visible keys).
  float* score_rows[2] = {nullptr, nullptr};
  if constexpr (kSplit && kBranch == kBranchCmp)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (rows[r].t >= 0)
        score_rows[r] = a.cmp_scores + ((seq.row0 + rows[r].t - seq.pos0) * H + rows[r].head) * a.cmp_score_stride;
  const auto to_scores = [&](const auto& scores, int key0) {
    if constexpr (kSplit && kBranch == kBranchCmp) {
      constexpr int NB = sizeof(scores) / sizeof(scores[0]);
#pragma unroll
      for (int r = 0; r < 2; ++r)
        if (score_rows[r] != nullptr)
#pragma unroll
          for (int nb = 0; nb < NB; ++nb)
            *reinterpret_cast<float2*>(score_rows[r] + key0 + nb * 8 + tig * 2) =
                make_float2(scores[nb][2 * r], scores[nb][2 * r + 1]);
    }
  };
  const auto tile_body = [&](const auto& tiles, const TileInfo& ti, const T* tk, const T* tv) {
    if constexpr (kWarpSplit)
      softmax_tile<T, Dk, Dv, 2>(tiles, ti, tk, tv, qf, a.scale_log2, rows, acc, m, l, to_scores, warp * 16);
    else
      softmax_tile<T, Dk, Dv, 8, Mma>(tiles, ti, tk, tv, qf, a.scale_log2, rows, acc, m, l, to_scores);
  };
  if constexpr (kTmaRing) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // The ring's barriers and counts (after the tiles and the Q tile). The slc ring's are published
    // by slc_tiles' CTA barriers; the cmp and win rings wait for their Q tile's copies and publish
    // both after the first refills (sweep_tma_ring).
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + kSweepBytes - AttentionSmem::kRingSyncBytes);
    uint32_t* released = reinterpret_cast<uint32_t*>(full + kStages);
    if (threadIdx.x == 0) {
      for (int st = 0; st < kStages; ++st) {
        mbarrier_init(&full[st], 1);
        released[st] = 0;
      }
      mbarrier_init_fence();
    }
    if constexpr (kWgmma) __syncthreads();  // the barriers, before any thread waits on them
    with_branch_tiles<T, kBranch>(a, b, seq, kv_head, rt, smem + kSweepBytes, [&](const auto& tiles, const T* kbase,
                                                                                  int64_t kstride, const T* vbase,
                                                                                  int64_t vstride, int key_row0) {
      const int map_batch = a.cu_seqlens != nullptr ? 0 : b;
      count_keys_read(tiles, keys_read);
      // After the first refills: the slc ring's Q tile into registers; a wgmma ring's Q tile copies
      // waited for and, with the ring's barriers, published.
      const auto q_ready = [&] {
        if constexpr (kQInLastStage) {
          load_q();
        } else {
          cp_async_wait<0>();
          fence_proxy_async_smem();
          __syncthreads();
        }
      };
      sweep_tma_ring<T, Dk, Dv, kStages, kThreads, kWgmma, kQInLastStage>(
          tiles, *maps, kv_head, key_row0, map_batch, kbase, kstride, vbase, vstride, sK, sV, full, released,
          rt.warp_positions, tile_body, q_ready);
    });
#endif
  } else {
    sweep_branch<T, Dk, Dv, kBranch, kSplit, Mma, kThreads>(a, b, seq, kv_head, rt, smem + kSweepBytes, sK, sV,
                                                            keys_read, tile_body, tile_x);
  }

  if constexpr (kSplit) allow_next_kernel();  // the decode path's next kernel may launch

  // Rows this warp writes: with kWarpSplit only the first warp's, which holds the merged state.
  RowState out_rows[2] = {rows[0], rows[1]};
  if constexpr (kWarpSplit) {
    fold_warps<Dv>(smem, acc, m, l);
    if (warp > 0) out_rows[0].t = out_rows[1].t = -1;
  }

  if constexpr (kSplit) {
    // This split's partial result: unnormalized output, running max (log2 domain) and row sum.
    const int64_t plane = (int64_t{kBranch} * a.num_splits + tile_x) * (int64_t{a.batch} * a.seqlen);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float row_sum = l[r];
      row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 1);
      row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 2);
      if (out_rows[r].t < 0) continue;
      if constexpr (kBranch == kBranchSlc) {
        if (a.num_splits == 1) {  // the last branch of a one-split step: merge here, no combine launch
          combine_one_split<T, Dv>(a, seq.row0 + out_rows[r].t - seq.pos0, out_rows[r].head,
                                   MergedRow{m[r], row_sum}, acc, r);
          continue;
        }
      }
      const int64_t slot = (plane + seq.row0 + out_rows[r].t - seq.pos0) * H + out_rows[r].head;
      if (tig == 0) a.split_ml[slot] = make_float2(m[r], row_sum);
      float* dst = a.split_acc + slot * Dv;
#pragma unroll
      for (int nb = 0; nb < Dv / 8; ++nb)
        *reinterpret_cast<float2*>(dst + nb * 8 + tig * 2) = make_float2(acc[nb][2 * r], acc[nb][2 * r + 1]);
    }
  } else {
    // Epilogue: the lse, and the branch output rounded to T staged in shared memory for
    // store_staged_rows (the K / V tiles are free once every warp is done with them).
    __syncthreads();
    constexpr int kStageStride = Dv + 8;  // conflict-free 4-byte writes by the quads' rows
    static_assert(int64_t{kRows} * kStageStride * 2 <= AttentionSmem::tiles_bytes(Dk, Dv, kStages), "staging fits");
    T* stage = reinterpret_cast<T*>(smem) + warp * 16 * kStageStride;
    const int quad = (threadIdx.x & 31) >> 2;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float inv, lse;
      finish_row(m[r], l[r], &inv, &lse);
      if (out_rows[r].t >= 0 && tig == 0)
        a.lse[((seq.row0 + out_rows[r].t - seq.pos0) * H + out_rows[r].head) * 3 + kBranch] = lse;
#pragma unroll
      for (int nb = 0; nb < Dv / 8; ++nb)
        *reinterpret_cast<uint32_t*>(stage + (quad + 8 * r) * kStageStride + nb * 8 + tig * 2) =
            Tr::pack(acc[nb][2 * r] * inv, acc[nb][2 * r + 1] * inv);
    }
    __syncwarp();
    store_staged_rows<T, Dv, kBranch>(a, b, seq, kv_head, m0 + warp * 16, stage, kStageStride);
  }
}

// The tile_x of an attention CTA: with kSplit (the decode path) its split; the slc kernel's row tiles
// heaviest first (heaviest_first_tile: an H100 A/B, paper config at 8k, slc 1.396 -> 1.378 ms); the
// cmp and win kernels' in launch order (cmp 0.282 -> 0.289 ms there with the order reversed, win
// unchanged: docs/decisions/0018).
template <int kBranch, bool kSplit>
__device__ __forceinline__ int prefill_tile() {
  return !kSplit && kBranch == kBranchSlc ? heaviest_first_tile() : static_cast<int>(blockIdx.x);
}

template <class T, int Dk, int Dv, int kBranch, bool kSplit = false, bool kWarpSplit = false>
__global__ void __launch_bounds__(kAttnThreads * kAttnWarpgroups<Dk, kBranch, kSplit>,
                                  (kAttnCtaMinBlocks<Dk, kBranch, kSplit>)) attention_kernel(const ForwardArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];  // wgmma's 1024-byte alignment: wgmma_check_smem
  const int tile_x = prefill_tile<kBranch, kSplit>();
  attention_cta<T, Dk, Dv, kBranch, kSplit, kWarpSplit>(a, tile_x, static_cast<int>(blockIdx.y),
                                                        static_cast<int>(blockIdx.z), smem);
}

// A prefill sweep on sm_90 with its K / V tiles through a TMA ring (sweep_tma_ring): the slc
// kernel where slc_gather_applies, the cmp and win kernels where sweep_ring_applies; grid, threads
// and warpgroups as attention_kernel's. Launched only on a 9.0 device with sm_90a code
// (launch_forward); other passes trap.
template <class T, int Dk, int Dv, int kBranch>
__global__ void __launch_bounds__(kAttnThreads * kAttnWarpgroups<Dk, kBranch, false>,
                                  (kAttnCtaMinBlocks<Dk, kBranch, false>))
    tma_ring_kernel(const ForwardArgs a, const __grid_constant__ KvTensorMaps maps) {
  extern __shared__ __align__(16) unsigned char smem[];  // the 128-byte swizzle's 1024-byte alignment
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  attention_cta<T, Dk, Dv, kBranch, false, false, true>(a, prefill_tile<kBranch, false>(), static_cast<int>(blockIdx.y),
                                                        static_cast<int>(blockIdx.z), smem, &maps);
#else
  __trap();
#endif
}

}  // namespace nsa::cuda_detail
