// encode_kv_tensor_maps: cuTensorMapEncodeTiled through the runtime's driver entry point, so that
// the library needs no -lcuda.
#include "cuda/kv_tensor_maps.h"

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000
#include <cuda_runtime.h>


namespace nsa::cuda_detail {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encoder = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
    return err == cudaSuccess && found == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn)
               : nullptr;
  }();
  return encoder;
}

bool encode(const TensorRef& t, const ForwardArgs& a, int64_t rows, int d, CUtensorMap* map) {
  const bool varlen = a.cu_seqlens != nullptr;
  const int64_t batch = varlen ? 1 : a.batch;
  // One sequence (or the packed rows): any batch stride the driver takes will do, so this one.
  const int64_t batch_stride = batch == 1 ? rows * t.seq_stride : t.batch_stride;
  // Likewise one kv head: its stride is never stepped.
  const int64_t head_stride = a.num_kv_heads == 1 ? d : t.head_stride;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(d), static_cast<cuuint64_t>(a.num_kv_heads),
                              static_cast<cuuint64_t>(rows), static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(head_stride) * 2, static_cast<cuuint64_t>(t.seq_stride) * 2,
                                 static_cast<cuuint64_t>(batch_stride) * 2};
  const cuuint32_t box[4] = {64, 1, 64, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const auto encoder = tensor_map_encoder();
  // The copies take signed 32-bit coordinates.
  constexpr int64_t kMaxRows = int64_t{1} << 31;
  if (encoder == nullptr || rows <= 0 || rows >= kMaxRows || head_stride <= 0 || t.seq_stride <= 0 ||
      batch_stride <= 0)
    return false;
  return encoder(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 4, const_cast<void*>(t.data), dims, strides, box, element_strides,
                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace

bool encode_kv_tensor_maps(const ForwardArgs& a, int branch, int dk, int dv, KvTensorMaps* maps) {
  const TensorRef& k = branch == kBranchCmp ? a.k_cmp : branch == kBranchWin ? a.k_win : a.k;
  const TensorRef& v = branch == kBranchCmp ? a.v_cmp : branch == kBranchWin ? a.v_win : a.v;
  const int64_t rows = branch == kBranchCmp ? a.cmp_key_rows : a.key_rows;
  return dk % 64 == 0 && dv % 64 == 0 && encode(k, a, rows, dk, &maps->k) && encode(v, a, rows, dv, &maps->v);
}

}  // namespace nsa::cuda_detail
