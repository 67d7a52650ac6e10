// The torch ops nsa::forward, nsa::backward and nsa::forward_kvcache (decode / chunked prefill):
// schemas, and the CPU and CUDA implementations that turn tensors into nsa::ForwardParams /
// BackwardParams, check them (naming the argument) and call the backend. Fake (meta) kernels and
// autograd are registered in python/nsa/ops.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "nsa/nsa.h"

#if NSA_TORCH_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace nsa_torch {
namespace {

using at::Tensor;

nsa::DType to_nsa_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return nsa::DType::kFloat32;
    case at::kDouble: return nsa::DType::kFloat64;
    case at::kBFloat16: return nsa::DType::kBFloat16;
    case at::kHalf: return nsa::DType::kFloat16;
    default:
      TORCH_CHECK(false, "nsa: q has dtype ", type, "; supported: float32, float64, bfloat16, float16");
  }
}

// The op's config arguments: the core's Config plus max_seqlen (packed layout only).
struct Config {
  nsa::Config core;
  int64_t max_seqlen;
};

Config make_config(int64_t cmp_block, int64_t cmp_stride, int64_t sel_block, int64_t num_selected, int64_t num_init,
                   int64_t num_local, int64_t window, double scale, int64_t max_seqlen) {
  return {nsa::Config{cmp_block, cmp_stride, sel_block, num_selected, num_init, num_local, window, scale}, max_seqlen};
}

// The layout shared by every tensor of one call: padded [B, T, H, D] or packed [total, H, D].
struct Layout {
  bool varlen;
  int64_t batch, seqlen, rows, cmp_rows;
  int64_t cmp_seqlen;  // padded: Tc = num_cmp_tokens(T)
  at::Device device;
  at::ScalarType dtype;
};

std::string shape_string(const Tensor& t) { return c10::str(t.sizes()); }

// Checks that `t` has the expected dtype, device and shape (leading dims from the layout, then
// heads and dim) with a contiguous last dim, and returns its strides as nsa::InputTensor fields.
void check_tensor(const char* name, const Tensor& t, const Layout& layout, bool compressed, int64_t heads,
                  int64_t dim, at::ScalarType dtype) {
  TORCH_CHECK(t.device() == layout.device, "nsa: ", name, " is on ", t.device(), " but q is on ", layout.device);
  TORCH_CHECK(t.scalar_type() == dtype, "nsa: ", name, " has dtype ", t.scalar_type(), ", expected ", dtype,
              " (the dtype of q)");
  const int64_t seq = compressed ? layout.cmp_seqlen : layout.seqlen;
  std::vector<int64_t> expected = layout.varlen ? std::vector<int64_t>{compressed ? layout.cmp_rows : layout.rows, heads, dim}
                                                : std::vector<int64_t>{layout.batch, seq, heads, dim};
  TORCH_CHECK(t.sizes().vec() == expected, "nsa: ", name, " has shape ", shape_string(t), ", expected ",
              c10::IntArrayRef(expected));
  TORCH_CHECK(t.numel() == 0 || t.stride(-1) == 1, "nsa: ", name,
              " must have a contiguous last dimension (stride 1), got strides ", t.strides());
}

template <class TensorRef, class Ptr>
TensorRef tensor_ref(Ptr data, const Tensor& t, bool varlen) {
  if (varlen) return {data, 0, t.stride(0), t.stride(1)};
  return {data, t.stride(0), t.stride(1), t.stride(2)};
}
nsa::InputTensor input_ref(const Tensor& t, bool varlen) {
  return tensor_ref<nsa::InputTensor>(static_cast<const void*>(t.data_ptr()), t, varlen);
}
nsa::InputTensor optional_input_ref(const std::optional<Tensor>& t, bool varlen) {
  return t.has_value() ? input_ref(*t, varlen) : nsa::InputTensor{};
}
nsa::OutputTensor output_ref(const Tensor& t, bool varlen) {
  return tensor_ref<nsa::OutputTensor>(t.data_ptr(), t, varlen);
}

