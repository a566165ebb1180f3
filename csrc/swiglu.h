// Torch glue of the fused SwiGLU (csrc/swiglu.cpp), bound in selective_loss.cpp's module.
#pragma once

#include <torch/extension.h>

// x[..., 2f] contiguous (gate half first) -> y[..., f] = silu(x[..., :f]) * x[..., f:]
torch::Tensor swiglu_forward(const torch::Tensor& x);

// dy[..., f], x[..., 2f] -> dx[..., 2f] (x's dtype; fp32 math, one rounding)
torch::Tensor swiglu_backward(const torch::Tensor& dy, const torch::Tensor& x);
