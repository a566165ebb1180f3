// CUDA launchers of the fused SwiGLU (csrc/cuda/swiglu.cu); the torch glue is csrc/swiglu.cpp.
//
// Raw pointers, int64 sizes and a cudaStream_t, so that the .cu never includes torch headers.
// Both launchers are asynchronous on `stream` and return the cudaError_t of their launch (0 on
// success; selective_loss_error_string describes the others). Rows are contiguous: x[rows, 2f]
// holds the gate half x[:, :f] and the linear half x[:, f:] (megatron-core's fc1 layout, per
// tensor-parallel rank). Math in fp32, one rounding to the storage dtype (codes of
// selective_loss_cuda.h: kFloat32, kFloat16, kBFloat16).
#pragma once

#include <cstdint>

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

namespace megatron_slm {
namespace cuda {

// y[r, j] = silu(x[r, j]) * x[r, f + j]
int swiglu_forward(const void* x, void* y, int dtype, int64_t rows, int64_t f,
                   cudaStream_t stream);

// dx[r, j] = dy[r, j] * x[r, f + j] * silu'(x[r, j]),  dx[r, f + j] = dy[r, j] * silu(x[r, j])
int swiglu_backward(const void* dy, const void* x, void* dx, int dtype, int64_t rows, int64_t f,
                    cudaStream_t stream);

}  // namespace cuda
}  // namespace megatron_slm
