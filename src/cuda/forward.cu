// nsa::cuda::forward: the API layer of the CUDA forward. Validates the params (the shared
// validate() for the contract, then what this backend supports), builds the kernel-side
// ForwardArgs and dispatches on (dtype, Dk, Dv) to the generated instantiations of
// launch_forward (src/cuda/forward_launch.cuh). Never synchronizes, never allocates.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
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

// The decode path (src/cuda/decode.cuh) is taken with a KV cache when all the queries of a
// (sequence, kv head) fit one 64-row tile; the compressed key tiles are then split until up to
// kDecodeTargetCtas CTAs run (B = 1, Hkv = 4, 64k: 32 splits of two tiles), so that small batches
// still fill the GPU: about two CTAs per SM of an H100 / H200 (132 SMs, the three-stage sweeps'
// shared memory) less the window branch's, so that the whole cmp + win launch is one wave. (With
// 256 cmp CTAs the B = 1, 64k launch took 14 us instead of 9: its last CTAs waited for a slot.)
constexpr int64_t kDecodeTargetCtas = 224;
constexpr int64_t kDecodeScoreSmemBytes = 48 * 1024;  // bound of the scoring CTA's pg and of the top-n's copy
constexpr int64_t kDecodeScoreStageBytes = 16 * 1024;  // each of the scoring CTA's kDecodeScoreStages score buffers

struct DecodePlan {
  int num_splits = 0;  // 0: the prefill kernels
  int branch_splits[kNumBranches] = {0, 0, 0};
  bool warp_split = false;
  int64_t score_stride = 0;
  int blocks = 0;
  int score_blocks = 0;
};

DecodePlan decode_plan(const ForwardParams& p) {
  DecodePlan plan;
  const Shape& s = p.shape;
  const Config& c = p.config;
  if (p.cache.seqlens == nullptr || s.num_kv_heads <= 0 || s.seqlen * (s.num_q_heads / s.num_kv_heads) > 64)
    return plan;
  const int64_t blocks = (p.cache.capacity + c.sel_block - 1) / c.sel_block;
  const int64_t cmp_capacity = num_cmp_tokens(p.cache.capacity, c.cmp_block, c.cmp_stride);
  // The scoring CTAs: about kDecodeTargetCtas of them (one wave), each 128 .. 8192 compressed
  // tokens (its blocks' tokens' head-summed probabilities stay in shared memory), so that from
  // B * Hkv >= kDecodeTargetCtas on one CTA scores all the blocks of its (sequence, kv head) and
  // picks them without a round trip through block_scores (score_alone).
  const int64_t tokens_per_block = c.sel_block / c.cmp_stride, overlap = c.cmp_block / c.cmp_stride;
  const int64_t per_seq = std::max<int64_t>(1, kDecodeTargetCtas / std::max<int64_t>(1, s.batch * s.num_kv_heads));
  const int64_t score_blocks = std::clamp<int64_t>((blocks + per_seq - 1) / per_seq, std::max<int64_t>(1, 128 / tokens_per_block),
                                                   std::max<int64_t>(1, 8192 / tokens_per_block));
  if (4 * (score_blocks * tokens_per_block + overlap) > kDecodeScoreSmemBytes) return plan;
  // Upper bounds of each branch's key tiles (the device knows the exact counts): the compressed
  // tokens of the capacity; the union of the m queries' n blocks; the window of the m queries.
  const int64_t m = s.seqlen;
  const int64_t branch_tiles[kNumBranches] = {
      std::max<int64_t>(1, (cmp_capacity + 63) / 64),
      std::max<int64_t>(1, std::min(m * c.num_selected, blocks) * ((c.sel_block + 63) / 64)),
      (std::min(c.window, p.cache.capacity) + m - 1 + 63) / 64 + 1};
  // Splits of equal tile counts (the largest count the target allows), so that none is empty.
  const int64_t ctas = std::max<int64_t>(1, s.batch * s.num_kv_heads);
  const int64_t target = std::min<int64_t>(kDecodeMaxSplits, std::max<int64_t>(1, kDecodeTargetCtas / ctas));
  const int64_t tiles_per_split = (branch_tiles[kBranchCmp] + target - 1) / target;
  plan.num_splits = static_cast<int>((branch_tiles[kBranchCmp] + tiles_per_split - 1) / tiles_per_split);
  for (int branch = 0; branch < kNumBranches; ++branch)
    plan.branch_splits[branch] = static_cast<int>(std::min<int64_t>(plan.num_splits, branch_tiles[branch]));
  plan.warp_split = m * (s.num_q_heads / s.num_kv_heads) <= 16;
  plan.score_stride = std::max<int64_t>(1, (cmp_capacity + 63) / 64) * 64;  // whole key tiles
  plan.blocks = static_cast<int>(blocks);
  plan.score_blocks = static_cast<int>(score_blocks);
  return plan;
}

