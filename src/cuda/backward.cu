// nsa::cuda::backward: the API layer of the CUDA backward. Validates the params (the shared
// validate() for the contract, then what this backend supports), lays out the workspace, zeroes
// the fp32 accumulators, builds the selection branch's block -> query index (keys kernel, a CUB
// radix sort, segment offsets; independent of dtype and head dims, so it lives here) and
// dispatches on (dtype, Dk, Dv) to the generated instantiations of launch_backward
// (src/cuda/backward_launch.cuh). Never synchronizes, never allocates.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "cuda/api_common.h"
#include "cuda/backward.cuh"
#include "cuda/backward_args.h"
#include "cuda/backward_launch.h"
#include "cuda/backward_split.h"
#include "cuda/dispatch.h"
#include "cuda/instantiations/instances.h"
#include "cuda/launch_common.cuh"
#include "cuda/stages.h"
#include "nsa/nsa.h"

namespace nsa::cuda_detail {
namespace {

constexpr const char* kApi = "nsa::cuda::backward";

// ------------------------------------------------------------------------------------------------
// The block -> query index: one key per (row, kv head, slot) of block_indices, a radix sort, then
// the first key of every segment.

__device__ int sequence_of_row(const ForwardArgs& a, int64_t row) {
  if (a.cu_seqlens == nullptr) return static_cast<int>(row / a.seqlen);
  int lo = 0, hi = a.batch - 1;  // the last b with cu_seqlens[b] <= row
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (a.cu_seqlens[mid] <= row) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

__global__ void selection_keys_kernel(const BackwardArgs a, uint64_t* keys, int64_t num_pairs) {
  const int n = a.num_selected, Hkv = a.num_kv_heads;
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < num_pairs;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = e / (int64_t{Hkv} * n);
    const int h = static_cast<int>((e / n) % Hkv);
    const int b = sequence_of_row(a, row);
    const int64_t t = row - (a.cu_seqlens != nullptr ? int64_t{a.cu_seqlens[b]} : int64_t{b} * a.seqlen);
    const int j = a.block_indices[e];
    const bool valid = j >= 0 && j <= t / a.sel_block;
    const uint64_t segment = (uint64_t(b) * Hkv + h) * uint64_t(a.max_blocks) + uint64_t(j);
    keys[e] = valid ? (segment << 31) | uint64_t(t) : ~uint64_t{0};
  }
}

// offsets[s] = the first index of sorted `keys` whose segment is >= s, for s in [0, num_segments].
__global__ void segment_offsets_kernel(const uint64_t* keys, int64_t num_pairs, int64_t num_segments,
                                       int32_t* offsets) {
  auto segment = [&](int64_t i) -> int64_t {
    if (i >= num_pairs) return num_segments;
    const uint64_t s = keys[i] >> 31;
    return s < uint64_t(num_segments) ? int64_t(s) : num_segments;
  };
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i <= num_pairs;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t prev = i == 0 ? -1 : segment(i - 1);
    const int64_t cur = segment(i);
    for (int64_t s = prev + 1; s <= cur; ++s) offsets[s] = static_cast<int32_t>(i);
  }
}


// Whether the selection branch's dq runs key-major (and the workspace holds its accumulator):
// SelectedDq::kKeyMajor asked (refused later where it cannot run), or kAuto on dims where it pays,
// not deterministic, on a device that runs the sm_90a code (a failed device query: query-major).
bool key_major_dq(const BackwardParams& p) {
  if (p.selected_dq == SelectedDq::kQueryMajor) return false;
  if (p.selected_dq == SelectedDq::kKeyMajor) return true;
  const Shape& s = p.shape;
  const Config& c = p.config;
  return !p.deterministic &&
         selected_dq_key_major_pays(s.head_dim_qk, s.num_q_heads / s.num_kv_heads, s.seqlen, c.sel_block,
                                    c.num_selected, c.num_init + c.num_local) &&
         sm90a_code_runs();
}

// Byte offsets of the workspace's parts (each 256-byte aligned). The fp32 dK / dV accumulators are
// one contiguous range [acc_begin, acc_end) so that one memset zeroes them; the key-major dq
// accumulator (held, dq_slc_bytes > 0, only when that mode runs) is zeroed apart.
struct Workspace {
  int64_t num_pairs = 0;     // rows * Hkv * n entries of block_indices
  int64_t num_segments = 0;  // B * Hkv * max_blocks
  int end_bit = 0;           // bits of the sort keys
  size_t delta = 0, acc_begin = 0, dk = 0, dv = 0, dkw = 0, dvw = 0, dkc = 0, dvc = 0, acc_end = 0;
  size_t dq_slc = 0, dq_slc_bytes = 0;
  size_t keys_in = 0, keys_out = 0, offsets = 0, sort_temp = 0, sort_temp_bytes = 0, total = 0;
};

Workspace layout(const BackwardParams& p) {
  Workspace w;
  const Shape& s = p.shape;
  const int64_t rows = total_rows(p), cmp_rows = total_cmp_rows(p);
  const int64_t max_blocks = (s.seqlen + p.config.sel_block - 1) / p.config.sel_block;
  w.num_pairs = rows * s.num_kv_heads * p.config.num_selected;
  w.num_segments = s.batch * s.num_kv_heads * max_blocks;
  int segment_bits = 0;
  while ((int64_t{1} << segment_bits) <= w.num_segments) ++segment_bits;  // 2^bits > num_segments
  w.end_bit = std::min(64, 31 + segment_bits);
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t offset = at;
    at = (at + bytes + 255) / 256 * 256;
    return offset;
  };
  const size_t f = sizeof(float);
  w.delta = take(f * static_cast<size_t>(rows * s.num_q_heads * kNumBranches));
  w.acc_begin = at;
  w.dk = take(f * static_cast<size_t>(rows * s.num_kv_heads * s.head_dim_qk));
  w.dv = take(f * static_cast<size_t>(rows * s.num_kv_heads * s.head_dim_v));
  w.dkw = p.k_win.data != nullptr ? take(f * static_cast<size_t>(rows * s.num_kv_heads * s.head_dim_qk)) : w.dk;
  w.dvw = p.v_win.data != nullptr ? take(f * static_cast<size_t>(rows * s.num_kv_heads * s.head_dim_v)) : w.dv;
  w.dkc = take(f * static_cast<size_t>(cmp_rows * s.num_kv_heads * s.head_dim_qk));
  w.dvc = take(f * static_cast<size_t>(cmp_rows * s.num_kv_heads * s.head_dim_v));
  w.acc_end = at;
  if (key_major_dq(p)) {
    w.dq_slc_bytes = f * static_cast<size_t>(rows * s.num_q_heads * s.head_dim_qk);
    w.dq_slc = take(w.dq_slc_bytes);
  }
  w.keys_in = take(sizeof(uint64_t) * static_cast<size_t>(w.num_pairs));
  w.keys_out = take(sizeof(uint64_t) * static_cast<size_t>(w.num_pairs));
  w.offsets = take(sizeof(int32_t) * static_cast<size_t>(w.num_segments + 1));
  // CUB's temporary storage for this many keys (a host-side size query, no device work).
  cub::DeviceRadixSort::SortKeys(nullptr, w.sort_temp_bytes, static_cast<const uint64_t*>(nullptr),
                                 static_cast<uint64_t*>(nullptr), w.num_pairs, 0, w.end_bit);
  w.sort_temp = take(w.sort_temp_bytes);
  w.total = at;
  return w;
}

