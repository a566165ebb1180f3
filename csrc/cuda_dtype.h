// The CUDA launchers' dtype code (cuda/selective_loss_cuda.h) of a tensor's dtype: one mapping for
// every op's torch glue. Only in builds with the CUDA kernels (MEGATRON_SLM_WITH_CUDA).
#pragma once

#ifdef MEGATRON_SLM_WITH_CUDA
#include <torch/extension.h>

#include "cuda/selective_loss_cuda.h"

namespace megatron_slm {

// `op` names the caller in the error for a dtype the kernels do not take.
inline int cuda_dtype_code(torch::ScalarType st, const char* op) {
  TORCH_CHECK(st == torch::kFloat32 || st == torch::kFloat16 || st == torch::kBFloat16, op,
              ": CUDA tensors must be float32, float16 or bfloat16, got ", st);
  if (st == torch::kFloat32) return cuda::kFloat32;
  return st == torch::kFloat16 ? cuda::kFloat16 : cuda::kBFloat16;
}

}  // namespace megatron_slm
#endif
