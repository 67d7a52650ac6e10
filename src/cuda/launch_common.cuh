// Host-side helpers shared by the launchers (forward_launch.cuh, backward_launch.cuh): the
// backend-error status of a failed CUDA call and the shared-memory check + attribute of a kernel.
// `api` names the entry point in messages ("nsa::cuda::forward").
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <mutex>
#include <string>
#include <unordered_map>

#include "nsa/status.h"

namespace nsa::cuda_detail {

// Devices the per-device caches below keep (higher device ids skip the caches).
inline constexpr int kMaxDevices = 64;

inline Status backend_error(const char* api, const char* what, cudaError_t err) {
  return {StatusCode::kBackendError, std::string(api) + ": " + what + ": " + cudaGetErrorString(err)};
}

// The status of the last kernel launch (cudaGetLastError), naming what was launched.
inline Status launch_status(const char* api, const char* what) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? Status::Ok() : backend_error(api, what, err);
}

// kUnsupported when the kernel needs more dynamic shared memory than the device allows, else
// raises the kernel's dynamic shared-memory limit to smem_bytes. The limit only ever grows and is
// remembered per (device, kernel), so a decode step does not pay a driver call per kernel.
template <class Kernel>
Status prepare_kernel(const char* api, Kernel kernel, int64_t smem_bytes, int max_smem, const char* name) {
  if (smem_bytes > max_smem) {
    return Status::Unsupported(std::string(api) + ": " + name + " needs " + std::to_string(smem_bytes) +
                               " bytes of shared memory, the device allows " + std::to_string(max_smem) +
                               " (reduce num_selected, the group size or the sequence length)");
  }
  static std::mutex mutex;
  static std::unordered_map<const void*, int> limits[kMaxDevices];  // per device: kernel -> limit set
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return backend_error(api, "cudaGetDevice", err);
  const bool cached = device >= 0 && device < kMaxDevices;
  std::unique_lock<std::mutex> lock(mutex, std::defer_lock);
  int* limit = nullptr;
  if (cached) {
    lock.lock();
    limit = &limits[device][reinterpret_cast<const void*>(kernel)];
    if (*limit >= smem_bytes) return Status::Ok();
  }
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
  if (err != cudaSuccess) return backend_error(api, "cudaFuncSetAttribute", err);
  if (cached) *limit = static_cast<int>(smem_bytes);
  return Status::Ok();
}

// The opt-in shared-memory limit per block of the current device (queried once per device).
inline Status max_dynamic_smem(const char* api, int* max_smem) {
  static std::atomic<int> limits[kMaxDevices] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return backend_error(api, "querying the device", err);
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && (*max_smem = limits[device].load(std::memory_order_relaxed)) > 0) return Status::Ok();
  err = cudaDeviceGetAttribute(max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return backend_error(api, "querying the device", err);
  if (cached) limits[device].store(*max_smem, std::memory_order_relaxed);
  return Status::Ok();
}

}  // namespace nsa::cuda_detail
