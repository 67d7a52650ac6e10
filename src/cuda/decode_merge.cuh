// The last step of the decode path: merging each branch's split partials (split_acc / split_ml)
// into the branch outputs and their lse, and the gated sum (Eq. 5). Run by decode_combine_kernel
// (decode.cuh), or, when every branch ran one split, by the slc kernel's epilogue for its rows
// (attention.cuh), which saves the combine launch.
#pragma once

#include "cuda/common.cuh"
#include "cuda/forward_args.h"
#include "nsa/params.h"

namespace nsa::cuda_detail {

// Merged statistics of a branch for (query row grow, head): the max of the partials' running
// maxima (log2 domain) and the sum rescaled to it.
struct MergedRow {
  float max2, sum;
  __device__ float lse2() const { return sum > 0.f ? max2 + log2f(sum) : neg_inf(); }
};

__device__ __forceinline__ int64_t part_slot(const ForwardArgs& a, int branch, int part, int64_t grow, int head) {
  const int64_t rows = int64_t{a.batch} * a.seqlen;
  return ((int64_t{branch} * a.num_splits + part) * rows + grow) * a.num_q_heads + head;
}

// Run by a whole warp (lanes over the partials, each folding its own into a running (max, sum),
// then a butterfly over the lanes); every lane gets the result. One round of loads: a max pass
// before a sum pass doubled the latency of the scoring CTAs' first step.
__device__ __forceinline__ MergedRow merge_row(const ForwardArgs& a, int branch, int64_t grow, int head) {
  const int lane = threadIdx.x & 31, parts = a.branch_splits[branch];
  float max2 = neg_inf(), sum = 0.f;
#pragma unroll 4
  for (int s = lane; s < parts; s += 32) {
    const float2 ml = a.split_ml[part_slot(a, branch, s, grow, head)];
    if (ml.x > max2) {
      sum = sum * fast_exp2(max2 - ml.x) + ml.y;
      max2 = ml.x;
    } else if (ml.x != neg_inf()) {
      sum += ml.y * fast_exp2(ml.x - max2);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float other_max = __shfl_xor_sync(0xffffffffu, max2, off);
    const float other_sum = __shfl_xor_sync(0xffffffffu, sum, off);
    const float merged = fmaxf(max2, other_max);
    if (merged != neg_inf()) sum = sum * fast_exp2(max2 - merged) + other_sum * fast_exp2(other_max - merged);
    max2 = merged;
  }
  return {max2, sum};
}

// The lse (natural log) of a branch of (row grow, head) from its merged statistics.
__device__ __forceinline__ void store_branch_lse(const ForwardArgs& a, int64_t grow, int head, int branch,
                                                 const MergedRow& row) {
  constexpr float kLn2 = 0.69314718055994531f;
  a.lse[(grow * a.num_q_heads + head) * kNumBranches + branch] = row.sum > 0.f ? row.lse2() * kLn2 : neg_inf();
}

// Where the merged outputs of (row grow, head) go: each branch output rounded to T (as the prefill
// stores them) to out_branch (win only when kept), and the gated sum of the rounded outputs to out.
template <class T>
struct CombinedRow {
  float gate[kNumBranches];
  T* branch_out[kNumBranches];
  T* out;

  __device__ __forceinline__ CombinedRow(const ForwardArgs& a, int64_t grow, int head) {
    using Tr = TypeTraits<T>;
    const int b = static_cast<int>(grow / a.seqlen);
    const int64_t i = grow % a.seqlen;
    const T* g = static_cast<const T*>(a.gates.data) + int64_t{b} * a.gates.batch_stride + i * a.gates.seq_stride +
                 int64_t{head} * a.gates.head_stride;
#pragma unroll
    for (int branch = 0; branch < kNumBranches; ++branch) gate[branch] = Tr::to_float(g[branch]);
    branch_out[kBranchCmp] = branch_row<T>(a.cmp_out, a, grow, head);
    branch_out[kBranchSlc] = branch_row<T>(a.slc_out, a, grow, head);
    branch_out[kBranchWin] = a.win_out != nullptr ? branch_row<T>(a.win_out, a, grow, head) : nullptr;
    out = static_cast<T*>(a.out) + int64_t{b} * a.out_batch_stride + i * a.out_seq_stride +
          int64_t{head} * a.out_head_stride;
  }

  // Dims dim, dim + 1 from the merged branch outputs o[branch] (fp32).
  __device__ __forceinline__ void store(int dim, const float2 (&o)[kNumBranches]) const {
    using Tr = TypeTraits<T>;
    float2 sum = make_float2(0.f, 0.f);
#pragma unroll
    for (int branch = 0; branch < kNumBranches; ++branch) {
      const uint32_t packed = Tr::pack(o[branch].x, o[branch].y);
      const float2 rounded = Tr::unpack(packed);
      if (branch_out[branch] != nullptr) *reinterpret_cast<uint32_t*>(branch_out[branch] + dim) = packed;
      sum.x += gate[branch] * rounded.x;
      sum.y += gate[branch] * rounded.y;
    }
    *reinterpret_cast<uint32_t*>(out + dim) = Tr::pack(sum.x, sum.y);
  }
};

// The slc kernel's epilogue when every branch ran one split (a.num_splits == 1): for one of the
// thread's rows (C-fragment rows r of acc, dims nb * 8 + 2 * (lane % 4)), the slc output from its
// registers and statistics `slc`, the cmp and win outputs from their single partials, merged as
// decode_combine_kernel would (one partial: weight 1 / sum). The partials are loaded kBatch
// n-blocks at a time ahead of the stores, which the compiler may not move loads across.
template <class T, int Dv>
__device__ __forceinline__ void combine_one_split(const ForwardArgs& a, int64_t grow, int head, const MergedRow& slc,
                                                  const float (&acc)[Dv / 8][4], int r) {
  constexpr int kBatch = 8;
  static_assert((Dv / 8) % kBatch == 0, "whole batches of n-blocks");
  const int tig = threadIdx.x & 3;
  const CombinedRow<T> dst(a, grow, head);
  MergedRow rows[kNumBranches];
  const float* partial[kNumBranches];
#pragma unroll
  for (int branch = 0; branch < kNumBranches; ++branch) {
    const int64_t slot = part_slot(a, branch, 0, grow, head);
    rows[branch] = slc;
    if (branch != kBranchSlc) {
      const float2 ml = a.split_ml[slot];
      rows[branch] = MergedRow{ml.x, ml.y};
    }
    partial[branch] = a.split_acc + slot * Dv + tig * 2;
  }
  float weight[kNumBranches];
#pragma unroll
  for (int branch = 0; branch < kNumBranches; ++branch) {
    weight[branch] = rows[branch].sum > 0.f ? 1.f / rows[branch].sum : 0.f;
    if (tig == 0) store_branch_lse(a, grow, head, branch, rows[branch]);
  }
#pragma unroll
  for (int nb0 = 0; nb0 < Dv / 8; nb0 += kBatch) {
    float2 part[kNumBranches][kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int nb = nb0 + u;
      part[kBranchCmp][u] = *reinterpret_cast<const float2*>(partial[kBranchCmp] + nb * 8);
      part[kBranchWin][u] = *reinterpret_cast<const float2*>(partial[kBranchWin] + nb * 8);
      part[kBranchSlc][u] = make_float2(acc[nb][2 * r], acc[nb][2 * r + 1]);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      float2 o[kNumBranches];
#pragma unroll
      for (int branch = 0; branch < kNumBranches; ++branch)
        o[branch] = make_float2(weight[branch] * part[branch][u].x, weight[branch] * part[branch][u].y);
      dst.store((nb0 + u) * 8 + tig * 2, o);
    }
  }
}

}  // namespace nsa::cuda_detail
