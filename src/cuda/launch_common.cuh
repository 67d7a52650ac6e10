// Host-side helpers shared by the launchers (forward_launch.cuh, backward_launch.cuh): the
// backend-error status of a failed CUDA call, the shared-memory check + attribute of a kernel, and
// the chained (programmatic dependent) launch.
// `api` names the entry point in messages ("nsa::cuda::forward").
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

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

// The status of a launch of `kernel` (its name as prepare_kernel takes it) that returned err:
// "launching <kernel>" on failure, the message built only then (no allocation per launch).
inline Status kernel_launch_status(const char* api, const char* kernel, cudaError_t err) {
  return err == cudaSuccess ? Status::Ok() : backend_error(api, (std::string("launching ") + kernel).c_str(), err);
}

// What the launchers remember per (device, kernel), so that a decode step does not pay driver
// calls per kernel: the dynamic shared-memory limit set (only ever raised; the carveout is set
// with the first raise, so a kernel must always be prepared with the same carveout) and the
// virtual architecture the kernel's code was compiled for (cudaFuncAttributes::ptxVersion, -1
// until queried).
struct KernelState {
  int smem_limit = 0;
  int ptx_version = -1;
};

// The one store of those states, per device, and its lock.
struct KernelStates {
  std::mutex mutex;
  std::unordered_map<const void*, KernelState> per_device[kMaxDevices];
};
inline KernelStates& kernel_states() {
  static KernelStates states;
  return states;
}

// Runs update(state) on the remembered state of `kernel` on the current device, under the lock
// (on a fresh state, not remembered, for device ids past kMaxDevices).
template <class Kernel, class Update>
Status with_kernel_state(const char* api, Kernel kernel, Update&& update) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return backend_error(api, "cudaGetDevice", err);
  if (device < 0 || device >= kMaxDevices) {
    KernelState fresh;
    return update(fresh);
  }
  KernelStates& states = kernel_states();
  const std::lock_guard<std::mutex> lock(states.mutex);
  return update(states.per_device[device][reinterpret_cast<const void*>(kernel)]);
}

// Whether prepare_kernel also asks for the SM's largest shared-memory carveout (less L1): for
// kernels whose occupancy target (__launch_bounds__) needs more shared memory than the driver's
// default split leaves.
enum class Carveout { kDefault, kMaxShared };

// kUnsupported when the kernel needs more dynamic shared memory than the device allows, else
// raises the kernel's dynamic shared-memory limit to smem_bytes (and sets the carveout).
template <class Kernel>
Status prepare_kernel(const char* api, Kernel kernel, int64_t smem_bytes, int max_smem, const char* name,
                      Carveout carveout = Carveout::kDefault) {
  if (smem_bytes > max_smem) {
    return Status::Unsupported(std::string(api) + ": " + name + " needs " + std::to_string(smem_bytes) +
                               " bytes of shared memory, the device allows " + std::to_string(max_smem) +
                               " (reduce num_selected, the group size or the sequence length)");
  }
  return with_kernel_state(api, kernel, [&](KernelState& state) {
    if (state.smem_limit >= smem_bytes) return Status::Ok();
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
    if (err != cudaSuccess) return backend_error(api, "cudaFuncSetAttribute", err);
    if (carveout == Carveout::kMaxShared) {
      const cudaError_t carve_err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                                         cudaSharedmemCarveoutMaxShared);
      if (carve_err != cudaSuccess) return backend_error(api, "cudaFuncSetAttribute (carveout)", carve_err);
    }
    state.smem_limit = static_cast<int>(smem_bytes);
    return Status::Ok();
  });
}

// Launches kernel<<<grid, block, smem, stream>>>(args...) chained to the kernel before it in the
// stream (programmatic dependent launch): it may start while that one finishes, and must call
// wait_for_previous_kernel() (common.cuh) before it touches what that kernel writes or reads.
// Chained only when the kernel's code was compiled for compute_90 or newer, where that wait is
// in it: the virtual architecture (ptxVersion), not the machine code's (binaryVersion), which
// is the device's also when the driver compiled older PTX (an sm_80-only build on an H100).
// Otherwise an ordinary launch. `what` names the kernel in errors.
template <class... Params, class... Args>
Status launch_chained(const char* api, const char* what, void (*kernel)(Params...), dim3 grid, dim3 block,
                      size_t smem, cudaStream_t stream, Args&&... args) {
  bool chain = false;
  Status st = with_kernel_state(api, kernel, [&](KernelState& state) {
    if (state.ptx_version < 0) {
      cudaFuncAttributes attributes{};
      const cudaError_t err = cudaFuncGetAttributes(&attributes, kernel);
      if (err != cudaSuccess) return backend_error(api, "cudaFuncGetAttributes", err);
      state.ptx_version = attributes.ptxVersion;
    }
    chain = state.ptx_version >= 90;
    return Status::Ok();
  });
  if (!st.ok()) return st;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = chain ? &attribute : nullptr;
  config.numAttrs = chain ? 1 : 0;
  cudaError_t err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  // A launch error is cleared so that it is not reported again by a later check.
  const cudaError_t last = cudaGetLastError();
  if (err == cudaSuccess) err = last;
  return kernel_launch_status(api, what, err);
}

// What the launchers size kernels by on the current device, queried once per device:
//   max_smem: the opt-in shared-memory limit per block;
//   wgmma_sweeps: whether the prefill attention kernels (those prefill_sweep_wgmma names) run their
//     wgmma form, which they do where the library carries sm_90a code (NSA_CUDA_SM90A) and the
//     device is a 9.0 (it then runs that code); their shared memory then holds the Q tile too
//     (AttentionSmem::sweep_bytes).
struct DeviceLimits {
  int max_smem = 0;
  bool wgmma_sweeps = false;
};
inline Status device_limits(const char* api, DeviceLimits* limits) {
  // Per device: max_smem + 1 when queried (0: not yet), the sm_90a bit above it.
  static std::atomic<int64_t> cached[kMaxDevices] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return backend_error(api, "querying the device", err);
  const bool cacheable = device >= 0 && device < kMaxDevices;
  int64_t packed = cacheable ? cached[device].load(std::memory_order_relaxed) : 0;
  if (packed == 0) {
    int max_smem = 0, major = 0, minor = 0;
    err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    if (err != cudaSuccess) return backend_error(api, "querying the device", err);
#if defined(NSA_CUDA_SM90A)
    const bool wgmma = major == 9 && minor == 0;
#else
    const bool wgmma = false;
#endif
    packed = (int64_t{max_smem} + 1) | (int64_t{wgmma} << 32);
    if (cacheable) cached[device].store(packed, std::memory_order_relaxed);
  }
  limits->max_smem = static_cast<int>((packed & 0xFFFFFFFF) - 1);
  limits->wgmma_sweeps = (packed >> 32) != 0;
  return Status::Ok();
}

}  // namespace nsa::cuda_detail
