// A minimal parallel-for for the CPU reference: static thread count, dynamic work stealing
// over task indices. Results never depend on the schedule: each task owns what it writes.
#pragma once

#include <cstdint>
#include <functional>

#include "nsa/nsa.h"

namespace nsa::cpu {

// Runs task(i) for i in [0, count) on num_threads threads (the caller's thread is one of them).
void parallel_for(int64_t count, int num_threads, const std::function<void(int64_t)>& task);

}  // namespace nsa::cpu
