// nsa: Native Sparse Attention. Public C++ entry points; include this header only.
//
// Every entry point validates its params first and returns a Status; on error nothing has
// been written. The CPU backend is the exact reference (float64 accumulation).
#pragma once

#include <cstddef>

#include "nsa/config.h"
#include "nsa/kv_cache.h"
#include "nsa/params.h"
#include "nsa/semantics.h"
#include "nsa/status.h"

namespace nsa {

// Where the params' pointers live. Host validation also reads the contents of cu_seqlens,
// cu_seqlens_cmp and given block_indices; device validation checks everything else.
enum class MemorySpace { kHost, kDevice };

// Checks params against the contract without running anything. The backends call these.
Status validate(const Config& config);
// The packed layout's offsets (host memory): cu_seqlens and cu_seqlens_cmp against each other,
// shape.batch, shape.seqlen and the totals. Only those fields of shape are read.
Status validate(const Config& config, const Shape& shape, const Varlen& varlen);
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

// The CUDA backend. Every pointer in the params is a device pointer (cu_seqlens and a given
// block_indices included; their contents are not validated on the host). Supported: bfloat16
// and float16 inputs (float32 lse), head dims (Dk, Dv) in {(64, 64), (128, 128), (192, 128)},
// data pointers 16-byte aligned with strides that are multiples of 8 elements (gates: any).
// Anything else returns kUnsupported with the supported set in the message. A build without
// CUDA provides the same symbols: built() is false and the rest return kUnsupported.
namespace cuda {
// Whether this library was built with the CUDA backend.
bool built();
// Bytes of device workspace forward() needs for these params: the staged branch outputs when
// out_branch is null (2 * rows * Hq * Dv elements of the input dtype), and with a KV cache the
// decode path's split partials and compressed-token scores; 0 when neither applies.
size_t forward_workspace_bytes(const ForwardParams& params);
// Enqueues the forward on `stream` (a cudaStream_t; nullptr = the legacy default stream).
// Never synchronizes and never allocates; the workspace (256-byte aligned, e.g. from cudaMalloc)
// holds forward_workspace_bytes(params) bytes (it may be null when that is 0). Launch errors
// return kBackendError with CUDA's message.
Status forward(const ForwardParams& params, void* workspace, size_t workspace_bytes, void* stream);
// Bytes of device workspace backward() needs for these params on the current device (fp32
// gradient accumulators, per-branch softmax row terms, the block -> query index of the selection
// branch, and where the selection branch's dq runs key-major its fp32 accumulator [rows, Hq, Dk]:
// params.selected_dq, docs/decisions/0012); 0 when the params do not validate.
size_t backward_workspace_bytes(const BackwardParams& params);
// Enqueues the backward on `stream`: every gradient of BackwardParams (grad_k also receives the
// window branch's when k_win is null, grad_v likewise). Never synchronizes and never allocates;
// the workspace (256-byte aligned, e.g. from cudaMalloc; its contents need not be zeroed) holds
// backward_workspace_bytes(params) bytes and is in use until the enqueued work completes.
// params.deterministic = true gives bitwise identical gradients run to run (no floating-point
// atomics whose order varies); false lets long key lists be split across CTAs (faster, the
// order of the fp32 accumulation then varies in the last bits).
Status backward(const BackwardParams& params, void* workspace, size_t workspace_bytes, void* stream);
}  // namespace cuda

}  // namespace nsa
