// Definition of launch_backward<T, Dk, Dv>: grids, dynamic shared memory and attributes of the
// backward's (T, Dk, Dv)-dependent kernels (src/cuda/backward.cuh), in stream order:
//   preprocess_kernel     grid rows, a warp per (row, query head)
//   (key-major dq: dkv_kernel<slc, kKeyMajorDq> here, as below, so that dq can add its sums)
//   dq_kernel             grid (ceil(T*G/64), Hkv, B), as the forward's attention kernels
//   dkv_kernel<cmp>       grid (B * ceil(Tc/64W), Hkv, splits)  splits = ceil(T / split_positions[branch])
//   dkv_kernel<slc>       grid (B * ceil(T/l') * ceil(l'/64), Hkv, splits)
//   dkv_kernel<win>       grid (B * ceil(T/64W), Hkv, splits)
//   (W: dkv_key_groups, the CTA's warpgroups of 64 keys each)
//   convert_kernel        per gradient of k / v / k_win / v_win / k_cmp / v_cmp
// Included only by the generated instantiation files.
#pragma once

#include "cuda/backward.cuh"
#include "cuda/backward_launch.h"
#include "cuda/backward_split.h"
#include "cuda/launch_common.cuh"
#include "cuda/stages.h"

namespace nsa::cuda_detail {

constexpr const char* kBackwardApi = "nsa::cuda::backward";

template <class T>
Status launch_convert(const float* acc, int64_t rows, int heads, int dim, int64_t rows_per_seq, const OutputRef& dst,
                      cudaStream_t stream) {
  const int64_t pairs = rows * heads * (dim / 2);
  if (pairs == 0 || dst.data == nullptr) return Status::Ok();
  const int64_t blocks = std::min<int64_t>((pairs + 255) / 256, 132 * 16);
  convert_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(acc, rows, heads, dim, rows_per_seq, dst);
  return launch_status(kBackwardApi, "launching the gradient conversion");
}

template <class T, int Dk, int Dv>
Status launch_backward(const BackwardArgs& a, cudaStream_t stream, unsigned stages) {
  DeviceLimits device;
  Status st = device_limits(kBackwardApi, &device);
  if (!st.ok()) return st;
  const int max_smem = device.max_smem;

  const bool varlen = a.cu_seqlens != nullptr;
  const int64_t total = a.total_rows, cmp_total = a.total_cmp_rows;

  // Key-major dq (a.dq_slc_acc; backward.cu set it only with the sm_90a code, Dk <= 128): the dq
  // kernel then has no slc sweep, so no block union in its shared memory.
  const bool key_major_dq = a.dq_slc_acc != nullptr;
  const int64_t dq_smem =
      DqSmem::tiles_bytes(Dk, Dv) + (key_major_dq ? 0 : AttentionSmem::union_bytes(a.union_words, a.union_capacity));
  // Per branch: the dK / dV CTA's warpgroups of 64 keys (as the kernel's kDkvKeyGroups) and its
  // shared memory.
  const auto key_groups = [&](int branch) {
    return dkv_key_groups(branch, Dk, device.wgmma_sweeps && kDkvRows<Dk> == 64);
  };
  const auto dkv_smem = [&](int branch) { return DkvSmem::bytes(Dk, Dv, kDkvRows<Dk>, key_groups(branch)); };
  const auto dq = dq_kernel<T, Dk, Dv>;
  const auto dkv_cmp = dkv_kernel<T, Dk, Dv, kBranchCmp>;
  auto dkv_slc = dkv_kernel<T, Dk, Dv, kBranchSlc>;
  if constexpr (Dk <= kKeyMajorDqMaxDk)
    if (key_major_dq) dkv_slc = dkv_kernel<T, Dk, Dv, kBranchSlc, true>;
  if (key_major_dq && Dk > kKeyMajorDqMaxDk)  // (backward.cu refuses it first; the dq kernel would skip slc)
    return Status::Unsupported(std::string(kBackwardApi) + ": key-major dq supports Dk <= " +
                               std::to_string(kKeyMajorDqMaxDk) + "; got Dk = " + std::to_string(Dk));
  const auto dkv_win = dkv_kernel<T, Dk, Dv, kBranchWin>;
  // With three CTAs per SM asked (backward_three_ctas: dq, cmp and slc dk/dv), the largest carveout.
  const Carveout carveout =
      backward_three_ctas(Dk, device.wgmma_sweeps) ? Carveout::kMaxShared : Carveout::kDefault;
  st = prepare_kernel(kBackwardApi, dq, dq_smem, max_smem, "the dq kernel", carveout);
  if (st.ok())
    st = prepare_kernel(kBackwardApi, dkv_cmp, dkv_smem(kBranchCmp), max_smem, "the dk/dv kernel", carveout);
  if (st.ok())
    st = prepare_kernel(kBackwardApi, dkv_slc, dkv_smem(kBranchSlc), max_smem, "the dk/dv kernel", carveout);
  if (st.ok()) st = prepare_kernel(kBackwardApi, dkv_win, dkv_smem(kBranchWin), max_smem, "the dk/dv kernel");
  if (!st.ok()) return st;

  if (stages & kBwdStagePrep) {
    preprocess_kernel<T, Dv><<<static_cast<unsigned>(total), kPreprocessThreads, 0, stream>>>(a);
    if (!(st = launch_status(kBackwardApi, "launching the preprocess kernel")).ok()) return st;
  }

  const auto splits = [&](int branch) {
    return static_cast<unsigned>((a.seqlen + a.split_positions[branch] - 1) / a.split_positions[branch]);
  };
  // Key tiles per sequence of each branch's CTAs (64 keys per warpgroup).
  const auto tiles = [&](int branch) {
    return static_cast<int>((key_major_tiles(a, branch) + key_groups(branch) - 1) / key_groups(branch));
  };
  // Launches `branch`'s dK / dV kernel: grid (B * tiles, Hkv, splits), a warpgroup per 64 keys.
  const auto launch_dkv = [&](auto kernel, int branch, const char* what) {
    const int tiles_per_seq = tiles(branch);
    const dim3 grid(static_cast<unsigned>(a.batch * tiles_per_seq), static_cast<unsigned>(a.num_kv_heads),
                    splits(branch));
    kernel<<<grid, static_cast<unsigned>(kAttnThreads * key_groups(branch)), dkv_smem(branch), stream>>>(
        a, tiles_per_seq);
    return launch_status(kBackwardApi, what);
  };
  const auto launch_slc = [&] { return launch_dkv(dkv_slc, kBranchSlc, "launching the slc dk/dv kernel"); };
  if (key_major_dq && (stages & kBwdStageSlc) && !(st = launch_slc()).ok()) return st;

  const dim3 dq_grid(static_cast<unsigned>((a.seqlen * a.group + 63) / 64), static_cast<unsigned>(a.num_kv_heads),
                     static_cast<unsigned>(a.batch));
  if (stages & kBwdStageDq) {
    dq<<<dq_grid, kAttnThreads, dq_smem, stream>>>(a);
    if (!(st = launch_status(kBackwardApi, "launching the dq kernel")).ok()) return st;
  }

  if ((stages & kBwdStageCmp) && tiles(kBranchCmp) > 0 &&
      !(st = launch_dkv(dkv_cmp, kBranchCmp, "launching the cmp dk/dv kernel")).ok())
    return st;
  if (!key_major_dq && (stages & kBwdStageSlc) && !(st = launch_slc()).ok()) return st;
  if ((stages & kBwdStageWin) && !(st = launch_dkv(dkv_win, kBranchWin, "launching the win dk/dv kernel")).ok())
    return st;
  if (!(stages & kBwdStageConvert)) return st;

  const int64_t per_seq = varlen ? 0 : a.seqlen, cmp_per_seq = varlen ? 0 : a.cmp_per_seq;
  const int Hkv = a.num_kv_heads;
  if (st.ok()) st = launch_convert<T>(a.dk_acc, total, Hkv, Dk, per_seq, a.grad_k, stream);
  if (st.ok()) st = launch_convert<T>(a.dv_acc, total, Hkv, Dv, per_seq, a.grad_v, stream);
  if (st.ok()) st = launch_convert<T>(a.dkw_acc, total, Hkv, Dk, per_seq, a.grad_k_win, stream);
  if (st.ok()) st = launch_convert<T>(a.dvw_acc, total, Hkv, Dv, per_seq, a.grad_v_win, stream);
  if (st.ok()) st = launch_convert<T>(a.dkc_acc, cmp_total, Hkv, Dk, cmp_per_seq, a.grad_k_cmp, stream);
  if (st.ok()) st = launch_convert<T>(a.dvc_acc, cmp_total, Hkv, Dv, cmp_per_seq, a.grad_v_cmp, stream);
  return st;
}

}  // namespace nsa::cuda_detail
