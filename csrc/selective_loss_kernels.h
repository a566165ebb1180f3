// CPU building blocks of the selective loss op: dtype loads/stores with fp32 math, a vectorizable
// exp, and the per-row kernels. Header-only so that other ops in csrc/ can reuse the helpers.
//
// Everything here is plain C++17 (no torch headers) and written so that GCC/Clang auto-vectorize
// the inner loops with -O3 -march=native -ffp-contract=fast.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace megatron_slm {
namespace selective_loss {

// Elements per chunk of a row: 2 KiB of fp32, stays in L1 between the max and the exp pass.
constexpr int64_t kChunk = 512;

// ---------------------------------------------------------------------------------------------
// Bit-level conversions (16-bit storage, fp32 math).
// ---------------------------------------------------------------------------------------------
struct bf16_t {
  uint16_t x;
};
struct fp16_t {
  uint16_t x;
};

static inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}
static inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

// IEEE half -> float, branch-free (handles normals, subnormals, inf/nan).
static inline float half_to_float_scalar(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t two_w = static_cast<uint32_t>(h) << 17;  // drop the sign
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = bits_to_float(0x7800000u);  // 2^-112
  const float normalized = bits_to_float((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = bits_to_float((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? float_to_bits(denormalized) : float_to_bits(normalized));
  return bits_to_float(result);
}

// float -> IEEE half, round to nearest even (same algorithm as FP16 library / c10).
static inline uint16_t float_to_half_scalar(float f) {
  const float scale_to_inf = bits_to_float(0x77800000u);   // 2^112
  const float scale_to_zero = bits_to_float(0x08800000u);  // 2^-110
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static inline float bf16_to_float_scalar(uint16_t h) {
  return bits_to_float(static_cast<uint32_t>(h) << 16);
}

// float -> bfloat16, round to nearest even, NaN stays NaN.
static inline uint16_t float_to_bf16_scalar(float f) {
  const uint32_t b = float_to_bits(f);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((b >> 16) | 0x0040u);
  const uint32_t rounding = 0x7FFFu + ((b >> 16) & 1u);
  return static_cast<uint16_t>((b + rounding) >> 16);
}

// Load n elements into an fp32 buffer.
static inline void load_f32(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}
static inline void load_f32(const bf16_t* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = bits_to_float(static_cast<uint32_t>(s[i]) << 16);
}
static inline void load_f32(const fp16_t* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) dst[i] = half_to_float_scalar(s[i]);
}

// Store n fp32 values in the destination dtype (single rounding).
static inline void store_from_f32(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}
static inline void store_from_f32(const float* src, bf16_t* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = float_to_bits(src[i]);
    const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    const bool is_nan = (b & 0x7FFFFFFFu) > 0x7F800000u;
    d[i] = static_cast<uint16_t>(is_nan ? ((b >> 16) | 0x0040u) : rounded);
  }
}
static inline void store_from_f32(const float* src, fp16_t* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), h);
  }
#endif
  for (; i < n; ++i) d[i] = float_to_half_scalar(src[i]);
}

static inline float load_one(const float* p) { return *p; }
static inline float load_one(const bf16_t* p) { return bf16_to_float_scalar(p->x); }
static inline float load_one(const fp16_t* p) { return half_to_float_scalar(p->x); }
static inline void store_one(float v, float* p) { *p = v; }
static inline void store_one(float v, bf16_t* p) { p->x = float_to_bf16_scalar(v); }
static inline void store_one(float v, fp16_t* p) { p->x = float_to_half_scalar(v); }

// ---------------------------------------------------------------------------------------------
// exp(x) for x <= ~0 (arguments are always logit - max or logit - logsumexp): Cody-Waite range
// reduction and a degree-6 polynomial, ~2 ulp, branch-free so that the loops vectorize.
// ---------------------------------------------------------------------------------------------
static inline float fast_exp(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;
  const float kLn2Lo = -2.12194440e-4f;
  const float lo = -87.0f;
  const bool underflow = x < lo;  // also true for -inf
  x = std::min(std::max(x, lo), 88.0f);
  const float n = std::nearbyint(x * kLog2e);
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n without a float -> int conversion, which is undefined for NaN (a NaN x reaches here):
  // adding 1.5 * 2^23 puts the integer n (|n| <= 128) in the low mantissa bits, exactly. For a
  // NaN the bits are garbage but defined, and p (NaN) * scale is NaN.
  const uint32_t e = float_to_bits(n + 12582912.0f) - 0x4B400000u + 127u;
  const float scale = bits_to_float(e << 23);
  const float y = p * scale;
  return underflow ? 0.0f : y;
}

