// torch.classes.nsa.KvCache: the tensors of an NSA KV cache for decode and chunked prefill, one
// slot per sequence. The bookkeeping (lengths, where tokens go, which compressed tokens become
// due, capacity) is the core's nsa::KvCacheBook (include/nsa/kv_cache.h); this class only holds
// the tensors in the book's layout and moves data as its plans say. Python wrapper and usage:
// python/nsa/cache.py, docs/decode.md.
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "nsa/kv_cache.h"
#include "nsa/semantics.h"

namespace nsa_torch {
namespace {

using at::Tensor;

void check_book(const nsa::Status& status) { TORCH_CHECK(status.ok(), "nsa.", status.message); }

class KvCache : public torch::CustomClassHolder {
 public:
  // config: (cmp_block, cmp_stride, sel_block, num_selected, num_init, num_local, window) of the
  // attention op the cache serves. compressed = false: a plain KV cache (dense attention): no
  // compressed tokens, no phi inputs. separate_window: the window branch has its own k_win, v_win.
  KvCache(int64_t num_slots, int64_t capacity, int64_t num_kv_heads, int64_t head_dim_qk, int64_t head_dim_v,
          bool separate_window, bool compressed, std::vector<int64_t> config, at::ScalarType dtype,
          at::Device device)
      : heads_(num_kv_heads), dim_qk_(head_dim_qk), dim_v_(head_dim_v), separate_window_(separate_window) {
    TORCH_CHECK(config.size() == 7, "nsa.KvCache: config must list (cmp_block, cmp_stride, sel_block, num_selected, "
                "num_init, num_local, window), got ", config.size(), " values");
    for (const auto& [name, value] : {std::pair<const char*, int64_t>{"num_kv_heads", num_kv_heads},
                                      {"head_dim_qk", head_dim_qk}, {"head_dim_v", head_dim_v}})
      TORCH_CHECK(value >= 1, "nsa.KvCache: ", name, " must be >= 1, got ", value);
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                "nsa.KvCache: dtype must be float32, float64, bfloat16 or float16, got ", dtype);
    TORCH_CHECK(device.is_cpu() || device.is_cuda(), "nsa.KvCache: device must be cpu or cuda, got ", device);
    const nsa::Config core{config[0], config[1], config[2], config[3], config[4], config[5], config[6], 0.0};
    check_book(nsa::KvCacheBook::create(core, compressed, num_slots, capacity, &book_));
    const auto options = at::TensorOptions().dtype(dtype).device(device);
    k_ = at::zeros({num_slots, capacity, heads_, dim_qk_}, options);
    v_ = at::zeros({num_slots, capacity, heads_, dim_v_}, options);
    if (separate_window_) {
      k_win_ = at::zeros_like(k_);
      v_win_ = at::zeros_like(v_);
    }
    const int64_t cmp_capacity = book_.cmp_capacity(), ring = book_.ring_size();
    k_cmp_ = at::zeros({num_slots, cmp_capacity, heads_, dim_qk_}, options);
    v_cmp_ = at::zeros({num_slots, cmp_capacity, heads_, dim_v_}, options);
    k_ring_ = at::zeros({num_slots, ring, heads_, dim_qk_}, options);
    v_ring_ = at::zeros({num_slots, ring, heads_, dim_v_}, options);
  }

