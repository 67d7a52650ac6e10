// nsa::KvCacheBook (include/nsa/kv_cache.h): compressed tokens become due exactly at DESIGN's
// emission boundaries, chunked appends due the same tokens as single-token appends and gather
// phi's input from the right positions, capacity growth, slot reset, and a clear error for every
// invalid argument.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "nsa/kv_cache.h"
#include "nsa/semantics.h"

namespace {

nsa::Config small_config(int64_t cmp_block, int64_t cmp_stride) {
  nsa::Config config;
  config.cmp_block = cmp_block;
  config.cmp_stride = cmp_stride;
  config.sel_block = 2 * cmp_block;
  config.num_selected = 3;
  config.num_init = 1;
  config.num_local = 1;
  config.window = 8;
  return config;
}

nsa::KvCacheBook make_book(const nsa::Config& config, int64_t num_slots, int64_t capacity, bool compressed = true) {
  nsa::KvCacheBook book;
  const nsa::Status status = nsa::KvCacheBook::create(config, compressed, num_slots, capacity, &book);
  EXPECT_TRUE(status.ok()) << status.message;
  return book;
}

// plan_append + (grow as needed) + commit_append + commit_cmp, as an owner of storage would.
nsa::KvAppendPlan append(nsa::KvCacheBook& book, const std::vector<int64_t>& slots, int64_t count) {
  nsa::KvAppendPlan plan;
  nsa::Status status = book.plan_append(slots, count, &plan);
  EXPECT_TRUE(status.ok()) << status.message;
  if (plan.required_capacity > book.capacity()) {
    EXPECT_TRUE(book.grow(book.grown_capacity(plan.required_capacity)).ok());
  }
  status = book.commit_append(plan);
  EXPECT_TRUE(status.ok()) << status.message;
  status = book.commit_cmp(plan);
  EXPECT_TRUE(status.ok()) << status.message;
  return plan;
}

void expect_invalid(const nsa::Status& status, const std::vector<std::string>& fragments) {
  EXPECT_EQ(status.code, nsa::StatusCode::kInvalidArgument);
  for (const std::string& fragment : fragments)
    EXPECT_NE(status.message.find(fragment), std::string::npos) << "message: " << status.message
                                                                << "\nmissing: " << fragment;
}

// DESIGN section 1: appending position t makes a compressed token due iff t+1 >= l and
// (t+1-l) % d == 0; it compresses [t+1-l, t+1).
TEST(KvCacheBook, DueTokensAtEmissionBoundaries) {
  for (const auto& [l, d] : std::vector<std::pair<int64_t, int64_t>>{{32, 16}, {16, 8}, {8, 8}, {4, 1}}) {
    nsa::KvCacheBook book = make_book(small_config(l, d), 1, 300);
    for (int64_t t = 0; t < 300; ++t) {
      const nsa::KvAppendPlan plan = append(book, {0}, 1);
      const bool due = t + 1 >= l && (t + 1 - l) % d == 0;
      ASSERT_EQ(plan.due.size(), due ? 1u : 0u) << "l=" << l << " d=" << d << " t=" << t;
      if (due) {
        EXPECT_EQ(plan.due[0].index, (t + 1 - l) / d);
        EXPECT_EQ(plan.due[0].raw_start, t + 1 - l);
        EXPECT_EQ(plan.due[0].batch_row, 0);
      }
      EXPECT_EQ(book.lengths()[0], t + 1);
      EXPECT_EQ(book.cmp_lengths()[0], nsa::num_cmp_tokens(t + 1, l, d));
    }
  }
}

// The first due tokens sit exactly at t = l-1, l-1+d, l-1+2d.
TEST(KvCacheBook, FirstBoundariesOfThePaperConfig) {
  nsa::KvCacheBook book = make_book(nsa::Config{}, 1, 64);  // l = 32, d = 16
  std::vector<int64_t> due_after;
  for (int64_t t = 0; t < 64; ++t)
    if (!append(book, {0}, 1).due.empty()) due_after.push_back(t);
  EXPECT_EQ(due_after, (std::vector<int64_t>{31, 47, 63}));
}

// Appending in chunks of any size dues the same tokens as appending one at a time, and every
// due token's phi rows resolve (through the ring or the new tokens) to positions
// [raw_start, raw_start + l) of its own slot. Slots of different lengths share each append.
TEST(KvCacheBook, ChunkedAppendsGatherPhiInputFromRingAndNewTokens) {
  const int64_t l = 16, d = 8, num_slots = 3;
  for (const int64_t chunk : {1, 3, 7, 16, 33, 100}) {
    nsa::KvCacheBook book = make_book(small_config(l, d), num_slots, 8);
    // What the ring holds: ring_position[row] = (slot, position); (-1, -1) = never written.
    std::vector<std::pair<int64_t, int64_t>> ring_position(static_cast<size_t>(num_slots * l), {-1, -1});
    std::vector<std::vector<int64_t>> due_indices(num_slots);
    const auto check_append = [&](const std::vector<int64_t>& slots, int64_t count) {
      nsa::KvAppendPlan plan;
      ASSERT_TRUE(book.plan_append(slots, count, &plan).ok());
      ASSERT_EQ(plan.phi_rows.size(), plan.due.size() * static_cast<size_t>(l));
      const auto resolve = [&](int64_t row) -> std::pair<int64_t, int64_t> {
        if (row < num_slots * l) return ring_position[static_cast<size_t>(row)];
        const int64_t b = (row - num_slots * l) / count, j = (row - num_slots * l) % count;
        return {slots[static_cast<size_t>(b)], plan.first_positions[static_cast<size_t>(b)] + j};
      };
      for (size_t k = 0; k < plan.due.size(); ++k) {
        const nsa::KvDueToken& token = plan.due[k];
        const int64_t slot = slots[static_cast<size_t>(token.batch_row)];
        due_indices[static_cast<size_t>(slot)].push_back(token.index);
        EXPECT_EQ(token.raw_start, token.index * d);
        for (int64_t j = 0; j < l; ++j)
          ASSERT_EQ(resolve(plan.phi_rows[k * static_cast<size_t>(l) + static_cast<size_t>(j)]),
                    std::make_pair(slot, token.raw_start + j))
              << "chunk " << chunk << " due token " << token.index << " of slot " << slot << " raw " << j;
      }
      ASSERT_EQ(plan.ring_sources.size(), plan.ring_rows.size());
      for (size_t x = 0; x < plan.ring_rows.size(); ++x)
        ring_position[static_cast<size_t>(plan.ring_rows[x])] = resolve(num_slots * l + plan.ring_sources[x]);
      if (plan.required_capacity > book.capacity()) {
        ASSERT_TRUE(book.grow(book.grown_capacity(plan.required_capacity)).ok());
      }
      ASSERT_TRUE(book.commit_append(plan).ok());
      ASSERT_TRUE(book.commit_cmp(plan).ok());
    };
    check_append({1}, 5);  // slot 1 runs 5 tokens ahead: the batches below mix lengths
    for (int64_t appended = 0; appended < 240; appended += chunk) check_append({2, 0, 1}, chunk);
    for (int64_t slot = 0; slot < num_slots; ++slot) {
      const int64_t length = book.lengths()[static_cast<size_t>(slot)];
      std::vector<int64_t> expected;
      for (int64_t i = 0; i < nsa::num_cmp_tokens(length, l, d); ++i) expected.push_back(i);
      EXPECT_EQ(due_indices[static_cast<size_t>(slot)], expected) << "chunk " << chunk << " slot " << slot;
      EXPECT_EQ(book.cmp_lengths()[static_cast<size_t>(slot)], static_cast<int64_t>(expected.size()));
    }
  }
}

TEST(KvCacheBook, RawAndCompressedRowsAreSlotMajor) {
  nsa::KvCacheBook book = make_book(small_config(4, 2), 3, 10);
  append(book, {2}, 3);
  nsa::KvAppendPlan plan;
  ASSERT_TRUE(book.plan_append({1, 2}, 2, &plan).ok());
  std::vector<int64_t> rows;
  ASSERT_TRUE(book.raw_rows(plan, &rows).ok());
  EXPECT_EQ(rows, (std::vector<int64_t>{10, 11, 23, 24}));  // slot 1 from 0, slot 2 from 3
  // Slot 2 reaches length 5: compressed tokens 0 (at length 4) and 1 (at length 6) -> only 0 due.
  ASSERT_EQ(plan.due.size(), 1u);
  EXPECT_EQ(plan.due[0].batch_row, 1);
  EXPECT_EQ(plan.due[0].index, 0);
  expect_invalid(book.cmp_rows(plan, &rows), {"stale"});  // not committed yet
  ASSERT_TRUE(book.commit_append(plan).ok());
  ASSERT_TRUE(book.cmp_rows(plan, &rows).ok());
  EXPECT_EQ(rows, (std::vector<int64_t>{2 * book.cmp_capacity() + 0}));
  EXPECT_EQ(book.cmp_capacity(), nsa::num_cmp_tokens(10, 4, 2));
}

TEST(KvCacheBook, GrowthDoublesAndKeepsLengths) {
  nsa::KvCacheBook book = make_book(small_config(4, 2), 2, 4);
  append(book, {0}, 3);
  nsa::KvAppendPlan plan;
  ASSERT_TRUE(book.plan_append({0, 1}, 2, &plan).ok());
  EXPECT_EQ(plan.required_capacity, 5);
  std::vector<int64_t> rows;
  expect_invalid(book.raw_rows(plan, &rows), {"capacity 5", "holds 4", "grow it first"});
  expect_invalid(book.commit_append(plan), {"capacity 5", "grow it first"});
  // The rows the plan writes decide, not the capacity it claims to need.
  nsa::KvAppendPlan understated = plan;
  understated.required_capacity = 1;
  expect_invalid(book.raw_rows(understated, &rows), {"capacity 5", "holds 4", "grow it first"});
  EXPECT_EQ(book.grown_capacity(5), 8);    // doubling
  EXPECT_EQ(book.grown_capacity(20), 20);  // a bigger jump is taken as is
  expect_invalid(book.grow(3), {"new_capacity", "[4", "got 3"});
  ASSERT_TRUE(book.grow(8).ok());
  EXPECT_EQ(book.capacity(), 8);
  EXPECT_EQ(book.cmp_capacity(), nsa::num_cmp_tokens(8, 4, 2));
  EXPECT_EQ(book.lengths(), (std::vector<int64_t>{3, 0}));
  ASSERT_TRUE(book.raw_rows(plan, &rows).ok());
  EXPECT_EQ(rows, (std::vector<int64_t>{3, 4, 8, 9}));  // the new capacity's row stride
  ASSERT_TRUE(book.commit_append(plan).ok());
  EXPECT_EQ(book.lengths(), (std::vector<int64_t>{5, 2}));
  EXPECT_EQ(book.grown_capacity(nsa::KvCacheBook::max_capacity()), nsa::KvCacheBook::max_capacity());
}

TEST(KvCacheBook, ResetReusesASlot) {
  const int64_t l = 8, d = 4;
  nsa::KvCacheBook book = make_book(small_config(l, d), 2, 64);
  append(book, {0, 1}, 20);
  ASSERT_TRUE(book.reset(0).ok());
  EXPECT_EQ(book.lengths(), (std::vector<int64_t>{0, 20}));
  EXPECT_EQ(book.cmp_lengths(), (std::vector<int64_t>{0, nsa::num_cmp_tokens(20, l, d)}));
  const nsa::KvAppendPlan plan = append(book, {0}, 8);
  EXPECT_EQ(plan.first_positions, std::vector<int64_t>{0});
  ASSERT_EQ(plan.due.size(), 1u);
  EXPECT_EQ(plan.due[0].index, 0);
  // Every phi row of the reused slot comes from the new tokens, none from the stale ring.
  for (const int64_t row : plan.phi_rows) EXPECT_GE(row, 2 * l);
  expect_invalid(book.reset(2), {"slot must be in [0, 2)", "got 2"});
  expect_invalid(book.reset(-1), {"slot", "got -1"});
}

TEST(KvCacheBook, PlainCacheHasNoCompressedTokens) {
  nsa::KvCacheBook book = make_book(small_config(4, 2), 1, 16, /*compressed=*/false);
  EXPECT_EQ(book.cmp_capacity(), 0);
  EXPECT_EQ(book.ring_size(), 0);
  const nsa::KvAppendPlan plan = append(book, {0}, 16);
  EXPECT_TRUE(plan.due.empty());
  EXPECT_TRUE(plan.phi_rows.empty());
  EXPECT_TRUE(plan.ring_rows.empty());
  EXPECT_TRUE(book.check_ready({0}).ok());
}

TEST(KvCacheBook, InvalidArgumentsAreClearErrors) {
  nsa::KvCacheBook book;
  expect_invalid(nsa::KvCacheBook::create(small_config(4, 2), true, 0, 8, &book), {"num_slots must be >= 1", "got 0"});
  expect_invalid(nsa::KvCacheBook::create(small_config(4, 2), true, 1, 0, &book), {"capacity must be in [1,", "got 0"});
  expect_invalid(nsa::KvCacheBook::create(small_config(4, 2), true, 1, nsa::KvCacheBook::max_capacity() + 1, &book),
                 {"capacity"});
  expect_invalid(nsa::KvCacheBook::create(small_config(4, 3), true, 1, 8, &book), {"cmp_stride (d) must divide"});
  expect_invalid(nsa::KvCacheBook::create(small_config(4, 2), true, 1, 8, nullptr), {"book must not be null"});

  nsa::KvAppendPlan plan;
  expect_invalid(book.plan_append({0}, 1, &plan), {"empty", "create"});
  book = make_book(small_config(4, 2), 3, 8);
  expect_invalid(book.plan_append({}, 1, &plan), {"slots must list at least one slot"});
  expect_invalid(book.plan_append({0}, 0, &plan), {"count", ">= 1", "got 0"});
  expect_invalid(book.plan_append({0, 3}, 1, &plan), {"slots[1] must be in [0, 3)", "got 3"});
  expect_invalid(book.plan_append({-1}, 1, &plan), {"slots[0]", "got -1"});
  expect_invalid(book.plan_append({1, 1}, 1, &plan), {"distinct", "slot 1"});
  expect_invalid(book.check_ready({}), {"at least one slot"});
  expect_invalid(book.check_ready({0, 5}), {"slots[1]", "got 5"});

  // Compressed tokens due but not committed: refused by the next append and by check_ready.
  ASSERT_TRUE(book.plan_append({0}, 4, &plan).ok());
  ASSERT_EQ(plan.due.size(), 1u);
  ASSERT_TRUE(book.commit_append(plan).ok());
  expect_invalid(book.check_ready({1, 0}), {"slot 0 has 1 compressed token(s) due"});
  nsa::KvAppendPlan next;
  expect_invalid(book.plan_append({0}, 1, &next), {"slot 0", "due"});
  EXPECT_TRUE(book.plan_append({1}, 1, &next).ok());  // other slots are unaffected
  expect_invalid(book.commit_append(plan), {"stale", "slot 0 holds 4 tokens"});  // committed twice
  ASSERT_TRUE(book.commit_cmp(plan).ok());
  expect_invalid(book.commit_cmp(plan), {"stale"});
  EXPECT_TRUE(book.check_ready({0}).ok());
  expect_invalid(book.commit_append(nsa::KvAppendPlan{}), {"malformed"});
  std::vector<int64_t> rows;
  expect_invalid(book.raw_rows(plan, nullptr), {"rows must not be null"});
  expect_invalid(book.cmp_rows(plan, nullptr), {"rows must not be null"});
  expect_invalid(book.plan_append({0}, 1, nullptr), {"plan must not be null"});
  expect_invalid(book.plan_append({0}, nsa::KvCacheBook::max_capacity(), &next), {"slot 0 holds 4", "exceed"});
}

}  // namespace
