// Validation of ForwardParams / BackwardParams against the contract, shared by every backend.
// Each failure returns kInvalidArgument with a message naming the argument, what was expected
// and what was given. Host-side only: device-resident contents (cu_seqlens, cache.seqlens,
// block_indices on a GPU) are checked by the backend that can read them, if at all.
#include <cmath>
#include <string>
#include <vector>

#include "common/message.h"
#include "nsa/nsa.h"

namespace nsa {
namespace {

template <class... Parts>
Status invalid(const Parts&... parts) {
  return Status::Invalid(detail::cat(parts...));
}

#define NSA_RETURN_IF_ERROR(expr)       \
  do {                                  \
    Status status_ = (expr);            \
    if (!status_.ok()) return status_;  \
  } while (0)

Status check_config(const Config& c) {
  if (c.cmp_block <= 0) return invalid("config.cmp_block (l) must be positive, got ", c.cmp_block);
  if (c.cmp_stride <= 0) return invalid("config.cmp_stride (d) must be positive, got ", c.cmp_stride);
  if (c.sel_block <= 0) return invalid("config.sel_block (l') must be positive, got ", c.sel_block);
  if (c.cmp_block % c.cmp_stride != 0)
    return invalid("config.cmp_stride (d) must divide config.cmp_block (l), got l=", c.cmp_block, " d=", c.cmp_stride);
  if (c.sel_block % c.cmp_stride != 0)
    return invalid("config.cmp_stride (d) must divide config.sel_block (l'), got l'=", c.sel_block,
                   " d=", c.cmp_stride);
  if (c.num_init < 0) return invalid("config.num_init must be >= 0, got ", c.num_init);
  if (c.num_local < 0) return invalid("config.num_local must be >= 0, got ", c.num_local);
  if (c.num_selected < 1) return invalid("config.num_selected (n) must be >= 1, got ", c.num_selected);
  if (c.num_selected < c.num_init + c.num_local)
    return invalid("config.num_selected (n) must be >= num_init + num_local = ", c.num_init + c.num_local,
                   ", got n=", c.num_selected);
  if (c.window < 1) return invalid("config.window (w) must be >= 1, got ", c.window);
  if (!std::isfinite(c.scale) || c.scale < 0)
    return invalid("config.scale must be finite and >= 0 (0 selects 1/sqrt(head_dim_qk)), got ", c.scale);
  return Status::Ok();
}

Status check_shape(const Shape& s, DType dtype) {
  const struct { const char* name; int64_t value; } dims[] = {
      {"shape.batch", s.batch},           {"shape.seqlen", s.seqlen},           {"shape.num_q_heads", s.num_q_heads},
      {"shape.num_kv_heads", s.num_kv_heads}, {"shape.head_dim_qk", s.head_dim_qk}, {"shape.head_dim_v", s.head_dim_v}};
  for (const auto& dim : dims)
    if (dim.value <= 0) return invalid(dim.name, " must be positive, got ", dim.value);
  if (s.num_q_heads % s.num_kv_heads != 0)
    return invalid("shape.num_q_heads (", s.num_q_heads, ") must be a multiple of shape.num_kv_heads (",
                   s.num_kv_heads, ")");
  if (dtype_size(dtype) == 0) return invalid("dtype must be one of float32, float64, bfloat16, float16, got code ",
                                             static_cast<int>(dtype));
  return Status::Ok();
}

// Sizes of one tensor's three strided dimensions (batch, seq, head); the last dim is contiguous.
struct Extent {
  int64_t batch, seq, heads, dim;
};

Status check_tensor_strides(const char* name, int64_t batch_stride, int64_t seq_stride, int64_t head_stride,
                            const Extent& e, bool varlen, bool is_output) {
  if (seq_stride < 0 || head_stride < 0 || (!varlen && batch_stride < 0))
    return invalid(name, ": strides must be >= 0, got (batch, seq, head) = (", batch_stride, ", ", seq_stride, ", ",
                   head_stride, ")");
  if (!is_output) return Status::Ok();
  // Outputs must not alias: sorted by stride, each dim must step over everything inside it.
  struct Dim { int64_t stride, size; };
  std::vector<Dim> dims = {{head_stride, e.heads}, {seq_stride, e.seq}};
  if (!varlen) dims.push_back({batch_stride, e.batch});
  for (size_t a = 0; a < dims.size(); ++a)
    for (size_t b = a + 1; b < dims.size(); ++b)
      if (dims[b].stride < dims[a].stride) std::swap(dims[a], dims[b]);
  int64_t span = e.dim;  // elements covered by the inner dims
  for (const Dim& d : dims) {
    if (d.size <= 1) continue;
    if (d.stride < span)
      return invalid(name, ": output strides (batch, seq, head) = (", batch_stride, ", ", seq_stride, ", ", head_stride,
                     ") make elements overlap for shape (", e.batch, ", ", e.seq, ", ", e.heads, ", ", e.dim, ")");
    span = d.stride * (d.size - 1) + span;
  }
  return Status::Ok();
}

Status check_input(const char* name, const InputTensor& t, const Extent& e, bool varlen, bool required) {
  if (t.data == nullptr) {
    if (required) return invalid(name, " must not be null");
    return Status::Ok();
  }
  return check_tensor_strides(name, t.batch_stride, t.seq_stride, t.head_stride, e, varlen, false);
}

Status check_output(const char* name, const OutputTensor& t, const Extent& e, bool varlen, bool required) {
  if (t.data == nullptr) {
    if (required) return invalid(name, " must not be null");
    return Status::Ok();
  }
  return check_tensor_strides(name, t.batch_stride, t.seq_stride, t.head_stride, e, varlen, true);
}

// Extents of the query-row, raw-key and compressed-key tensors for this layout.
struct Extents {
  bool varlen;
  int64_t rows_batch, rows_seq;  // query rows (q, gates, outputs): (B, T), (1, total) or, a cache, (B, m)
  int64_t key_batch, key_seq;    // raw keys (k, v, k_win, v_win): the query rows or (B, capacity)
  int64_t cmp_batch, cmp_seq;    // compressed keys: (B, Tc), (1, total_cmp) or (B, cmp_capacity)
};

// Decode / chunked prefill: the m = shape.seqlen queries of each sequence against its KV cache
// (params.h, KvCacheView). With MemorySpace::kDevice seqlens lives on the GPU and is not read here.
Status check_cache(const Config& c, const Shape& s, const Varlen& v, const KvCacheView& cache, MemorySpace space,
                   Extents* out) {
  if (v.cu_seqlens != nullptr || v.cu_seqlens_cmp != nullptr)
    return invalid("cache.seqlens (decode / chunked prefill) needs the padded layout: varlen.cu_seqlens and "
                   "varlen.cu_seqlens_cmp must be null");
  const int64_t m = s.seqlen;
  if (cache.capacity < m)
    return invalid("cache.capacity must be >= shape.seqlen (m, the queries per sequence) = ", m, ", got ",
                   cache.capacity);
  // Every sequence holds at least its m query positions, hence at least their compressed tokens.
  const int64_t min_cmp = num_cmp_tokens(m, c.cmp_block, c.cmp_stride);
  if (cache.cmp_capacity < min_cmp)
    return invalid("cache.cmp_capacity must be >= num_cmp_tokens(shape.seqlen) = ", min_cmp,
                   " (and >= 0), got ", cache.cmp_capacity);
  *out = {false, s.batch, m, s.batch, cache.capacity, s.batch, cache.cmp_capacity};
  if (space == MemorySpace::kDevice) return Status::Ok();
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t len = cache.seqlens[b];
    if (len < m)
      return invalid("cache.seqlens[", b, "] must be >= shape.seqlen (m, the queries per sequence) = ", m, ", got ",
                     len);
    if (len > cache.capacity)
      return invalid("cache.seqlens[", b, "] must be <= cache.capacity = ", cache.capacity, ", got ", len);
    const int64_t cmp_len = num_cmp_tokens(len, c.cmp_block, c.cmp_stride);
    if (cmp_len > cache.cmp_capacity)
      return invalid("cache.cmp_capacity must hold the ", cmp_len, " compressed tokens of cache.seqlens[", b,
                     "] = ", len, ", got ", cache.cmp_capacity);
  }
  return Status::Ok();
}

// With MemorySpace::kDevice the offsets live on the GPU and their contents are not read here.
Status check_layout(const Config& c, const Shape& s, const Varlen& v, const KvCacheView& cache, MemorySpace space,
                    Extents* out) {
  if (cache.seqlens != nullptr) return check_cache(c, s, v, cache, space, out);
  if (cache.capacity != 0 || cache.cmp_capacity != 0)
    return invalid("cache.capacity or cache.cmp_capacity is set but cache.seqlens is null (a cache needs seqlens), "
                   "got capacity ", cache.capacity, ", cmp_capacity ", cache.cmp_capacity);
  out->varlen = v.cu_seqlens != nullptr;
  if (!out->varlen) {
    if (v.cu_seqlens_cmp != nullptr)
      return invalid("varlen.cu_seqlens_cmp is set but varlen.cu_seqlens is null (packed layout needs both)");
    out->rows_batch = out->key_batch = s.batch;
    out->rows_seq = out->key_seq = s.seqlen;
    out->cmp_batch = s.batch;
    out->cmp_seq = num_cmp_tokens(s.seqlen, c.cmp_block, c.cmp_stride);
    return Status::Ok();
  }
  if (v.cu_seqlens_cmp == nullptr)
    return invalid("varlen.cu_seqlens_cmp must not be null when varlen.cu_seqlens is set");
  if (v.total_tokens < 0) return invalid("varlen.total_tokens must be >= 0, got ", v.total_tokens);
  if (v.total_cmp_tokens < 0) return invalid("varlen.total_cmp_tokens must be >= 0, got ", v.total_cmp_tokens);
  out->rows_batch = out->key_batch = 1;
  out->rows_seq = out->key_seq = v.total_tokens;
  out->cmp_batch = 1;
  out->cmp_seq = v.total_cmp_tokens;
  if (space == MemorySpace::kDevice) return Status::Ok();
  if (v.cu_seqlens[0] != 0) return invalid("varlen.cu_seqlens[0] must be 0, got ", v.cu_seqlens[0]);
  if (v.cu_seqlens_cmp[0] != 0) return invalid("varlen.cu_seqlens_cmp[0] must be 0, got ", v.cu_seqlens_cmp[0]);
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t len = int64_t{v.cu_seqlens[b + 1]} - v.cu_seqlens[b];
    if (len < 0)
      return invalid("varlen.cu_seqlens must be non-decreasing, got cu_seqlens[", b, "]=", v.cu_seqlens[b],
                     " > cu_seqlens[", b + 1, "]=", v.cu_seqlens[b + 1]);
    if (len > s.seqlen)
      return invalid("sequence ", b, " has length ", len, " > shape.seqlen (max_seqlen, the longest sequence) ",
                     s.seqlen);
    const int64_t cmp_len = int64_t{v.cu_seqlens_cmp[b + 1]} - v.cu_seqlens_cmp[b];
    const int64_t want = num_cmp_tokens(len, c.cmp_block, c.cmp_stride);
    if (cmp_len != want)
      return invalid("varlen.cu_seqlens_cmp: sequence ", b, " of length ", len, " must have ", want,
                     " compressed tokens, got cu_seqlens_cmp[", b + 1, "]-cu_seqlens_cmp[", b, "]=", cmp_len);
  }
  if (v.cu_seqlens[s.batch] != v.total_tokens)
    return invalid("varlen.cu_seqlens[", s.batch, "] must equal varlen.total_tokens=", v.total_tokens, ", got ",
                   v.cu_seqlens[s.batch]);
  if (v.cu_seqlens_cmp[s.batch] != v.total_cmp_tokens)
    return invalid("varlen.cu_seqlens_cmp[", s.batch, "] must equal varlen.total_cmp_tokens=", v.total_cmp_tokens,
                   ", got ", v.cu_seqlens_cmp[s.batch]);
  return Status::Ok();
}

