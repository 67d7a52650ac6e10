// nsa: Native Sparse Attention. Public C++ entry points; include this header only.
//
// Every entry point validates its params first and returns a Status; on error nothing has
// been written. The CPU backend is the exact reference (float64 accumulation).
#pragma once

#include "nsa/config.h"
#include "nsa/params.h"
#include "nsa/semantics.h"
#include "nsa/status.h"

namespace nsa {

// Where the params' pointers live. Host validation also reads the contents of cu_seqlens,
// cu_seqlens_cmp and given block_indices; device validation checks everything else.
enum class MemorySpace { kHost, kDevice };

// Checks params against the contract without running anything. The backends call these.
Status validate(const ForwardParams& params, MemorySpace space = MemorySpace::kHost);
Status validate(const BackwardParams& params, MemorySpace space = MemorySpace::kHost);

namespace cpu {
// The thread count the CPU backend uses for a requested count: requested if > 0, else
// NSA_NUM_THREADS when set, else std::thread::hardware_concurrency().
int resolve_num_threads(int requested);

// num_threads <= 0: std::thread::hardware_concurrency(), or NSA_NUM_THREADS when set.
Status forward(const ForwardParams& params, int num_threads = 0);
Status backward(const BackwardParams& params, int num_threads = 0);
}  // namespace cpu

}  // namespace nsa
