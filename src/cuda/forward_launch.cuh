// Definition of launch_forward<T, Dk, Dv>: grid shapes, dynamic shared memory and attributes of
// the four kernels of the forward, in stream order:
//   1. attention_kernel<cmp>:  compressed attention       grid (ceil(T*G/(64*W)), Hkv, B), 128*W threads
//   2. select_kernel:          scores + top-n             grid (ceil(T/P), Hkv, B), P <= max(1, 16*warps/R)
//   3. attention_kernel<slc>:  selected attention         grid (ceil(T*G/64), Hkv, B), 128 threads
//      (slc_gather_kernel, the same with a TMA ring, on sm_90a at Dk >= 128 where the K / V tensor maps encode)
//   4. attention_kernel<win>:  window attention + gated combine, grid as 1.
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
  const int64_t cmp_smem = sweep_smem(kBranchCmp), win_smem = sweep_smem(kBranchWin);
  const int64_t union_bytes = AttentionSmem::union_bytes(a.union_words, a.union_capacity);
  const int64_t slc_smem = sweep_smem(kBranchSlc) + union_bytes;
  // The slc kernel with a TMA ring where slc_gather_applies, if the driver encodes tensor maps of
  // this K / V layout.
  KvTensorMaps maps{};
  const bool slc_gather = (stages & kStageSlc) && !(stages & kStageSlcCpAsync) &&
                          slc_gather_applies(Dk, Dv, a.sel_block, a.union_words, a.union_capacity,
                                             device.wgmma_sweeps, a.key_extent) &&
                          encode_kv_tensor_maps(a, Dk, Dv, &maps);
  const int64_t gather_smem = slc_gather_smem(Dk, Dv, a.union_words, a.union_capacity);
  // Selection: P positions per CTA keep [P][ceil(T / l')] block scores in shared memory
  // (select_tiling). 3 <= G <= 16 take the shuffle path (whole positions per warp).
  const SelectTiling select = select_tiling(a.group, Dk, device.wgmma_sweeps, a.select_blocks, max_smem);
  ForwardArgs sa = a;
  sa.select_t_per_cta = select.positions;
  sa.select_chunks = select.chunks;
  const int padded_group = select_padded_group(a.group);
  const int64_t select_smem = select.smem_bytes;
  const auto cmp_kernel = attention_kernel<T, Dk, Dv, kBranchCmp>;
  const auto slc_kernel = attention_kernel<T, Dk, Dv, kBranchSlc>;
  const auto win_kernel = attention_kernel<T, Dk, Dv, kBranchWin>;
  const auto sel_kernel = padded_group == 16  ? select_kernel<T, Dk, 16>
                          : padded_group == 8 ? select_kernel<T, Dk, 8>
                          : padded_group == 4 ? select_kernel<T, Dk, 4>
                                              : select_kernel<T, Dk, 0>;
  const bool run_select = (stages & kStageSelect) && !a.indices_given;
  st = prepare_kernel(kForwardApi, cmp_kernel, cmp_smem, max_smem, "the cmp attention kernel");
  if (st.ok() && !slc_gather) st = prepare_kernel(kForwardApi, slc_kernel, slc_smem, max_smem, "the slc attention kernel");
  if (st.ok() && slc_gather)
    st = prepare_kernel(kForwardApi, slc_gather_kernel<T, Dk, Dv>, gather_smem, max_smem,
                        "the slc attention kernel (TMA)");
  if (st.ok()) st = prepare_kernel(kForwardApi, win_kernel, win_smem, max_smem, "the win attention kernel");
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
  if (stages & kStageCmp) {
    cmp_kernel<<<attn_grid(kBranchCmp), attn_threads(kBranchCmp), cmp_smem, stream>>>(a);
    if (!(st = launch_status(kForwardApi, "launching the cmp attention kernel")).ok()) return st;
  }
  if (run_select) {
    sel_kernel<<<select_grid, select.threads, select_smem, stream>>>(sa);
    if (!(st = launch_status(kForwardApi, "launching the selection kernel")).ok()) return st;
  }
  if (stages & kStageSlc) {
    if (slc_gather)
      slc_gather_kernel<T, Dk, Dv><<<attn_grid(kBranchSlc), kAttnThreads, gather_smem, stream>>>(a, maps);
    else
      slc_kernel<<<attn_grid(kBranchSlc), attn_threads(kBranchSlc), slc_smem, stream>>>(a);
    if (!(st = launch_status(kForwardApi, "launching the slc attention kernel")).ok()) return st;
  }
  if (stages & kStageWin) {
    win_kernel<<<attn_grid(kBranchWin), attn_threads(kBranchWin), win_smem, stream>>>(a);
    if (!(st = launch_status(kForwardApi, "launching the win attention kernel")).ok()) return st;
  }
  return Status::Ok();
}

}  // namespace nsa::cuda_detail
