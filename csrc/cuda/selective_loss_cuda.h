// CUDA launchers of the selective loss op (csrc/cuda/selective_loss.cu).
//
// Plain C++ interface (raw pointers, int64 sizes, a cudaStream_t) so that the torch glue in
// csrc/selective_loss.cpp can call it and the .cu never includes torch/ATen/c10 headers.
// All launchers are asynchronous on `stream`; pointers are device pointers. Each returns the
// cudaError_t of its launch (0 on success; selective_loss_error_string describes the others).
#pragma once

#include <cstdint>

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

namespace megatron_slm {
namespace cuda {

// dtype codes of the logits / gradient buffers
constexpr int kFloat32 = 0;
constexpr int kFloat16 = 1;
constexpr int kBFloat16 = 2;

// Per row of logits[N, V] (row-major, contiguous): stats[3 * r + {0, 1, 2}] =
// {max, sum exp(x - max), logit of target[r] - vocab_start or 0 when outside [0, V)}.
int selective_loss_fwd_stats(const void* logits, int dtype, const int64_t* target, int64_t N,
                             int64_t V, int64_t vocab_start, float* stats, cudaStream_t stream);

// grad[r, :] = (softmax(logits[r, :]) - onehot(target[r] - vocab_start)) * scale[r] with
// softmax = exp(x - lse[r]), computed in fp32 and rounded once to the logits dtype. grad may
// equal logits (in place). Rows with scale[r] == 0 are zero-filled without reading logits.
int selective_loss_backward(const void* logits, void* grad, int dtype, const int64_t* target,
                            int64_t N, int64_t V, int64_t vocab_start, const float* lse,
                            const float* scale, cudaStream_t stream);

// Per-row epilogue (csrc/selective_loss_finalize.h) over combined stats[N, 3]: writes loss, lse,
// score, eligible and selected [N] and totals[kSums + 1] = {n_valid, n_scored, n_selected,
// loss_sum, selected_loss_sum, excess_sum, n_bad_targets, targets_ok (1 when n_bad_targets is
// 0, else 0)}. ref and mask may be nullptr.
// `partials` is device memory of selective_loss_finalize_blocks(N) * kSums doubles. Two launches;
// the sums are deterministic (fixed order for a given N).
int selective_loss_finalize_blocks(int64_t N);
int selective_loss_finalize(const float* stats, const int64_t* target, const float* ref,
                            const uint8_t* mask, int64_t N, int64_t v_global, int flags,
                            float* loss, float* lse, float* score, uint8_t* eligible,
                            uint8_t* selected, double* partials, float* totals,
                            cudaStream_t stream);

// Exact top-k per group g of scores[G, n]: selected[g, i] = 1 for the k[g] eligible entries with
// the highest score (ties: lower i; NaN ranks as -inf and -0.0 as +0.0), 0 elsewhere. With
// k == nullptr, k[g] = keep_count(ratio, eligible entries of g), derived in the kernels. Radix
// select, O(n): one launch of one block per group for n <= 8192, else several blocks per group.
// `workspace` is device memory of selective_loss_select_workspace_bytes(G, n) bytes (8-byte
// aligned; 0 for n <= 8192), in use until the selection is done on `stream`.
int64_t selective_loss_select_workspace_bytes(int64_t G, int64_t n);
int selective_loss_select(const float* scores, const uint8_t* eligible, const int64_t* k,
                          double ratio, int64_t G, int64_t n, uint8_t* selected, void* workspace,
                          cudaStream_t stream);

// The top-k rows join the selection (ratio < 1): selected[r] |= top[r] for r < N, and
// totals[n_selected] and totals[selected_loss_sum] grow by the count and the loss sum of the top
// rows (double sums in a fixed order, one rounding each). One launch of one block.
int selective_loss_add_top(const uint8_t* top, const float* loss, int64_t N, uint8_t* selected,
                           float* totals, cudaStream_t stream);

const char* selective_loss_error_string(int code);

}  // namespace cuda
}  // namespace megatron_slm