// The checks shared by forward and backward: config, shape, layout and the input tensors. The
// backward has no cache (it gets an empty KvCacheView).
template <class P>
Status check_common(const P& p, const KvCacheView& cache, MemorySpace space, Extents* ext) {
  NSA_RETURN_IF_ERROR(check_config(p.config));
  NSA_RETURN_IF_ERROR(check_shape(p.shape, p.dtype));
  NSA_RETURN_IF_ERROR(check_layout(p.config, p.shape, p.varlen, cache, space, ext));
  const Shape& s = p.shape;
  const bool vl = ext->varlen;
  const int64_t B = ext->rows_batch, T = ext->rows_seq, Bk = ext->key_batch, Tk = ext->key_seq;
  const int64_t Bc = ext->cmp_batch, Tc = ext->cmp_seq;
  const bool has_cmp = Tc > 0 && Bc > 0;
  NSA_RETURN_IF_ERROR(check_input("q", p.q, {B, T, s.num_q_heads, s.head_dim_qk}, vl, true));
  NSA_RETURN_IF_ERROR(check_input("k", p.k, {Bk, Tk, s.num_kv_heads, s.head_dim_qk}, vl, true));
  NSA_RETURN_IF_ERROR(check_input("v", p.v, {Bk, Tk, s.num_kv_heads, s.head_dim_v}, vl, true));
  NSA_RETURN_IF_ERROR(check_input("k_win", p.k_win, {Bk, Tk, s.num_kv_heads, s.head_dim_qk}, vl, false));
  NSA_RETURN_IF_ERROR(check_input("v_win", p.v_win, {Bk, Tk, s.num_kv_heads, s.head_dim_v}, vl, false));
  NSA_RETURN_IF_ERROR(check_input("k_cmp", p.k_cmp, {Bc, Tc, s.num_kv_heads, s.head_dim_qk}, vl, has_cmp));
  NSA_RETURN_IF_ERROR(check_input("v_cmp", p.v_cmp, {Bc, Tc, s.num_kv_heads, s.head_dim_v}, vl, has_cmp));
  NSA_RETURN_IF_ERROR(check_input("gates", p.gates, {B, T, s.num_q_heads, kNumBranches}, vl, true));
  return Status::Ok();
}

