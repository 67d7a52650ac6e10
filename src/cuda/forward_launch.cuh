// Definition of launch_forward<T, Dk, Dv>: grid shapes, dynamic shared memory and attributes of
// the four kernels of the forward, in stream order:
//   1. attention_kernel<cmp>:  compressed attention       grid (ceil(T*G/(64*W)), Hkv, B), 128*W threads
//   2. select_kernel:          scores + top-n             grid (ceil(T/P), Hkv, B), P <= max(1, 16*warps/R)
//   3. attention_kernel<slc>:  selected attention         grid (ceil(T*G/64), Hkv, B), 128 threads
//   4. attention_kernel<win>:  window attention + gated combine, grid as 1.
// On sm_90a each of 1, 3 and 4 runs as tma_ring_kernel<branch> instead (its K / V tiles through a
// TMA ring) where its ring applies (slc_gather_applies, sweep_ring_applies) and the driver encodes
// the branch's tensor maps.
// W: the CTA's warpgroups (prefill_warpgroups: three for cmp and win on wgmma at Dk >= 128).
// The decode path (ForwardArgs::num_splits > 0) launches the kernels of src/cuda/decode.cuh instead.
// Included only by the generated instantiation files.
#pragma once

#include <algorithm>

#include "cuda/attention.cuh"
#include "cuda/decode.cuh"
#include "cuda/launch_common.cuh"
#include "cuda/stages.h"
#include "cuda/forward_launch.h"
#include "cuda/kv_tensor_maps.h"
#include "cuda/select.cuh"

