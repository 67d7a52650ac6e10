// nsa::cuda::forward: the API layer of the CUDA forward. Validates the params (the shared
// validate() for the contract, then what this backend supports), builds the kernel-side
// ForwardArgs and dispatches on (dtype, Dk, Dv) to the generated instantiations of
// launch_forward (src/cuda/forward_launch.cuh). Never synchronizes, never allocates.
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>

#include "cuda/dispatch.h"
#include "cuda/forward_args.h"
#include "cuda/forward_internal.h"
#include "cuda/forward_launch.h"
#include "cuda/instantiations/instances.h"
#include "nsa/nsa.h"

namespace nsa::cuda_detail {
namespace {

template <class... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

int64_t total_rows(const ForwardParams& p) {
  return p.varlen.cu_seqlens != nullptr ? p.varlen.total_tokens : p.shape.batch * p.shape.seqlen;
}

bool aligned(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// 16-byte vector loads: pointer 16-byte aligned and every stride a multiple of 8 elements.
Status check_vector_input(const char* name, const InputTensor& t, bool varlen) {
  if (t.data == nullptr) return Status::Ok();
  const bool strides_ok = t.seq_stride % 8 == 0 && t.head_stride % 8 == 0 && (varlen || t.batch_stride % 8 == 0);
  if (!aligned(t.data, 16) || !strides_ok)
    return Status::Unsupported(cat("nsa::cuda::forward: ", name,
                                   " must be 16-byte aligned with (batch, seq, head) strides that are multiples of 8 "
                                   "elements; got strides (",
                                   t.batch_stride, ", ", t.seq_stride, ", ", t.head_stride, ")"));
  return Status::Ok();
}

Status check_supported(const ForwardParams& p) {
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16)
    return Status::Unsupported(cat("nsa::cuda::forward supports dtypes " NSA_CUDA_SUPPORTED_DTYPES "; got ",
                                   dtype_name(p.dtype)));
  const Shape& s = p.shape;
  if (!nsa_cuda_supported_head_dims(s.head_dim_qk, s.head_dim_v))
    return Status::Unsupported(cat("nsa::cuda::forward supports head dims (Dk, Dv) in " NSA_CUDA_SUPPORTED_HEAD_DIMS
                                   "; got (",
                                   s.head_dim_qk, ", ", s.head_dim_v, ")"));
  const Config& c = p.config;
  const int64_t kMaxInt = std::numeric_limits<int32_t>::max();
  if (s.seqlen > (int64_t{1} << 30) || s.seqlen * (s.num_q_heads / s.num_kv_heads) > kMaxInt - 128)
    return Status::Unsupported(cat("nsa::cuda::forward: shape.seqlen * G must be < 2^31 - 128 and seqlen <= 2^30, got "
                                   "seqlen ", s.seqlen, ", G ", s.num_q_heads / s.num_kv_heads));
  if (s.batch > 65535 || s.num_kv_heads > 65535)
    return Status::Unsupported(cat("nsa::cuda::forward: batch and num_kv_heads must be <= 65535, got ", s.batch, ", ",
                                   s.num_kv_heads));
  if (c.cmp_block > (1 << 20) || c.cmp_stride > (1 << 20) || c.sel_block > (1 << 20) || c.num_selected > (1 << 16))
    return Status::Unsupported(cat("nsa::cuda::forward: cmp_block, cmp_stride, sel_block must be <= 2^20 and "
                                   "num_selected <= 2^16"));
  const bool varlen = p.varlen.cu_seqlens != nullptr;
  const struct { const char* name; const InputTensor& t; } inputs[] = {
      {"q", p.q}, {"k", p.k}, {"v", p.v}, {"k_win", p.k_win}, {"v_win", p.v_win}, {"k_cmp", p.k_cmp},
      {"v_cmp", p.v_cmp}};
  for (const auto& in : inputs) {
    Status st = check_vector_input(in.name, in.t, varlen);
    if (!st.ok()) return st;
  }
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
  a.batch = static_cast<int>(s.batch);
  a.num_q_heads = static_cast<int>(s.num_q_heads);
  a.num_kv_heads = static_cast<int>(s.num_kv_heads);
  a.group = static_cast<int>(s.num_q_heads / s.num_kv_heads);
  a.seqlen = s.seqlen;
  a.cmp_per_seq = num_cmp_tokens(s.seqlen, c.cmp_block, c.cmp_stride);
  a.cu_seqlens = p.varlen.cu_seqlens;
  a.cu_seqlens_cmp = p.varlen.cu_seqlens_cmp;
  a.cmp_block = static_cast<int>(c.cmp_block);
  a.cmp_stride = static_cast<int>(c.cmp_stride);
  a.sel_block = static_cast<int>(c.sel_block);
  a.num_selected = static_cast<int>(c.num_selected);
  a.num_init = static_cast<int>(std::min<int64_t>(c.num_init, c.num_selected));
  a.num_local = static_cast<int>(std::min<int64_t>(c.num_local, c.num_selected));
  a.window = std::min<int64_t>(c.window, s.seqlen);
  const double scale = c.scale > 0 ? c.scale : 1.0 / std::sqrt(static_cast<double>(s.head_dim_qk));
  a.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  auto ref = [](const InputTensor& t) { return TensorRef{t.data, t.batch_stride, t.seq_stride, t.head_stride}; };
  a.q = ref(p.q);
  a.k = ref(p.k);
  a.v = ref(p.v);
  a.k_win = ref(p.k_win.data != nullptr ? p.k_win : p.k);
  a.v_win = ref(p.v_win.data != nullptr ? p.v_win : p.v);
  a.k_cmp = ref(p.k_cmp);
  a.v_cmp = ref(p.v_cmp);
  a.gates = ref(p.gates);
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
  // Selected-block union of an attention CTA: positions covered by 64 rows, n blocks each.
  const int64_t max_blocks = (s.seqlen + c.sel_block - 1) / c.sel_block;
  // Block scores of every eligible block per selection position (launch_forward shrinks P to fit).
  a.select_blocks = static_cast<int>(max_blocks);
  const int64_t positions = std::min<int64_t>(64, 63 / a.group + 2);
  a.union_words = static_cast<int>((max_blocks + 31) / 32);
  a.union_capacity = static_cast<int>(std::min<int64_t>(positions * c.num_selected, max_blocks));
  return a;
}

template <class T, int Dk, int Dv>
Status run_instance(const ForwardArgs& a, cudaStream_t stream, unsigned stages) {
  if constexpr (kInstanceCompiled<T, Dk, Dv>) {
    return launch_forward<T, Dk, Dv>(a, stream, stages);
  } else {
    return Status::Unsupported(cat("nsa::cuda::forward: (Dk, Dv) = (", Dk, ", ", Dv,
                                   ") with this dtype is not compiled in this build (NSA_CUDA_FAST_BUILD compiles "
                                   "bfloat16 with (64, 64) only)"));
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
