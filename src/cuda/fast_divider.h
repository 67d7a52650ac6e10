// Division by a divisor fixed for a kernel's run but not known at compile time, as a multiply-high,
// an add and a shift (Granlund and Montgomery), for the quotients a kernel takes per key tile. Plain
// arithmetic, so that the host tests check the function the kernels use (tests/cpp/test_fast_divider.cpp).
#pragma once

#include <cstdint>

#include "nsa/semantics.h"  // NSA_HOST_DEVICE

namespace nsa::cuda_detail {

// n / divisor for 0 <= n < 2^31 and 1 <= divisor <= 2^31: with shift = ceil(log2 divisor) and
// magic = floor(2^32 (2^shift - divisor) / divisor) + 1 (< 2^32), n / divisor = (mulhi(n, magic) + n) >> shift,
// the sum below 2^32 because n < 2^31.
class FastDivider {
 public:
  NSA_HOST_DEVICE explicit FastDivider(int divisor) {
    const uint64_t d = static_cast<uint32_t>(divisor);
    while ((uint64_t{1} << shift_) < d) ++shift_;
    magic_ = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift_) - d)) / d + 1);
  }
  NSA_HOST_DEVICE int operator()(int n) const {
    const uint32_t un = static_cast<uint32_t>(n);
#if defined(__CUDA_ARCH__)
    const uint32_t high = __umulhi(un, magic_);
#else
    const uint32_t high = static_cast<uint32_t>((uint64_t{un} * magic_) >> 32);
#endif
    return static_cast<int>((high + un) >> shift_);
  }

 private:
  uint32_t shift_ = 0;
  uint32_t magic_ = 0;
};

}  // namespace nsa::cuda_detail
