// The backward kernels (tensor cores: mma.sync m16n8k16, and wgmma for the dq and key-major
// kernels on sm_90a; fp32 accumulation), in stream order:
//   1. preprocess_kernel: per (row, query head) and branch c, dgates_c = dO . o_c (written to
//      grad_gates) and the softmax backward's row term delta_c = g_c * dgates_c (workspace);
//   2. (src/cuda/backward.cu) the block -> query index of the selection branch: which positions
//      selected block j of kv head h;
//   3. dq_kernel: query-major, the rows of the forward's attention CTAs (64 rows of the flattened
//      (t, g) space), sweeps the key tiles of all three branches and accumulates
//      dq = scale * sum_c dS_c K_c in registers: one writer per element, no atomics. With key-major
//      dq for the selection branch (SelectedDq, dq_slc_acc) the slc dK / dV kernel of step 4 runs
//      first and also adds its dS K to an fp32 accumulator, and this kernel sweeps cmp and win only
//      and adds that accumulator to its own sums;
//   4. dkv_kernel<branch>: key-major, a CTA owns 64 keys of one kv head (128 in two warpgroups for
//      cmp and win on wgmma at Dk = 128: dkv_key_groups) and sweeps the rows
//      (t, g) that attend to them: the positions t >= i*d + l - 1 (cmp), t in [s, s + w) (win),
//      the query list of the block from step 2 (slc); dK += scale * dS^T Q, dV += P^T (g dO) in
//      registers, then added to fp32 accumulators. Lists longer than split_positions[branch] are split
//      over the grid's z dimension (the adds then come in a varying order); with one CTA per key
//      tile every accumulator element receives one add per kernel: deterministic;
//   5. convert_kernel: the fp32 accumulators to the gradients' dtype and layout.
//
// Per branch c (dO_c = g_c dO): P = exp(S scale - lse_c), dP = dO_c V^T, dS = P (dP - delta_c);
// lse_c comes from the forward, so no online softmax: every key tile is independent.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/attention.cuh"
#include "cuda/backward_args.h"

