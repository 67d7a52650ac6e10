// KvCacheBook (include/nsa/kv_cache.h): slot lengths, append plans, the compressed tokens that
// become due, capacity growth. Pure host bookkeeping; validates every argument.
#include "nsa/kv_cache.h"

#include <algorithm>
#include <string>

#include "common/message.h"
#include "nsa/nsa.h"

namespace nsa {
namespace {

template <class... Parts>
Status invalid(const Parts&... parts) {
  return Status::Invalid(detail::cat("KvCache: ", parts...));
}

}  // namespace

Status KvCacheBook::create(const Config& config, bool compressed, int64_t num_slots, int64_t capacity,
                           KvCacheBook* book) {
  if (book == nullptr) return invalid("book must not be null");
  const Status config_status = validate(config);
  if (!config_status.ok()) return invalid(config_status.message);
  if (num_slots < 1) return invalid("num_slots must be >= 1, got ", num_slots);
  if (capacity < 1 || capacity > max_capacity())
    return invalid("capacity must be in [1, ", max_capacity(), "], got ", capacity);
  book->config_ = config;
  book->compressed_ = compressed;
  book->capacity_ = capacity;
  book->lengths_.assign(static_cast<size_t>(num_slots), 0);
  book->cmp_lengths_.assign(static_cast<size_t>(num_slots), 0);
  return Status::Ok();
}

int64_t KvCacheBook::cmp_capacity() const {
  return compressed_ ? num_cmp_tokens(capacity_, config_.cmp_block, config_.cmp_stride) : 0;
}

int64_t KvCacheBook::grown_capacity(int64_t required) const {
  const int64_t doubled = capacity_ > max_capacity() / 2 ? max_capacity() : 2 * capacity_;
  return std::min(max_capacity(), std::max(required, doubled));
}

Status KvCacheBook::check_slot(const std::string& name, int64_t slot) const {
  if (slot < 0 || slot >= num_slots())
    return invalid(name, " must be in [0, ", num_slots(), ") (num_slots), got ", slot);
  return Status::Ok();
}

Status KvCacheBook::plan_append(const std::vector<int64_t>& slots, int64_t count, KvAppendPlan* plan) const {
  if (plan == nullptr) return invalid("plan must not be null");
  if (num_slots() == 0) return invalid("the book is empty; make it with KvCacheBook::create");
  if (slots.empty()) return invalid("slots must list at least one slot");
  if (count < 1) return invalid("count (tokens appended per slot) must be >= 1, got ", count);
  std::vector<bool> seen(lengths_.size(), false);
  int64_t required = 0;
  for (size_t b = 0; b < slots.size(); ++b) {
    const int64_t slot = slots[b];
    const Status slot_status = check_slot("slots[" + std::to_string(b) + "]", slot);
    if (!slot_status.ok()) return slot_status;
    if (seen[static_cast<size_t>(slot)]) return invalid("slots must be distinct, slot ", slot, " is listed twice");
    seen[static_cast<size_t>(slot)] = true;
    const int64_t length = lengths_[static_cast<size_t>(slot)];
    if (count > max_capacity() - length)
      return invalid("slot ", slot, " holds ", length, " tokens; appending ", count, " would exceed ",
                     max_capacity(), " (the most an int32 sequence length counts)");
    const Status ready = check_ready({slot});
    if (!ready.ok()) return ready;
    required = std::max(required, length + count);
  }

  KvAppendPlan result;
  result.slots = slots;
  result.count = count;
  result.required_capacity = required;
  const int64_t l = config_.cmp_block, d = config_.cmp_stride;
  const int64_t new_token_base = num_slots() * l;  // phi source rows: the ring first, then the new tokens
  for (size_t b = 0; b < slots.size(); ++b) {
    const int64_t slot = slots[b], first = lengths_[static_cast<size_t>(slot)];
    result.first_positions.push_back(first);
    if (!compressed_) continue;
    const int64_t row = static_cast<int64_t>(b);
    const auto source_row = [&](int64_t position) {
      return position >= first ? new_token_base + row * count + (position - first) : slot * l + position % l;
    };
    // Due: the compressed tokens of the new length not held yet. Their raw tokens start at
    // i*d >= first + 1 - l (token i was not due at length `first`), so the ring has the older ones.
    for (int64_t i = num_cmp_tokens(first, l, d); i < num_cmp_tokens(first + count, l, d); ++i) {
      result.due.push_back({row, i, i * d});
      for (int64_t p = i * d; p < i * d + l; ++p) result.phi_rows.push_back(source_row(p));
    }
    // The ring keeps the newest l positions; older new tokens would only be overwritten.
    for (int64_t p = std::max(first, first + count - l); p < first + count; ++p) {
      result.ring_sources.push_back(row * count + (p - first));
      result.ring_rows.push_back(slot * l + p % l);
    }
  }
  *plan = std::move(result);
  return Status::Ok();
}

Status KvCacheBook::grow(int64_t new_capacity) {
  if (new_capacity < capacity_ || new_capacity > max_capacity())
    return invalid("new_capacity must be in [", capacity_, " (the current capacity), ", max_capacity(), "], got ",
                   new_capacity);
  capacity_ = new_capacity;
  return Status::Ok();
}

Status KvCacheBook::check_plan_state(const KvAppendPlan& plan, bool appended) const {
  if (plan.slots.empty() || plan.first_positions.size() != plan.slots.size() || plan.count < 1 ||
      plan.count > max_capacity())
    return invalid("the plan is empty or malformed; make it with plan_append");
  int64_t needed = 0;  // raw rows per slot the append writes up to
  for (size_t b = 0; b < plan.slots.size(); ++b) {
    const int64_t slot = plan.slots[b];
    const Status slot_status = check_slot("plan.slots[" + std::to_string(b) + "]", slot);
    if (!slot_status.ok()) return slot_status;
    const int64_t first = plan.first_positions[b];
    const int64_t expected = appended ? first + plan.count : first;
    const int64_t length = lengths_[static_cast<size_t>(slot)], cmp_length = cmp_lengths_[static_cast<size_t>(slot)];
    const int64_t cmp_expected = compressed_ ? num_cmp_tokens(first, config_.cmp_block, config_.cmp_stride) : 0;
    if (length != expected || cmp_length != cmp_expected)
      return invalid("the plan is stale: slot ", slot, " holds ", length, " tokens (", cmp_length,
                     " compressed), the plan expects ", expected, " (", cmp_expected, " compressed)",
                     appended ? " after its append" : " before its append");
    needed = std::max(needed, first + plan.count);
  }
  // Before the append the rows must fit: counted from the plan's positions, not taken from its
  // required_capacity, so that no plan makes raw_rows point past a slot.
  if (!appended && needed > capacity_)
    return invalid("the plan needs capacity ", needed, " but the storage holds ", capacity_,
                   " rows per slot; grow it first");
  return Status::Ok();
}

Status KvCacheBook::raw_rows(const KvAppendPlan& plan, std::vector<int64_t>* rows) const {
  if (rows == nullptr) return invalid("rows must not be null");
  const Status state = check_plan_state(plan, false);
  if (!state.ok()) return state;
  rows->clear();
  for (size_t b = 0; b < plan.slots.size(); ++b)
    for (int64_t j = 0; j < plan.count; ++j) rows->push_back(plan.slots[b] * capacity_ + plan.first_positions[b] + j);
  return Status::Ok();
}

Status KvCacheBook::commit_append(const KvAppendPlan& plan) {
  const Status state = check_plan_state(plan, false);
  if (!state.ok()) return state;
  for (const int64_t slot : plan.slots) lengths_[static_cast<size_t>(slot)] += plan.count;
  return Status::Ok();
}

Status KvCacheBook::cmp_rows(const KvAppendPlan& plan, std::vector<int64_t>* rows) const {
  if (rows == nullptr) return invalid("rows must not be null");
  const Status state = check_plan_state(plan, true);
  if (!state.ok()) return state;
  rows->clear();
  const int64_t cmp_cap = cmp_capacity();
  for (const KvDueToken& token : plan.due) {
    if (token.batch_row < 0 || token.batch_row >= static_cast<int64_t>(plan.slots.size()) || token.index < 0 ||
        token.index >= cmp_cap)
      return invalid("the plan is malformed: due token (batch row ", token.batch_row, ", index ", token.index,
                     ") is outside the batch or the compressed capacity ", cmp_cap);
    rows->push_back(plan.slots[static_cast<size_t>(token.batch_row)] * cmp_cap + token.index);
  }
  return Status::Ok();
}

Status KvCacheBook::commit_cmp(const KvAppendPlan& plan) {
  std::vector<int64_t> rows;
  const Status state = cmp_rows(plan, &rows);
  if (!state.ok()) return state;
  for (const KvDueToken& token : plan.due)
    ++cmp_lengths_[static_cast<size_t>(plan.slots[static_cast<size_t>(token.batch_row)])];
  return Status::Ok();
}

Status KvCacheBook::reset(int64_t slot) {
  const Status slot_status = check_slot("slot", slot);
  if (!slot_status.ok()) return slot_status;
  lengths_[static_cast<size_t>(slot)] = 0;
  cmp_lengths_[static_cast<size_t>(slot)] = 0;
  return Status::Ok();
}

Status KvCacheBook::check_ready(const std::vector<int64_t>& slots) const {
  if (slots.empty()) return invalid("slots must list at least one slot");
  for (size_t i = 0; i < slots.size(); ++i) {
    const int64_t slot = slots[i];
    const Status slot_status = check_slot("slots[" + std::to_string(i) + "]", slot);
    if (!slot_status.ok()) return slot_status;
    if (!compressed_) continue;
    const int64_t held = cmp_lengths_[static_cast<size_t>(slot)];
    const int64_t due = num_cmp_tokens(lengths_[static_cast<size_t>(slot)], config_.cmp_block, config_.cmp_stride);
    if (held != due)
      return invalid("slot ", slot, " has ", due - held, " compressed token(s) due that are not stored yet "
                     "(store phi's outputs for the last append first)");
  }
  return Status::Ok();
}

}  // namespace nsa
