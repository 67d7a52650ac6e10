// Host-side helpers shared by the launchers (forward_launch.cuh, backward_launch.cuh): the
// backend-error status of a failed CUDA call and the shared-memory check + attribute of a kernel.
// `api` names the entry point in messages ("nsa::cuda::forward").
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "nsa/status.h"

namespace nsa::cuda_detail {

inline Status backend_error(const char* api, const char* what, cudaError_t err) {
  return {StatusCode::kBackendError, std::string(api) + ": " + what + ": " + cudaGetErrorString(err)};
}

// The status of the last kernel launch (cudaGetLastError), naming what was launched.
inline Status launch_status(const char* api, const char* what) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? Status::Ok() : backend_error(api, what, err);
}

// kUnsupported when the kernel needs more dynamic shared memory than the device allows, else
// raises the kernel's dynamic shared-memory limit to smem_bytes.
template <class Kernel>
Status prepare_kernel(const char* api, Kernel kernel, int64_t smem_bytes, int max_smem, const char* name) {
  if (smem_bytes > max_smem) {
    return Status::Unsupported(std::string(api) + ": " + name + " needs " + std::to_string(smem_bytes) +
                               " bytes of shared memory, the device allows " + std::to_string(max_smem) +
                               " (reduce num_selected, the group size or the sequence length)");
  }
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
  if (err != cudaSuccess) return backend_error(api, "cudaFuncSetAttribute", err);
  return Status::Ok();
}

// The opt-in shared-memory limit per block of the current device.
inline Status max_dynamic_smem(const char* api, int* max_smem) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return err == cudaSuccess ? Status::Ok() : backend_error(api, "querying the device", err);
}

}  // namespace nsa::cuda_detail
