// CUDA kernels of the selective loss op. No torch/ATen/c10 headers (see selective_loss_cuda.h).
//
// * fwd_stats: one block per row, 16-byte vectorized loads, per-thread online max/sum-exp,
//   block reduction of the (max, sum) pairs; fp32 math for every input dtype. A row with a NaN
//   (or +inf) sums to NaN; an all -inf row gives {-inf, 0} (its loss is then NaN, as in torch).
//   NaN rule (the CPU kernel's too, csrc/selective_loss_kernels.h): the max ignores NaN (fmaxf):
//   the largest non-NaN value, -inf when there is none.
// * backward: one block per row, writes (softmax - onehot) * scale rounded once to the logits
//   dtype, in place when grad == logits; zero-scale rows are zero-filled without loads.
// * finalize: one thread per row derives loss, lse, score and the selection flags from the
//   combined row statistics (selective_loss_finalize.h) and sums the op's statistics: per-block
//   partial sums in double, then one block adds the partials in block order (deterministic).
// * add_top (ratio < 1): one block ORs the top-k rows into the selection and adds their count
//   and loss sum to the statistics (deterministic: one block, fixed order).
// * select: 4-pass 8-bit radix select of the k-th largest key, then an ordered pass that breaks
//   ties among equal keys by position (exact top-k, O(n)). A group of one chunk (<= 8192
//   scores) is selected by one block in one launch, from a copy of its keys in shared memory;
//   a larger group is cut into chunks, one block per (group, chunk), so that one large group
//   still uses the whole GPU.
// Grids are capped at the device's limit; blocks then loop over rows / groups. Every launcher
// returns the launch's cudaError_t (0 on success).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "selective_loss_cuda.h"
#include "selective_loss_finalize.h"
#include "kernel_common.cuh"

namespace megatron_slm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kSelectThreads = 1024;
constexpr int kPickThreads = 256;
// select_one_block_kernel: 512 threads (16 scores each at n = 8192) leave it 128 registers; at
// 1024 ptxas spilled (64 registers).
constexpr int kOneBlockThreads = 512;
constexpr int64_t kSelectChunk = 8 * kSelectThreads;  // scores per block and (group, chunk) item

// (max, sum) pair of an online softmax; sum is relative to max.
struct MaxSum {
  float m;
  float s;
};

// A part whose values are all -inf or NaN has m == -inf and s == 0 (all -inf) or NaN; NaN sums
// must survive every step so that the row's loss is NaN, as in torch.
__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, a.s + b.s};
  const float sa = a.s == 0.0f ? 0.0f : a.s * __expf(a.m - m);
  const float sb = b.s == 0.0f ? 0.0f : b.s * __expf(b.m - m);
  return {m, sa + sb};
}

__device__ __forceinline__ void accumulate(MaxSum& acc, const float* x, int n) {
  float vm = x[0];
  for (int i = 1; i < n; ++i) vm = fmaxf(vm, x[i]);  // fmaxf skips NaN: the sum catches it
  if (vm > acc.m) {
    acc.s = acc.s == 0.0f ? 0.0f : acc.s * __expf(acc.m - vm);
    acc.m = vm;
  }
  if (acc.m == -INFINITY) {  // only -inf and NaN so far: exp(-inf - -inf) is NaN, keep real NaNs
    for (int i = 0; i < n; ++i) {
      if (x[i] != x[i]) acc.s += x[i];
    }
    return;
  }
  for (int i = 0; i < n; ++i) acc.s += __expf(x[i] - acc.m);
}

__device__ MaxSum block_reduce(MaxSum v) {
  __shared__ float sm[32];
  __shared__ float ss[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    MaxSum o{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off)};
    v = combine(v, o);
  }
  if (lane == 0) {
    sm[warp] = v.m;
    ss[warp] = v.s;
  }
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  if (warp == 0) {
    v = lane < nwarps ? MaxSum{sm[lane], ss[lane]} : MaxSum{-INFINITY, 0.0f};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      MaxSum o{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off)};
      v = combine(v, o);
    }
  }
  __syncthreads();  // sm/ss are rewritten by the next row of this block
  return v;  // valid in thread 0
}