  // Appends m tokens to each of `slots` (distinct; batch row b goes to slots[b]): k, k_win,
  // k_cmp_raw [B, m, Hkv, Dk]; v, v_win, v_cmp_raw [B, m, Hkv, Dv] (k_win/v_win iff the cache
  // has a separate window; k_cmp_raw/v_cmp_raw, phi's inputs, iff it is compressed). Grows the
  // capacity (doubling, contents kept) when a slot would overflow. Returns the compressed tokens
  // that became due, ascending by (batch row, index): due_rows [N] (batch row), due_indices [N]
  // (compressed index i) int64 on the cache's device, and phi's input for each, k_blocks
  // [N, l, Hkv, Dk] and v_blocks [N, l, Hkv, Dv] (raw tokens [i*d, i*d + l)). When N > 0, store
  // phi's outputs with append_cmp before the next append or attention.
  std::tuple<Tensor, Tensor, Tensor, Tensor> append(std::vector<int64_t> slots, const Tensor& k, const Tensor& v,
                                                    const std::optional<Tensor>& k_win,
                                                    const std::optional<Tensor>& v_win,
                                                    const std::optional<Tensor>& k_cmp_raw,
                                                    const std::optional<Tensor>& v_cmp_raw) {
    const at::NoGradGuard no_grad;
    TORCH_CHECK(!pending_.has_value(), "nsa.KvCache.append: the ", pending_ ? pending_->due.size() : 0,
                " compressed token(s) due from the last append are not stored yet (call append_cmp first)");
    TORCH_CHECK(k.dim() == 4, "nsa.KvCache.append: k must be [B, m, Hkv, Dk], got shape ", k.sizes());
    const int64_t batch = k.size(0), count = k.size(1);
    TORCH_CHECK(batch == static_cast<int64_t>(slots.size()), "nsa.KvCache.append: k has ", batch,
                " rows (B) but slots lists ", slots.size(), " slots");
    check_tokens("k", k, {batch, count, heads_, dim_qk_});
    check_tokens("v", v, {batch, count, heads_, dim_v_});
    const char* window = "separate window storage";
    const char* compressed = "compressed-token storage";
    check_optional("k_win", k_win, separate_window_, window, {batch, count, heads_, dim_qk_});
    check_optional("v_win", v_win, separate_window_, window, {batch, count, heads_, dim_v_});
    check_optional("k_cmp_raw", k_cmp_raw, book_.compressed(), compressed, {batch, count, heads_, dim_qk_});
    check_optional("v_cmp_raw", v_cmp_raw, book_.compressed(), compressed, {batch, count, heads_, dim_v_});

    nsa::KvAppendPlan plan;
    check_book(book_.plan_append(slots, count, &plan));
    if (plan.required_capacity > book_.capacity()) grow_storage(book_.grown_capacity(plan.required_capacity));
    std::vector<int64_t> raw_rows;
    check_book(book_.raw_rows(plan, &raw_rows));

    // Every index this append needs, in one host-to-device copy.
    std::vector<int64_t> due_rows, due_indices;
    for (const nsa::KvDueToken& token : plan.due) {
      due_rows.push_back(token.batch_row);
      due_indices.push_back(token.index);
    }
    const std::vector<Tensor> index =
        to_device({raw_rows, plan.phi_rows, plan.ring_sources, plan.ring_rows, due_rows, due_indices});
    const int64_t rows = batch * count;
    const Tensor& raw_index = index[0];
    rows_of(k_).index_copy_(0, raw_index, k.reshape({rows, heads_, dim_qk_}));
    rows_of(v_).index_copy_(0, raw_index, v.reshape({rows, heads_, dim_v_}));
    if (separate_window_) {
      rows_of(k_win_).index_copy_(0, raw_index, k_win->reshape({rows, heads_, dim_qk_}));
      rows_of(v_win_).index_copy_(0, raw_index, v_win->reshape({rows, heads_, dim_v_}));
    }
    const int64_t num_due = static_cast<int64_t>(plan.due.size()), l = book_.config().cmp_block;
    Tensor k_blocks, v_blocks;
    if (book_.compressed()) {
      const Tensor &phi_rows = index[1], &ring_sources = index[2], &ring_rows = index[3];
      k_blocks = gather_phi_input(k_ring_, k_cmp_raw->reshape({rows, heads_, dim_qk_}), phi_rows, ring_sources,
                                  ring_rows, l);
      v_blocks = gather_phi_input(v_ring_, v_cmp_raw->reshape({rows, heads_, dim_v_}), phi_rows, ring_sources,
                                  ring_rows, l);
    } else {
      k_blocks = at::empty({num_due, l, heads_, dim_qk_}, k_.options());
      v_blocks = at::empty({num_due, l, heads_, dim_v_}, v_.options());
    }
    check_book(book_.commit_append(plan));
    if (plan.due.empty()) {
      check_book(book_.commit_cmp(plan));
    } else {
      pending_ = std::move(plan);
    }
    const Tensor &due_row_index = index[4], &due_index = index[5];
    return {due_row_index, due_index, k_blocks, v_blocks};
  }

  // Stores phi's outputs for the compressed tokens the last append made due: k_cmp [N, Hkv, Dk],
  // v_cmp [N, Hkv, Dv], in the order append returned them.
  void append_cmp(const Tensor& k_cmp, const Tensor& v_cmp) {
    const at::NoGradGuard no_grad;
    TORCH_CHECK(pending_.has_value(), "nsa.KvCache.append_cmp: no compressed tokens are due (the last append made "
                "none, or append_cmp already stored them)");
    const int64_t num_due = static_cast<int64_t>(pending_->due.size());
    check_tokens("k_cmp", k_cmp, {num_due, heads_, dim_qk_});
    check_tokens("v_cmp", v_cmp, {num_due, heads_, dim_v_});
    std::vector<int64_t> rows;
    check_book(book_.cmp_rows(*pending_, &rows));
    const Tensor index = to_device({rows})[0];
    rows_of(k_cmp_).index_copy_(0, index, k_cmp);
    rows_of(v_cmp_).index_copy_(0, index, v_cmp);
    check_book(book_.commit_cmp(*pending_));
    pending_.reset();
  }

