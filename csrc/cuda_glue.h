// What every op's torch glue needs of the CUDA launchers: the dtype code of a tensor's dtype
// (cuda/selective_loss_cuda.h), and a launch on the tensor's device and current stream whose error
// raises.
// Builds without the CUDA kernels get a launch that raises a clear error.
#pragma once

#include <torch/extension.h>

#ifdef MEGATRON_SLM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/selective_loss_cuda.h"
#endif

namespace megatron_slm {

#ifdef MEGATRON_SLM_WITH_CUDA
// `op` names the caller in the error for a dtype the kernels do not take.
inline int cuda_dtype_code(torch::ScalarType st, const char* op) {
  TORCH_CHECK(st == torch::kFloat32 || st == torch::kFloat16 || st == torch::kBFloat16, op,
              ": CUDA tensors must be float32, float16 or bfloat16, got ", st);
  if (st == torch::kFloat32) return cuda::kFloat32;
  return st == torch::kFloat16 ? cuda::kFloat16 : cuda::kBFloat16;
}

// launch(dtype code, stream) on x's device and current stream; a launch error raises, naming op.
template <typename Launch>
void launch_on_cuda(const torch::Tensor& x, const char* op, Launch launch) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int err = launch(cuda_dtype_code(x.scalar_type(), op),
                         c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, op, ": CUDA launch failed: ", cuda::selective_loss_error_string(err));
}
#else
template <typename Launch>
void launch_on_cuda(const torch::Tensor&, const char* op, Launch) {
  TORCH_CHECK(false, op, ": megatron_slm._C was built without CUDA kernels");
}
#endif

}  // namespace megatron_slm