// ------------------------------------------------------------------------------------------
// forward statistics
// ------------------------------------------------------------------------------------------
// kUnroll vectors in flight per thread before any is used: with one, each thread waits a full
// memory latency per 16 bytes (the loop's next load issues only after the math on this one).
template <typename T, bool kVectorized, int kUnroll>
__global__ void __launch_bounds__(kThreads)
    fwd_stats_kernel(const T* __restrict__ logits, const int64_t* __restrict__ target, int64_t N,
                     int64_t V, int64_t vocab_start, float* __restrict__ stats) {
  using Tr = Traits<T>;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const T* x = logits + row * V;
    MaxSum acc{-INFINITY, 0.0f};
    if (kVectorized) {
      const uint4* xv = reinterpret_cast<const uint4*>(x);
      const int64_t nvec = V / Tr::kVec;
      const int64_t step = static_cast<int64_t>(blockDim.x) * kUnroll;
      float buf[Tr::kVec];
      int64_t i = threadIdx.x;
      for (; i + (kUnroll - 1) * static_cast<int64_t>(blockDim.x) < nvec; i += step) {
        uint4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) v[u] = __ldg(xv + i + u * blockDim.x);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          Tr::unpack(v[u], buf);
          accumulate(acc, buf, Tr::kVec);
        }
      }
      for (; i < nvec; i += blockDim.x) {  // the tail: fewer than kUnroll vectors left
        Tr::unpack(__ldg(xv + i), buf);
        accumulate(acc, buf, Tr::kVec);
      }
    } else {
      for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
        const float f = Tr::to_f(x[i]);
        accumulate(acc, &f, 1);
      }
    }
    acc = block_reduce(acc);
    if (threadIdx.x == 0) {
      const int64_t t = target[row] - vocab_start;
      stats[3 * row + 0] = acc.m;
      stats[3 * row + 1] = acc.s;
      stats[3 * row + 2] = (t >= 0 && t < V) ? Tr::to_f(x[t]) : 0.0f;
    }
  }
}

// ------------------------------------------------------------------------------------------
// backward
// ------------------------------------------------------------------------------------------
// (softmax - onehot) * scale of the kVec logits in vector iv of a row, packed back.
template <typename Tr>
__device__ __forceinline__ uint4 grad_vector(const uint4& v, int64_t iv, int64_t t, float l,
                                             float sc) {
  float buf[Tr::kVec];
  Tr::unpack(v, buf);
#pragma unroll
  for (int j = 0; j < Tr::kVec; ++j) {
    const int64_t col = iv * Tr::kVec + j;
    const float p = __expf(buf[j] - l);
    buf[j] = (col == t ? p - 1.0f : p) * sc;
  }
  return Tr::pack(buf);
}

