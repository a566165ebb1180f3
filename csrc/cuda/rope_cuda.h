// CUDA launcher of the fused rotary position embedding (csrc/cuda/rope.cu); the torch glue is
// csrc/rope.cpp.
//
// Raw pointers, int64 sizes and a cudaStream_t, so that the .cu never includes torch headers.
// Asynchronous on `stream`; returns the cudaError_t of its launch (0 on success;
// selective_loss_error_string describes the others). Math in fp32, one rounding to the storage
// dtype (codes of selective_loss_cuda.h: kFloat32, kFloat16, kBFloat16).
#pragma once

#include <cstdint>

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

namespace megatron_slm {
namespace cuda {

// megatron-core's non-interleaved RoPE (rotate_half) on `rows` rows of d values (d even, h = d/2).
// Row r of x starts at x + r * row_stride (element units; its d values are contiguous) and sits at
// position p = r / rows_per_position (the [s, b, heads, d] layout: rows_per_position = b * heads);
// cos/sin are fp32 [positions, d], contiguous. Output rows are contiguous: out[r * d + j].
//   forward:  out[j] = x[j] cos[j] - x[j+h] sin[j],   out[j+h] = x[j+h] cos[j+h] + x[j] sin[j+h]
//   backward (x = the output's gradient, out = the input's, the transposed rotation):
//             out[j] = x[j] cos[j] + x[j+h] sin[j+h], out[j+h] = x[j+h] cos[j+h] - x[j] sin[j]
int rope(const void* x, int64_t row_stride, const float* cos, const float* sin, void* out,
         int dtype, int64_t rows, int64_t rows_per_position, int64_t d, bool backward,
         cudaStream_t stream);

}  // namespace cuda
}  // namespace megatron_slm
