// Tensor maps (TMA descriptors) of one branch's keys and values in a forward, for the sm_90 ring
// kernels (tma_ring_kernel in attention.cuh), which load whole 64-key tiles with one copy per 64
// columns. Host side: encode_kv_tensor_maps (kv_tensor_maps.cpp); the kernel takes the maps as a
// __grid_constant__ parameter.
#pragma once

#include <cuda.h>  // CUtensorMap (types only: the encoder comes through the runtime's driver entry point)

#include "cuda/forward_args.h"

namespace nsa::cuda_detail {

struct KvTensorMaps {
  CUtensorMap k;  // the branch's keys as [B][rows][Hkv][Dk] (varlen: B = 1, the packed rows), box {64, 1, 64, 1}
  CUtensorMap v;  // its values as [B][rows][Hkv][Dv], box {64, 1, 64, 1}
};

// Encodes the maps of branch `branch`'s keys and values (slc: a.k, a.v; win: a.k_win, a.v_win; cmp:
// a.k_cmp, a.v_cmp, rows a.cmp_key_rows; 2-byte elements, head dims dk and dv, multiples of 64):
// boxes of 64 keys x 64 elements of one kv head, in the 128-byte swizzle of
// tile_chunk_offset<D, 64, true>. False where the driver has no encoder or rejects the layout (e.g.
// a batch stride that is not a multiple of 16 bytes); the caller then runs the cp.async kernel.
bool encode_kv_tensor_maps(const ForwardArgs& a, int branch, int dk, int dv, KvTensorMaps* maps);

}  // namespace nsa::cuda_detail