template <typename T, bool kVectorized, int kUnroll>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* logits, T* grad, const int64_t* __restrict__ target, int64_t N,
                    int64_t V, int64_t vocab_start, const float* __restrict__ lse,
                    const float* __restrict__ scale) {
  using Tr = Traits<T>;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const float sc = scale[row];
    const T* x = logits + row * V;
    T* g = grad + row * V;
    if (sc == 0.0f) {  // zero gradient: write zeros, never read the logits
      if (kVectorized) {
        uint4* gv = reinterpret_cast<uint4*>(g);
        const int64_t nvec = V / Tr::kVec;
        for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) gv[i] = make_uint4(0, 0, 0, 0);
      } else {
        for (int64_t i = threadIdx.x; i < V; i += blockDim.x) g[i] = Tr::from_f(0.0f);
      }
      continue;
    }
    const float l = lse[row];
    const int64_t t = target[row] - vocab_start;
    if (kVectorized) {
      const uint4* xv = reinterpret_cast<const uint4*>(x);
      uint4* gv = reinterpret_cast<uint4*>(g);
      const int64_t nvec = V / Tr::kVec;
      const int64_t step = static_cast<int64_t>(blockDim.x) * kUnroll;
      int64_t i = threadIdx.x;
      // In place, grad == logits: each vector is read before it is written, by the same thread.
      for (; i + (kUnroll - 1) * static_cast<int64_t>(blockDim.x) < nvec; i += step) {
        uint4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) v[u] = xv[i + u * blockDim.x];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t iv = i + u * blockDim.x;
          gv[iv] = grad_vector<Tr>(v[u], iv, t, l, sc);
        }
      }
      for (; i < nvec; i += blockDim.x) gv[i] = grad_vector<Tr>(xv[i], i, t, l, sc);
    } else {
      for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
        const float p = __expf(Tr::to_f(x[i]) - l);
        g[i] = Tr::from_f((i == t ? p - 1.0f : p) * sc);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// finalize: per-row epilogue + the op's statistics
// ------------------------------------------------------------------------------------------
constexpr int kFinalizeThreads = 256;
// At most this many blocks (and partial sums); fixed by N alone, so the sums' order (and bits)
// never depend on the device.
constexpr int64_t kFinalizeMaxBlocks = 128;
constexpr int kSums = finalize::kSums;

struct FinalizeArgs {
  const float* stats;      // [N, 3] combined {max, sumexp, target logit}
  const int64_t* target;   // [N]
  const float* ref;        // [N] or nullptr
  const uint8_t* mask;     // [N] or nullptr (all valid)
  int64_t N;
  int64_t v_global;
  int flags;
  float* loss;             // [N]
  float* lse;              // [N]
  float* score;            // [N]
  uint8_t* eligible;       // [N]
  uint8_t* selected;       // [N]
  double* partials;        // [blocks, kSums]
  float* totals;           // [kSums + 1]
};

__global__ void __launch_bounds__(kFinalizeThreads) finalize_rows_kernel(FinalizeArgs a) {
  __shared__ double red[kSums][kFinalizeThreads];
  double acc[kSums];
  for (int j = 0; j < kSums; ++j) acc[j] = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < a.N;
       r += stride) {
    const bool has_ref = a.ref != nullptr;
    finalize::finalize_row(a.stats + 3 * r, a.target[r], a.v_global, has_ref,
                           has_ref ? a.ref[r] : 0.0f, a.mask == nullptr || a.mask[r] != 0,
                           a.flags, a.loss + r, a.lse + r, a.score + r, a.eligible + r,
                           a.selected + r, acc);
  }
  for (int j = 0; j < kSums; ++j) red[j][threadIdx.x] = acc[j];
  __syncthreads();
  for (int half = kFinalizeThreads / 2; half > 0; half >>= 1) {
    if (static_cast<int>(threadIdx.x) < half) {
      for (int j = 0; j < kSums; ++j) red[j][threadIdx.x] += red[j][threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    for (int j = 0; j < kSums; ++j) a.partials[blockIdx.x * kSums + j] = red[j][0];
  }
}

// One block: thread j adds partial j of every block, in block order.
__global__ void __launch_bounds__(32)
    finalize_totals_kernel(const double* __restrict__ partials, int blocks,
                           float* __restrict__ totals) {
  const int j = threadIdx.x;
  if (j < kSums) {
    double sum = 0.0;
    for (int b = 0; b < blocks; ++b) sum += partials[b * kSums + j];
    totals[j] = static_cast<float>(sum);
  } else if (j == finalize::kTargetsOk) {
    double bad = 0.0;
    for (int b = 0; b < blocks; ++b) bad += partials[b * kSums + finalize::kBadTargets];
    totals[j] = finalize::targets_ok(bad);
  }
}

// ------------------------------------------------------------------------------------------
// add_top: the top-k rows join the selection and its statistics (ratio < 1)
// ------------------------------------------------------------------------------------------
constexpr int kAddTopThreads = 512;

// One block, so that the sums' order is fixed (deterministic): selected |= top, and the totals'
// n_selected and selected_loss_sum grow by the top rows' count and loss sum. One launch for what
// took six tensor ops (or, where, two sums, stack, add). A block streams 5 bytes a row: a
// micro-batch's rows (8192) take a few microseconds.
__global__ void __launch_bounds__(kAddTopThreads)
    add_top_kernel(const uint8_t* __restrict__ top, const float* __restrict__ loss, int64_t N,
                   uint8_t* __restrict__ selected, float* __restrict__ totals) {
  __shared__ double red_n[kAddTopThreads];
  __shared__ double red_sum[kAddTopThreads];
  double n = 0.0;
  double sum = 0.0;
#pragma unroll 4
  for (int64_t r = threadIdx.x; r < N; r += blockDim.x) {
    const uint8_t t = top[r];
    const float l = loss[r];  // loaded with top[r], not after it: the loads of a row overlap
    if (t) {
      selected[r] = 1;
      n += 1.0;
      sum += static_cast<double>(l);
    }
  }
  red_n[threadIdx.x] = n;
  red_sum[threadIdx.x] = sum;
  __syncthreads();
  for (int half = kAddTopThreads / 2; half > 0; half >>= 1) {
    if (static_cast<int>(threadIdx.x) < half) {
      red_n[threadIdx.x] += red_n[threadIdx.x + half];
      red_sum[threadIdx.x] += red_sum[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) finalize::add_top_sums(totals, red_n[0], red_sum[0]);
}

// ------------------------------------------------------------------------------------------
// exact top-k selection
// ------------------------------------------------------------------------------------------
// Order-preserving float -> uint32 map (larger float, larger key) with the ranking of the other
// implementations: NaN ranks as -inf and -0.0 as +0.0, ties among them then go by position.
// Bitwise tests, so that no fast-math setting can fold them away.
__device__ __forceinline__ uint32_t score_key(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) u = 0xFF800000u;  // NaN -> -inf
  if ((u & 0x7FFFFFFFu) == 0u) u = 0u;                    // -0.0 -> +0.0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The key of entry i when it is a candidate (eligible), else 0. score_key never returns 0: NaN
// takes -inf's key (0x007FFFFF), and the keys below it would be negative NaNs. Both loads are
// unconditional, so that a loop's loads do not wait on each other.
__device__ __forceinline__ uint32_t candidate_key(const float* sc, const uint8_t* el, int64_t i) {
  const float s = sc[i];
  const uint8_t e = el[i];
  return e ? score_key(s) : 0u;
}

// Candidate keys read from the scores in global memory, or from a block's staged copy.
struct GlobalKeys {
  const float* sc;
  const uint8_t* el;
  __device__ __forceinline__ uint32_t operator()(int64_t i) const {
    return candidate_key(sc, el, i);
  }
};
struct StagedKeys {
  const uint32_t* keys;
  __device__ __forceinline__ uint32_t operator()(int64_t i) const { return keys[i]; }
};

// keys[0, n) = the candidate keys, by the whole block: each thread's kStageLoads loads are issued
// before their keys are stored, so that their latencies overlap.
constexpr int kStageLoads = 4;
__device__ __forceinline__ void stage_keys(const float* sc, const uint8_t* el, int64_t n,
                                           uint32_t* keys) {
  for (int64_t base = threadIdx.x; base < n; base += kStageLoads * blockDim.x) {
    uint32_t key[kStageLoads];
#pragma unroll
    for (int j = 0; j < kStageLoads; ++j) {
      const int64_t i = base + j * static_cast<int64_t>(blockDim.x);
      key[j] = i < n ? candidate_key(sc, el, i) : 0u;
    }
#pragma unroll
    for (int j = 0; j < kStageLoads; ++j) {
      const int64_t i = base + j * static_cast<int64_t>(blockDim.x);
      if (i < n) keys[i] = key[j];
    }
  }
}

// Adds a tile's keys to a shared histogram: the lanes of a warp that fall in the same bin add
// once, with their count. Scores are skewed: most keys' first digit (sign and exponent) falls in
// a few bins, and a plain per-key atomic serialises on them. Every lane of the warp calls it
// (the match names the whole warp; __match_any_sync needs sm_70+); bin < 0 adds nothing.
__device__ __forceinline__ void add_to_bins(unsigned int* bins, int bin) {
  const unsigned int peers = __match_any_sync(0xffffffffu, bin);
  const unsigned int lower = peers & ((1u << (threadIdx.x & 31)) - 1u);
  if (bin >= 0 && lower == 0u) atomicAdd(&bins[bin], static_cast<unsigned int>(__popc(peers)));
}

// The digit of a key for a histogram pass (-1: not a candidate, or outside the prefix found so far)
__device__ __forceinline__ int digit_of(uint32_t key, uint32_t mask, uint32_t prefix, int shift) {
  return key != 0u && (key & mask) == prefix ? static_cast<int>((key >> shift) & 0xFFu) : -1;
}

// Multi-block radix select. Every group g of n scores is cut into chunks of kSelectChunk; a
// block works on one (group, chunk) item at a time, so a single large group (microbatch and
// data-parallel scopes) still fills the GPU. Per 8-bit digit (4 passes) select_hist_kernel
// counts the digits of the candidates (keys matching the prefix found so far) into the group's
// global histogram, and select_pick_kernel finds the bin of the k-th largest key. Then
// select_count_kernel counts, per chunk, the keys equal to the k-th, and select_write_kernel
// writes the selection in position order: keys above the k-th, plus the first `take_equal`
// keys equal to it (ties by position), each chunk starting from the count of the chunks before.
// __shared__ variables stay in non-template functions (see csrc/cuda/testing/simt_host.h).
struct SelectState {
  unsigned long long remaining;  // how many of the candidates are still to be taken
  unsigned long long total;      // eligible entries of the group
  long long k;                   // the group's k: given, or keep_count(ratio, total)
  uint32_t prefix;               // key digits found so far (the k-th key after the last pass)
  uint32_t pad;
};

struct SelectWorkspace {
  SelectState* state;        // [G]
  unsigned long long* hist;  // [G, 256]
  unsigned int* eq_count;    // [G, chunks]
};

__device__ __forceinline__ int64_t chunks_of(int64_t n) {
  return (n + kSelectChunk - 1) / kSelectChunk;
}

__global__ void __launch_bounds__(kSelectThreads)
    select_hist_kernel(const float* __restrict__ scores, const uint8_t* __restrict__ eligible,
                       int64_t G, int64_t n, int shift, SelectWorkspace ws) {
  __shared__ unsigned int hist[256];
  const int64_t chunks = chunks_of(n);
  const uint32_t mask = shift == 24 ? 0u : ~0u << (shift + 8);
  for (int64_t item = blockIdx.x; item < G * chunks; item += gridDim.x) {
    const int64_t grp = item / chunks;
    const int64_t lo = (item % chunks) * kSelectChunk;
    const int64_t hi = lo + kSelectChunk < n ? lo + kSelectChunk : n;
    const float* sc = scores + grp * n;
    const uint8_t* el = eligible + grp * n;
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
    __syncthreads();
    const uint32_t prefix = ws.state[grp].prefix;
    for (int64_t base = lo; base < hi; base += blockDim.x) {  // whole warps to the end
      const int64_t i = base + threadIdx.x;
      add_to_bins(hist, i < hi ? digit_of(candidate_key(sc, el, i), mask, prefix, shift) : -1);
    }
    __syncthreads();
    unsigned long long* gh = ws.hist + grp * 256;
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
      if (hist[i]) atomicAdd(&gh[i], static_cast<unsigned long long>(hist[i]));
    }
    __syncthreads();  // hist is zeroed for the next item
  }
}

// One block per group; thread 0 scans the 256 bins. Clears the histogram for the next pass.
// After the first digit pass, which counts every eligible entry of the group: its k (given, or
// derived from the ratio and that count) and how many are still to be taken.
__device__ __forceinline__ void start_group(SelectState& st, const int64_t* k, double ratio,
                                            int64_t grp, unsigned long long total) {
  st.total = total;
  st.k = k != nullptr ? k[grp] : finalize::keep_count(ratio, static_cast<int64_t>(total));
  st.remaining = st.k > 0 ? static_cast<unsigned long long>(st.k) : 0ull;
}

__global__ void __launch_bounds__(kPickThreads)
    select_pick_kernel(const int64_t* __restrict__ k, double ratio, int64_t G, int shift,
                       SelectWorkspace ws) {
  for (int64_t grp = blockIdx.x; grp < G; grp += gridDim.x) {
    unsigned long long* gh = ws.hist + grp * 256;
    SelectState& st = ws.state[grp];
    if (threadIdx.x == 0) {
      unsigned long long total = 0;
      for (int b = 0; b < 256; ++b) total += gh[b];
      if (shift == 24) start_group(st, k, ratio, grp, total);
      const unsigned long long rem = st.remaining;
      if (rem > 0 && rem <= total) {
        // the bin holding the rem-th largest candidate, counting from the top bin
        unsigned long long above = 0;
        int b = 255;
        for (; b > 0; --b) {
          if (above + gh[b] >= rem) break;
          above += gh[b];
        }
        st.remaining = rem - above;
        st.prefix |= static_cast<uint32_t>(b) << shift;
      }
      // rem > total only in the first pass (k >= #eligible): select_write_kernel takes all
    }
    __syncthreads();  // thread 0 has read the bins
    for (int i = threadIdx.x; i < 256; i += blockDim.x) gh[i] = 0ull;
  }
}

__device__ __forceinline__ bool select_all_or_none(const SelectState& st) {
  const unsigned long long want = st.k > 0 ? static_cast<unsigned long long>(st.k) : 0ull;
  return want == 0 || want >= st.total;
}

__global__ void __launch_bounds__(kSelectThreads)
    select_count_kernel(const float* __restrict__ scores, const uint8_t* __restrict__ eligible,
                        int64_t G, int64_t n, SelectWorkspace ws) {
  __shared__ unsigned int warp_counts[kSelectThreads / 32];
  const int64_t chunks = chunks_of(n);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int64_t item = blockIdx.x; item < G * chunks; item += gridDim.x) {
    const int64_t grp = item / chunks;
    if (select_all_or_none(ws.state[grp])) continue;  // uniform in the block
    const int64_t lo = (item % chunks) * kSelectChunk;
    const int64_t hi = lo + kSelectChunk < n ? lo + kSelectChunk : n;
    const float* sc = scores + grp * n;
    const uint8_t* el = eligible + grp * n;
    const uint32_t kth = ws.state[grp].prefix;
    unsigned int count = 0;
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
      count += candidate_key(sc, el, i) == kth ? 1u : 0u;  // kth is never 0
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) count += __shfl_xor_sync(0xffffffffu, count, off);
    if (lane == 0) warp_counts[warp] = count;
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned int total = 0;
      for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += warp_counts[w];
      ws.eq_count[grp * chunks + item % chunks] = total;
    }
    __syncthreads();  // warp_counts is rewritten by the next item
  }
}

