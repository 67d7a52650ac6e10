// Internal entry point of the CUDA forward, for tools that time its stages one by one
// (tools/nsa_bench_forward.cpp). nsa::cuda::forward == forward_stages(..., kStageAll).
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
};

// Runs the given stages only (each reads what the earlier ones wrote in an earlier call).
Status forward_stages(const ForwardParams& params, void* workspace, size_t workspace_bytes, void* stream,
                      unsigned stages);

}  // namespace nsa::cuda_detail
