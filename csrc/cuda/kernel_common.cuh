// What every .cu of csrc/cuda shares: the launch macro, the grid cap, and the dtype traits
// (fp32 conversions and 16-byte vectors, uint4, of each storage type). No torch headers; the CPU
// test harness (testing/simt_host.h) provides the CUDA types and intrinsics these use.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

// Every launch goes through SLM_LAUNCH(grid, block, smem, stream, kernel)(args...): a real launch
// under nvcc; the CPU test harness (csrc/cuda/testing/simt_host.h) defines its own.
#ifndef SLM_LAUNCH
#define SLM_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace megatron_slm {
namespace cuda {

// Grid of min(count, device limit) blocks: the kernels loop over the rest.
inline cudaError_t grid_for(int64_t count, unsigned int* grid) {
  int device = 0;
  int max_x = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_x, cudaDevAttrMaxGridDimX, device);
  if (err != cudaSuccess) return err;
  *grid = static_cast<unsigned int>(count < max_x ? count : static_cast<int64_t>(max_x));
  return cudaSuccess;
}

template <typename T>
struct Traits;

template <>
struct Traits<float> {
  static constexpr int kVec = 4;
  __device__ static float to_f(float x) { return x; }
  __device__ static float from_f(float x) { return x; }
  __device__ static void unpack(const uint4& v, float* out) {
    out[0] = __uint_as_float(v.x);
    out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z);
    out[3] = __uint_as_float(v.w);
  }
  __device__ static uint4 pack(const float* in) {
    return make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]),
                      __float_as_uint(in[3]));
  }
};

template <>
struct Traits<__half> {
  static constexpr int kVec = 8;
  __device__ static float to_f(__half x) { return __half2float(x); }
  __device__ static __half from_f(float x) { return __float2half_rn(x); }
  // memcpy, not a reinterpret_cast: reading a uint4 through __half2 is undefined behaviour
  // (g++ -O2 miscompiles it); compilers turn the copy into register moves.
  __device__ static void unpack(const uint4& v, float* out) {
    __half2 h[4];
    memcpy(h, &v, sizeof(h));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  __device__ static uint4 pack(const float* in) {
    __half2 h[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(in[2 * i], in[2 * i + 1]);
    uint4 v;
    memcpy(&v, h, sizeof(v));
    return v;
  }
};

template <>
struct Traits<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ static float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
  __device__ static void unpack(const uint4& v, float* out) {
    __nv_bfloat162 h[4];
    memcpy(h, &v, sizeof(h));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  __device__ static uint4 pack(const float* in) {
    __nv_bfloat162 h[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
    uint4 v;
    memcpy(&v, h, sizeof(v));
    return v;
  }
};

// kN values at p as fp32: one 16-byte vector (kN == Traits<T>::kVec; p 16-byte aligned) or one
// value (kN == 1); and back, rounded once to T. The elementwise kernels' loads and stores.
template <typename T, int kN>
__device__ __forceinline__ void load_values(const T* p, float* v) {
  static_assert(kN == 1 || kN == Traits<T>::kVec, "one value or one 16-byte vector");
  if constexpr (kN > 1) {
    Traits<T>::unpack(*reinterpret_cast<const uint4*>(p), v);
  } else {
    v[0] = Traits<T>::to_f(*p);
  }
}

template <typename T, int kN>
__device__ __forceinline__ void store_values(T* p, const float* v) {
  static_assert(kN == 1 || kN == Traits<T>::kVec, "one value or one 16-byte vector");
  if constexpr (kN > 1) {
    *reinterpret_cast<uint4*>(p) = Traits<T>::pack(v);
  } else {
    *p = Traits<T>::from_f(v[0]);
  }
}

}  // namespace cuda
}  // namespace megatron_slm
