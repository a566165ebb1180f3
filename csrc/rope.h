// Torch glue of the fused rotary position embedding (csrc/rope.cpp), bound in selective_loss.cpp's
// module.
#pragma once

#include <torch/extension.h>

// x [s, b, heads, d] (any strides; d contiguous where possible), cos/sin fp32 [s, d] ->
// contiguous [s, b, heads, d] in x's dtype: megatron-core's rotate_half RoPE (backward: the
// transposed rotation, for x = the output's gradient). fp32 math, one rounding.
torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                   bool backward);