// Reductions with kLanes independent accumulators: without -ffast-math the compiler may not
// reassociate a single float accumulator, but it vectorizes these lane-wise loops.
constexpr int64_t kLanes = 16;

// The NaN rule of the row statistics (the CUDA kernel's fmaxf, csrc/cuda/selective_loss.cu):
// the max ignores NaN, it is the largest non-NaN value (-inf when there is none), and a NaN
// anywhere makes the row's sum NaN. `x > acc ? x : acc` keeps acc (never NaN) when x is NaN,
// wherever the NaN sits; it still vectorizes to maxps.
static inline float chunk_max(const float* buf, int64_t n) {
  float acc[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) acc[j] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] = buf[i + j] > acc[j] ? buf[i + j] : acc[j];
  }
  float m = -std::numeric_limits<float>::infinity();
  for (; i < n; ++i) m = buf[i] > m ? buf[i] : m;
  for (int64_t j = 0; j < kLanes; ++j) m = acc[j] > m ? acc[j] : m;
  return m;
}

static inline float chunk_sum_exp(const float* buf, int64_t n, float shift) {
  float acc[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) acc[j] = 0.0f;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += fast_exp(buf[i + j] - shift);
  }
  float s = 0.0f;
  for (; i < n; ++i) s += fast_exp(buf[i] - shift);
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// Forward statistics of one row, one pass over memory: running max, sum of exp(x - max) and the
// target logit (0 when the target is not in this shard). stats = {max, sumexp, target_logit}.
// A row with a NaN sums to NaN and its max is the largest non-NaN value (chunk_max: the CUDA
// kernel's rule); an all -inf row gives {-inf, 0} (like the CUDA and torch kernels;
// its loss log(0) - inf - target logit is then NaN, as torch's logsumexp gives).
template <typename T>
static inline void row_forward_stats(const T* row, int64_t V, int64_t local_target, float* stats) {
  alignas(64) float buf[kChunk];
  float m = -std::numeric_limits<float>::infinity();
  float s = 0.0f;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const float* x;
    if constexpr (std::is_same<T, float>::value) {
      x = row + c0;
    } else {
      load_f32(row + c0, buf, n);
      x = buf;
    }
    const float cm = chunk_max(x, n);
    if (cm > m) {
      if (s != 0.0f) s *= fast_exp(m - cm);
      m = cm;
    }
    if (m == -std::numeric_limits<float>::infinity()) {
      // only -inf and NaN so far: exp(-inf - -inf) would be NaN for the -inf values too
      for (int64_t i = 0; i < n; ++i) {
        if (std::isnan(x[i])) s += x[i];
      }
    } else {
      s += chunk_sum_exp(x, n, m);
    }
  }
  stats[0] = m;
  stats[1] = s;
  stats[2] = (local_target >= 0 && local_target < V) ? load_one(row + local_target) : 0.0f;
}

// Backward of one row: out = (softmax(x) - onehot(target)) * scale, computed in fp32, rounded once
// to T. `out` may alias `row` (in-place backward): each chunk is read before it is written and the
// target logit is read first. Rows with scale == 0 must not come here (the caller zero-fills).
template <typename T>
static inline void row_backward(const T* row, T* out, int64_t V, int64_t local_target, float lse,
                                float scale) {
  alignas(64) float buf[kChunk];
  float target_grad = 0.0f;
  const bool has_target = local_target >= 0 && local_target < V;
  if (has_target) {
    const float xt = load_one(row + local_target);
    target_grad = (std::exp(xt - lse) - 1.0f) * scale;
  }
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    load_f32(row + c0, buf, n);
    for (int64_t i = 0; i < n; ++i) buf[i] = fast_exp(buf[i] - lse) * scale;
    if (has_target && local_target >= c0 && local_target < c0 + n) buf[local_target - c0] = target_grad;
    store_from_f32(buf, out + c0, n);
  }
}

}  // namespace selective_loss
}  // namespace megatron_slm