namespace nsa::cuda_detail {

inline constexpr float kLog2e = 1.4426950408889634f;

// Element offset of packed row `row` (padded: b * rows_per_seq + t) of a strided tensor.
// rows_per_seq == 0: varlen layout (rows are packed; batch strides ignored).
__device__ __forceinline__ int64_t row_offset(int64_t row, int64_t rows_per_seq, int64_t batch_stride,
                                              int64_t seq_stride) {
  if (rows_per_seq == 0) return row * seq_stride;
  const int64_t b = row / rows_per_seq;
  return b * batch_stride + (row - b * rows_per_seq) * seq_stride;
}

// A fragment source (see qk_tile) reading the warp's 16 rows from shared memory on each use: for
// operands that do not fit in registers next to the accumulators.
template <class T, int D>
struct RowsInSmem {
  const T* tile;
  int row0;
  __device__ __forceinline__ void load(const T* t, int r0) {
    tile = t;
    row0 = r0;
  }
  __device__ __forceinline__ void fragment(int ks, uint32_t (&a)[4]) const { load_q_fragment<T, D>(a, tile, row0, ks); }
};

// ------------------------------------------------------------------------------------------------
// 1. dgates and delta. A CTA per row, its four warps taking the query heads in turn (a warp per
// (row, head)): the row's offsets are computed once, not per (row, head) with 64-bit divisions.

inline constexpr int kPreprocessThreads = 128;

template <class T, int Dv>
__global__ void __launch_bounds__(kPreprocessThreads) preprocess_kernel(const BackwardArgs a) {
  using Tr = TypeTraits<T>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = blockIdx.x;
  const int H = a.num_q_heads;
  const int64_t per_seq = a.cu_seqlens != nullptr ? 0 : a.seqlen;
  const T* dout_row = static_cast<const T*>(a.grad_out.data) +
                      row_offset(row, per_seq, a.grad_out.batch_stride, a.grad_out.seq_stride);
  const T* gates_row =
      static_cast<const T*>(a.gates.data) + row_offset(row, per_seq, a.gates.batch_stride, a.gates.seq_stride);
  T* grad_gates_row = static_cast<T*>(a.grad_gates.data) +
                      row_offset(row, per_seq, a.grad_gates.batch_stride, a.grad_gates.seq_stride);
  for (int head = warp; head < H; head += kPreprocessThreads / 32) {
    const T* dout = dout_row + int64_t{head} * a.grad_out.head_stride;
    const T* ob = static_cast<const T*>(a.out_branch) + (row * H + head) * (3 * Dv);
    float dot[3] = {0.f, 0.f, 0.f};
    for (int col = 2 * lane; col < Dv; col += 64) {
      const float2 d = Tr::unpack(*reinterpret_cast<const uint32_t*>(dout + col));
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        const float2 o = Tr::unpack(*reinterpret_cast<const uint32_t*>(ob + c * Dv + col));
        dot[c] += d.x * o.x + d.y * o.y;
      }
    }
#pragma unroll
    for (int c = 0; c < 3; ++c)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) dot[c] += __shfl_xor_sync(0xffffffffu, dot[c], off);
    if (lane < 3) {
      const int c = lane;
      const float value = c == 0 ? dot[0] : (c == 1 ? dot[1] : dot[2]);
      grad_gates_row[int64_t{head} * a.grad_gates.head_stride + c] = static_cast<T>(value);
      a.delta[(row * H + head) * 3 + c] = Tr::to_float(gates_row[int64_t{head} * a.gates.head_stride + c]) * value;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// 3. dq, query-major, all branches.

// Whether the dq kernel and the cmp and slc dk/dv kernels ask for three resident CTAs per SM
// (decision 0008): at Dk = 64 in the sm_90a code. On an H100 that takes dq from 174 to 164
// registers (no spills; its stage 20% faster on the showcase's shapes) and those dk/dv kernels
// from 177 to 168 (32-76 bytes of spill stores; 5-6% faster). The win dk/dv kernel already ran
// three CTAs at 168 registers and only gained spills. An A100's shared memory holds two of them
// whatever the registers. The host asks for the largest shared-memory carveout with it, as in the
// measured variant (the carveout was not measured alone). `sm90a`: kHaveWgmma on the device, the
// device's wgmma_sweeps on the host.
NSA_HOST_DEVICE constexpr bool backward_three_ctas(int dk, bool sm90a) { return sm90a && dk <= 64; }

// __launch_bounds__'s minimum CTAs per SM of the dq and the three dK / dV kernels; 0 sets none, as
// before (an explicit 1 changed ptxas's choice: the win dk/dv kernel took 211 registers instead of
// 168). The win dK / dV kernel runs at 3 CTAs per SM at Dk = 64 too since its row terms are loaded
// ahead (8 bytes of spills); that change as a whole took m7c-125m's win dK / dV from 0.640 to 0.607
// ms on an H200 (docs/performance.md).
template <int Dk>
inline constexpr int kBackwardMinBlocks = backward_three_ctas(Dk, kHaveWgmma) ? 3 : 0;

struct DqSmem {
  // Q [64][Dk+8], dO [64][Dv+8], K and V double buffers [2][64][D+8] (2-byte elements; wgmma's
  // swizzled tiles fit the padded slots), then the selected-block union as in the forward's slc
  // kernel.
  NSA_HOST_DEVICE static constexpr int64_t tiles_bytes(int dk, int dv) {
    return 2 * (int64_t{64} * (dk + 8) + int64_t{64} * (dv + 8) + 2 * AttentionSmem::k_elems(dk) +
                2 * AttentionSmem::v_elems(dv));
  }
};

// Row terms of branch c for the thread's two rows.
struct BranchRows {
  float lse2[2];   // lse * log2 e
  float delta[2];  // g_c * (dO . o_c)
  float gate[2];   // g_c
};

template <class T, int Dk, int Dv, class Mma, class Tiles, class QSource, class DoSource>
__device__ __forceinline__ void dq_tile(const Tiles& tiles, const TileInfo& ti, const T* tk, const T* tv,
                                        const QSource& qf, const DoSource& dof, float scale_log2,
                                        const RowState (&rows)[2], const BranchRows& br, float (&dq)[Dk / 8][4]) {
  const int tig = threadIdx.x & 3;
  float s[8][4], dp[8][4];
  // Two groups, not scores_pair: one group slowed this kernel (kBackwardPairedProducts, decision 0011).
  Mma::template scores<T, Dk, 8>(qf, tk, 0, s);
  Mma::template scores<T, Dv, 8>(dof, tv, 0, dp);
#pragma unroll
  for (int nb = 0; nb < 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = e >> 1;
      const bool valid = tiles.valid(ti, rows[r], nb * 8 + tig * 2 + (e & 1));
      const float p = valid ? fast_exp2(s[nb][e] * scale_log2 - br.lse2[r]) : 0.f;
      s[nb][e] = p * (br.gate[r] * dp[nb][e] - br.delta[r]);
    }
  Mma::template accumulate<T, Dk, 8>(dq, s, tk, 0);
}

template <class T, int Dk, int Dv>
__global__ void __launch_bounds__(kAttnThreads, kBackwardMinBlocks<Dk>) dq_kernel(const BackwardArgs a) {
  using Tr = TypeTraits<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sDo = sQ + 64 * (Dk + 8);
  T* sK = sDo + 64 * (Dv + 8);
  T* sV = sK + 2 * AttentionSmem::k_elems(Dk);
  static_assert(kBackwardMinBlocks<Dk> < 3 || ctas_fit(3, DqSmem::tiles_bytes(Dk, Dv)));
  unsigned char* union_smem = smem + DqSmem::tiles_bytes(Dk, Dv);

  const int b = blockIdx.z, kv_head = blockIdx.y;
  const SeqInfo seq = seq_info(a, b);
  // The heaviest row tiles first (H100, paper config: 2.615 -> 2.550 ms at 8k, 40.71 -> 39.71 at 64k).
  const int m0 = heaviest_first_tile() * 64;
  if (int64_t{m0} >= seq.len * a.group) return;  // uniform over the CTA
  const int warp = threadIdx.x >> 5, tig = threadIdx.x & 3;
  const int H = a.num_q_heads;

  // wgmma on sm_90a up to Dk = 128 (its dq += dS K takes one or two 64-column parts): Q and dO
  // stay in shared memory, swizzled, for S = Q K^T and dP = dO V^T; the four warps take every tile
  // of every branch (a slc tile that none of a warp's positions selected is masked to zeros). With
  // mma.sync for the slc sweep alone, whose warps skip such tiles, the kernel was slower on an H100
  // (paper config, 64k: 61.0 ms against 54.2; docs/decisions/0007).
  constexpr bool kWgmma = kHaveWgmma && Dk <= 128;
  using Mma = std::conditional_t<kWgmma, WgmmaTiles, MmaSyncTiles>;
  // wgmma's swizzle atoms need 1024-byte aligned tiles: every tile of DqSmem is a multiple of 1024
  // bytes (64 rows of Dk + 8 or Dv + 8 elements), and the base is checked.
  static_assert(!kWgmma || ((128 * (Dk + 8)) % 1024 == 0 && (128 * (Dv + 8)) % 1024 == 0), "tile alignment");
  if constexpr (kWgmma) wgmma_check_smem(smem, static_cast<uint32_t>(DqSmem::tiles_bytes(Dk, Dv)));
  load_head_rows_async<T, Dk, kWgmma>(sQ, a.q, a, b, seq, kv_head, m0);
  load_head_rows_async<T, Dv, kWgmma>(sDo, a.grad_out, a, b, seq, kv_head, m0);
  cp_async_commit();
  const RowTile rt = make_row_tile(a, kv_head, m0, seq, static_cast<int>(threadIdx.x >> 5));
  const RowState(&rows)[2] = rt.rows;
  BranchRows br[3];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int t = rows[r].t >= 0 ? rows[r].t : 0;
    const int64_t idx = ((seq.row0 + t) * H + rows[r].head) * 3;
    const T* gate = seq_head_ptr<T>(a.gates, a, b, seq.row0, rows[r].head) + int64_t{t} * a.gates.seq_stride;
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      br[c].lse2[r] = a.lse[idx + c] * kLog2e;
      br[c].delta[r] = a.delta[idx + c];
      br[c].gate[r] = Tr::to_float(gate[c]);
    }
  }
  cp_async_wait<0>();
  sync_copied_tiles<kWgmma>();
  // mma.sync: Q stays in registers next to the dq accumulators up to Dk = 128; wider rows are
  // re-read.
  using QRows = std::conditional_t<(Dk <= 128), QInRegisters<T, Dk>, RowsInSmem<T, Dk>>;
  std::conditional_t<kWgmma, QInSharedMemory<T>, QRows> qf;
  qf.load(sQ, warp * 16);
  std::conditional_t<kWgmma, QInSharedMemory<T>, RowsInSmem<T, Dv>> dof;
  dof.load(sDo, warp * 16);