// Writes out[lo, hi) in position order, tile by tile: keys above the k-th (kth), and keys equal
// to it while fewer than take_equal were taken before (*s_taken: those before out[lo] on entry;
// the block's shared counter). Called by the whole block; warp_counts is block shared memory.
// keys(i): entry i's candidate key (GlobalKeys or StagedKeys).
template <typename Keys>
__device__ __forceinline__ void write_ordered(const Keys& keys, uint8_t* out,
                                              int64_t lo, int64_t hi, uint32_t kth,
                                              unsigned long long take_equal,
                                              unsigned int* warp_counts,
                                              unsigned long long* s_taken) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  for (int64_t base = lo; base < hi; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const uint32_t key = i < hi ? keys(i) : 0u;  // 0: no candidate, never above or at kth
    const bool is_gt = key > kth;
    const bool is_eq = key == kth;
    const unsigned int ballot = __ballot_sync(0xffffffffu, is_eq);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    unsigned long long before = *s_taken;
    for (int w = 0; w < warp; ++w) before += warp_counts[w];
    before += __popc(ballot & ((1u << lane) - 1u));
    if (i < hi) out[i] = (is_gt || (is_eq && before < take_equal)) ? 1 : 0;
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long tile = 0;
      for (int w = 0; w < nwarps; ++w) tile += warp_counts[w];
      *s_taken += tile;
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kSelectThreads)
    select_write_kernel(const float* __restrict__ scores, const uint8_t* __restrict__ eligible,
                        int64_t G, int64_t n, uint8_t* __restrict__ selected, SelectWorkspace ws) {
  __shared__ unsigned int warp_counts[kSelectThreads / 32];
  __shared__ unsigned long long s_taken;
  const int64_t chunks = chunks_of(n);
  for (int64_t item = blockIdx.x; item < G * chunks; item += gridDim.x) {
    const int64_t grp = item / chunks;
    const int64_t chunk = item % chunks;
    const int64_t lo = chunk * kSelectChunk;
    const int64_t hi = lo + kSelectChunk < n ? lo + kSelectChunk : n;
    const float* sc = scores + grp * n;
    const uint8_t* el = eligible + grp * n;
    uint8_t* out = selected + grp * n;
    const SelectState& st = ws.state[grp];
    if (select_all_or_none(st)) {  // k <= 0: nothing; k >= #eligible: every eligible entry
      const bool any = st.k > 0;
      for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) out[i] = (any && el[i]) ? 1 : 0;
      continue;
    }
    const uint32_t kth = st.prefix;
    const unsigned long long take_equal = st.remaining;  // how many keys == kth to keep
    if (threadIdx.x == 0) {
      unsigned long long before = 0;  // keys == kth in the chunks before this one
      for (int64_t c = 0; c < chunk; ++c) before += ws.eq_count[grp * chunks + c];
      s_taken = before;
    }
    __syncthreads();
    write_ordered(GlobalKeys{sc, el}, out, lo, hi, kth, take_equal, warp_counts, &s_taken);
  }
}

