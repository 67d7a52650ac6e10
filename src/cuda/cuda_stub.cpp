// The CUDA entry points of a build without CUDA (no nvcc found, or NSA_CUDA=OFF): the symbols
// exist so that callers link either way; built() is false and everything else is kUnsupported.
#include "cuda/stages.h"
#include "nsa/nsa.h"

namespace nsa::cuda_detail {
Status forward_stages(const ForwardParams&, void*, size_t, void*, unsigned) {
  return Status::Unsupported("nsa was built without CUDA");
}
Status backward_stages(const BackwardParams&, void*, size_t, void*, unsigned) {
  return Status::Unsupported("nsa was built without CUDA");
}
bool sm90a_code_runs() { return false; }
bool backward_key_major_dq(const BackwardParams&) { return false; }
}  // namespace nsa::cuda_detail

namespace nsa::cuda {
bool built() { return false; }
size_t forward_workspace_bytes(const ForwardParams&) { return 0; }
Status forward(const ForwardParams&, void*, size_t, void*) { return Status::Unsupported("nsa was built without CUDA"); }
size_t backward_workspace_bytes(const BackwardParams&) { return 0; }
Status backward(const BackwardParams&, void*, size_t, void*) { return Status::Unsupported("nsa was built without CUDA"); }
}  // namespace nsa::cuda
