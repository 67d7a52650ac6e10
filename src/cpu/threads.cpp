// parallel_for over std::thread with an atomic task counter.
#include "cpu/threads.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <thread>
#include <vector>

namespace nsa::cpu {

int resolve_num_threads(int requested) {
  if (requested > 0) return requested;
  if (const char* env = std::getenv("NSA_NUM_THREADS")) {
    const int from_env = std::atoi(env);
    if (from_env > 0) return from_env;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

void parallel_for(int64_t count, int num_threads, const std::function<void(int64_t)>& task) {
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    for (int64_t i = next++; i < count; i = next++) task(i);
  };
  const int64_t spawned = std::min<int64_t>(num_threads, count) - 1;
  std::vector<std::thread> threads;
  for (int64_t i = 0; i < spawned; ++i) threads.emplace_back(worker);
  worker();
  for (std::thread& thread : threads) thread.join();
}

}  // namespace nsa::cpu