// Groups of one chunk (n <= kSelectChunk, e.g. a micro-batch of up to 8192 tokens): one block per
// group runs all four digit passes and the ordered write in shared memory: one launch, no
// workspace. On an H200 the multi-block path's 11 launches (memset, 4 x histogram + pick, count,
// write) were most of the select's cost at [4096, 2, 32000] (0.51 ms at ratio 0.6 vs 0.44 ms at
// ratio 1, benchmarks/RESULTS_gpu.md). The pick scans 32 lane sums, then 8 bins, not 256 bins.
// The group's candidate keys are read from global memory once, into shared memory (32 KiB): the
// five passes over them (4 digits, the write) then wait on no global load. One block is all the
// GPU runs here, so its loads' latency, not bandwidth, is the select's time.
__global__ void __launch_bounds__(kOneBlockThreads)
    select_one_block_kernel(const float* __restrict__ scores,
                            const uint8_t* __restrict__ eligible, const int64_t* __restrict__ k,
                            double ratio, int64_t G, int64_t n, uint8_t* __restrict__ selected) {
  __shared__ uint32_t keys[kSelectChunk];  // candidate keys of the group (0: not eligible)
  __shared__ unsigned int bins[256];
  __shared__ unsigned int lane_sums[32];  // lane l: bins 255 - 8 l down to 248 - 8 l (top first)
  __shared__ unsigned int warp_counts[kOneBlockThreads / 32];
  __shared__ unsigned long long s_taken;
  __shared__ SelectState st;
  for (int64_t grp = blockIdx.x; grp < G; grp += gridDim.x) {
    const float* sc = scores + grp * n;
    const uint8_t* el = eligible + grp * n;
    uint8_t* out = selected + grp * n;
    stage_keys(sc, el, n, keys);
    if (threadIdx.x == 0) {
      st.remaining = 0ull;
      st.total = 0ull;
      st.k = 0;
      st.prefix = 0u;
      s_taken = 0ull;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = threadIdx.x; b < 256; b += blockDim.x) bins[b] = 0u;
      __syncthreads();  // bins zeroed, keys staged, st of the last pass written
      const uint32_t mask = shift == 24 ? 0u : ~0u << (shift + 8);
      const uint32_t prefix = st.prefix;
      for (int64_t base = 0; base < n; base += blockDim.x) {  // whole warps to the end
        const int64_t i = base + threadIdx.x;
        add_to_bins(bins, i < n ? digit_of(keys[i], mask, prefix, shift) : -1);
      }
      __syncthreads();
      if (threadIdx.x < 32) {
        unsigned int sum = 0u;
        for (int j = 0; j < 8; ++j) sum += bins[255 - 8 * static_cast<int>(threadIdx.x) - j];
        lane_sums[threadIdx.x] = sum;
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        unsigned long long total = 0ull;
        for (int l = 0; l < 32; ++l) total += lane_sums[l];
        if (shift == 24) start_group(st, k, ratio, grp, total);
        const unsigned long long rem = st.remaining;
        if (rem > 0 && rem <= total) {  // the bin of the rem-th largest candidate
          unsigned long long above = 0ull;
          int l = 0;
          for (; l < 31 && above + lane_sums[l] < rem; ++l) above += lane_sums[l];
          int b = 255 - 8 * l;
          for (int j = 0; j < 7 && above + bins[b] < rem; ++j, --b) above += bins[b];
          st.remaining = rem - above;
          st.prefix |= static_cast<uint32_t>(b) << shift;
        }
      }
      __syncthreads();  // the next pass zeroes bins and reads st.prefix
    }
    if (select_all_or_none(st)) {  // uniform in the block: k <= 0 or k >= #eligible
      const bool any = st.k > 0;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = any && keys[i] != 0u;
    } else {
      write_ordered(StagedKeys{keys}, out, 0, n, st.prefix, st.remaining, warp_counts, &s_taken);
    }
    __syncthreads();  // keys, st, s_taken and warp_counts are rewritten by the next group
  }
}