namespace nsa::cuda_detail {

constexpr const char* kForwardApi = "nsa::cuda::forward";

// The decode path (src/cuda/decode.cuh): every stage, the attention kernels split over
// a.num_splits CTAs per (kv head, sequence), with the warps sharing the rows when kWarpSplit.
template <class T, int Dk, int Dv, bool kWarpSplit>
Status launch_decode(const ForwardArgs& a, cudaStream_t stream, int max_smem) {
  const int64_t attn_smem = AttentionSmem::tiles_bytes(Dk, Dv, sweep_stages(true, Dk, Dv));
  const int64_t slc_smem = attn_smem + AttentionSmem::union_bytes(a.union_words, a.union_capacity);
  const int64_t score_smem =
      int64_t{4} * (score_alone(a) ? score_smem_floats(a) + a.decode_blocks
                                  : std::max(score_smem_floats(a), a.topn_in_smem ? a.decode_blocks : 0));
  const auto cmp_win_kernel = decode_cmp_win_kernel<T, Dk, Dv, kWarpSplit>;
  const auto slc_kernel = attention_kernel<T, Dk, Dv, kBranchSlc, true, kWarpSplit>;
  Status st = prepare_kernel(kForwardApi, cmp_win_kernel, attn_smem, max_smem, "the decode cmp + win kernel");
  if (st.ok()) st = prepare_kernel(kForwardApi, slc_kernel, slc_smem, max_smem, "the decode slc kernel");
  if (st.ok())
    st = prepare_kernel(kForwardApi, decode_score_topn_kernel<T>, score_smem, max_smem, "the decode scoring kernel");
  if (!st.ok()) return st;
  const unsigned heads = static_cast<unsigned>(a.num_kv_heads), batch = static_cast<unsigned>(a.batch);
  const unsigned cmp_win_ctas = static_cast<unsigned>(int64_t{a.branch_splits[kBranchCmp] + a.branch_splits[kBranchWin]} *
                                                      a.num_kv_heads * a.batch);
  // The first kernel waits for the stream's earlier work as usual; each later one is chained to
  // the one before it (launch_chained), so that its launch and prologue overlap that kernel's tail.
  cmp_win_kernel<<<cmp_win_ctas, kAttnThreads, attn_smem, stream>>>(a);
  if (!(st = launch_status(kForwardApi, "launching the decode cmp + win kernel")).ok()) return st;
  if (!a.indices_given) {
    const unsigned score_ctas = static_cast<unsigned>((a.decode_blocks + a.score_blocks - 1) / a.score_blocks);
    st = launch_chained(kForwardApi, "the decode scoring kernel", decode_score_topn_kernel<T>,
                        dim3(score_ctas, heads, batch), dim3(kDecodeThreads), score_smem, stream, a);
    if (!st.ok()) return st;
  }
  st = launch_chained(kForwardApi, "the decode slc kernel", slc_kernel,
                      dim3(static_cast<unsigned>(a.num_splits), heads, batch), dim3(kAttnThreads), slc_smem, stream, a);
  if (!st.ok() || a.num_splits == 1) return st;  // one split: the slc kernel merged (decode_merge.cuh)
  const unsigned combine_ctas = static_cast<unsigned>(int64_t{a.batch} * a.seqlen * a.num_q_heads);
  return launch_chained(kForwardApi, "the decode combine kernel", decode_combine_kernel<T, Dv>, dim3(combine_ctas),
                        dim3(kCombineThreads), 0, stream, a);
}

template <class T, int Dk, int Dv>
Status launch_forward(const ForwardArgs& a, cudaStream_t stream, unsigned stages) {
  DeviceLimits device;
  Status st = device_limits(kForwardApi, &device);
  if (!st.ok()) return st;
  const int max_smem = device.max_smem;
  if (a.num_splits > 0)
    return a.warp_split ? launch_decode<T, Dk, Dv, true>(a, stream, max_smem)
                        : launch_decode<T, Dk, Dv, false>(a, stream, max_smem);

  // Per branch: wgmma (sm_90a code on an sm_90 device) and the warpgroups of a CTA (64 rows each).
  const auto wgmma = [&](int branch) { return device.wgmma_sweeps && prefill_sweep_wgmma(branch, Dk); };
  const auto warpgroups = [&](int branch) { return prefill_warpgroups(branch, Dk, wgmma(branch)); };
  const auto sweep_smem = [&](int branch) {
    return AttentionSmem::sweep_bytes(Dk, Dv, sweep_stages(false, Dk, Dv), wgmma(branch), warpgroups(branch));
  };
  const int64_t union_bytes = AttentionSmem::union_bytes(a.union_words, a.union_capacity);
  // Per attention branch: the ring kernel where it applies and its maps encode (not with
  // kStageCpAsyncSweeps), else attention_kernel; its shared memory; its maps.
  struct BranchKernel {
    bool ring = false;
    int64_t smem = 0;
    KvTensorMaps maps{};
  };
  BranchKernel kernels[kNumBranches];
  for (int branch = 0; branch < kNumBranches; ++branch) {
    BranchKernel& k = kernels[branch];
    const bool applies = branch == kBranchSlc ? slc_gather_applies(Dk, Dv, a.sel_block, a.union_words,
                                                                   a.union_capacity, device.wgmma_sweeps, a.key_extent)
                                              : sweep_ring_applies(branch, Dk, Dv, device.wgmma_sweeps);
    k.ring = (stages & kStageBits[branch]) && !(stages & kStageCpAsyncSweeps) && applies &&
             encode_kv_tensor_maps(a, branch, Dk, Dv, &k.maps);
    k.smem = k.ring ? tma_ring_smem(branch, Dk, Dv, a.union_words, a.union_capacity)
                    : sweep_smem(branch) + (branch == kBranchSlc ? union_bytes : 0);
  }
  // Selection: P positions per CTA keep [P][ceil(T / l')] block scores in shared memory
  // (select_tiling). 3 <= G <= 16 take the shuffle path (whole positions per warp).
  const SelectTiling select = select_tiling(a.group, Dk, device.wgmma_sweeps, a.select_blocks, max_smem);
  ForwardArgs sa = a;
  sa.select_t_per_cta = select.positions;
  sa.select_chunks = select.chunks;
  const int padded_group = select_padded_group(a.group);
  const int64_t select_smem = select.smem_bytes;
  const auto sel_kernel = padded_group == 16  ? select_kernel<T, Dk, 16>
                          : padded_group == 8 ? select_kernel<T, Dk, 8>
                          : padded_group == 4 ? select_kernel<T, Dk, 4>
                                              : select_kernel<T, Dk, 0>;
  const bool run_select = (stages & kStageSelect) && !a.indices_given;
  // Calls f(kernel, name, args...) with `branch`'s attention kernel (its ring kernel where
  // kernels[branch].ring), the kernel's name (for prepare_kernel and kernel_launch_status) and its
  // launch arguments.
  const auto with_branch_kernel = [&](int branch, const auto& f) {
    const BranchKernel& k = kernels[branch];
    const auto of_branch = [&](auto kb) {
      constexpr int kB = decltype(kb)::value;
      static constexpr const char* kNames[kNumBranches][2] = {
          {"the cmp attention kernel", "the cmp attention kernel (TMA ring)"},
          {"the slc attention kernel", "the slc attention kernel (TMA ring)"},
          {"the win attention kernel", "the win attention kernel (TMA ring)"}};
      if constexpr (tma_ring_compiled(kB, Dk))
        if (k.ring) return f(tma_ring_kernel<T, Dk, Dv, kB>, kNames[kB][1], a, k.maps);
      return f(attention_kernel<T, Dk, Dv, kB>, kNames[kB][0], a);
    };
    if (branch == kBranchCmp) return of_branch(std::integral_constant<int, kBranchCmp>{});
    if (branch == kBranchSlc) return of_branch(std::integral_constant<int, kBranchSlc>{});
    return of_branch(std::integral_constant<int, kBranchWin>{});
  };
  for (int branch = 0; branch < kNumBranches && st.ok(); ++branch) {
    if (!(stages & kStageBits[branch])) continue;
    st = with_branch_kernel(branch, [&](auto kernel, const char* name, const auto&...) {
      return prepare_kernel(kForwardApi, kernel, kernels[branch].smem, max_smem, name);
    });
  }
  if (st.ok() && run_select) st = prepare_kernel(kForwardApi, sel_kernel, select_smem, max_smem, "the selection kernel");
  if (!st.ok()) return st;

  const auto attn_grid = [&](int branch) {
    const int64_t rows = 64 * warpgroups(branch);
    return dim3(static_cast<unsigned>((a.seqlen * a.group + rows - 1) / rows), static_cast<unsigned>(a.num_kv_heads),
                static_cast<unsigned>(a.batch));
  };
  const auto attn_threads = [&](int branch) { return kAttnThreads * warpgroups(branch); };
  const dim3 select_grid(static_cast<unsigned>((a.seqlen + sa.select_t_per_cta - 1) / sa.select_t_per_cta),
                         static_cast<unsigned>(a.num_kv_heads), static_cast<unsigned>(a.batch));
  // Launches `branch`'s attention kernel (each reads what the earlier stages wrote).
  const auto launch_branch = [&](int branch) {
    return with_branch_kernel(branch, [&](auto kernel, const char* name, const auto&... args) {
      kernel<<<attn_grid(branch), attn_threads(branch), kernels[branch].smem, stream>>>(args...);
      return kernel_launch_status(kForwardApi, name, cudaGetLastError());
    });
  };
  if ((stages & kStageCmp) && !(st = launch_branch(kBranchCmp)).ok()) return st;
  if (run_select) {
    sel_kernel<<<select_grid, select.threads, select_smem, stream>>>(sa);
    if (!(st = launch_status(kForwardApi, "launching the selection kernel")).ok()) return st;
  }
  if ((stages & kStageSlc) && !(st = launch_branch(kBranchSlc)).ok()) return st;
  if ((stages & kStageWin) && !(st = launch_branch(kBranchWin)).ok()) return st;
  return Status::Ok();
}

}  // namespace nsa::cuda_detail