  // Keys held per slot of `slots`, int32 [B] on the cache's device (the op's cache_seqlens),
  // copied from the host book without waiting for the device.
  Tensor seqlens(std::vector<int64_t> slots) const {
    check_book(book_.check_ready(slots));
    std::vector<int64_t> lengths;
    for (const int64_t slot : slots) lengths.push_back(book_.lengths()[static_cast<size_t>(slot)]);
    return to_device({lengths})[0].to(at::kInt);
  }

  // The storage of `slots` for the attention op: k, v, k_win, v_win [B, capacity, Hkv, D] (k_win,
  // v_win None without a separate window), k_cmp, v_cmp [B, cmp_capacity, Hkv, D]. Views without
  // a copy when the slots step evenly upwards (0, 1, 2 / 3 / 1, 3, 5); a gathered copy otherwise.
  std::tuple<Tensor, Tensor, std::optional<Tensor>, std::optional<Tensor>, Tensor, Tensor> view(
      std::vector<int64_t> slots) const {
    check_book(book_.check_ready(slots));
    const int64_t first = slots.front(), count = static_cast<int64_t>(slots.size());
    const int64_t step = progression_step(slots);
    const Tensor index = step > 0 ? Tensor() : to_device({slots})[0];
    const auto select = [&](const Tensor& t) {
      return step > 0 ? t.slice(0, first, first + (count - 1) * step + 1, step) : t.index_select(0, index);
    };
    return {select(k_), select(v_),
            separate_window_ ? std::optional<Tensor>(select(k_win_)) : std::nullopt,
            separate_window_ ? std::optional<Tensor>(select(v_win_)) : std::nullopt,
            select(k_cmp_), select(v_cmp_)};
  }

  // Empties a slot for another sequence.
  void reset(int64_t slot) {
    TORCH_CHECK(!pending_.has_value(), "nsa.KvCache.reset: store the due compressed tokens of the last append first "
                "(append_cmp)");
    check_book(book_.reset(slot));
  }

  // Grows every slot to hold at least `capacity` tokens (contents kept); never shrinks.
  void reserve(int64_t capacity) {
    TORCH_CHECK(!pending_.has_value(), "nsa.KvCache.reserve: store the due compressed tokens first (append_cmp)");
    if (capacity > book_.capacity()) grow_storage(capacity);
  }

  std::vector<int64_t> lengths() const { return book_.lengths(); }
  std::vector<int64_t> cmp_lengths() const { return book_.cmp_lengths(); }
  int64_t num_slots() const { return book_.num_slots(); }
  int64_t capacity() const { return book_.capacity(); }
  int64_t cmp_capacity() const { return book_.cmp_capacity(); }
  bool compressed() const { return book_.compressed(); }
  bool separate_window() const { return separate_window_; }
  int64_t num_pending_cmp() const { return pending_ ? static_cast<int64_t>(pending_->due.size()) : 0; }

 private:
  void check_tokens(const char* name, const Tensor& t, const std::vector<int64_t>& shape) const {
    TORCH_CHECK(t.sizes().vec() == shape, "nsa.KvCache: ", name, " has shape ", t.sizes(), ", expected ",
                c10::IntArrayRef(shape));
    TORCH_CHECK(t.scalar_type() == k_.scalar_type(), "nsa.KvCache: ", name, " has dtype ", t.scalar_type(),
                ", expected the cache's ", k_.scalar_type());
    TORCH_CHECK(t.device() == k_.device(), "nsa.KvCache: ", name, " is on ", t.device(), ", expected the cache's ",
                k_.device());
  }

  // An input the cache takes iff it has the storage for it (`storage`: what that storage is).
  void check_optional(const char* name, const std::optional<Tensor>& t, bool has_storage, const char* storage,
                      const std::vector<int64_t>& shape) const {
    TORCH_CHECK(!has_storage || t.has_value(), "nsa.KvCache: ", name, " is required (the cache has ", storage, ")");
    TORCH_CHECK(has_storage || !t.has_value(), "nsa.KvCache: ", name, " must be None (the cache has no ", storage, ")");
    if (t) check_tokens(name, *t, shape);
  }