  float dq[Dk / 8][4];
#pragma unroll
  for (int nb = 0; nb < Dk / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[nb][e] = 0.f;
  auto body = [&](const BranchRows& rows_c) {
    return [&](const auto& tiles, const TileInfo& ti, const T* tk, const T* tv) {
      dq_tile<T, Dk, Dv, Mma>(tiles, ti, tk, tv, qf, dof, a.scale_log2, rows, rows_c, dq);
    };
  };
  sweep_branch<T, Dk, Dv, kBranchCmp, false, Mma>(a, b, seq, kv_head, rt, union_smem, sK, sV, nullptr,
                                                  body(br[kBranchCmp]));
  // Key-major (dq_slc_acc): the slc dK / dV kernel, launched before this one, has summed the slc
  // branch's dS K there.
  if (a.dq_slc_acc == nullptr)
    sweep_branch<T, Dk, Dv, kBranchSlc, false, Mma>(a, b, seq, kv_head, rt, union_smem, sK, sV, nullptr,
                                                    body(br[kBranchSlc]));
  sweep_branch<T, Dk, Dv, kBranchWin, false, Mma>(a, b, seq, kv_head, rt, union_smem, sK, sV, nullptr,
                                                  body(br[kBranchWin]));

  // The key-major sums of both rows are loaded before the first store: the compiler may not move
  // a load past a store to grad_q (they might alias), so loads between the stores would wait for
  // memory one after the other.
  if (a.dq_slc_acc != nullptr) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (rows[r].t < 0) continue;
      const float* slc = a.dq_slc_acc + ((seq.row0 + rows[r].t) * H + rows[r].head) * Dk + tig * 2;
      float2 added[Dk / 8];
#pragma unroll
      for (int nb = 0; nb < Dk / 8; ++nb) added[nb] = *reinterpret_cast<const float2*>(slc + nb * 8);
#pragma unroll
      for (int nb = 0; nb < Dk / 8; ++nb) {
        dq[nb][2 * r] += added[nb].x;
        dq[nb][2 * r + 1] += added[nb].y;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r].t < 0) continue;
    const int64_t base = a.cu_seqlens != nullptr ? (seq.row0 + rows[r].t) * a.grad_q.seq_stride
                                                 : int64_t{b} * a.grad_q.batch_stride + int64_t{rows[r].t} * a.grad_q.seq_stride;
    T* dst = static_cast<T*>(a.grad_q.data) + base + int64_t{rows[r].head} * a.grad_q.head_stride;
#pragma unroll
    for (int nb = 0; nb < Dk / 8; ++nb)
      *reinterpret_cast<uint32_t*>(dst + nb * 8 + tig * 2) =
          Tr::pack(dq[nb][2 * r] * a.scale, dq[nb][2 * r + 1] * a.scale);
  }
}