// Workspace layout (byte offsets, 256-aligned): the staged o_cmp / o_slc planes when out_branch
// is null, then the decode path's split partials and cmp scores.
struct WorkspaceLayout {
  size_t split_acc = 0, split_ml = 0, cmp_scores = 0, block_scores = 0, score_counters = 0, total = 0;
};

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

WorkspaceLayout workspace_layout(const ForwardParams& p) {
  WorkspaceLayout w;
  const int64_t rows = total_rows(p);
  const size_t row_heads = static_cast<size_t>(std::max<int64_t>(0, rows * p.shape.num_q_heads));
  size_t offset = 0;
  if (p.out_branch == nullptr)
    offset = align256(2 * row_heads * static_cast<size_t>(p.shape.head_dim_v * dtype_size(p.dtype)));
  const DecodePlan plan = decode_plan(p);
  if (plan.num_splits > 0) {
    w.cmp_scores = offset;
    offset += align256(row_heads * static_cast<size_t>(plan.score_stride) * sizeof(float));
    const size_t partials = static_cast<size_t>(kNumBranches) * static_cast<size_t>(plan.num_splits) * row_heads;
    w.split_acc = offset;
    offset += align256(partials * static_cast<size_t>(p.shape.head_dim_v) * sizeof(float));
    w.split_ml = offset;
    offset += align256(partials * 2 * sizeof(float));
    w.block_scores = offset;
    const size_t row_kv_heads = static_cast<size_t>(std::max<int64_t>(0, rows * p.shape.num_kv_heads));
    offset += align256(row_kv_heads * static_cast<size_t>(plan.blocks) * sizeof(float));
    w.score_counters = offset;
    offset += align256(static_cast<size_t>(std::max<int64_t>(0, p.shape.batch * p.shape.num_kv_heads)) * sizeof(int));
  }
  w.total = offset;
  return w;
}

