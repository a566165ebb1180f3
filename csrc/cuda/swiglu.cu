// CUDA kernels of the fused SwiGLU (csrc/cuda/swiglu_cuda.h). No torch/ATen/c10 headers.
//
// Megatron-core without Transformer Engine or Apex runs SwiGLU as three tensor ops (split, silu,
// multiply) forward and five backward, each a pass over [tokens, ffn] activations in memory.
// Fused: the forward reads x[rows, 2f] once and writes y[rows, f]; the backward reads dy and x
// once and writes dx. One thread per 16-byte vector of outputs (8 bf16/fp16 or 4 fp32 values)
// when f is a whole number of vectors and the buffers are 16-byte aligned, one value per thread
// otherwise; grid-stride loops over the rest. fp32 math, one rounding to the storage dtype
// (built with --use_fast_math, expf and the division are the fast approximations: a few fp32
// ulps, far below a bf16 rounding; the CPU harness runs them exact).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "selective_loss_cuda.h"
#include "swiglu_cuda.h"
#include "kernel_common.cuh"

namespace megatron_slm {
namespace cuda {
namespace {

constexpr int kSwigluThreads = 256;

__device__ __forceinline__ float sigmoid(float a) { return 1.0f / (1.0f + expf(-a)); }

// body(r, j) for every vector of kN values of every row: row r, columns j .. j + kN - 1 of f
// (grid-stride: any grid covers every row).
template <int kN, typename Body>
__device__ __forceinline__ void for_each_vector(int64_t rows, int64_t f, Body body) {
  const int64_t per_row = f / kN;
  const int64_t total = rows * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row;
    body(r, (i - r * per_row) * kN);
  }
}

template <typename T, bool kVecPath>
__global__ void __launch_bounds__(kSwigluThreads) swiglu_forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows,
                                      int64_t f) {
  constexpr int kN = kVecPath ? Traits<T>::kVec : 1;
  for_each_vector<kN>(rows, f, [&](int64_t r, int64_t j) {
    const T* gate = x + r * 2 * f + j;
    float a[kN], b[kN], out[kN];
    load_values<T, kN>(gate, a);
    load_values<T, kN>(gate + f, b);
#pragma unroll
    for (int k = 0; k < kN; ++k) out[k] = a[k] * sigmoid(a[k]) * b[k];
    store_values<T, kN>(y + r * f + j, out);
  });
}

template <typename T, bool kVecPath>
__global__ void __launch_bounds__(kSwigluThreads) swiglu_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                       T* __restrict__ dx, int64_t rows, int64_t f) {
  constexpr int kN = kVecPath ? Traits<T>::kVec : 1;
  for_each_vector<kN>(rows, f, [&](int64_t r, int64_t j) {
    const int64_t in = r * 2 * f + j;
    float g[kN], a[kN], b[kN], da[kN], db[kN];
    load_values<T, kN>(dy + r * f + j, g);
    load_values<T, kN>(x + in, a);
    load_values<T, kN>(x + in + f, b);
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      const float s = sigmoid(a[k]);
      da[k] = g[k] * b[k] * s * (1.0f + a[k] * (1.0f - s));  // d silu(a) / da = s (1 + a (1 - s))
      db[k] = g[k] * a[k] * s;
    }
    store_values<T, kN>(dx + in, da);
    store_values<T, kN>(dx + in + f, db);
  });
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Blocks for `items` work items, one per thread, at most the device's grid limit.
cudaError_t elementwise_grid(int64_t items, unsigned int* grid) {
  return grid_for((items + kSwigluThreads - 1) / kSwigluThreads, grid);
}

template <typename T>
cudaError_t launch_forward(const void* x, void* y, int64_t rows, int64_t f, cudaStream_t stream) {
  const bool vec = f % Traits<T>::kVec == 0 && aligned16(x) && aligned16(y);
  unsigned int grid = 0;
  const cudaError_t err = elementwise_grid(rows * (vec ? f / Traits<T>::kVec : f), &grid);
  if (err != cudaSuccess) return err;
  const T* xt = static_cast<const T*>(x);
  T* yt = static_cast<T*>(y);
  if (vec) {
    SLM_LAUNCH(grid, kSwigluThreads, 0, stream, swiglu_forward_kernel<T, true>)(xt, yt, rows, f);
  } else {
    SLM_LAUNCH(grid, kSwigluThreads, 0, stream, swiglu_forward_kernel<T, false>)(xt, yt, rows, f);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const void* dy, const void* x, void* dx, int64_t rows, int64_t f,
                            cudaStream_t stream) {
  const bool vec = f % Traits<T>::kVec == 0 && aligned16(dy) && aligned16(x) && aligned16(dx);
  unsigned int grid = 0;
  const cudaError_t err = elementwise_grid(rows * (vec ? f / Traits<T>::kVec : f), &grid);
  if (err != cudaSuccess) return err;
  const T* g = static_cast<const T*>(dy);
  const T* xt = static_cast<const T*>(x);
  T* d = static_cast<T*>(dx);
  if (vec) {
    SLM_LAUNCH(grid, kSwigluThreads, 0, stream, swiglu_backward_kernel<T, true>)(g, xt, d, rows, f);
  } else {
    SLM_LAUNCH(grid, kSwigluThreads, 0, stream, swiglu_backward_kernel<T, false>)(g, xt, d, rows,
                                                                                  f);
  }
  return cudaGetLastError();
}

}  // namespace

int swiglu_forward(const void* x, void* y, int dtype, int64_t rows, int64_t f,
                   cudaStream_t stream) {
  if (rows == 0 || f == 0) return cudaSuccess;
  if (dtype == kFloat32) return launch_forward<float>(x, y, rows, f, stream);
  if (dtype == kFloat16) return launch_forward<__half>(x, y, rows, f, stream);
  return launch_forward<__nv_bfloat16>(x, y, rows, f, stream);
}

int swiglu_backward(const void* dy, const void* x, void* dx, int dtype, int64_t rows, int64_t f,
                    cudaStream_t stream) {
  if (rows == 0 || f == 0) return cudaSuccess;
  if (dtype == kFloat32) return launch_backward<float>(dy, x, dx, rows, f, stream);
  if (dtype == kFloat16) return launch_backward<__half>(dy, x, dx, rows, f, stream);
  return launch_backward<__nv_bfloat16>(dy, x, dx, rows, f, stream);
}

}  // namespace cuda
}  // namespace megatron_slm