// ------------------------------------------------------------------------------------------------
// 4. dK, dV, key-major, one branch.

// Rows per row tile of the key-major kernel: its registers hold the dK and dV accumulators of
// the warp's 16 keys plus S^T and dP^T for the tile, so wide heads take half tiles.
template <int Dk>
inline constexpr int kDkvRows = Dk > 128 ? 32 : 64;

// Whether the dK / dV kernel issues S^T and dP^T, then dV and dK, as one wgmma group each. On an H100
// (2026-12-06, nsa_bench_forward --backward) the pairs took the Dk = 128 kernels' spills away (paper
// config at 8k: slc 3.547 -> 3.467 ms, win 1.898 -> 1.726; at 64k 28.80 -> 27.86, 14.59 -> 13.40),
// while at Dk = 64 the slc kernel spilled more and slowed (m7c-125m: 1.228 -> 1.259). The dq kernel
// keeps two groups: its S / dP pair slowed Dk = 128 (3.711 -> 3.837 at 8k). Decision 0011.
template <int Dk>
inline constexpr bool kBackwardPairedProducts = Dk > 64;

// Whether the dK / dV kernel skips the per-element mask on row tiles whose rows all see all of a
// warp's 16 keys (every branch's keys form an interval per row and its rows an interval per key, so
// the four corners decide; rows come in ascending t). At Dk = 64 on an H200 (2026-12-06, in the
// same call as the prefetch below it): m7c-125m 2.90 -> 2.83-2.86 ms, long 7.52 -> 7.35; at Dk = 128
// the second loop body spilled and the paper config's 8k backward slowed (9.15 -> 9.94 ms).
template <int Dk>
inline constexpr bool kDkvUnmaskedTiles = Dk <= 64;

// Warpgroups of a key-major dK / dV CTA, each on its own 64 keys, all sharing every Q / dO row tile:
// two for the cmp and win kernels on wgmma at Dk = 128, which halves their Q / dO bytes per key (the
// forward's cmp and win sweeps share their K / V tiles so: prefill_warpgroups), else one. On an H100
// (paper config, docs/decisions/0018) cmp dK / dV went from 34.3 to 26.6 ms at 64k and from 0.600 to
// 0.580 at 8k, win from 9.06 to 8.87 and from 1.227 to 1.143. The slc kernel keeps one: the
// positions that selected two blocks differ. `wgmma`: the sm_90a code's
// (kHaveWgmma on the device, the device's wgmma_sweeps on the host), with 64-row tiles.
NSA_HOST_DEVICE constexpr int dkv_key_groups(int branch, int dk, bool wgmma) {
  return wgmma && dk == 128 && branch != kBranchSlc ? 2 : 1;
}
template <int Dk, int kBranch>
inline constexpr int kDkvKeyGroups = dkv_key_groups(kBranch, Dk, kHaveWgmma && kDkvRows<Dk> == 64);

struct DkvSmem {
  // K [W][64][Dk+8], V [W][64][Dv+8] (W = dkv_key_groups), Q double buffer [2][R][Dk+8], dO double
  // buffer [2][R][Dv+8] (2-byte elements), then the row terms of three row tiles [3][R]: t (int),
  // lse2, delta, gate (float); three, since a tile's terms are stored while the tile before it is
  // being computed.
  static constexpr int kTermBuffers = 3;
  NSA_HOST_DEVICE static constexpr int64_t bytes(int dk, int dv, int rows, int key_groups = 1) {
    return 2 * (int64_t{64} * key_groups * (dk + 8) + int64_t{64} * key_groups * (dv + 8) +
                2 * int64_t{rows} * (dk + 8) + 2 * int64_t{rows} * (dv + 8)) +
           4 * 4 * kTermBuffers * int64_t{rows};
  }
};

// The keys of one key-major CTA and the positions that attend to them.
struct KeyTile {
  int key0, count;  // keys key0 .. key0 + count - 1 of the branch's key sequence
  int num_positions;
  int first_position;          // cmp / win: position p of the list is first_position + p
  const uint64_t* list;        // slc: position p is the low 31 bits of list[p]
  // Position p's list entry as loaded (its low 32 bits), or for cmp / win its t; position_of gives
  // t. Two steps so that a load issued a row tile ahead is not waited on where it is issued.
  __device__ __forceinline__ uint32_t entry(int p) const {
    return list != nullptr ? reinterpret_cast<const uint32_t*>(list + p)[0] : static_cast<uint32_t>(first_position + p);
  }
  static __device__ __forceinline__ int position_of(uint32_t entry) { return static_cast<int>(entry & 0x7fffffffu); }
};

