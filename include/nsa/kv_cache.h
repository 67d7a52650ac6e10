// KvCacheBook: the host-side bookkeeping of an NSA KV cache for decode and chunked prefill
// (DESIGN.md section 1, "Decode and chunked prefill"; ForwardParams::cache in params.h). It
// owns no storage and knows no framework: it tracks how many raw and compressed tokens each
// slot (one sequence) holds, plans where appended tokens go, says which compressed tokens
// become due and how much capacity the storage needs. The owner of the tensors
// (torch/nsa_kv_cache.cpp) moves the data as the plans say. Never throws: every fallible
// method returns a Status whose message names the argument, what was expected and what was given.
//
// Storage the plans index, per kv head group (H heads, head dim D), rows flat and slot-major:
//   raw  [num_slots, capacity, H, D]      token p of slot s: row s * capacity + p (raw_rows)
//   cmp  [num_slots, cmp_capacity, H, D]  compressed token i of slot s: row s * cmp_capacity + i
//                                         (cmp_rows); cmp_capacity = num_cmp_tokens(capacity)
//   ring [num_slots, l, H, D]             phi's input (the cmp branch's raw keys and values) for
//                                         the last l tokens of each slot: token p of slot s at row
//                                         s * l + p % l. A due compressed token needs only the last
//                                         l - 1 tokens before an append, so phi's input is never
//                                         stored in full.
// The due rule: appending position t makes compressed token i = (t + 1 - l) / d due when
// t + 1 >= l and (t + 1 - l) % d == 0; it compresses raw tokens [i * d, i * d + l).
//
// Protocol of one append of m tokens to a batch of slots:
//   plan_append -> (capacity < plan.required_capacity: grow the storage, copying its contents,
//   then grow(grown_capacity(...))) -> write the new tokens at raw_rows(plan), gather phi's
//   input at plan.phi_rows and update the ring -> commit_append -> run phi on each due token ->
//   store the results at cmp_rows(plan) -> commit_cmp. A slot whose due compressed tokens are not
//   committed yet is refused by the next plan_append and by check_ready (the attention op needs
//   them).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "nsa/config.h"
#include "nsa/status.h"

namespace nsa {

// A compressed token that an append made due.
struct KvDueToken {
  int64_t batch_row;  // row b of the append's batch; its slot is plan.slots[b]
  int64_t index;      // compressed token index i within the slot
  int64_t raw_start;  // i * d: it compresses raw tokens [raw_start, raw_start + l)
};

// What one append does, from KvCacheBook::plan_append. The phi source of an append is the ring
// rows [num_slots * l] followed by the new tokens' phi inputs [B * m] (row num_slots * l + b * m + j
// for token j of batch row b).
struct KvAppendPlan {
  std::vector<int64_t> slots;            // [B] batch row b appends to slot slots[b]
  int64_t count = 0;                     // m: tokens appended to every slot of the batch
  std::vector<int64_t> first_positions;  // [B] position of batch row b's first new token (its old length)
  int64_t required_capacity = 0;         // raw rows per slot the storage must hold before commit_append
  std::vector<KvDueToken> due;           // ascending by (batch_row, index)
  std::vector<int64_t> phi_rows;         // [due.size() * l] phi source rows of each due token's l raw tokens
  std::vector<int64_t> ring_sources;     // new-token rows b * m + j whose phi input the ring keeps ...
  std::vector<int64_t> ring_rows;        // ... and the ring rows they go to (distinct)
};

class KvCacheBook {
 public:
  // An empty book (no slots); use create().
  KvCacheBook() = default;

  // A book of num_slots empty slots of `capacity` raw rows each. compressed = false: a plain KV
  // cache (dense attention) that never has compressed tokens due and no ring; config is then
  // still validated but only its shape-free parts matter. Requires num_slots >= 1 and
  // 1 <= capacity <= max_capacity().
  static Status create(const Config& config, bool compressed, int64_t num_slots, int64_t capacity,
                       KvCacheBook* book);

  // Longest sequence a slot can hold: the attention op counts keys in int32.
  static constexpr int64_t max_capacity() { return 2147483647; }

  const Config& config() const { return config_; }
  bool compressed() const { return compressed_; }
  int64_t num_slots() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t capacity() const { return capacity_; }
  int64_t cmp_capacity() const;
  int64_t ring_size() const { return compressed_ ? config_.cmp_block : 0; }
  // Raw tokens held per slot.
  const std::vector<int64_t>& lengths() const { return lengths_; }
  // Compressed tokens held (committed) per slot; num_cmp_tokens(length) unless some are pending.
  const std::vector<int64_t>& cmp_lengths() const { return cmp_lengths_; }

  // The capacity to grow to when `required` raw rows per slot are needed: at least double the
  // current one (amortized O(1) copying per token), at most max_capacity().
  int64_t grown_capacity(int64_t required) const;

  // Plans appending `count` tokens to each of `slots` (distinct, each in [0, num_slots), none
  // with pending compressed tokens). Does not change the book.
  Status plan_append(const std::vector<int64_t>& slots, int64_t count, KvAppendPlan* plan) const;
  // The storage now holds `new_capacity` (>= capacity(), <= max_capacity()) raw rows per slot,
  // old contents kept; cmp_capacity() follows.
  Status grow(int64_t new_capacity);
  // Rows of the raw storage that the plan's new tokens go to: row b * m + j of the new tokens to
  // slots[b] * capacity() + first_positions[b] + j. The plan must be current (not yet committed,
  // capacity grown to plan.required_capacity).
  Status raw_rows(const KvAppendPlan& plan, std::vector<int64_t>* rows) const;
  // The new tokens are stored: the slots' lengths grow by plan.count. The plan must be current.
  Status commit_append(const KvAppendPlan& plan);
  // Rows of the compressed storage that the plan's due tokens go to, in plan.due order. The plan
  // must be committed and its compressed tokens not yet.
  Status cmp_rows(const KvAppendPlan& plan, std::vector<int64_t>* rows) const;
  // The plan's due compressed tokens are stored.
  Status commit_cmp(const KvAppendPlan& plan);

  // Empties a slot for reuse (its rows are overwritten by later appends).
  Status reset(int64_t slot);
  // The slots (non-empty, each in [0, num_slots), repeats allowed) can be attended to: none has
  // compressed tokens due that commit_cmp has not stored.
  Status check_ready(const std::vector<int64_t>& slots) const;

 private:
  Status check_slot(const std::string& name, int64_t slot) const;
  // The plan's slots hold exactly what they held when it was made (`appended`: plus its tokens);
  // before its append, the storage holds the rows it writes.
  Status check_plan_state(const KvAppendPlan& plan, bool appended) const;

  Config config_;
  bool compressed_ = true;
  int64_t capacity_ = 0;
  std::vector<int64_t> lengths_;
  std::vector<int64_t> cmp_lengths_;
};

}  // namespace nsa
