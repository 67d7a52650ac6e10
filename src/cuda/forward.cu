// nsa::cuda::forward: the API layer of the CUDA forward. Validates the params (the shared
// validate() for the contract, then what this backend supports), builds the kernel-side
// ForwardArgs and dispatches on (dtype, Dk, Dv) to the generated instantiations of
// launch_forward (src/cuda/forward_launch.cuh). Never synchronizes, never allocates.
#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda/api_common.h"
#include "cuda/dispatch.h"
#include "cuda/forward_args.h"
#include "cuda/stages.h"
#include "cuda/forward_launch.h"
#include "cuda/instantiations/instances.h"
#include "nsa/nsa.h"

namespace nsa::cuda_detail {
namespace {

Status check_supported(const ForwardParams& p) {
  Status st = check_common_supported(p, "nsa::cuda::forward");
  if (!st.ok()) return st;
  const bool varlen = p.varlen.cu_seqlens != nullptr;
  const OutputTensor& o = p.out;
  if (!aligned(o.data, 4) || o.seq_stride % 2 != 0 || o.head_stride % 2 != 0 || (!varlen && o.batch_stride % 2 != 0))
    return Status::Unsupported("nsa::cuda::forward: out must be 4-byte aligned with even strides");
  if (!aligned(p.out_branch, 4) || !aligned(p.lse, 4) || !aligned(p.block_indices, 4))
    return Status::Unsupported("nsa::cuda::forward: out_branch, lse and block_indices must be 4-byte aligned");
  return Status::Ok();
}

ForwardArgs make_args(const ForwardParams& p, void* workspace) {
  const Config& c = p.config;
  const Shape& s = p.shape;
  ForwardArgs a{};
  fill_common_args(a, p);
  a.block_indices = p.block_indices;
  a.indices_given = p.block_indices_given;
  a.out = p.out.data;
  a.out_batch_stride = p.out.batch_stride;
  a.out_seq_stride = p.out.seq_stride;
  a.out_head_stride = p.out.head_stride;
  const size_t elem = static_cast<size_t>(dtype_size(p.dtype));
  if (p.out_branch != nullptr) {
    char* base = static_cast<char*>(p.out_branch);
    a.cmp_out = base;
    a.slc_out = base + elem * static_cast<size_t>(s.head_dim_v);
    a.win_out = base + 2 * elem * static_cast<size_t>(s.head_dim_v);
    a.branch_row_stride = s.num_q_heads * kNumBranches * s.head_dim_v;
    a.branch_head_stride = kNumBranches * s.head_dim_v;
  } else {
    char* base = static_cast<char*>(workspace);
    a.cmp_out = base;
    a.slc_out = base + elem * static_cast<size_t>(total_rows(p) * s.num_q_heads * s.head_dim_v);
    a.win_out = nullptr;
    a.branch_row_stride = s.num_q_heads * s.head_dim_v;
    a.branch_head_stride = s.head_dim_v;
  }
  a.lse = static_cast<float*>(p.lse);
  // Selection CTA: P = max(1, 64 / G) positions with all G heads, in 64-row chunks.
  a.select_t_per_cta = std::max(1, 64 / a.group);
  a.select_chunks = (a.select_t_per_cta * a.group + 63) / 64;
  // Block scores of every eligible block per selection position (launch_forward shrinks P to fit).
  a.select_blocks = static_cast<int>((s.seqlen + c.sel_block - 1) / c.sel_block);
  return a;
}

template <class T, int Dk, int Dv>
Status run_instance(const ForwardArgs& a, cudaStream_t stream, unsigned stages) {
  if constexpr (kInstanceCompiled<T, Dk, Dv>) {
    return launch_forward<T, Dk, Dv>(a, stream, stages);
  } else {
    return not_compiled("nsa::cuda::forward", Dk, Dv);
  }
}

}  // namespace

Status forward_stages(const ForwardParams& p, void* workspace, size_t workspace_bytes, void* stream,
                      unsigned stages) {
  Status st = validate(p, MemorySpace::kDevice);
  if (!st.ok()) return st;
  const size_t needed = nsa::cuda::forward_workspace_bytes(p);
  if (needed > 0 && (workspace == nullptr || workspace_bytes < needed || !aligned(workspace, 4)))
    return Status::Invalid(cat("nsa::cuda::forward: out_branch is null, so the workspace must hold ", needed,
                               " bytes (4-byte aligned); got ", workspace_bytes, " bytes at ", workspace));
  st = check_supported(p);
  if (!st.ok()) return st;
  if (total_rows(p) == 0) return Status::Ok();
  const ForwardArgs args = make_args(p, workspace);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  NSA_CUDA_DTYPE_SWITCH(p.dtype, T,
                        NSA_CUDA_HEAD_DIM_SWITCH(p.shape.head_dim_qk, p.shape.head_dim_v, DK, DV,
                                                 return run_instance<T, DK, DV>(args, s, stages);))
  return Status::Unsupported("nsa::cuda::forward: no kernel for this dtype and head dims");
}

}  // namespace nsa::cuda_detail

namespace nsa::cuda {

bool built() { return true; }

size_t forward_workspace_bytes(const ForwardParams& p) {
  if (p.out_branch != nullptr) return 0;
  const int64_t rows = p.varlen.cu_seqlens != nullptr ? p.varlen.total_tokens : p.shape.batch * p.shape.seqlen;
  const int64_t bytes = 2 * rows * p.shape.num_q_heads * p.shape.head_dim_v * dtype_size(p.dtype);
  return bytes > 0 ? static_cast<size_t>(bytes) : 0;
}

Status forward(const ForwardParams& p, void* workspace, size_t workspace_bytes, void* stream) {
  return cuda_detail::forward_stages(p, workspace, workspace_bytes, stream, cuda_detail::kStageAll);
}

}  // namespace nsa::cuda