void check_status(const nsa::Status& status) {
  TORCH_CHECK(status.ok(), "nsa: ", status.message);
}

// Shapes, layout and every input of forward and backward, checked against q.
struct Checked {
  Layout layout;
  nsa::Shape shape;
  nsa::Varlen varlen;
  Tensor cu_seqlens, cu_seqlens_cmp;  // contiguous int32, or undefined
};

Checked check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& k_win,
                     const std::optional<Tensor>& v_win, const Tensor& k_cmp, const Tensor& v_cmp, const Tensor& gates,
                     const std::optional<Tensor>& cu_seqlens, const std::optional<Tensor>& cu_seqlens_cmp,
                     const Config& config) {
  Checked c{Layout{cu_seqlens.has_value(), 0, 0, 0, 0, 0, q.device(), q.scalar_type()}, {}, {}, {}, {}};
  check_status(nsa::validate(config.core));  // before any size is derived from it
  to_nsa_dtype(q.scalar_type());
  Layout& layout = c.layout;
  TORCH_CHECK(cu_seqlens.has_value() == cu_seqlens_cmp.has_value(),
              "nsa: cu_seqlens and cu_seqlens_cmp must be given together (packed varlen layout) or not at all");
  if (layout.varlen) {
    TORCH_CHECK(q.dim() == 3, "nsa: with cu_seqlens, q must be packed [total, Hq, Dk], got shape ", shape_string(q));
    for (const auto& [name, offsets] : {std::pair<const char*, const Tensor&>{"cu_seqlens", *cu_seqlens},
                                        std::pair<const char*, const Tensor&>{"cu_seqlens_cmp", *cu_seqlens_cmp}}) {
      TORCH_CHECK(offsets.scalar_type() == at::kInt, "nsa: ", name, " must be int32, got ", offsets.scalar_type());
      TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 2, "nsa: ", name, " must be 1-D [N+1] with N >= 1, got ",
                  shape_string(offsets));
      TORCH_CHECK(offsets.device() == q.device(), "nsa: ", name, " is on ", offsets.device(), " but q is on ",
                  q.device());
    }
    TORCH_CHECK(cu_seqlens->size(0) == cu_seqlens_cmp->size(0), "nsa: cu_seqlens has ", cu_seqlens->size(0),
                " entries but cu_seqlens_cmp has ", cu_seqlens_cmp->size(0));
    TORCH_CHECK(config.max_seqlen > 0, "nsa: max_seqlen (the longest sequence) must be > 0 with cu_seqlens, got ",
                config.max_seqlen);
    layout.batch = cu_seqlens->size(0) - 1;
    layout.seqlen = config.max_seqlen;
    layout.rows = q.size(0);
    c.cu_seqlens = cu_seqlens->contiguous();
    c.cu_seqlens_cmp = cu_seqlens_cmp->contiguous();
    const int32_t* offsets = c.cu_seqlens.data_ptr<int32_t>();
    const int32_t* cmp_offsets = c.cu_seqlens_cmp.data_ptr<int32_t>();
    if (q.is_cpu()) {
      // The offsets are checked before any tensor is measured against them. On a GPU reading
      // them would be a host sync: there k_cmp's rows are taken as given.
      layout.cmp_rows = cmp_offsets[layout.batch];
      check_status(nsa::validate(config.core, {layout.batch, layout.seqlen, 1, 1, 1, 1},
                                 {offsets, cmp_offsets, layout.rows, layout.cmp_rows}));
    } else {
      layout.cmp_rows = k_cmp.dim() > 0 ? k_cmp.size(0) : 0;
    }
    c.varlen = {offsets, cmp_offsets, layout.rows, layout.cmp_rows};
  } else {
    TORCH_CHECK(q.dim() == 4, "nsa: q must be [B, T, Hq, Dk] (or packed [total, Hq, Dk] with cu_seqlens), got shape ",
                shape_string(q));
    layout.batch = q.size(0);
    layout.seqlen = q.size(1);
    layout.rows = layout.batch * layout.seqlen;
    layout.cmp_seqlen = nsa::num_cmp_tokens(layout.seqlen, config.core.cmp_block, config.core.cmp_stride);
    layout.cmp_rows = layout.batch * layout.cmp_seqlen;
  }
  TORCH_CHECK(k.dim() == q.dim(), "nsa: k must have ", q.dim(), " dims like q, got shape ", shape_string(k));
  TORCH_CHECK(v.dim() == q.dim(), "nsa: v must have ", q.dim(), " dims like q, got shape ", shape_string(v));
  const int64_t hq = q.size(-2), hkv = k.size(-2), dk = q.size(-1), dv = v.size(-1);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "nsa: q has ", hq, " heads, which is not a multiple of the ", hkv,
              " kv heads of k");
  const at::ScalarType dtype = q.scalar_type();
  check_tensor("q", q, layout, false, hq, dk, dtype);
  check_tensor("k", k, layout, false, hkv, dk, dtype);
  check_tensor("v", v, layout, false, hkv, dv, dtype);
  if (k_win) check_tensor("k_win", *k_win, layout, false, hkv, dk, dtype);
  if (v_win) check_tensor("v_win", *v_win, layout, false, hkv, dv, dtype);
  check_tensor("k_cmp", k_cmp, layout, true, hkv, dk, dtype);
  check_tensor("v_cmp", v_cmp, layout, true, hkv, dv, dtype);
  check_tensor("gates", gates, layout, false, hq, nsa::kNumBranches, dtype);
  c.shape = {layout.batch, layout.seqlen, hq, hkv, dk, dv};
  return c;
}

