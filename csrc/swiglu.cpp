// Torch glue of the fused SwiGLU: the CPU kernels, and the CUDA launchers of csrc/cuda/swiglu.cu
// when built with MEGATRON_SLM_WITH_CUDA. Called from megatron_slm/ops/swiglu.py.
//
// The CPU kernels use the same fp32 formulas as the .cu (one rounding to the storage dtype), so
// that the CUDA kernels run on the CPU harness can be held to them.

#include "swiglu.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>

// declarations only (no CUDA headers): the launches below name them in both builds
#include "cuda/swiglu_cuda.h"

#include "cuda_glue.h"

namespace {

int64_t half_width(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0,
              "swiglu: the last dimension must hold the gate and linear halves, got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "swiglu: x must be contiguous");
  return x.size(-1) / 2;
}

// fp32 math for fp32/bf16/fp16 (the CUDA kernels' formulas), double for double
template <typename A>
inline A sigmoid(A a) {
  return A(1) / (A(1) + std::exp(-a));
}

template <typename T>
void forward_cpu(const T* x, T* y, int64_t rows, int64_t f) {
  using A = at::opmath_type<T>;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = x + r * 2 * f;
      for (int64_t j = 0; j < f; ++j) {
        const A a = static_cast<A>(gate[j]);
        y[r * f + j] = static_cast<T>(a * sigmoid(a) * static_cast<A>(gate[f + j]));
      }
    }
  });
}

template <typename T>
void backward_cpu(const T* dy, const T* x, T* dx, int64_t rows, int64_t f) {
  using A = at::opmath_type<T>;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = x + r * 2 * f;
      for (int64_t j = 0; j < f; ++j) {
        const A g = static_cast<A>(dy[r * f + j]);
        const A a = static_cast<A>(gate[j]);
        const A b = static_cast<A>(gate[f + j]);
        const A s = sigmoid(a);
        dx[r * 2 * f + j] = static_cast<T>(g * b * s * (A(1) + a * (A(1) - s)));
        dx[r * 2 * f + f + j] = static_cast<T>(g * a * s);
      }
    }
  });
}


}  // namespace

torch::Tensor swiglu_forward(const torch::Tensor& x) {
  const int64_t f = half_width(x);
  auto sizes = x.sizes().vec();
  sizes.back() = f;
  auto y = torch::empty(sizes, x.options());
  const int64_t rows = f == 0 ? 0 : x.numel() / (2 * f);
  if (x.is_cuda()) {
    megatron_slm::launch_on_cuda(x, "swiglu", [&](int dtype, auto stream) {
      return megatron_slm::cuda::swiglu_forward(x.data_ptr(), y.data_ptr(), dtype, rows, f, stream);
    });
    return y;
  }
  TORCH_CHECK(x.device().is_cpu(), "swiglu: x must be on the CPU or a CUDA device");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "swiglu_forward", [&] {
    forward_cpu<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, f);
  });
  return y;
}

torch::Tensor swiglu_backward(const torch::Tensor& dy, const torch::Tensor& x) {
  const int64_t f = half_width(x);
  TORCH_CHECK(dy.is_contiguous() && dy.scalar_type() == x.scalar_type() &&
                  dy.device() == x.device() && dy.numel() * 2 == x.numel(),
              "swiglu: dy must be a contiguous tensor of x's dtype and device, half x's size");
  auto dx = torch::empty_like(x);
  const int64_t rows = f == 0 ? 0 : x.numel() / (2 * f);
  if (x.is_cuda()) {
    megatron_slm::launch_on_cuda(x, "swiglu", [&](int dtype, auto stream) {
      return megatron_slm::cuda::swiglu_backward(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), dtype,
                                                 rows, f, stream);
    });
    return dx;
  }
  TORCH_CHECK(x.device().is_cpu(), "swiglu: x must be on the CPU or a CUDA device");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "swiglu_backward", [&] {
    backward_cpu<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                           dx.data_ptr<scalar_t>(), rows, f);
  });
  return dx;
}