// cp.async of row tile i of a key-major CTA (rows (p, g), p-major; R rows per tile) of a
// per-query-head tensor (Q or dO, `base` at query head kv_head * G) into a tile of R rows at dst
// (layout: tile_chunk_offset). tile_t [R] (shared memory): each row's position t, -1 past the
// CTA's rows, which are zeros. row: GroupedRowCursor(G, TileChunks<D, R, kThreads>::kRowStep) at
// row i R + tid / (D / 8), the thread's first where TileChunks gives it a fixed column (the caller
// steps it from tile to tile, so that no load divides by G); otherwise each chunk's row is sought.
// Not committed. kThreads: the CTA's.
template <class T, int D, int R, bool kSwizzled, int kThreads = kAttnThreads>
__device__ __forceinline__ void load_list_rows_async(T* dst, const T* base, const TensorRef& ref, const int* tile_t,
                                                     int i, GroupedRowCursor row) {
  using Chunks = TileChunks<D, R, kThreads>;
  Chunks::visit(
      static_cast<int>(threadIdx.x),
      [&](int r, int) {
        if constexpr (!Chunks::kFixedColumn) row.seek(i * R + r);
      },
      [&](int r, int c) {
        const int t = tile_t[r];
        const bool valid = t >= 0;
        const T* src = valid ? base + int64_t{t} * ref.seq_stride + int64_t{row.g} * ref.head_stride + c * 8 : base;
        cp_async_16(dst + tile_chunk_offset<D, R, kSwizzled>(r, c), src, valid);
      },
      [&] { row.advance(); });
}

// Key tile `tile` of `keys` keys (64 per warpgroup; the slc kernel's: 64).
template <int kBranch>
__device__ __forceinline__ KeyTile make_key_tile(const BackwardArgs& a, int b, const SeqInfo& seq, int kv_head,
                                                 int tile, int keys) {
  const int len = static_cast<int>(seq.len);
  KeyTile kt{};
  kt.list = nullptr;
  if constexpr (kBranch == kBranchCmp) {
    kt.key0 = tile * keys;
    kt.count = min(keys, static_cast<int>(seq.num_cmp) - kt.key0);
    kt.first_position = kt.key0 * a.cmp_stride + a.cmp_block - 1;  // the first t that sees key0
    kt.num_positions = len - kt.first_position;
  } else if constexpr (kBranch == kBranchWin) {
    kt.key0 = tile * keys;
    kt.count = min(keys, len - kt.key0);
    kt.first_position = kt.key0;
    const int64_t last = min64(int64_t{len} - 1, int64_t{kt.key0} + kt.count - 1 + a.window - 1);
    kt.num_positions = static_cast<int>(last - kt.key0 + 1);
  } else {
    const int chunks = (a.sel_block + 63) / 64;
    const int j = tile / chunks, c = tile % chunks;
    kt.key0 = j * a.sel_block + c * 64;
    kt.count = min(min(64, a.sel_block - c * 64), len - kt.key0);
    kt.first_position = 0;
    const int64_t segment = (int64_t{b} * a.num_kv_heads + kv_head) * a.max_blocks + j;  // j < max_blocks
    const int32_t begin = a.seg_offsets[segment];
    kt.list = a.sel_keys + begin;
    kt.num_positions = a.seg_offsets[segment + 1] - begin;
  }
  return kt;
}

// Whether key `key` of the branch is attended by position t (t >= 0); the slc list holds only
// positions that selected the key's block.
template <int kBranch>
__device__ __forceinline__ bool key_visible(const BackwardArgs& a, int key, int t) {
  if constexpr (kBranch == kBranchCmp) return key * a.cmp_stride + a.cmp_block - 1 <= t;
  else if constexpr (kBranch == kBranchWin) return key <= t && int64_t{t} - a.window < key;
  else return key <= t;
}

// Adds a C-fragment tile [16 keys][D] (keys key_local0 + group (+ 8) of the tile) to an fp32
// [*, Hkv, D] accumulator.
template <int D>
__device__ __forceinline__ void add_to_accumulator(float* acc, int64_t key_row0, int num_kv_heads, int kv_head,
                                                   int key_local0, int count, const float (&frag)[D / 8][4],
                                                   float scale) {
  const int lane = threadIdx.x & 31, group = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key_local0 + group + 8 * r;
    if (key >= count) continue;
    float* dst = acc + ((key_row0 + key) * num_kv_heads + kv_head) * D;
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
      const int col = nb * 8 + tig * 2;
#if __CUDA_ARCH__ >= 900
      atomicAdd(reinterpret_cast<float2*>(dst + col), make_float2(frag[nb][2 * r] * scale, frag[nb][2 * r + 1] * scale));
#else
      atomicAdd(dst + col, frag[nb][2 * r] * scale);
      atomicAdd(dst + col + 1, frag[nb][2 * r + 1] * scale);
#endif
    }
  }
}