// Vectors in flight per thread in the row kernels: 2 by default; MEGATRON_SLM_ROW_UNROLL=1 keeps
// the one-at-a-time loop. Read once per process. Measured on an H200 (benchmarks/RESULTS_gpu.md):
// the same within noise at [8192, 131072] bf16/fp32 and [8192, 32000] bf16 (1.65 vs 1.66 ms,
// 3.25 vs 3.23, 0.44 vs 0.45): 8 blocks of 256 threads per SM already keep enough bytes in
// flight there; the variant stays for devices with fewer resident warps.
int row_unroll() {
  static const int unroll = [] {
    const char* env = std::getenv("MEGATRON_SLM_ROW_UNROLL");
    return env != nullptr && env[0] == '1' && env[1] == '\0' ? 1 : 2;
  }();
  return unroll;
}

template <typename T>
cudaError_t launch_fwd(const void* logits, const int64_t* target, int64_t N, int64_t V,
                       int64_t vocab_start, float* stats, cudaStream_t stream) {
  const bool vec = (reinterpret_cast<uintptr_t>(logits) % 16 == 0) &&
                   ((V * static_cast<int64_t>(sizeof(T))) % 16 == 0);
  const T* x = static_cast<const T*>(logits);
  unsigned int grid = 0;
  const cudaError_t err = grid_for(N, &grid);
  if (err != cudaSuccess) return err;
  if (vec && row_unroll() == 2) {
    SLM_LAUNCH(grid, kThreads, 0, stream, fwd_stats_kernel<T, true, 2>)(x, target, N, V,
                                                                        vocab_start, stats);
  } else if (vec) {
    SLM_LAUNCH(grid, kThreads, 0, stream, fwd_stats_kernel<T, true, 1>)(x, target, N, V,
                                                                        vocab_start, stats);
  } else {
    SLM_LAUNCH(grid, kThreads, 0, stream, fwd_stats_kernel<T, false, 1>)(x, target, N, V,
                                                                         vocab_start, stats);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* logits, void* grad, const int64_t* target, int64_t N,
                       int64_t V, int64_t vocab_start, const float* lse, const float* scale,
                       cudaStream_t stream) {
  const bool vec = (reinterpret_cast<uintptr_t>(logits) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(grad) % 16 == 0) &&
                   ((V * static_cast<int64_t>(sizeof(T))) % 16 == 0);
  const T* x = static_cast<const T*>(logits);
  T* g = static_cast<T*>(grad);
  unsigned int grid = 0;
  const cudaError_t err = grid_for(N, &grid);
  if (err != cudaSuccess) return err;
  if (vec && row_unroll() == 2) {
    SLM_LAUNCH(grid, kThreads, 0, stream, backward_kernel<T, true, 2>)(x, g, target, N, V,
                                                                       vocab_start, lse, scale);
  } else if (vec) {
    SLM_LAUNCH(grid, kThreads, 0, stream, backward_kernel<T, true, 1>)(x, g, target, N, V,
                                                                       vocab_start, lse, scale);
  } else {
    SLM_LAUNCH(grid, kThreads, 0, stream, backward_kernel<T, false, 1>)(x, g, target, N, V,
                                                                        vocab_start, lse, scale);
  }
  return cudaGetLastError();
}

}  // namespace