std::vector<int64_t> row_shape(const Layout& layout, std::initializer_list<int64_t> tail) {
  std::vector<int64_t> shape = layout.varlen ? std::vector<int64_t>{layout.rows}
                                             : std::vector<int64_t>{layout.batch, layout.seqlen};
  shape.insert(shape.end(), tail);
  return shape;
}

template <class Params>
void fill_inputs(Params& p, const Checked& c, const Config& config, const Tensor& q, const Tensor& k, const Tensor& v,
                 const std::optional<Tensor>& k_win, const std::optional<Tensor>& v_win, const Tensor& k_cmp,
                 const Tensor& v_cmp, const Tensor& gates) {
  const bool vl = c.layout.varlen;
  p.config = config.core;
  p.dtype = to_nsa_dtype(q.scalar_type());
  p.shape = c.shape;
  p.varlen = c.varlen;
  p.q = input_ref(q, vl);
  p.k = input_ref(k, vl);
  p.v = input_ref(v, vl);
  p.k_win = optional_input_ref(k_win, vl);
  p.v_win = optional_input_ref(v_win, vl);
  p.k_cmp = k_cmp.numel() ? input_ref(k_cmp, vl) : nsa::InputTensor{};
  p.v_cmp = v_cmp.numel() ? input_ref(v_cmp, vl) : nsa::InputTensor{};
  p.gates = input_ref(gates, vl);
}

// Runs the forward on q's device: the CPU reference, or the CUDA kernels on the current stream
// with a workspace from torch's caching allocator.
void run_forward(const Tensor& q, const nsa::ForwardParams& p) {
  if (q.is_cpu()) {
    check_status(nsa::cpu::forward(p));
    return;
  }
#if NSA_TORCH_WITH_CUDA
  if (q.is_cuda()) {
    const c10::cuda::CUDAGuard guard(q.device());
    const size_t bytes = nsa::cuda::forward_workspace_bytes(p);
    const Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
    check_status(nsa::cuda::forward(p, bytes ? workspace.data_ptr() : nullptr, bytes,
                                    c10::cuda::getCurrentCUDAStream().stream()));
    return;
  }
#endif
  TORCH_CHECK(false, "nsa: q is on ", q.device(), " but this build of nsa has no CUDA kernels (CPU only)");
}

