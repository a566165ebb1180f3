// CUDA kernel of the fused rotary position embedding (csrc/cuda/rope_cuda.h). No torch headers.
//
// megatron-core without Transformer Engine applies RoPE to the query and the key as tensor ops:
// a multiply, a negation and a concatenation (rotate_half), a second multiply, an add and a last
// concatenation, each a pass over [s, b, heads, d] in memory, and about as many backward. Fused:
// one pass each way that reads the rows once (strided rows of the QKV projection's output are
// read in place) and writes them once, with fp32 cos/sin tables (computed once per sequence
// length by torch, accurate sin/cos: this file is built with --use_fast_math, whose __sinf would
// lose digits at positions in the thousands). A thread rotates kN pairs (j, j + h) of one row:
// 16-byte vectors when h is a whole number of vectors and the rows are 16-byte aligned, one pair
// otherwise; grid-stride loops over the rest.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_common.cuh"
#include "rope_cuda.h"
#include "selective_loss_cuda.h"

namespace megatron_slm {
namespace cuda {
namespace {

constexpr int kRopeThreads = 256;

// kN = 1 (one pair per thread) or Traits<T>::kVec (one 16-byte vector of each half).
template <typename T, int kN, bool kBackward>
__global__ void __launch_bounds__(kRopeThreads)
    rope_kernel(const T* __restrict__ x, int64_t row_stride, const float* __restrict__ cos,
                const float* __restrict__ sin, T* __restrict__ out, int64_t rows,
                int64_t rows_per_position, int64_t d) {
  const int64_t h = d / 2;
  const int64_t per_row = h / kN;
  const int64_t total = rows * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row;
    const int64_t j = (i - r * per_row) * kN;
    const int64_t table = (r / rows_per_position) * d + j;
    const T* in = x + r * row_stride + j;
    float a[kN], b[kN], ra[kN], rb[kN];
    load_values<T, kN>(in, a);
    load_values<T, kN>(in + h, b);
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      const float ca = cos[table + k], cb = cos[table + h + k];
      const float sa = sin[table + k], sb = sin[table + h + k];
      if constexpr (kBackward) {
        ra[k] = a[k] * ca + b[k] * sb;
        rb[k] = b[k] * cb - a[k] * sa;
      } else {
        ra[k] = a[k] * ca - b[k] * sa;
        rb[k] = b[k] * cb + a[k] * sb;
      }
    }
    T* o = out + r * d + j;
    store_values<T, kN>(o, ra);
    store_values<T, kN>(o + h, rb);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int kN>
cudaError_t launch_with(const void* x, int64_t row_stride, const float* cos, const float* sin,
                        void* out, int64_t rows, int64_t rows_per_position, int64_t d,
                        bool backward, cudaStream_t stream) {
  unsigned int grid = 0;
  const int64_t items = rows * (d / 2 / kN);
  const cudaError_t err = grid_for((items + kRopeThreads - 1) / kRopeThreads, &grid);
  if (err != cudaSuccess) return err;
  const T* xt = static_cast<const T*>(x);
  T* o = static_cast<T*>(out);
  if (backward) {
    SLM_LAUNCH(grid, kRopeThreads, 0, stream, rope_kernel<T, kN, true>)(
        xt, row_stride, cos, sin, o, rows, rows_per_position, d);
  } else {
    SLM_LAUNCH(grid, kRopeThreads, 0, stream, rope_kernel<T, kN, false>)(
        xt, row_stride, cos, sin, o, rows, rows_per_position, d);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const void* x, int64_t row_stride, const float* cos, const float* sin,
                   void* out, int64_t rows, int64_t rows_per_position, int64_t d, bool backward,
                   cudaStream_t stream) {
  constexpr int kVec = Traits<T>::kVec;
  // every vector of every row 16-byte aligned: the halves, the row stride and both bases
  const bool vec = (d / 2) % kVec == 0 && row_stride % kVec == 0 && aligned16(x) &&
                   aligned16(out);
  if (vec) {
    return launch_with<T, kVec>(x, row_stride, cos, sin, out, rows, rows_per_position, d,
                                backward, stream);
  }
  return launch_with<T, 1>(x, row_stride, cos, sin, out, rows, rows_per_position, d, backward,
                           stream);
}

}  // namespace

int rope(const void* x, int64_t row_stride, const float* cos, const float* sin, void* out,
         int dtype, int64_t rows, int64_t rows_per_position, int64_t d, bool backward,
         cudaStream_t stream) {
  if (rows == 0 || d == 0) return cudaSuccess;
  if (dtype == kFloat32) {
    return launch<float>(x, row_stride, cos, sin, out, rows, rows_per_position, d, backward,
                         stream);
  }
  if (dtype == kFloat16) {
    return launch<__half>(x, row_stride, cos, sin, out, rows, rows_per_position, d, backward,
                          stream);
  }
  return launch<__nv_bfloat16>(x, row_stride, cos, sin, out, rows, rows_per_position, d, backward,
                               stream);
}

}  // namespace cuda
}  // namespace megatron_slm
