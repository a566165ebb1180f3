// Per-row epilogue of the selective loss op, shared by the CPU kernel (selective_loss.cpp) and the
// CUDA kernel (cuda/selective_loss.cu), so that both compute the same bits.
//
// From the combined row statistics {max m, sum exp(x - m) s, target logit t} (all TP shards) it
// derives lse = log(s) + m and loss = lse - t, the ranking score, the scored/selected flags and
// the row's contribution to the op's statistics. One call per row replaces ~25 elementwise
// tensor operations (and their launches on a GPU) of the Python epilogue.
//
// log(s) is taken in double and rounded once to float: correctly rounded in practice, and immune
// to --use_fast_math (which turns logf into the approximate __logf).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SLM_FINALIZE_FN __host__ __device__ __forceinline__
#else
#define SLM_FINALIZE_FN inline
#endif

namespace megatron_slm {
namespace finalize {

// flags
constexpr int kRankExcess = 1;    // score = loss - ref; rows with a non-finite ref are unscored
constexpr int kKeepUnscored = 2;  // unscored valid rows are always selected
constexpr int kSelectAll = 4;     // ratio 1: every scored row is selected (no top-k pass)

// Sums accumulated per row (in double), in this order; the op's statistics are the first six.
constexpr int kSums = 7;
constexpr int kNValid = 0, kNScored = 1, kNSelected = 2, kLossSum = 3, kSelectedLossSum = 4,
              kExcessSum = 5, kBadTargets = 6;
// totals[kTargetsOk] (after the sums): 1 when every target id is in range, else 0, so that the
// caller's device-side assert reads it as it is (no comparison launched per call).
constexpr int kTargetsOk = kSums;

// Bitwise finiteness test: no fast-math setting can fold it away.
SLM_FINALIZE_FN bool is_finite(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return (u & 0x7F800000u) != 0x7F800000u;
}

// One row. `ref` is read only when has_ref; `valid` is the loss mask. Writes loss, lse, score,
// eligible (scored) and selected (top-k rows are added later by the select pass when !kSelectAll)
// and adds the row to acc[kSums].
SLM_FINALIZE_FN void finalize_row(const float* st, int64_t target, int64_t v_global, bool has_ref,
                                  float ref, bool valid, int flags, float* loss, float* lse,
                                  float* score, uint8_t* eligible, uint8_t* selected,
                                  double* acc) {
  const float l = static_cast<float>(log(static_cast<double>(st[1]))) + st[0];
  const float ls = l - st[2];
  const bool finite_ref = has_ref && is_finite(ref);
  const float excess = ls - ref;
  const bool rank_excess = (flags & kRankExcess) != 0;
  const bool scored = rank_excess ? (valid && finite_ref) : valid;
  const bool unscored = rank_excess && valid && !finite_ref;
  const bool sel = ((flags & kSelectAll) != 0 && scored) ||
                   ((flags & kKeepUnscored) != 0 && unscored);
  *lse = l;
  *loss = ls;
  *score = rank_excess ? excess : ls;
  *eligible = scored ? 1 : 0;
  *selected = sel ? 1 : 0;
  if (valid) {
    acc[kNValid] += 1.0;
    acc[kLossSum] += static_cast<double>(ls);
  }
  if (scored) acc[kNScored] += 1.0;
  if (sel) {
    acc[kNSelected] += 1.0;
    acc[kSelectedLossSum] += static_cast<double>(ls);
  }
  if (valid && finite_ref) acc[kExcessSum] += static_cast<double>(excess);
  if (target < 0 || target >= v_global) acc[kBadTargets] += 1.0;
}

SLM_FINALIZE_FN float targets_ok(double bad_targets) { return bad_targets == 0.0 ? 1.0f : 0.0f; }

// The top-k rows (ratio < 1) join the selection's statistics: their count and loss sum, taken in
// double, are added to the float totals with one rounding each.
SLM_FINALIZE_FN void add_top_sums(float* totals, double n_top, double top_loss_sum) {
  totals[kNSelected] = static_cast<float>(static_cast<double>(totals[kNSelected]) + n_top);
  totals[kSelectedLossSum] =
      static_cast<float>(static_cast<double>(totals[kSelectedLossSum]) + top_loss_sum);
}

// How many of a group's n_scored rows the top-k keeps at `ratio` (< 1): floor(ratio * n + 0.5),
// at least 1, at most n (selective_loss_reference.num_to_keep). The select kernels compute it
// from the group's eligible count themselves, so no count and no k is prepared per call.
SLM_FINALIZE_FN int64_t keep_count(double ratio, int64_t n_scored) {
  if (n_scored <= 0) return 0;
  if (ratio >= 1.0) return n_scored;
  const int64_t k = static_cast<int64_t>(floor(ratio * static_cast<double>(n_scored) + 0.5));
  return k < 1 ? 1 : (k > n_scored ? n_scored : k);
}

}  // namespace finalize
}  // namespace megatron_slm