// The backward likewise: the CPU reference, or the CUDA kernels on the current stream with a
// workspace from torch's caching allocator (never 0 bytes when there is a row; its blocks are
// 512-byte aligned, the backend needs 256).
void run_backward(const Tensor& q, const nsa::BackwardParams& p) {
  if (q.is_cpu()) {
    check_status(nsa::cpu::backward(p));
    return;
  }
#if NSA_TORCH_WITH_CUDA
  if (q.is_cuda()) {
    const c10::cuda::CUDAGuard guard(q.device());
    const size_t bytes = nsa::cuda::backward_workspace_bytes(p);
    const Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
    check_status(nsa::cuda::backward(p, bytes ? workspace.data_ptr() : nullptr, bytes,
                                     c10::cuda::getCurrentCUDAStream().stream()));
    return;
  }
#endif
  TORCH_CHECK(false, "nsa: q is on ", q.device(), " but this build of nsa has no CUDA kernels (CPU only)");
}

at::ScalarType stats_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_impl(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& k_win,
    const std::optional<Tensor>& v_win, const Tensor& k_cmp, const Tensor& v_cmp, const Tensor& gates,
    const std::optional<Tensor>& block_indices, const std::optional<Tensor>& cu_seqlens,
    const std::optional<Tensor>& cu_seqlens_cmp, int64_t max_seqlen, int64_t cmp_block, int64_t cmp_stride,
    int64_t sel_block, int64_t num_selected, int64_t num_init, int64_t num_local, int64_t window, double scale,
    bool save_branch_outputs, bool /*deterministic: for the backward, which autograd hands it to*/) {
  const Config config =
      make_config(cmp_block, cmp_stride, sel_block, num_selected, num_init, num_local, window, scale, max_seqlen);
  const Checked c = check_inputs(q, k, v, k_win, v_win, k_cmp, v_cmp, gates, cu_seqlens, cu_seqlens_cmp, config);
  const Layout& layout = c.layout;
  const auto opts = q.options();
  Tensor out = at::empty(row_shape(layout, {c.shape.num_q_heads, c.shape.head_dim_v}), opts);
  Tensor out_branch = save_branch_outputs
                          ? at::empty(row_shape(layout, {c.shape.num_q_heads, nsa::kNumBranches, c.shape.head_dim_v}), opts)
                          : at::empty({0}, opts);
  Tensor lse = at::empty(row_shape(layout, {c.shape.num_q_heads, nsa::kNumBranches}), opts.dtype(stats_dtype(q.scalar_type())));
  Tensor indices;
  if (block_indices.has_value()) {
    TORCH_CHECK(block_indices->scalar_type() == at::kInt, "nsa: block_indices must be int32, got ",
                block_indices->scalar_type());
    TORCH_CHECK(block_indices->device() == q.device(), "nsa: block_indices is on ", block_indices->device(),
                " but q is on ", q.device());
    const auto expected = row_shape(layout, {c.shape.num_kv_heads, num_selected});
    TORCH_CHECK(block_indices->sizes().vec() == expected, "nsa: block_indices has shape ",
                shape_string(*block_indices), ", expected ", c10::IntArrayRef(expected));
    indices = block_indices->contiguous().clone();
  } else {
    indices = at::empty(row_shape(layout, {c.shape.num_kv_heads, num_selected}), opts.dtype(at::kInt));
  }
  nsa::ForwardParams p;
  fill_inputs(p, c, config, q, k, v, k_win, v_win, k_cmp, v_cmp, gates);
  p.block_indices = indices.data_ptr<int32_t>();
  p.block_indices_given = block_indices.has_value();
  p.out = output_ref(out, layout.varlen);
  p.out_branch = save_branch_outputs ? out_branch.data_ptr() : nullptr;
  p.lse = lse.data_ptr();
  run_forward(q, p);
  return {out, out_branch, lse, indices};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_impl(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& k_win,
    const std::optional<Tensor>& v_win, const Tensor& k_cmp, const Tensor& v_cmp, const Tensor& gates,
    const Tensor& block_indices, const Tensor& out_branch, const Tensor& lse, const std::optional<Tensor>& cu_seqlens,
    const std::optional<Tensor>& cu_seqlens_cmp, int64_t max_seqlen, int64_t cmp_block, int64_t cmp_stride,
    int64_t sel_block, int64_t num_selected, int64_t num_init, int64_t num_local, int64_t window, double scale,
    bool deterministic) {
  const Config config =
      make_config(cmp_block, cmp_stride, sel_block, num_selected, num_init, num_local, window, scale, max_seqlen);
  const Checked c = check_inputs(q, k, v, k_win, v_win, k_cmp, v_cmp, gates, cu_seqlens, cu_seqlens_cmp, config);
  const Layout& layout = c.layout;
  check_tensor("grad_out", grad_out, layout, false, c.shape.num_q_heads, c.shape.head_dim_v, q.scalar_type());
  const auto check_exact = [&](const char* name, const Tensor& t, std::vector<int64_t> shape, at::ScalarType dtype) {
    TORCH_CHECK(t.scalar_type() == dtype, "nsa: ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
    TORCH_CHECK(t.device() == q.device(), "nsa: ", name, " is on ", t.device(), " but q is on ", q.device());
    TORCH_CHECK(t.sizes().vec() == shape, "nsa: ", name, " has shape ", shape_string(t), ", expected ",
                c10::IntArrayRef(shape), (t.numel() == 0 ? " (run the forward with save_branch_outputs=True)" : ""));
  };
  check_exact("block_indices", block_indices, row_shape(layout, {c.shape.num_kv_heads, num_selected}), at::kInt);
  check_exact("out_branch", out_branch, row_shape(layout, {c.shape.num_q_heads, nsa::kNumBranches, c.shape.head_dim_v}),
              q.scalar_type());
  check_exact("lse", lse, row_shape(layout, {c.shape.num_q_heads, nsa::kNumBranches}), stats_dtype(q.scalar_type()));
  const Tensor indices = block_indices.contiguous(), branch = out_branch.contiguous(), stats = lse.contiguous();

  Tensor grad_q = at::empty_like(q, at::MemoryFormat::Contiguous), grad_k = at::empty_like(k, at::MemoryFormat::Contiguous);
  Tensor grad_v = at::empty_like(v, at::MemoryFormat::Contiguous);
  Tensor grad_k_win = k_win ? at::empty_like(*k_win, at::MemoryFormat::Contiguous) : at::empty({0}, q.options());
  Tensor grad_v_win = v_win ? at::empty_like(*v_win, at::MemoryFormat::Contiguous) : at::empty({0}, q.options());
  Tensor grad_k_cmp = at::empty_like(k_cmp, at::MemoryFormat::Contiguous);
  Tensor grad_v_cmp = at::empty_like(v_cmp, at::MemoryFormat::Contiguous);
  Tensor grad_gates = at::empty_like(gates, at::MemoryFormat::Contiguous);

  nsa::BackwardParams p;
  fill_inputs(p, c, config, q, k, v, k_win, v_win, k_cmp, v_cmp, gates);
  const bool vl = layout.varlen;
  p.block_indices = indices.data_ptr<int32_t>();
  p.out_branch = branch.data_ptr();
  p.lse = stats.data_ptr();
  p.grad_out = input_ref(grad_out, vl);
  p.grad_q = output_ref(grad_q, vl);
  p.grad_k = output_ref(grad_k, vl);
  p.grad_v = output_ref(grad_v, vl);
  p.grad_k_win = k_win ? output_ref(grad_k_win, vl) : nsa::OutputTensor{};
  p.grad_v_win = v_win ? output_ref(grad_v_win, vl) : nsa::OutputTensor{};
  p.grad_k_cmp = k_cmp.numel() ? output_ref(grad_k_cmp, vl) : nsa::OutputTensor{};
  p.grad_v_cmp = v_cmp.numel() ? output_ref(grad_v_cmp, vl) : nsa::OutputTensor{};
  p.grad_gates = output_ref(grad_gates, vl);
  p.deterministic = deterministic;
  run_backward(q, p);
  return {grad_q, grad_k, grad_v, grad_k_win, grad_v_win, grad_k_cmp, grad_v_cmp, grad_gates};
}

// Decode / chunked prefill: the m newest tokens of each sequence (q, gates [B, m, ...]) against
// its KV cache (k_cache, v_cache [B, capacity, Hkv, D], k_cmp_cache, v_cmp_cache
// [B, cmp_capacity, Hkv, D]), cache_seqlens [B] int32 = keys held after the append
// (include/nsa/params.h, KvCacheView). Inference only: no autograd. tokens_read, when given,
// is an int64 [B, 3] accumulator of the key rows each branch gathered.
std::tuple<Tensor, Tensor> forward_kvcache_impl(
    const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const std::optional<Tensor>& k_win_cache,
    const std::optional<Tensor>& v_win_cache, const Tensor& k_cmp_cache, const Tensor& v_cmp_cache,
    const Tensor& gates, const Tensor& cache_seqlens, const std::optional<Tensor>& tokens_read, int64_t cmp_block,
    int64_t cmp_stride, int64_t sel_block, int64_t num_selected, int64_t num_init, int64_t num_local, int64_t window,
    double scale) {
  const Config config =
      make_config(cmp_block, cmp_stride, sel_block, num_selected, num_init, num_local, window, scale, 0);
  check_status(nsa::validate(config.core));
  to_nsa_dtype(q.scalar_type());
  TORCH_CHECK(q.dim() == 4, "nsa: q must be [B, m, Hq, Dk] (the m newest tokens of each sequence), got shape ",
              shape_string(q));
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"k_cache", k_cache},
                                std::pair<const char*, const Tensor&>{"v_cache", v_cache},
                                std::pair<const char*, const Tensor&>{"k_cmp_cache", k_cmp_cache},
                                std::pair<const char*, const Tensor&>{"v_cmp_cache", v_cmp_cache}})
    TORCH_CHECK(t.dim() == 4, "nsa: ", name, " must be [B, capacity, Hkv, D], got shape ", shape_string(t));
  const int64_t batch = q.size(0), m = q.size(1), hq = q.size(2), dk = q.size(3);
  const int64_t hkv = k_cache.size(2), dv = v_cache.size(3);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "nsa: q has ", hq, " heads, which is not a multiple of the ", hkv,
              " kv heads of k_cache");
  const at::ScalarType dtype = q.scalar_type();
  const Layout queries{false, batch, m, batch * m, 0, 0, q.device(), dtype};
  const Layout cache{false, batch, k_cache.size(1), 0, 0, k_cmp_cache.size(1), q.device(), dtype};
  check_tensor("q", q, queries, false, hq, dk, dtype);
  check_tensor("gates", gates, queries, false, hq, nsa::kNumBranches, dtype);
  check_tensor("k_cache", k_cache, cache, false, hkv, dk, dtype);
  check_tensor("v_cache", v_cache, cache, false, hkv, dv, dtype);
  if (k_win_cache) check_tensor("k_win_cache", *k_win_cache, cache, false, hkv, dk, dtype);
  if (v_win_cache) check_tensor("v_win_cache", *v_win_cache, cache, false, hkv, dv, dtype);
  check_tensor("k_cmp_cache", k_cmp_cache, cache, true, hkv, dk, dtype);
  check_tensor("v_cmp_cache", v_cmp_cache, cache, true, hkv, dv, dtype);
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 && cache_seqlens.size(0) == batch,
              "nsa: cache_seqlens must be int32 [", batch, "], got ", cache_seqlens.scalar_type(), " ",
              shape_string(cache_seqlens));
  TORCH_CHECK(cache_seqlens.device() == q.device(), "nsa: cache_seqlens is on ", cache_seqlens.device(),
              " but q is on ", q.device());
  const Tensor seqlens = cache_seqlens.contiguous();
  if (tokens_read) {
    const bool counter_ok = tokens_read->scalar_type() == at::kLong && tokens_read->dim() == 2 &&
                            tokens_read->size(0) == batch && tokens_read->size(1) == nsa::kNumBranches &&
                            tokens_read->is_contiguous() && tokens_read->device() == q.device();
    TORCH_CHECK(counter_ok,
                "nsa: tokens_read must be a contiguous int64 [", batch, ", 3] tensor on ", q.device(), ", got ",
                tokens_read->scalar_type(), " ", shape_string(*tokens_read), " on ", tokens_read->device());
  }

  const auto opts = q.options();
  Tensor out = at::empty({batch, m, hq, dv}, opts);
  Tensor lse = at::empty({batch, m, hq, nsa::kNumBranches}, opts.dtype(stats_dtype(dtype)));
  Tensor indices = at::empty({batch, m, hkv, num_selected}, opts.dtype(at::kInt));
  nsa::ForwardParams p;
  p.config = config.core;
  p.dtype = to_nsa_dtype(dtype);
  p.shape = {batch, m, hq, hkv, dk, dv};
  p.q = input_ref(q, false);
  p.k = input_ref(k_cache, false);
  p.v = input_ref(v_cache, false);
  p.k_win = optional_input_ref(k_win_cache, false);
  p.v_win = optional_input_ref(v_win_cache, false);
  p.k_cmp = input_ref(k_cmp_cache, false);
  p.v_cmp = input_ref(v_cmp_cache, false);
  p.gates = input_ref(gates, false);
  p.block_indices = indices.data_ptr<int32_t>();
  p.out = output_ref(out, false);
  p.lse = lse.data_ptr();
  p.cache = {seqlens.data_ptr<int32_t>(), k_cache.size(1), k_cmp_cache.size(1)};
  p.tokens_read = tokens_read ? tokens_read->data_ptr<int64_t>() : nullptr;
  run_forward(q, p);
  return {out, indices};
}

}  // namespace