int selective_loss_fwd_stats(const void* logits, int dtype, const int64_t* target, int64_t N,
                             int64_t V, int64_t vocab_start, float* stats, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  if (dtype == kFloat32) return launch_fwd<float>(logits, target, N, V, vocab_start, stats, stream);
  if (dtype == kFloat16) {
    return launch_fwd<__half>(logits, target, N, V, vocab_start, stats, stream);
  }
  return launch_fwd<__nv_bfloat16>(logits, target, N, V, vocab_start, stats, stream);
}

int selective_loss_backward(const void* logits, void* grad, int dtype, const int64_t* target,
                            int64_t N, int64_t V, int64_t vocab_start, const float* lse,
                            const float* scale, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  if (dtype == kFloat32) {
    return launch_bwd<float>(logits, grad, target, N, V, vocab_start, lse, scale, stream);
  }
  if (dtype == kFloat16) {
    return launch_bwd<__half>(logits, grad, target, N, V, vocab_start, lse, scale, stream);
  }
  return launch_bwd<__nv_bfloat16>(logits, grad, target, N, V, vocab_start, lse, scale, stream);
}

int selective_loss_finalize_blocks(int64_t N) {
  const int64_t need = (N + kFinalizeThreads - 1) / kFinalizeThreads;
  return static_cast<int>(need < kFinalizeMaxBlocks ? (need > 0 ? need : 1) : kFinalizeMaxBlocks);
}