// kKeyMajorDq (slc only; SelectedDq::kKeyMajor, BackwardArgs::dq_slc_acc): the kernel also forms
// each row tile's dq = dS K (dS^T through shared memory, in the tile's dO buffer once dV's product
// has read it) and adds it to dq_slc_acc. A separate instance, so that the query-major kernel keeps
// its registers; the host launches it only with the sm_90a code.
template <class T, int Dk, int Dv, int kBranch, bool kKeyMajorDq = false>
__global__ void __launch_bounds__(kAttnThreads * kDkvKeyGroups<Dk, kBranch>, (kBackwardMinBlocks<Dk>))
    dkv_kernel(const BackwardArgs a, int tiles_per_seq) {
  constexpr int R = kDkvRows<Dk>, NB = R / 8;
  // W warpgroups (kDkvKeyGroups), warpgroup w on keys 64 w .. 64 w + 63 of the CTA's.
  constexpr int W = kDkvKeyGroups<Dk, kBranch>, kThreads = kAttnThreads * W;
  static_assert(kBackwardMinBlocks<Dk> < 3 || ctas_fit(3, DkvSmem::bytes(Dk, Dv, R, W)));
  static_assert(ctas_fit(1, DkvSmem::bytes(Dk, Dv, R, W)), "the warpgroups' K / V tiles and the row tiles fit an SM");
  static_assert(!kKeyMajorDq || kBranch == kBranchSlc, "key-major dq is the selection branch's");
  static_assert(!kKeyMajorDq || (R == 64 && Dv + 8 >= 64), "dS^T: a 64 x 64 tile in a row tile's dO buffer");
  static_assert(!kKeyMajorDq || W == 1, "key-major dq: one warpgroup's dS^T");
  using Tr = TypeTraits<T>;
  // wgmma on sm_90a (64-row tiles, Dk <= 128): the four warps take every row tile (they split the
  // keys), so the CTA issues its products together; K and V are the A operands from shared memory
  // (as Q in the forward: no loop-invariant register operands, docs/decisions/0006).
  constexpr bool kWgmma = kHaveWgmma && R == 64;
  using Mma = std::conditional_t<kWgmma, WgmmaTiles, MmaSyncTiles>;
  if constexpr (kKeyMajorDq && !kWgmma) __trap();  // (passes without wgmma: never launched there)
  static_assert(W == 1 || kWgmma, "several warpgroups: wgmma");
  check_block_threads<kThreads>();
  extern __shared__ __align__(16) unsigned char smem[];
  // wgmma's swizzle atoms need 1024-byte aligned tiles: every tile of DkvSmem is a multiple of 1024
  // bytes, and the base is checked.
  if constexpr (kWgmma) wgmma_check_smem(smem, static_cast<uint32_t>(DkvSmem::bytes(Dk, Dv, R, W)));
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + W * 64 * (Dk + 8);
  T* sQ = sV + W * 64 * (Dv + 8);
  T* sDo = sQ + 2 * R * (Dk + 8);
  constexpr int kTB = DkvSmem::kTermBuffers;
  int* s_t = reinterpret_cast<int*>(sDo + 2 * R * (Dv + 8));  // [kTB][R]
  float* s_lse2 = reinterpret_cast<float*>(s_t + kTB * R);    // [kTB][R]
  float* s_delta = s_lse2 + kTB * R;                          // [kTB][R]
  float* s_gate = s_delta + kTB * R;                          // [kTB][R]

  const int b = static_cast<int>(blockIdx.x) / tiles_per_seq, tile = static_cast<int>(blockIdx.x) % tiles_per_seq;
  const int kv_head = blockIdx.y;
  const SeqInfo seq = seq_info(a, b);
  const KeyTile kt = make_key_tile<kBranch>(a, b, seq, kv_head, tile, 64 * W);
  if (kt.count <= 0) return;  // uniform over the CTA
  const int split = a.split_positions[kBranch];
  const int p0 = static_cast<int>(blockIdx.z) * split;
  if (p0 >= kt.num_positions) return;
  const int p1 = static_cast<int>(min64(int64_t{kt.num_positions}, int64_t{p0} + split));
  const int G = a.group, H = a.num_q_heads;
  const int num_rows = (p1 - p0) * G;  // rows (p, g) of this CTA, p-major
  const int num_row_tiles = (num_rows + R - 1) / R;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, group = lane >> 2, tig = lane & 3;
  const int key_group = W > 1 ? warp >> 2 : 0;  // the warpgroup's 64 keys
  const int warp_key0 = warp * 16;               // the warp's first key of the CTA's (warpgroup * 64 + ...)

  const TensorRef& kref = kBranch == kBranchCmp ? a.k_cmp : (kBranch == kBranchSlc ? a.k : a.k_win);
  const TensorRef& vref = kBranch == kBranchCmp ? a.v_cmp : (kBranch == kBranchSlc ? a.v : a.v_win);
  const int64_t key_row0 = kBranch == kBranchCmp ? seq.cmp_row0 : seq.row0;
#pragma unroll
  for (int w = 0; w < W; ++w) {  // rows past the CTA's keys are zeros
    load_rows_async<T, Dk, 64, kThreads, false, kWgmma>(sK + w * 64 * (Dk + 8),
                                                        seq_head_ptr<T>(kref, a, b, key_row0, kv_head),
                                                        kref.seq_stride, kt.key0 + 64 * w, kt.count - 64 * w, tid);
    load_rows_async<T, Dv, 64, kThreads, false, kWgmma>(sV + w * 64 * (Dv + 8),
                                                        seq_head_ptr<T>(vref, a, b, key_row0, kv_head),
                                                        vref.seq_stride, kt.key0 + 64 * w, kt.count - 64 * w, tid);
  }
  cp_async_commit();

  const T* qbase = seq_head_ptr<T>(a.q, a, b, seq.row0, kv_head * G);
  const T* dobase = seq_head_ptr<T>(a.grad_out, a, b, seq.row0, kv_head * G);
  // Row r of tile i is list position p0 + (i R + r) / G at query head kv_head G + (i R + r) % G;
  // thread tid < R carries row tid's terms. They reach shared memory (buffer i % kTB) two tiles
  // before tile i is computed, from global loads issued one tile before that, so that no warp waits
  // on a global load inside the loop: at the end of iteration i the terms of tile i + 2 are stored,
  // those of tile i + 3 loaded, and the list entry of tile i + 4. Loaded values stay raw until they
  // are stored (a conversion where they are loaded would wait for them there).
  struct RowTerms {
    int t;  // -1 past the CTA's rows
    float lse, delta;
    T gate;
  };
  auto row_valid = [&](int i) { return tid < R && i * R + tid < num_rows; };
  auto row_head = [&](int i, int r) { return kv_head * G + (i * R + r) % G; };
  auto load_entry = [&](int i) { return row_valid(i) ? kt.entry(p0 + (i * R + tid) / G) : 0u; };
  auto load_terms = [&](int i, uint32_t entry) {
    RowTerms terms{-1, 0.f, 0.f, T{}};
    if (row_valid(i)) {
      terms.t = KeyTile::position_of(entry);
      const int head = row_head(i, tid);
      const int64_t idx = ((seq.row0 + terms.t) * H + head) * 3 + kBranch;
      terms.lse = a.lse[idx];
      terms.delta = a.delta[idx];
      terms.gate = seq_head_ptr<T>(a.gates, a, b, seq.row0, head)[int64_t{terms.t} * a.gates.seq_stride + kBranch];
    }
    return terms;
  };
  auto store_terms = [&](int i, const RowTerms& terms) {
    if (tid < R) {
      const int n = (i % kTB) * R + tid;
      s_t[n] = terms.t;
      s_lse2[n] = terms.lse * kLog2e;
      s_delta[n] = terms.delta;
      s_gate[n] = Tr::to_float(terms.gate);
    }
  };
  // Row tile i's Q and dO rows into buffer i & 1 by cp.async (its terms are in shared memory), for
  // i = 0, 1, 2, ... in turn: q_rows and do_rows are the loaders' cursors at the thread's first row
  // of the next tile (load_list_rows_async).
  GroupedRowCursor q_rows(G, TileChunks<Dk, R, kThreads>::kRowStep);
  GroupedRowCursor do_rows(G, TileChunks<Dv, R, kThreads>::kRowStep);
  const GroupedRowCursor row_tile_step(G, R);
  q_rows.seek(tid / (Dk / 8));
  do_rows.seek(tid / (Dv / 8));
  auto issue = [&](int i) {
    const int buf = i & 1;
    const int* tile_t = s_t + (i % kTB) * R;
    load_list_rows_async<T, Dk, R, kWgmma, kThreads>(sQ + buf * R * (Dk + 8), qbase, a.q, tile_t, i, q_rows);
    load_list_rows_async<T, Dv, R, kWgmma, kThreads>(sDo + buf * R * (Dv + 8), dobase, a.grad_out, tile_t, i, do_rows);
    q_rows.advance_by(row_tile_step);
    do_rows.advance_by(row_tile_step);
    cp_async_commit();
  };

  float dk[Dk / 8][4], dv[Dv / 8][4];
#pragma unroll
  for (int nb = 0; nb < Dk / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nb][e] = 0.f;
#pragma unroll
  for (int nb = 0; nb < Dv / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) dv[nb][e] = 0.f;
  std::conditional_t<kWgmma, QInSharedMemory<T>, RowsInSmem<T, Dk>> kf;
  kf.load(sK + key_group * 64 * (Dk + 8), (warp & 3) * 16);
  std::conditional_t<kWgmma, QInSharedMemory<T>, RowsInSmem<T, Dv>> vf;
  vf.load(sV + key_group * 64 * (Dv + 8), (warp & 3) * 16);

  // Whether every row of tile i sees every key of the warp (kDkvUnmaskedTiles): the tile's first and
  // last rows (t ascending; -1 past the CTA's rows) against the warp's first and last keys.
  const auto tile_sees_all_keys = [&](int i) {
    const int t_first = s_t[(i % kTB) * R], t_last = s_t[(i % kTB) * R + R - 1];
    const int k0 = kt.key0 + warp_key0, k1 = k0 + 15;
    return warp_key0 + 15 < kt.count && t_first >= 0 && t_last >= 0 && key_visible<kBranch>(a, k0, t_first) &&
           key_visible<kBranch>(a, k1, t_first) && key_visible<kBranch>(a, k0, t_last) &&
           key_visible<kBranch>(a, k1, t_last);
  };

  store_terms(0, load_terms(0, load_entry(0)));
  store_terms(1, load_terms(1, load_entry(1)));
  RowTerms terms_ahead = load_terms(2, load_entry(2));  // tile i + 2's, stored at the end of iteration i
  uint32_t entry_ahead = load_entry(3);                 // tile i + 3's
  __syncthreads();
  issue(0);
  for (int i = 0; i < num_row_tiles; ++i) {
    if (i + 1 < num_row_tiles) issue(i + 1);
    cp_async_wait_older(i + 1 < num_row_tiles);
    sync_copied_tiles<kWgmma>();
    const int buf = i & 1;
    const T* tq = sQ + buf * R * (Dk + 8);
    const T* tdo = sDo + buf * R * (Dv + 8);
    float s[NB][4], dp[NB][4];
    // S^T (the warp's 16 keys x R rows) and dP^T
    scores_pair<Mma, T, Dk, Dv, NB, kBackwardPairedProducts<Dk>>(kf, tq, s, vf, tdo, dp);
    const auto row_terms = [&](auto masked) {
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key_local = warp_key0 + group + 8 * (e >> 1);
          const int n = (i % kTB) * R + nb * 8 + tig * 2 + (e & 1);
          const int t = s_t[n];
          const bool valid = !decltype(masked)::value ||
                             (t >= 0 && key_local < kt.count && key_visible<kBranch>(a, kt.key0 + key_local, t));
          const float p = valid ? fast_exp2(s[nb][e] * a.scale_log2 - s_lse2[n]) : 0.f;
          s[nb][e] = p * s_gate[n];                                   // P^T g: for dV += P^T (g dO)
          dp[nb][e] = p * (s_gate[n] * dp[nb][e] - s_delta[n]);      // dS^T
        }
    };
    if (kDkvUnmaskedTiles<Dk> && tile_sees_all_keys(i)) row_terms(std::false_type{});
    else row_terms(std::true_type{});
    // Key-major dq: dS^T rounded to T (the product's operand) now, so that dp's fp32 registers need
    // not live across the dV / dK products.
    [[maybe_unused]] uint32_t ds_t[NB][2];
    if constexpr (kKeyMajorDq && kWgmma) {
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        ds_t[nb][0] = Tr::pack(dp[nb][0], dp[nb][1]);
        ds_t[nb][1] = Tr::pack(dp[nb][2], dp[nb][3]);
      }
    }
    accumulate_pair<Mma, T, Dv, Dk, NB, kBackwardPairedProducts<Dk>>(dv, s, tdo, dk, dp, tq);
    if constexpr (kKeyMajorDq && kWgmma) {
      // dS^T [64 keys][R rows] into the swizzled layout of a 64-column tile, in tile i's dO buffer,
      // once every warp's dV product has read it; then dq [R rows][Dk] = dS K for the whole
      // warpgroup, added per row (rows 16 warp + group (+ 8) of the C fragments) to dq_slc_acc.
      T* sds_t = sDo + buf * R * (Dv + 8);
      __syncthreads();
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          *reinterpret_cast<uint32_t*>(sds_t + tile_chunk_offset<64, 64, true>(warp * 16 + group + 8 * r, nb) +
                                       tig * 2) = ds_t[nb][r];
      fence_proxy_async_smem();
      __syncthreads();
      float dq[Dk / 8][4];
      Mma::template product_of_transposed<T, Dk>(dq, sds_t, sK);
      const int* tile_t = s_t + (i % kTB) * R;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = warp * 16 + group + 8 * r;
        const int t = tile_t[row];
        if (t < 0) continue;
        float* dst = a.dq_slc_acc + ((seq.row0 + t) * H + row_head(i, row)) * Dk + tig * 2;
#pragma unroll
        for (int nb = 0; nb < Dk / 8; ++nb)
          atomicAdd(reinterpret_cast<float2*>(dst + nb * 8), make_float2(dq[nb][2 * r], dq[nb][2 * r + 1]));
      }
    }
    if (i + 2 < num_row_tiles) {
      store_terms(i + 2, terms_ahead);  // buffer (i + 2) % kTB: tile i - 1's, done before the last barrier
      terms_ahead = load_terms(i + 3, entry_ahead);
      entry_ahead = load_entry(i + 4);
    }
    __syncthreads();  // buffer i & 1 is refilled by the issue of tile i + 2
  }

  float* dk_acc = kBranch == kBranchCmp ? a.dkc_acc : (kBranch == kBranchSlc ? a.dk_acc : a.dkw_acc);
  float* dv_acc = kBranch == kBranchCmp ? a.dvc_acc : (kBranch == kBranchSlc ? a.dv_acc : a.dvw_acc);
  const int64_t acc_row0 = key_row0 + kt.key0;
  add_to_accumulator<Dk>(dk_acc, acc_row0, a.num_kv_heads, kv_head, warp_key0, kt.count, dk, a.scale);
  add_to_accumulator<Dv>(dv_acc, acc_row0, a.num_kv_heads, kv_head, warp_key0, kt.count, dv, 1.f);
}

// ------------------------------------------------------------------------------------------------
// 5. fp32 accumulator [rows, H, D] -> a gradient tensor of type T (strided; rows_per_seq as in
// row_offset). Two elements per thread.

template <class T>
__global__ void convert_kernel(const float* acc, int64_t rows, int heads, int dim, int64_t rows_per_seq,
                               OutputRef dst) {
  using Tr = TypeTraits<T>;
  const int64_t pairs = rows * heads * (dim / 2);
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < pairs; e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t col = (e % (dim / 2)) * 2;
    const int64_t rh = e / (dim / 2);
    const int64_t row = rh / heads;
    const int head = static_cast<int>(rh - row * heads);
    T* out = static_cast<T*>(dst.data) + row_offset(row, rows_per_seq, dst.batch_stride, dst.seq_stride) +
             int64_t{head} * dst.head_stride + col;
    *reinterpret_cast<uint32_t*>(out) = Tr::pack(acc[rh * dim + col], acc[rh * dim + col + 1]);
  }
}

}  // namespace nsa::cuda_detail