// 4-byte element-pair stores: pointer 4-byte aligned, even strides.
Status check_pair_output(const char* name, const OutputTensor& t, bool varlen) {
  if (t.data == nullptr) return Status::Ok();
  if (!aligned(t.data, 4) || t.seq_stride % 2 != 0 || t.head_stride % 2 != 0 || (!varlen && t.batch_stride % 2 != 0))
    return Status::Unsupported(cat(kApi, ": ", name, " must be 4-byte aligned with even (batch, seq, head) strides; got (",
                                   t.batch_stride, ", ", t.seq_stride, ", ", t.head_stride, ")"));
  return Status::Ok();
}

Status check_supported(const BackwardParams& p, const Workspace& w) {
  Status st = check_common_supported(p, kApi);
  if (!st.ok()) return st;
  const bool varlen = p.varlen.cu_seqlens != nullptr;
  st = check_vector_input(kApi, "grad_out", p.grad_out, varlen);
  const struct {
    const char* name;
    const OutputTensor& t;
  } outputs[] = {{"grad_q", p.grad_q},         {"grad_k", p.grad_k},         {"grad_v", p.grad_v},
                 {"grad_k_win", p.grad_k_win}, {"grad_v_win", p.grad_v_win}, {"grad_k_cmp", p.grad_k_cmp},
                 {"grad_v_cmp", p.grad_v_cmp}};
  for (const auto& out : outputs)
    if (st.ok()) st = check_pair_output(out.name, out.t, varlen);
  if (!st.ok()) return st;
  if (!aligned(p.out_branch, 4) || !aligned(p.lse, 4) || !aligned(p.block_indices, 4))
    return Status::Unsupported(cat(kApi, ": out_branch, lse and block_indices must be 4-byte aligned"));
  if (p.selected_dq != SelectedDq::kAuto && p.selected_dq != SelectedDq::kQueryMajor &&
      p.selected_dq != SelectedDq::kKeyMajor)
    return Status::Invalid(cat(kApi, ": selected_dq must be kAuto, kQueryMajor or kKeyMajor; got ",
                               static_cast<int>(p.selected_dq)));
  if (p.selected_dq == SelectedDq::kKeyMajor && p.deterministic)
    return Status::Invalid(cat(kApi, ": selected_dq = kKeyMajor adds dq with floating-point atomics; it cannot be "
                                     "deterministic (use kQueryMajor or kAuto with deterministic = true)"));
  if (p.selected_dq == SelectedDq::kKeyMajor && p.shape.head_dim_qk > kKeyMajorDqMaxDk)
    return Status::Unsupported(cat(kApi, ": selected_dq = kKeyMajor supports Dk <= ", kKeyMajorDqMaxDk, "; got Dk = ",
                                   p.shape.head_dim_qk));
  if (w.num_pairs >= std::numeric_limits<int32_t>::max() || w.num_segments >= std::numeric_limits<int32_t>::max())
    return Status::Unsupported(cat(kApi, ": rows * Hkv * num_selected and B * Hkv * ceil(T / sel_block) must be < 2^31, "
                                   "got ",
                                   w.num_pairs, " and ", w.num_segments));
  return Status::Ok();
}