  // Index tensors (int64) on the cache's device, one copy through pinned memory for all of them.
  std::vector<Tensor> to_device(const std::vector<std::vector<int64_t>>& parts) const {
    int64_t total = 0;
    for (const auto& part : parts) total += static_cast<int64_t>(part.size());
    const bool cuda = k_.is_cuda();
    Tensor host = at::empty({total}, at::TensorOptions().dtype(at::kLong).pinned_memory(cuda));
    int64_t* out = host.data_ptr<int64_t>();
    for (const auto& part : parts) out = std::copy(part.begin(), part.end(), out);
    const Tensor device = host.to(k_.device(), /*non_blocking=*/cuda);
    std::vector<Tensor> result;
    int64_t offset = 0;
    for (const auto& part : parts) {
      result.push_back(device.narrow(0, offset, static_cast<int64_t>(part.size())));
      offset += static_cast<int64_t>(part.size());
    }
    return result;
  }

  // [S, N, H, D] storage as rows [S * N, H, D] (storage is always contiguous).
  static Tensor rows_of(const Tensor& t) { return t.view({-1, t.size(2), t.size(3)}); }

  // phi's input for the due tokens [N, l, H, D] from the ring and the new tokens (the book's phi
  // source), then the ring keeps the newest tokens. The gather comes first: the ring rows it reads
  // may be the ones the update overwrites.
  static Tensor gather_phi_input(const Tensor& ring, const Tensor& new_tokens, const Tensor& phi_rows,
                                 const Tensor& ring_sources, const Tensor& ring_rows, int64_t l) {
    const Tensor blocks =
        at::cat({rows_of(ring), new_tokens}).index_select(0, phi_rows).view({-1, l, ring.size(2), ring.size(3)});
    rows_of(ring).index_copy_(0, ring_rows, new_tokens.index_select(0, ring_sources));
    return blocks;
  }

  // Grows every slot to `capacity` rows, contents kept. The book changes only once every new
  // tensor is allocated, so a failed allocation leaves the cache as it was.
  void grow_storage(int64_t capacity) {
    nsa::KvCacheBook grown_book = book_;
    check_book(grown_book.grow(capacity));
    const auto grown = [](const Tensor& old, int64_t rows) {
      if (rows == old.size(1)) return old;
      Tensor t = at::zeros({old.size(0), rows, old.size(2), old.size(3)}, old.options());
      t.narrow(1, 0, old.size(1)).copy_(old);
      return t;
    };
    const int64_t rows = grown_book.capacity(), cmp_rows = grown_book.cmp_capacity();
    Tensor k = grown(k_, rows), v = grown(v_, rows), k_cmp = grown(k_cmp_, cmp_rows), v_cmp = grown(v_cmp_, cmp_rows);
    Tensor k_win = separate_window_ ? grown(k_win_, rows) : Tensor();
    Tensor v_win = separate_window_ ? grown(v_win_, rows) : Tensor();
    book_ = std::move(grown_book);
    k_ = std::move(k);
    v_ = std::move(v);
    k_win_ = std::move(k_win);
    v_win_ = std::move(v_win);
    k_cmp_ = std::move(k_cmp);
    v_cmp_ = std::move(v_cmp);
  }

  // The step of slots that form an ascending arithmetic progression (1 for a single slot), else 0.
  static int64_t progression_step(const std::vector<int64_t>& slots) {
    const int64_t step = slots.size() > 1 ? slots[1] - slots[0] : 1;
    if (step < 1) return 0;
    for (size_t i = 2; i < slots.size(); ++i)
      if (slots[i] - slots[i - 1] != step) return 0;
    return step;
  }

  nsa::KvCacheBook book_;
  int64_t heads_, dim_qk_, dim_v_;
  bool separate_window_;
  Tensor k_, v_, k_win_, v_win_, k_cmp_, v_cmp_, k_ring_, v_ring_;
  std::optional<nsa::KvAppendPlan> pending_;  // the last append's plan while its due tokens are not stored
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(nsa, m) {
  m.class_<KvCache>("KvCache")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, int64_t, bool, bool, std::vector<int64_t>, at::ScalarType,
                       at::Device>())
      .def("append", &KvCache::append)
      .def("append_cmp", &KvCache::append_cmp)
      .def("seqlens", &KvCache::seqlens)
      .def("view", &KvCache::view)
      .def("reset", &KvCache::reset)
      .def("reserve", &KvCache::reserve)
      .def("lengths", &KvCache::lengths)
      .def("cmp_lengths", &KvCache::cmp_lengths)
      .def("num_slots", &KvCache::num_slots)
      .def("capacity", &KvCache::capacity)
      .def("cmp_capacity", &KvCache::cmp_capacity)
      .def("compressed", &KvCache::compressed)
      .def("separate_window", &KvCache::separate_window)
      .def("num_pending_cmp", &KvCache::num_pending_cmp);
}

}  // namespace nsa_torch