// Query rows of sequence b (offset and count) and the position of its first query: 0 in
// prefill, seqlens[b] - m with a cache.
void sequence_rows(const Shape& s, const Varlen& v, const KvCacheView& cache, int64_t b, int64_t* first_row,
                   int64_t* length, int64_t* first_position) {
  if (v.cu_seqlens == nullptr) {
    *first_row = b * s.seqlen;
    *length = s.seqlen;
  } else {
    *first_row = v.cu_seqlens[b];
    *length = int64_t{v.cu_seqlens[b + 1]} - v.cu_seqlens[b];
  }
  *first_position = cache.seqlens != nullptr ? cache.seqlens[b] - s.seqlen : 0;
}

Status check_block_indices(const Config& c, const Shape& s, const Varlen& v, const KvCacheView& cache,
                           const int32_t* block_indices) {
  const int64_t n = c.num_selected;
  std::vector<int32_t> seen;
  for (int64_t b = 0; b < s.batch; ++b) {
    int64_t first_row = 0, length = 0, first_position = 0;
    sequence_rows(s, v, cache, b, &first_row, &length, &first_position);
    for (int64_t i = 0; i < length; ++i) {
      const int64_t t = first_position + i;
      const int64_t eligible = num_eligible_blocks(t, c.sel_block);
      for (int64_t h = 0; h < s.num_kv_heads; ++h) {
        const int32_t* row = block_indices + ((first_row + i) * s.num_kv_heads + h) * n;
        seen.clear();
        for (int64_t slot = 0; slot < n; ++slot) {
          const int32_t j = row[slot];
          if (j == -1) continue;
          if (j < 0 || j >= eligible)
            return invalid("block_indices[sequence ", b, ", t=", t, ", kv head ", h, ", slot ", slot, "] = ", j,
                           " is out of range: expected -1 or a block in [0, ", eligible - 1, "] (t / sel_block)");
          for (int32_t prev : seen)
            if (prev == j)
              return invalid("block_indices[sequence ", b, ", t=", t, ", kv head ", h, "] repeats block ", j);
          seen.push_back(j);
        }
      }
    }
  }
  return Status::Ok();
}

}  // namespace