OutputRef output_ref(const OutputTensor& t) { return OutputRef{t.data, t.batch_stride, t.seq_stride, t.head_stride}; }

BackwardArgs make_args(const BackwardParams& p, const Workspace& w, char* workspace) {
  BackwardArgs a{};
  fill_common_args(a, p);
  const Shape& s = p.shape;
  a.block_indices = const_cast<int32_t*>(p.block_indices);  // read only in the backward
  a.lse = static_cast<float*>(const_cast<void*>(p.lse));     // read only in the backward
  a.total_rows = total_rows(p);
  a.total_cmp_rows = total_cmp_rows(p);
  a.scale = static_cast<float>(static_cast<double>(a.scale_log2) / 1.4426950408889634);
  a.grad_out = tensor_ref(p.grad_out);
  a.out_branch = p.out_branch;
  a.grad_q = output_ref(p.grad_q);
  a.grad_gates = output_ref(p.grad_gates);
  a.grad_k = output_ref(p.grad_k);
  a.grad_v = output_ref(p.grad_v);
  a.grad_k_win = p.k_win.data != nullptr ? output_ref(p.grad_k_win) : OutputRef{};
  a.grad_v_win = p.v_win.data != nullptr ? output_ref(p.grad_v_win) : OutputRef{};
  a.grad_k_cmp = output_ref(p.grad_k_cmp);
  a.grad_v_cmp = output_ref(p.grad_v_cmp);
  auto f32 = [&](size_t offset) { return reinterpret_cast<float*>(workspace + offset); };
  a.delta = f32(w.delta);
  a.dk_acc = f32(w.dk);
  a.dv_acc = f32(w.dv);
  a.dkw_acc = f32(w.dkw);
  a.dvw_acc = f32(w.dvw);
  a.dkc_acc = f32(w.dkc);
  a.dvc_acc = f32(w.dvc);
  a.dq_slc_acc = w.dq_slc_bytes > 0 ? f32(w.dq_slc) : nullptr;
  a.sel_keys = reinterpret_cast<const uint64_t*>(workspace + w.keys_out);
  a.seg_offsets = reinterpret_cast<const int32_t*>(workspace + w.offsets);
  a.max_blocks = static_cast<int>((s.seqlen + p.config.sel_block - 1) / p.config.sel_block);
  // Default mode: per branch, its key tiles and their typical query list (cmp: half the sequence;
  // slc: the n * l' positions that select a block on average once T >> n * l'; win: w + 63).
  // Deterministic: one CTA per key tile.
  const int64_t group = s.num_q_heads / s.num_kv_heads, T = s.seqlen;
  const int64_t list_positions[kNumBranches] = {
      (T + 1) / 2, std::min<int64_t>(T, int64_t{p.config.num_selected} * p.config.sel_block),
      std::min<int64_t>(T, a.window + 63)};
  for (int c = 0; c < kNumBranches; ++c) {
    const int64_t key_tile_ctas = s.batch * key_major_tiles(a, c) * s.num_kv_heads;
    a.split_positions[c] = static_cast<int>(
        p.deterministic ? std::max<int64_t>(1, T) : key_major_split_positions(key_tile_ctas, list_positions[c], group, T));
  }
  return a;
}

