// FastDivider (src/cuda/fast_divider.h), the per-tile divisions of the selection kernel: equal to the
// integer division for every divisor up to 1100 over small numerators and the largest ones it takes,
// and for large divisors (powers of two and their neighbours) over spread numerators.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "cuda/fast_divider.h"

namespace {

using nsa::cuda_detail::FastDivider;

std::vector<int> numerators() {
  std::vector<int> n;
  for (int i = 0; i < 5000; ++i) n.push_back(i);
  for (int i = 0; i < 5000; ++i) n.push_back(INT32_MAX - i);
  for (int64_t x = 1; x < INT32_MAX; x = x * 3 + 1) {
    n.push_back(static_cast<int>(x));
    n.push_back(static_cast<int>(x - 1));
  }
  return n;
}

TEST(FastDivider, EqualsIntegerDivisionForSmallDivisors) {
  const std::vector<int> ns = numerators();
  for (int d = 1; d <= 1100; ++d) {
    const FastDivider div(d);
    for (int n : ns) ASSERT_EQ(div(n), n / d) << n << " / " << d;
  }
}

TEST(FastDivider, EqualsIntegerDivisionForLargeDivisors) {
  const std::vector<int> ns = numerators();
  for (int bit = 11; bit <= 30; ++bit) {
    for (int delta : {-1, 0, 1}) {
      const int d = (1 << bit) + delta;
      const FastDivider div(d);
      for (int n : ns) ASSERT_EQ(div(n), n / d) << n << " / " << d;
    }
  }
  const FastDivider largest(INT32_MAX);
  for (int n : ns) ASSERT_EQ(largest(n), n / INT32_MAX) << n;
}

}  // namespace