Status validate(const Config& config) { return check_config(config); }

Status validate(const Config& config, const Shape& shape, const Varlen& varlen) {
  NSA_RETURN_IF_ERROR(check_config(config));
  if (varlen.cu_seqlens == nullptr) return invalid("varlen.cu_seqlens must not be null");
  if (shape.batch <= 0) return invalid("shape.batch must be positive, got ", shape.batch);
  if (shape.seqlen <= 0) return invalid("shape.seqlen must be positive, got ", shape.seqlen);
  Extents ext{};
  return check_layout(config, shape, varlen, KvCacheView{}, MemorySpace::kHost, &ext);
}

Status validate(const ForwardParams& p, MemorySpace space) {
  Extents ext{};
  NSA_RETURN_IF_ERROR(check_common(p, p.cache, space, &ext));
  const Shape& s = p.shape;
  NSA_RETURN_IF_ERROR(check_output("out", p.out, {ext.rows_batch, ext.rows_seq, s.num_q_heads, s.head_dim_v},
                                   ext.varlen, true));
  if (p.lse == nullptr) return invalid("lse must not be null");
  if (p.block_indices == nullptr) return invalid("block_indices must not be null");
  if (p.block_indices_given && space == MemorySpace::kHost)
    return check_block_indices(p.config, s, p.varlen, p.cache, p.block_indices);
  return Status::Ok();
}

