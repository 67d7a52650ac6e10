// Internal entry points of the CUDA forward and backward, for tools that time their stages one
// by one (tools/nsa_bench_forward.cpp). nsa::cuda::forward == forward_stages(..., kStageAll),
// nsa::cuda::backward == backward_stages(..., kBwdStageAll).
#pragma once

#include <cstddef>

#include "nsa/nsa.h"

namespace nsa::cuda_detail {

enum Stage : unsigned {
  kStageCmp = 1u,     // compressed attention: o_cmp, lse[0]
  kStageSelect = 2u,  // scoring + top-n: block_indices (skipped when block_indices_given)
  kStageSlc = 4u,     // selected attention: o_slc, lse[1]
  kStageWin = 8u,     // window attention and the gated combine: out, o_win, lse[2]
  kStageAll = 15u,
  // With kStageCmp, kStageSlc, kStageWin: their cp.async kernels even where a TMA ring would run
  // (slc_gather_applies, sweep_ring_applies), so that tests compare the two and the bench times both.
  kStageCpAsyncSweeps = 16u,
};
// The stage of each attention branch (nsa/params.h: kBranchCmp, kBranchSlc, kBranchWin).
inline constexpr unsigned kStageBits[3] = {kStageCmp, kStageSlc, kStageWin};

enum BackwardStage : unsigned {
  kBwdStagePrep = 1u,     // zero the accumulators, dgates and delta, the block -> query index
  kBwdStageDq = 2u,       // dq of all branches (key-major selected dq: adds what kBwdStageSlc summed)
  kBwdStageCmp = 4u,      // dk_cmp, dv_cmp (into the fp32 accumulators)
  kBwdStageSlc = 8u,      // dk, dv of the selection branch (and its dq when key-major; then run first)
  kBwdStageWin = 16u,     // dk_win, dv_win (or into dk, dv when shared)
  kBwdStageConvert = 32u, // accumulators -> gradient tensors
  kBwdStageAll = 63u,
};

// Runs the given stages only (each reads what the earlier ones wrote in an earlier call).
Status forward_stages(const ForwardParams& params, void* workspace, size_t workspace_bytes, void* stream,
                      unsigned stages);
Status backward_stages(const BackwardParams& params, void* workspace, size_t workspace_bytes, void* stream,
                       unsigned stages);
// Whether the library's sm_90a code (the wgmma paths, key-major selected dq) runs on the current
// device: DeviceLimits::wgmma_sweeps; false when the device cannot be queried.
bool sm90a_code_runs();
// Whether the backward with these params computes the selection branch's dq key-major
// (BackwardParams::selected_dq as resolved on the current device; docs/decisions/0012); false for
// params that do not validate.
bool backward_key_major_dq(const BackwardParams& params);

}  // namespace nsa::cuda_detail
