// Torch glue of the fused rotary position embedding: the CPU kernel, and the CUDA launcher of
// csrc/cuda/rope.cu when built with MEGATRON_SLM_WITH_CUDA. Called from megatron_slm/ops/rope.py.
//
// The CPU kernel uses the same fp32 formulas as the .cu (one rounding to the storage dtype), so
// that the CUDA kernel run on the CPU harness can be held to it.

#include "rope.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

// declarations only (no CUDA headers): the launch below names it in both builds
#include "cuda/rope_cuda.h"

#include "cuda_glue.h"

namespace {

// fp32 math for fp32/bf16/fp16 (the CUDA kernel's formulas), double for double
template <typename T>
void rope_cpu(const T* x, int64_t row_stride, const float* cos, const float* sin, T* out,
              int64_t rows, int64_t rows_per_position, int64_t d, bool backward) {
  using A = at::opmath_type<T>;
  const int64_t h = d / 2;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* in = x + r * row_stride;
      const float* c = cos + (r / rows_per_position) * d;
      const float* s = sin + (r / rows_per_position) * d;
      T* o = out + r * d;
      for (int64_t j = 0; j < h; ++j) {
        const A a = static_cast<A>(in[j]), b = static_cast<A>(in[j + h]);
        const A ca = c[j], cb = c[j + h], sa = s[j], sb = s[j + h];
        if (backward) {
          o[j] = static_cast<T>(a * ca + b * sb);
          o[j + h] = static_cast<T>(b * cb - a * sa);
        } else {
          o[j] = static_cast<T>(a * ca - b * sa);
          o[j + h] = static_cast<T>(b * cb + a * sb);
        }
      }
    }
  });
}

}  // namespace

torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                   bool backward) {
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0,
              "rope: x must be [s, b, heads, d] with an even d, got ", x.sizes());
  const int64_t s = x.size(0), d = x.size(3);
  for (const auto* t : {&cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == s && t->size(1) == d && t->device() == x.device(),
                "rope: cos and sin must be contiguous float32 [s, d] = [", s, ", ", d,
                "] on x's device, got ", t->sizes());
  }
  // [rows, d] with one row stride: a view of the QKV projection's strided query/key where it
  // is one (reshape copies only where it is not), each row's d values contiguous
  torch::Tensor rows_view = x.reshape({-1, d});
  if (d > 1 && rows_view.stride(1) != 1) rows_view = rows_view.contiguous();
  const int64_t rows = rows_view.size(0);
  const int64_t row_stride = rows == 0 ? d : rows_view.stride(0);
  const int64_t rows_per_position = s == 0 ? 1 : rows / s;
  auto out = torch::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.is_cuda()) {
    megatron_slm::launch_on_cuda(x, "rope", [&](int dtype, auto stream) {
      return megatron_slm::cuda::rope(rows_view.data_ptr(), row_stride, cos.data_ptr<float>(),
                                      sin.data_ptr<float>(), out.data_ptr(), dtype, rows,
                                      rows_per_position, d, backward, stream);
    });
    return out;
  }
  TORCH_CHECK(x.device().is_cpu(), "rope: x must be on the CPU or a CUDA device");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rope", [&] {
    rope_cpu<scalar_t>(rows_view.data_ptr<scalar_t>(), row_stride, cos.data_ptr<float>(),
                       sin.data_ptr<float>(), out.data_ptr<scalar_t>(), rows, rows_per_position,
                       d, backward);
  });
  return out;
}