Status validate(const BackwardParams& p, MemorySpace space) {
  Extents ext{};
  NSA_RETURN_IF_ERROR(check_common(p, KvCacheView{}, space, &ext));
  const Shape& s = p.shape;
  const bool vl = ext.varlen;
  const int64_t B = ext.rows_batch, T = ext.rows_seq, Bc = ext.cmp_batch, Tc = ext.cmp_seq;
  const bool has_cmp = Tc > 0 && Bc > 0;
  NSA_RETURN_IF_ERROR(check_input("grad_out", p.grad_out, {B, T, s.num_q_heads, s.head_dim_v}, vl, true));
  if (p.block_indices == nullptr) return invalid("block_indices must not be null");
  if (p.out_branch == nullptr) return invalid("out_branch must not be null (the forward must be run with it)");
  if (p.lse == nullptr) return invalid("lse must not be null");
  NSA_RETURN_IF_ERROR(check_output("grad_q", p.grad_q, {B, T, s.num_q_heads, s.head_dim_qk}, vl, true));
  NSA_RETURN_IF_ERROR(check_output("grad_k", p.grad_k, {B, T, s.num_kv_heads, s.head_dim_qk}, vl, true));
  NSA_RETURN_IF_ERROR(check_output("grad_v", p.grad_v, {B, T, s.num_kv_heads, s.head_dim_v}, vl, true));
  const bool has_k_win = p.k_win.data != nullptr, has_v_win = p.v_win.data != nullptr;
  if (!has_k_win && p.grad_k_win.data != nullptr)
    return invalid("grad_k_win must be null when k_win is null (the window gradient goes to grad_k)");
  if (!has_v_win && p.grad_v_win.data != nullptr)
    return invalid("grad_v_win must be null when v_win is null (the window gradient goes to grad_v)");
  NSA_RETURN_IF_ERROR(
      check_output("grad_k_win", p.grad_k_win, {B, T, s.num_kv_heads, s.head_dim_qk}, vl, has_k_win));
  NSA_RETURN_IF_ERROR(check_output("grad_v_win", p.grad_v_win, {B, T, s.num_kv_heads, s.head_dim_v}, vl, has_v_win));
  NSA_RETURN_IF_ERROR(
      check_output("grad_k_cmp", p.grad_k_cmp, {Bc, Tc, s.num_kv_heads, s.head_dim_qk}, vl, has_cmp));
  NSA_RETURN_IF_ERROR(check_output("grad_v_cmp", p.grad_v_cmp, {Bc, Tc, s.num_kv_heads, s.head_dim_v}, vl, has_cmp));
  NSA_RETURN_IF_ERROR(check_output("grad_gates", p.grad_gates, {B, T, s.num_q_heads, kNumBranches}, vl, true));
  if (space == MemorySpace::kDevice) return Status::Ok();
  return check_block_indices(p.config, s, p.varlen, KvCacheView{}, p.block_indices);
}

}  // namespace nsa