bool cuda_built() { return NSA_TORCH_WITH_CUDA != 0; }

TORCH_LIBRARY(nsa, m) {
  m.def("cuda_built() -> bool", &cuda_built);
  m.def(
      "forward(Tensor q, Tensor k, Tensor v, Tensor? k_win, Tensor? v_win, Tensor k_cmp, Tensor v_cmp, "
      "Tensor gates, Tensor? block_indices, Tensor? cu_seqlens, Tensor? cu_seqlens_cmp, SymInt max_seqlen, "
      "int cmp_block, int cmp_stride, int sel_block, int num_selected, int num_init, int num_local, int window, "
      "float scale, bool save_branch_outputs, bool deterministic=False) -> (Tensor out, Tensor out_branch, "
      "Tensor lse, Tensor block_indices)");
  m.def(
      "backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? k_win, Tensor? v_win, Tensor k_cmp, "
      "Tensor v_cmp, Tensor gates, Tensor block_indices, Tensor out_branch, Tensor lse, Tensor? cu_seqlens, "
      "Tensor? cu_seqlens_cmp, SymInt max_seqlen, int cmp_block, int cmp_stride, int sel_block, int num_selected, "
      "int num_init, int num_local, int window, float scale, bool deterministic) -> (Tensor grad_q, Tensor grad_k, "
      "Tensor grad_v, Tensor grad_k_win, Tensor grad_v_win, Tensor grad_k_cmp, Tensor grad_v_cmp, Tensor grad_gates)");
  m.def(
      "forward_kvcache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? k_win_cache, Tensor? v_win_cache, "
      "Tensor k_cmp_cache, Tensor v_cmp_cache, Tensor gates, Tensor cache_seqlens, Tensor(a!)? tokens_read, "
      "int cmp_block, int cmp_stride, int sel_block, int num_selected, int num_init, int num_local, int window, "
      "float scale) -> (Tensor out, Tensor block_indices)");
}

TORCH_LIBRARY_IMPL(nsa, CPU, m) {
  m.impl("forward", &forward_impl);
  m.impl("backward", &backward_impl);
  m.impl("forward_kvcache", &forward_kvcache_impl);
}

TORCH_LIBRARY_IMPL(nsa, CUDA, m) {
  m.impl("forward", &forward_impl);
  m.impl("backward", &backward_impl);
  m.impl("forward_kvcache", &forward_kvcache_impl);
}

}  // namespace nsa_torch