Status build_selection_index(const BackwardArgs& a, const Workspace& w, char* workspace, cudaStream_t stream) {
  uint64_t* keys_in = reinterpret_cast<uint64_t*>(workspace + w.keys_in);
  uint64_t* keys_out = reinterpret_cast<uint64_t*>(workspace + w.keys_out);
  int32_t* offsets = reinterpret_cast<int32_t*>(workspace + w.offsets);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((w.num_pairs + 255) / 256 + 1, 132 * 16));
  if (w.num_pairs > 0) {
    selection_keys_kernel<<<grid, 256, 0, stream>>>(a, keys_in, w.num_pairs);
    size_t temp_bytes = w.sort_temp_bytes;
    const cudaError_t err = cub::DeviceRadixSort::SortKeys(workspace + w.sort_temp, temp_bytes, keys_in, keys_out,
                                                           w.num_pairs, 0, w.end_bit, stream);
    if (err != cudaSuccess) return {StatusCode::kBackendError, cat(kApi, ": radix sort: ", cudaGetErrorString(err))};
  }
  segment_offsets_kernel<<<grid, 256, 0, stream>>>(keys_out, w.num_pairs, w.num_segments, offsets);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return {StatusCode::kBackendError, cat(kApi, ": launching the selection index kernels: ", cudaGetErrorString(err))};
  return Status::Ok();
}

template <class T, int Dk, int Dv>
Status run_instance(const BackwardArgs& a, cudaStream_t stream, unsigned stages) {
  if constexpr (kInstanceCompiled<T, Dk, Dv>) {
    return launch_backward<T, Dk, Dv>(a, stream, stages);
  } else {
    return not_compiled(kApi, Dk, Dv, kCompiledInstances);
  }
}

}  // namespace

Status backward_stages(const BackwardParams& p, void* workspace, size_t workspace_bytes, void* stream,
                       unsigned stages) {
  Status st = validate(p, MemorySpace::kDevice);
  if (!st.ok()) return st;
  const Workspace w = layout(p);
  st = check_supported(p, w);
  if (!st.ok()) return st;
  if (workspace == nullptr || workspace_bytes < w.total || !aligned(workspace, 256))
    return Status::Invalid(cat(kApi, ": the workspace must hold backward_workspace_bytes() = ", w.total,
                               " bytes, 256-byte aligned; got ", workspace_bytes, " bytes at ", workspace));
  if (total_rows(p) == 0) return Status::Ok();
  char* ws = static_cast<char*>(workspace);
  if (p.selected_dq == SelectedDq::kKeyMajor && !sm90a_code_runs())
    return Status::Unsupported(cat(kApi, ": selected_dq = kKeyMajor needs the sm_90a code (a Hopper GPU and a "
                                         "build for sm_90a); this device runs without it"));
  const BackwardArgs args = make_args(p, w, ws);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (stages & kBwdStagePrep) {
    cudaError_t err = cudaMemsetAsync(ws + w.acc_begin, 0, w.acc_end - w.acc_begin, s);
    if (err == cudaSuccess && args.dq_slc_acc != nullptr) err = cudaMemsetAsync(ws + w.dq_slc, 0, w.dq_slc_bytes, s);
    if (err != cudaSuccess) return {StatusCode::kBackendError, cat(kApi, ": cudaMemsetAsync: ", cudaGetErrorString(err))};
    st = build_selection_index(args, w, ws, s);
    if (!st.ok()) return st;
  }
  NSA_CUDA_DTYPE_SWITCH(p.dtype, T,
                        NSA_CUDA_HEAD_DIM_SWITCH(p.shape.head_dim_qk, p.shape.head_dim_v, DK, DV,
                                                 return run_instance<T, DK, DV>(args, s, stages);))
  return Status::Unsupported(cat(kApi, ": no kernel for this dtype and head dims"));
}

bool sm90a_code_runs() {
  DeviceLimits device;
  return device_limits(kApi, &device).ok() && device.wgmma_sweeps;
}

bool backward_key_major_dq(const BackwardParams& p) {
  return validate(p, MemorySpace::kDevice).ok() && layout(p).dq_slc_bytes > 0;
}

}  // namespace nsa::cuda_detail

namespace nsa::cuda {

size_t backward_workspace_bytes(const BackwardParams& p) {
  if (!validate(p, MemorySpace::kDevice).ok()) return 0;
  return cuda_detail::layout(p).total;
}

Status backward(const BackwardParams& p, void* workspace, size_t workspace_bytes, void* stream) {
  return cuda_detail::backward_stages(p, workspace, workspace_bytes, stream, cuda_detail::kBwdStageAll);
}

}  // namespace nsa::cuda