Status check_supported(const ForwardParams& p) {
  Status st = check_common_supported(p, "nsa::cuda::forward");
  if (!st.ok()) return st;
  const bool varlen = p.varlen.cu_seqlens != nullptr;
  const OutputTensor& o = p.out;
  if (!aligned(o.data, 4) || o.seq_stride % 2 != 0 || o.head_stride % 2 != 0 || (!varlen && o.batch_stride % 2 != 0))
    return Status::Unsupported("nsa::cuda::forward: out must be 4-byte aligned with even strides");
  if (!aligned(p.out_branch, 4) || !aligned(p.lse, 4) || !aligned(p.block_indices, 4))
    return Status::Unsupported("nsa::cuda::forward: out_branch, lse and block_indices must be 4-byte aligned");
  if (p.cache.seqlens != nullptr && p.cache.capacity > (int64_t{1} << 30))
    return Status::Unsupported(cat("nsa::cuda::forward: cache.capacity must be <= 2^30, got ", p.cache.capacity));
  if (!aligned(p.tokens_read, 8))
    return Status::Unsupported("nsa::cuda::forward: tokens_read must be 8-byte aligned");
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
  const auto whole_chunks = [](const void* ptr, std::initializer_list<int64_t> strides) {
    bool ok = aligned(ptr, 16);
    for (int64_t stride : strides) ok = ok && stride % 8 == 0;
    return ok;
  };
  const int64_t out_batch_stride = p.varlen.cu_seqlens != nullptr ? 0 : p.out.batch_stride;
  a.chunk_stores = whole_chunks(a.out, {out_batch_stride, a.out_seq_stride, a.out_head_stride}) &&
                   whole_chunks(a.cmp_out, {a.branch_row_stride, a.branch_head_stride}) &&
                   whole_chunks(a.slc_out, {}) && (a.win_out == nullptr || whole_chunks(a.win_out, {}));
  a.lse = static_cast<float*>(p.lse);
  const DecodePlan plan = decode_plan(p);
  a.num_splits = plan.num_splits;
  a.warp_split = plan.warp_split;
  for (int branch = 0; branch < kNumBranches; ++branch) a.branch_splits[branch] = plan.branch_splits[branch];
  if (plan.num_splits > 0) {
    const WorkspaceLayout w = workspace_layout(p);
    char* base = static_cast<char*>(workspace);
    a.split_acc = reinterpret_cast<float*>(base + w.split_acc);
    a.split_ml = reinterpret_cast<float2*>(base + w.split_ml);
    a.cmp_scores = reinterpret_cast<float*>(base + w.cmp_scores);
    a.cmp_score_stride = plan.score_stride;
    a.block_scores = reinterpret_cast<float*>(base + w.block_scores);
    a.score_counters = reinterpret_cast<int*>(base + w.score_counters);
    a.decode_blocks = plan.blocks;
    a.score_blocks = plan.score_blocks;
    a.score_stage_tokens = static_cast<int>(
        std::clamp<int64_t>(kDecodeScoreStageBytes / (4 * a.group) / 4 * 4, 4, (score_tokens(a) + 3) / 4 * 4 + 4));
    a.topn_in_smem = int64_t{4} * plan.blocks <= kDecodeScoreSmemBytes;
  }
  // Block scores of every eligible block per selection position (launch_forward shrinks P to fit).
  a.select_blocks = static_cast<int>((a.key_extent + c.sel_block - 1) / c.sel_block);
  a.key_rows = p.varlen.cu_seqlens != nullptr ? p.varlen.total_tokens : a.key_extent;
  return a;
}

template <class T, int Dk, int Dv>
Status run_instance(const ForwardArgs& a, cudaStream_t stream, unsigned stages) {
  if constexpr (kInstanceCompiled<T, Dk, Dv>) {
    return launch_forward<T, Dk, Dv>(a, stream, stages);
  } else {
    return not_compiled("nsa::cuda::forward", Dk, Dv, kCompiledInstances);
  }
}

}  // namespace

Status forward_stages(const ForwardParams& p, void* workspace, size_t workspace_bytes, void* stream,
                      unsigned stages) {
  Status st = validate(p, MemorySpace::kDevice);
  if (!st.ok()) return st;
  const size_t needed = nsa::cuda::forward_workspace_bytes(p);
  if (needed > 0 && (workspace == nullptr || workspace_bytes < needed || !aligned(workspace, 256)))
    return Status::Invalid(cat("nsa::cuda::forward: the workspace must hold forward_workspace_bytes(params) = ", needed,
                               " bytes (256-byte aligned); got ", workspace_bytes, " bytes at ", workspace));
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

size_t forward_workspace_bytes(const ForwardParams& p) { return cuda_detail::workspace_layout(p).total; }

Status forward(const ForwardParams& p, void* workspace, size_t workspace_bytes, void* stream) {
  return cuda_detail::forward_stages(p, workspace, workspace_bytes, stream, cuda_detail::kStageAll);
}

}  // namespace nsa::cuda
