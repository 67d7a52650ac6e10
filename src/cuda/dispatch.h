// Switch macros of the CUDA dispatch: run BODY with TYPE bound to the CUDA element type of a
// DType, or with DK / DV bound to a supported (Dk, Dv) pair as constants. Unsupported values
// fall through (the caller returns kUnsupported). Used by src/cuda/forward.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nsa/config.h"

// Supported dtypes and head-dim pairs, as written in error messages.
#define NSA_CUDA_SUPPORTED_DTYPES "bfloat16, float16"
#define NSA_CUDA_SUPPORTED_HEAD_DIMS "(64, 64), (128, 128), (192, 128)"

#define NSA_CUDA_DTYPE_SWITCH(DTYPE, TYPE, ...)  \
  switch (DTYPE) {                               \
    case ::nsa::DType::kBFloat16: {              \
      using TYPE = __nv_bfloat16;                \
      __VA_ARGS__;                               \
      break;                                     \
    }                                            \
    case ::nsa::DType::kFloat16: {               \
      using TYPE = __half;                       \
      __VA_ARGS__;                               \
      break;                                     \
    }                                            \
    default:                                     \
      break;                                     \
  }

#define NSA_CUDA_HEAD_DIM_CASE(DK_VALUE, DV_VALUE, DK, DV, ...)   \
  if (dk_ == (DK_VALUE) && dv_ == (DV_VALUE)) {                   \
    constexpr int DK = (DK_VALUE), DV = (DV_VALUE);               \
    __VA_ARGS__                                                   \
  }

#define NSA_CUDA_HEAD_DIM_SWITCH(DK_RUNTIME, DV_RUNTIME, DK, DV, ...) \
  do {                                                                \
    const int64_t dk_ = (DK_RUNTIME), dv_ = (DV_RUNTIME);             \
    NSA_CUDA_HEAD_DIM_CASE(64, 64, DK, DV, __VA_ARGS__)               \
    NSA_CUDA_HEAD_DIM_CASE(128, 128, DK, DV, __VA_ARGS__)             \
    NSA_CUDA_HEAD_DIM_CASE(192, 128, DK, DV, __VA_ARGS__)             \
  } while (0)

inline bool nsa_cuda_supported_head_dims(int64_t dk, int64_t dv) {
  return (dk == 64 && dv == 64) || (dk == 128 && dv == 128) || (dk == 192 && dv == 128);
}
