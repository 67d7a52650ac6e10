// Host-side pieces shared by the CUDA API layers (forward.cu, backward.cu): the checks of what the
// CUDA backend supports that forward and backward params have in common, and the ForwardArgs
// fields both fill from them (shape, config, inputs). P is ForwardParams or
// BackwardParams, whose common fields have the same names.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "common/message.h"
#include "cuda/dispatch.h"
#include "cuda/forward_args.h"
#include "nsa/nsa.h"

namespace nsa::cuda_detail {

using detail::cat;

template <class P>
int64_t total_rows(const P& p) {
  return p.varlen.cu_seqlens != nullptr ? p.varlen.total_tokens : p.shape.batch * p.shape.seqlen;
}

template <class P>
int64_t total_cmp_rows(const P& p) {
  return p.varlen.cu_seqlens != nullptr
             ? p.varlen.total_cmp_tokens
             : p.shape.batch * num_cmp_tokens(p.shape.seqlen, p.config.cmp_block, p.config.cmp_stride);
}

inline bool aligned(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// 16-byte vector loads: pointer 16-byte aligned and every stride a multiple of 8 elements.
inline Status check_vector_input(const char* api, const char* name, const InputTensor& t, bool varlen) {
  if (t.data == nullptr) return Status::Ok();
  const bool strides_ok = t.seq_stride % 8 == 0 && t.head_stride % 8 == 0 && (varlen || t.batch_stride % 8 == 0);
  if (!aligned(t.data, 16) || !strides_ok)
    return Status::Unsupported(cat(api, ": ", name,
                                   " must be 16-byte aligned with (batch, seq, head) strides that are multiples of 8 "
                                   "elements; got strides (",
                                   t.batch_stride, ", ", t.seq_stride, ", ", t.head_stride, ")"));
  return Status::Ok();
}

// dtype, head dims, size limits of the kernels' index arithmetic, alignment of the inputs.
template <class P>
Status check_common_supported(const P& p, const char* api) {
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16)
    return Status::Unsupported(cat(api, " supports dtypes " NSA_CUDA_SUPPORTED_DTYPES "; got ", dtype_name(p.dtype)));
  const Shape& s = p.shape;
  if (!nsa_cuda_supported_head_dims(s.head_dim_qk, s.head_dim_v))
    return Status::Unsupported(cat(api, " supports head dims (Dk, Dv) in " NSA_CUDA_SUPPORTED_HEAD_DIMS "; got (",
                                   s.head_dim_qk, ", ", s.head_dim_v, ")"));
  const Config& c = p.config;
  const int64_t kMaxInt = std::numeric_limits<int32_t>::max();
  if (s.seqlen > (int64_t{1} << 30) || s.seqlen * (s.num_q_heads / s.num_kv_heads) > kMaxInt - 256)
    return Status::Unsupported(cat(api, ": shape.seqlen * G must be < 2^31 - 256 and seqlen <= 2^30, got seqlen ",
                                   s.seqlen, ", G ", s.num_q_heads / s.num_kv_heads));
  if (s.batch > 65535 || s.num_kv_heads > 65535)
    return Status::Unsupported(
        cat(api, ": batch and num_kv_heads must be <= 65535, got ", s.batch, ", ", s.num_kv_heads));
  if (c.cmp_block > (1 << 20) || c.cmp_stride > (1 << 20) || c.sel_block > (1 << 20) || c.num_selected > (1 << 16))
    return Status::Unsupported(
        cat(api, ": cmp_block, cmp_stride, sel_block must be <= 2^20 and num_selected <= 2^16"));
  const bool varlen = p.varlen.cu_seqlens != nullptr;
  const struct {
    const char* name;
    const InputTensor& t;
  } inputs[] = {{"q", p.q},         {"k", p.k},         {"v", p.v},         {"k_win", p.k_win},
                {"v_win", p.v_win}, {"k_cmp", p.k_cmp}, {"v_cmp", p.v_cmp}};
  for (const auto& in : inputs) {
    Status st = check_vector_input(api, in.name, in.t, varlen);
    if (!st.ok()) return st;
  }
  return Status::Ok();
}

// What the dispatch returns for a (dtype, Dk, Dv) this build did not compile; compiled: the
// instances it did (kCompiledInstances).
inline Status not_compiled(const char* api, int dk, int dv, const char* compiled) {
  return Status::Unsupported(cat(api, ": (Dk, Dv) = (", dk, ", ", dv,
                                 ") with this dtype is not compiled in this build; it compiled:", compiled,
                                 " (CMake options NSA_CUDA_INSTANCES, NSA_CUDA_FAST_BUILD)"));
}

inline TensorRef tensor_ref(const InputTensor& t) { return TensorRef{t.data, t.batch_stride, t.seq_stride, t.head_stride}; }

// The softmax scale: the config's, or 1 / sqrt(Dk) when it is 0.
template <class P>
double softmax_scale(const P& p) {
  return p.config.scale > 0 ? p.config.scale : 1.0 / std::sqrt(static_cast<double>(p.shape.head_dim_qk));
}

// Shape, config and input fields of ForwardArgs (the rest is the caller's).
template <class P>
void fill_common_args(ForwardArgs& a, const P& p) {
  const Config& c = p.config;
  const Shape& s = p.shape;
  a.batch = static_cast<int>(s.batch);
  a.num_q_heads = static_cast<int>(s.num_q_heads);
  a.num_kv_heads = static_cast<int>(s.num_kv_heads);
  a.group = static_cast<int>(s.num_q_heads / s.num_kv_heads);
  a.seqlen = s.seqlen;
  a.cmp_per_seq = num_cmp_tokens(s.seqlen, c.cmp_block, c.cmp_stride);
  a.cu_seqlens = p.varlen.cu_seqlens;
  a.cu_seqlens_cmp = p.varlen.cu_seqlens_cmp;
  a.cache_seqlens = nullptr;
  a.cache_max_held = 0;
  a.key_extent = s.seqlen;
  a.cmp_key_rows = p.varlen.cu_seqlens != nullptr ? p.varlen.total_cmp_tokens : a.cmp_per_seq;
  a.tokens_read = nullptr;
  if constexpr (std::is_same_v<P, ForwardParams>) {
    if (p.cache.seqlens != nullptr) {
      a.cache_seqlens = p.cache.seqlens;
      a.key_extent = p.cache.capacity;
      a.cmp_key_rows = p.cache.cmp_capacity;
      // num_cmp_tokens(held) <= cmp_capacity  <=>  held <= cmp_capacity * d + l - 1
      a.cache_max_held = std::min(p.cache.capacity, p.cache.cmp_capacity * c.cmp_stride + c.cmp_block - 1);
    }
    a.tokens_read = p.tokens_read;
  }
  a.cmp_block = static_cast<int>(c.cmp_block);
  a.cmp_stride = static_cast<int>(c.cmp_stride);
  a.sel_block = static_cast<int>(c.sel_block);
  a.num_selected = static_cast<int>(c.num_selected);
  a.num_init = static_cast<int>(std::min<int64_t>(c.num_init, c.num_selected));
  a.num_local = static_cast<int>(std::min<int64_t>(c.num_local, c.num_selected));
  a.window = std::min<int64_t>(c.window, a.key_extent);
  a.scale_log2 = static_cast<float>(softmax_scale(p) * 1.4426950408889634);
  a.q = tensor_ref(p.q);
  a.k = tensor_ref(p.k);
  a.v = tensor_ref(p.v);
  a.k_win = tensor_ref(p.k_win.data != nullptr ? p.k_win : p.k);
  a.v_win = tensor_ref(p.v_win.data != nullptr ? p.v_win : p.v);
  a.k_cmp = tensor_ref(p.k_cmp);
  a.v_cmp = tensor_ref(p.v_cmp);
  a.gates = tensor_ref(p.gates);
  // The selected-block union of a query-major CTA: positions covered by 64 rows, n blocks each.
  const int64_t max_blocks = (a.key_extent + c.sel_block - 1) / c.sel_block;
  const int64_t positions = std::min<int64_t>(64, 63 / a.group + 2);
  a.union_words = static_cast<int>((max_blocks + 31) / 32);
  a.union_capacity = static_cast<int>(std::min<int64_t>(positions * c.num_selected, max_blocks));
}

}  // namespace nsa::cuda_detail
