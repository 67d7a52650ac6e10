// The kernel-side view of one NSA backward: the forward's view of the inputs (ForwardArgs: shape,
// config, q/k/v/..., block_indices, lse) plus what the backward reads and writes. A POD built on
// the host (src/cuda/backward.cu) and passed by value to every kernel of the backward.
#pragma once

#include <cstdint>

#include "cuda/forward_args.h"

namespace nsa::cuda_detail {

// A written [B, T, H, D] (or packed [total, H, D]) tensor.
struct OutputRef {
  void* data;
  int64_t batch_stride;  // ignored in varlen layout
  int64_t seq_stride;
  int64_t head_stride;
};

// ForwardArgs fields used by the backward: the shape and config, the inputs, block_indices (read
// only: the forward's selection) and lse (read only: [rows, Hq, 3], natural log). Its output and
// selection-kernel fields are unused.
struct BackwardArgs : ForwardArgs {
  int64_t total_rows, total_cmp_rows;  // packed rows of the raw and compressed tensors (padded: B*T, B*Tc)
  float scale;  // the softmax scale (scale_log2 / log2 e): dq = scale * dS K, dk = scale * dS^T Q

  TensorRef grad_out;      // [B, T, Hq, Dv]
  const void* out_branch;  // [rows, Hq, 3, Dv] contiguous, dtype: the forward's branch outputs
  OutputRef grad_q;        // [B, T, Hq, Dk]
  OutputRef grad_gates;    // [B, T, Hq, 3]
  OutputRef grad_k, grad_v;          // [B, T, Hkv, D]: the selection branch's (and the window's when shared)
  OutputRef grad_k_win, grad_v_win;  // [B, T, Hkv, D]; data null when the window shares k / v
  OutputRef grad_k_cmp, grad_v_cmp;  // [B, Tc, Hkv, D]

  // Workspace.
  float* delta;    // [rows, Hq, 3]: g_c * (dO . o_c), the softmax backward's row term of branch c
  float* dk_acc;   // [rows, Hkv, Dk] fp32 gradient accumulators of the selection branch's k and v
  float* dv_acc;   // [rows, Hkv, Dv]
  float* dkw_acc;  // [rows, Hkv, Dk] of the window branch (== dk_acc when k_win is null)
  float* dvw_acc;  // [rows, Hkv, Dv] (== dv_acc when v_win is null)
  float* dkc_acc;  // [cmp_rows, Hkv, Dk]
  float* dvc_acc;  // [cmp_rows, Hkv, Dv]
  // The selection branch's dq, key-major (SelectedDq): [rows, Hq, Dk] fp32, unscaled dS K, added to
  // by the slc dK / dV kernel (which then runs before the dq kernel, and the dq kernel skips its slc
  // sweep and adds this in its epilogue); null: the dq kernel sweeps the slc blocks itself.
  float* dq_slc_acc;

  // The selection branch's block -> query index: sel_keys sorted ascending, each
  // (segment << 31) | t with segment = (b * Hkv + kv_head) * max_blocks + j for the position t of
  // sequence b that selected block j; the positions of a segment are
  // sel_keys[seg_offsets[segment] .. seg_offsets[segment + 1]) (low 31 bits).
  const uint64_t* sel_keys;  // [rows * Hkv * n]
  const int32_t* seg_offsets;  // [B * Hkv * max_blocks + 1]
  int max_blocks;              // ceil(seqlen / l')

  // Per branch (kBranchCmp, kBranchSlc, kBranchWin): KV-major CTAs take at most this many positions
  // of a key tile's query list (the grid's z dimension splits longer lists; their fp32 sums then meet
  // in the accumulators in a varying order): key_major_split_positions (backward_split.h). The
  // deterministic mode sets them to seqlen: one CTA per key tile.
  int split_positions[kNumBranches];
};

// Key tiles per sequence of branch c's key-major dk/dv kernel (64 keys each; a selection block of
// more than 64 keys takes several): the grid's x extent is batch times this.
inline int64_t key_major_tiles(const BackwardArgs& a, int c) {
  if (c == kBranchCmp) return (a.cmp_per_seq + 63) / 64;
  if (c == kBranchSlc) return int64_t{a.max_blocks} * ((a.sel_block + 63) / 64);
  return (a.seqlen + 63) / 64;
}

}  // namespace nsa::cuda_detail
