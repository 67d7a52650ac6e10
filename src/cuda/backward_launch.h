// Declaration of the per-(dtype, Dk, Dv) backward launcher. The definition is in
// backward_launch.cuh, explicitly instantiated once per supported combination in
// src/cuda/instantiations/backward_*.cu (scripts/gen_cuda_instantiations.py); backward.cu
// dispatches to them after it has built the selection index.
#pragma once

#include <cuda_runtime.h>

#include "cuda/backward_args.h"
#include "nsa/status.h"

namespace nsa::cuda_detail {

// Launches the kernels of the backward that depend on (T, Dk, Dv) on `stream`, those of the
// stages in `stages` (stages.h): delta and dgates (kBwdStagePrep), dq, dk/dv per branch, and the
// conversion of the fp32 accumulators (zeroed by the caller) into the gradients. The selection
// index in args must be built. Never synchronizes.
template <class T, int Dk, int Dv>
Status launch_backward(const BackwardArgs& args, cudaStream_t stream, unsigned stages);

}  // namespace nsa::cuda_detail