int selective_loss_finalize(const float* stats, const int64_t* target, const float* ref,
                            const uint8_t* mask, int64_t N, int64_t v_global, int flags,
                            float* loss, float* lse, float* score, uint8_t* eligible,
                            uint8_t* selected, double* partials, float* totals,
                            cudaStream_t stream) {
  const int blocks = selective_loss_finalize_blocks(N);
  FinalizeArgs a{stats, target, ref, mask, N, v_global, flags, loss, lse, score, eligible,
                 selected, partials, totals};
  SLM_LAUNCH(blocks, kFinalizeThreads, 0, stream, finalize_rows_kernel)(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  SLM_LAUNCH(1, 32, 0, stream, finalize_totals_kernel)(partials, blocks, totals);
  return cudaGetLastError();
}

int selective_loss_add_top(const uint8_t* top, const float* loss, int64_t N, uint8_t* selected,
                           float* totals, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  SLM_LAUNCH(1, kAddTopThreads, 0, stream, add_top_kernel)(top, loss, N, selected, totals);
  return cudaGetLastError();
}

namespace {

SelectWorkspace carve(void* workspace, int64_t G, int64_t n) {
  char* p = static_cast<char*>(workspace);
  SelectWorkspace ws;
  ws.state = reinterpret_cast<SelectState*>(p);
  ws.hist = reinterpret_cast<unsigned long long*>(p + G * sizeof(SelectState));
  ws.eq_count = reinterpret_cast<unsigned int*>(p + G * (sizeof(SelectState) + 256 * 8));
  (void)n;
  return ws;
}

}  // namespace

int64_t selective_loss_select_workspace_bytes(int64_t G, int64_t n) {
  if (n <= kSelectChunk) return 0;  // select_one_block_kernel keeps its state in shared memory
  const int64_t chunks = (n + kSelectChunk - 1) / kSelectChunk;
  return G * static_cast<int64_t>(sizeof(SelectState) + 256 * 8 + chunks * 4);
}

int selective_loss_select(const float* scores, const uint8_t* eligible, const int64_t* k,
                          double ratio, int64_t G, int64_t n, uint8_t* selected, void* workspace,
                          cudaStream_t stream) {
  if (G <= 0 || n <= 0) return cudaSuccess;
  if (n <= kSelectChunk) {
    unsigned int grid = 0;
    const cudaError_t err = grid_for(G, &grid);
    if (err != cudaSuccess) return err;
    SLM_LAUNCH(grid, kOneBlockThreads, 0, stream, select_one_block_kernel)(scores, eligible, k,
                                                                            ratio, G, n, selected);
    return cudaGetLastError();
  }
  const int64_t chunks = (n + kSelectChunk - 1) / kSelectChunk;
  unsigned int items_grid = 0, groups_grid = 0;
  cudaError_t err = grid_for(G * chunks, &items_grid);
  if (err == cudaSuccess) err = grid_for(G, &groups_grid);
  if (err == cudaSuccess) {
    // state and histograms start at zero (the counts are tiny next to the scores)
    err = cudaMemsetAsync(workspace, 0,
                          static_cast<size_t>(selective_loss_select_workspace_bytes(G, n)), stream);
  }
  if (err != cudaSuccess) return err;
  const SelectWorkspace ws = carve(workspace, G, n);
  for (int shift = 24; shift >= 0; shift -= 8) {
    SLM_LAUNCH(items_grid, kSelectThreads, 0, stream, select_hist_kernel)(scores, eligible, G, n,
                                                                          shift, ws);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    SLM_LAUNCH(groups_grid, kPickThreads, 0, stream, select_pick_kernel)(k, ratio, G, shift,
                                                                          ws);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  SLM_LAUNCH(items_grid, kSelectThreads, 0, stream, select_count_kernel)(scores, eligible, G, n,
                                                                         ws);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  SLM_LAUNCH(items_grid, kSelectThreads, 0, stream, select_write_kernel)(scores, eligible, G, n,
                                                                         selected, ws);
  return cudaGetLastError();
}

const char* selective_loss_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // namespace cuda
}  // namespace megatron_slm
