// A ptxas miscompile on sm_90a (nvcc 13.0), reduced: `c == 64` of c = max(0, min(64, y)) becomes the
// predicate output of VIMNMX.RELU, and the branch it guards is taken for c < 64 as well. Twice it
// broke a kernel of ours (docs/decisions/0001-cuda-forward-v0.md, 0010-slc-tma-ring.md); the
// kernels avoid the form and scripts/gpu_check.sh checks their SASS for it. This program shows
// whether the toolchain at hand still does it: it prints "ok" or "MISCOMPILED" last.
// Build: nvcc -arch=sm_90a -O3 -o vimnmx_repro scripts/vimnmx_repro.cu
#include <cstdio>

// The loops keep both sides of the branch real, so that ptxas branches rather than selects.
__global__ void clamp_then_compare(const int* y, int* took_whole, int* sink, int n) {
  const int i = threadIdx.x;
  if (i >= n) return;
  const int c = max(0, min(64, y[i]));
  if (c == 64) {
    for (int k = 0; k < y[i]; ++k) atomicAdd(&sink[k & 7], k);
    took_whole[i] = 1;
  } else {
    for (int k = 0; k < c; ++k) atomicAdd(&sink[8 + (k & 7)], k);
    took_whole[i] = 0;
  }
}

int main() {
  constexpr int kN = 6;
  const int host_y[kN] = {32, 64, 70, 0, -5, 63};
  int *y = nullptr, *took_whole = nullptr, *sink = nullptr;
  if (cudaMalloc(&y, sizeof host_y) != cudaSuccess || cudaMalloc(&took_whole, sizeof host_y) != cudaSuccess ||
      cudaMalloc(&sink, 16 * sizeof(int)) != cudaSuccess) {
    std::printf("vimnmx repro: no device\n");
    return 2;
  }
  cudaMemcpy(y, host_y, sizeof host_y, cudaMemcpyHostToDevice);
  clamp_then_compare<<<1, 32>>>(y, took_whole, sink, kN);
  int host_took[kN] = {};
  if (cudaMemcpy(host_took, took_whole, sizeof host_took, cudaMemcpyDeviceToHost) != cudaSuccess) {
    std::printf("vimnmx repro: the kernel failed\n");
    return 2;
  }
  int wrong = 0;
  for (int i = 0; i < kN; ++i) {
    const int want = host_y[i] >= 64;
    std::printf("y %3d: took the c == 64 branch %d (want %d)\n", host_y[i], host_took[i], want);
    wrong += host_took[i] != want;
  }
  std::printf("vimnmx repro: %s\n", wrong ? "MISCOMPILED" : "ok");
  return wrong ? 1 : 0;
}
