// Torch glue of the selective loss op (issue 3): CPU kernels and, when built with
// MEGATRON_SLM_WITH_CUDA, dispatch to the CUDA launchers of csrc/cuda/selective_loss.cu.
//
// Functions (all called from megatron_slm/ops/selective_loss.py):
//   selective_loss_fwd_stats(logits[N,V], target[N] int64, vocab_start) -> stats[N,3] fp32
//       per row {max, sum exp(x - max), target logit or 0 when the target is not in this shard}
//   selective_loss_backward(logits[N,V], target[N], vocab_start, lse[N] fp32, scale[N] fp32,
//                           inplace) -> grad[N,V] (logits dtype; the logits buffer when inplace)
//   selective_loss_select(scores[G,n] fp32, eligible[G,n] bool, k[G] int64 | None, ratio)
//       -> selected[G,n] bool; with k None, k[g] = keep_count(ratio, eligible count of g) (no
//       count and no k prepared by the caller: fewer launches per call on a GPU)
//       exact top-k per group, ties by lower index, O(n) (std::nth_element)
//   selective_loss_finalize(stats[N,3] fp32 combined over TP, target[N] int64, v_global,
//                           ref[N] fp32 or None, mask[N] bool or None, flags)
//       -> (loss, lse, score [N] fp32, eligible, selected [N] bool, totals[8] fp32)
//       the per-row epilogue and the op's statistics in one call (selective_loss_finalize.h);
//       totals[7] is 1 when every target id is in range (read by a device-side assert)
//   selective_loss_add_top(top[N] bool, loss[N] fp32, selected[N] bool, totals[8] fp32)
//       ratio < 1: selected |= top, and totals' n_selected and selected_loss_sum grow by the top
//       rows' count and loss sum (in place; one launch on a GPU)

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "rope.h"
#include "selective_loss_finalize.h"
#include "selective_loss_kernels.h"
#include "swiglu.h"

#ifdef MEGATRON_SLM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/selective_loss_cuda.h"
#include "cuda_glue.h"
#endif

namespace sl = megatron_slm::selective_loss;

namespace {

void check_common(const torch::Tensor& logits, const torch::Tensor& target) {
  TORCH_CHECK(logits.dim() == 2, "selective_loss: logits must be 2-D [rows, vocab_shard]");
  TORCH_CHECK(logits.is_contiguous(), "selective_loss: logits must be contiguous");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0),
              "selective_loss: target must be 1-D [rows]");
  TORCH_CHECK(target.scalar_type() == torch::kInt64, "selective_loss: target must be int64");
  TORCH_CHECK(target.is_contiguous(), "selective_loss: target must be contiguous");
  TORCH_CHECK(target.device() == logits.device(), "selective_loss: device mismatch");
  TORCH_CHECK(logits.device().is_cpu() || logits.device().is_cuda(),
              "selective_loss: logits must be on the CPU or a CUDA device, got ", logits.device());
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == torch::kFloat32 || st == torch::kBFloat16 || st == torch::kFloat16,
              "selective_loss: logits dtype must be float32, bfloat16 or float16");
}

#ifdef MEGATRON_SLM_WITH_CUDA
void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "selective_loss: CUDA launch of ", what, " failed: ",
              megatron_slm::cuda::selective_loss_error_string(err));
}

int cuda_dtype_code(torch::ScalarType st) {
  return megatron_slm::cuda_dtype_code(st, "selective_loss");
}
#endif

template <typename T>
void fwd_stats_cpu(const T* logits, const int64_t* target, int64_t N, int64_t V,
                   int64_t vocab_start, float* stats) {
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      sl::row_forward_stats<T>(logits + r * V, V, target[r] - vocab_start, stats + 3 * r);
    }
  });
}

template <typename T>
void backward_cpu(const T* logits, T* out, const int64_t* target, int64_t N, int64_t V,
                  int64_t vocab_start, const float* lse, const float* scale) {
  // Split rows into active and zero-gradient ones so that both loops stay load-balanced; the
  // zero rows are filled without reading their logits.
  std::vector<int64_t> active, zero;
  active.reserve(static_cast<size_t>(N));
  for (int64_t r = 0; r < N; ++r) (scale[r] != 0.0f ? active : zero).push_back(r);
  const int64_t n_active = static_cast<int64_t>(active.size());
  const int64_t n_zero = static_cast<int64_t>(zero.size());
  at::parallel_for(0, n_active, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = active[static_cast<size_t>(i)];
      sl::row_backward<T>(logits + r * V, out + r * V, V, target[r] - vocab_start, lse[r],
                          scale[r]);
    }
  });
  at::parallel_for(0, n_zero, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = zero[static_cast<size_t>(i)];
      std::memset(static_cast<void*>(out + r * V), 0, static_cast<size_t>(V) * sizeof(T));
    }
  });
}

template <typename Fn>
void dispatch_dtype(torch::ScalarType st, Fn&& fn) {
  if (st == torch::kFloat32) {
    fn(static_cast<float*>(nullptr));
  } else if (st == torch::kBFloat16) {
    fn(static_cast<sl::bf16_t*>(nullptr));
  } else {
    fn(static_cast<sl::fp16_t*>(nullptr));
  }
}

// Exact top-k of one group: indices (into the group) of the k eligible entries with the highest
// score, ties broken by the lower index. NaN scores rank lowest. O(n) expected.
void select_group(const float* scores, const bool* eligible, int64_t n, int64_t k, double ratio,
                  bool* out, std::vector<std::pair<float, int64_t>>& work) {
  std::fill(out, out + n, false);
  work.clear();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    if (eligible[i]) work.emplace_back(std::isnan(scores[i]) ? neg_inf : scores[i], i);
  }
  const int64_t m = static_cast<int64_t>(work.size());
  if (ratio >= 0) k = megatron_slm::finalize::keep_count(ratio, m);  // k < 0: derive it
  if (k <= 0 || m == 0) return;
  if (k < m) {
    auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    std::nth_element(work.begin(), work.begin() + (k - 1), work.end(), better);
    // Everything before position k-1 is better than or equal to the k-th; select the first k.
    for (int64_t j = 0; j < k; ++j) out[work[static_cast<size_t>(j)].second] = true;
  } else {
    for (const auto& p : work) out[p.second] = true;
  }
}

}  // namespace

torch::Tensor selective_loss_fwd_stats(torch::Tensor logits, torch::Tensor target,
                                       int64_t vocab_start) {
  check_common(logits, target);
  const int64_t N = logits.size(0);
  const int64_t V = logits.size(1);
  auto stats = torch::empty({N, 3}, logits.options().dtype(torch::kFloat32));
  if (N == 0) return stats;
  TORCH_CHECK(V > 0, "selective_loss: empty vocabulary shard");
  if (logits.is_cuda()) {
#ifdef MEGATRON_SLM_WITH_CUDA
    const c10::cuda::CUDAGuard guard(logits.device());
    check_launch(megatron_slm::cuda::selective_loss_fwd_stats(
                     logits.data_ptr(), cuda_dtype_code(logits.scalar_type()),
                     target.data_ptr<int64_t>(), N, V, vocab_start, stats.data_ptr<float>(),
                     c10::cuda::getCurrentCUDAStream(logits.device().index()).stream()),
                 "fwd_stats");
    return stats;
#else
    TORCH_CHECK(false, "megatron_slm._C was built without CUDA kernels");
#endif
  }
  const int64_t* tgt = target.data_ptr<int64_t>();
  float* st = stats.data_ptr<float>();
  dispatch_dtype(logits.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    fwd_stats_cpu<T>(static_cast<const T*>(logits.data_ptr()), tgt, N, V, vocab_start, st);
  });
  return stats;
}

torch::Tensor selective_loss_backward(torch::Tensor logits, torch::Tensor target,
                                      int64_t vocab_start, torch::Tensor lse, torch::Tensor scale,
                                      bool inplace) {
  check_common(logits, target);
  const int64_t N = logits.size(0);
  const int64_t V = logits.size(1);
  TORCH_CHECK(lse.scalar_type() == torch::kFloat32 && lse.is_contiguous() && lse.numel() == N,
              "selective_loss: lse must be contiguous fp32 [rows]");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() &&
                  scale.numel() == N,
              "selective_loss: scale must be contiguous fp32 [rows]");
  // A tensor on another device would hand a foreign pointer to the kernel.
  TORCH_CHECK(lse.device() == logits.device() && scale.device() == logits.device(),
              "selective_loss: lse and scale must be on the logits' device (", logits.device(),
              "), got ", lse.device(), " and ", scale.device());
  torch::Tensor grad = inplace ? logits : torch::empty_like(logits);
  if (N == 0) return grad;
  if (logits.is_cuda()) {
#ifdef MEGATRON_SLM_WITH_CUDA
    const c10::cuda::CUDAGuard guard(logits.device());
    check_launch(megatron_slm::cuda::selective_loss_backward(
                     logits.data_ptr(), grad.data_ptr(), cuda_dtype_code(logits.scalar_type()),
                     target.data_ptr<int64_t>(), N, V, vocab_start, lse.data_ptr<float>(),
                     scale.data_ptr<float>(),
                     c10::cuda::getCurrentCUDAStream(logits.device().index()).stream()),
                 "backward");
    return grad;
#else
    TORCH_CHECK(false, "megatron_slm._C was built without CUDA kernels");
#endif
  }
  const int64_t* tgt = target.data_ptr<int64_t>();
  const float* l = lse.data_ptr<float>();
  const float* s = scale.data_ptr<float>();
  dispatch_dtype(logits.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    backward_cpu<T>(static_cast<const T*>(logits.data_ptr()), static_cast<T*>(grad.data_ptr()),
                    tgt, N, V, vocab_start, l, s);
  });
  return grad;
}

torch::Tensor selective_loss_select(torch::Tensor scores, torch::Tensor eligible,
                                    std::optional<torch::Tensor> k, double ratio) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == torch::kFloat32 &&
                  scores.is_contiguous(),
              "selective_loss_select: scores must be contiguous fp32 [groups, n]");
  TORCH_CHECK(eligible.sizes() == scores.sizes() && eligible.scalar_type() == torch::kBool &&
                  eligible.is_contiguous(),
              "selective_loss_select: eligible must be contiguous bool like scores");
  TORCH_CHECK(k.has_value() != (ratio >= 0.0),
              "selective_loss_select: give either k or a ratio >= 0 (k is then derived)");
  TORCH_CHECK(!k.has_value() || (k->dim() == 1 && k->size(0) == scores.size(0) &&
                                 k->scalar_type() == torch::kInt64),
              "selective_loss_select: k must be int64 [groups]");
  // k may live anywhere (it is copied to the scores' device below); the others may not.
  TORCH_CHECK(eligible.device() == scores.device(),
              "selective_loss_select: eligible must be on the scores' device (", scores.device(),
              "), got ", eligible.device());
  TORCH_CHECK(scores.device().is_cpu() || scores.device().is_cuda(),
              "selective_loss_select: scores must be on the CPU or a CUDA device, got ",
              scores.device());
  const int64_t G = scores.size(0);
  const int64_t n = scores.size(1);
  auto out = torch::empty(scores.sizes(), scores.options().dtype(torch::kBool));
  if (G == 0 || n == 0) return out;
  if (scores.is_cuda()) {
#ifdef MEGATRON_SLM_WITH_CUDA
    const c10::cuda::CUDAGuard guard(scores.device());
    torch::Tensor kk = k.has_value() ? k->to(scores.device()).contiguous() : torch::Tensor();
    // int64 elements: the workspace is 8-byte aligned
    auto workspace = torch::empty(
        {(megatron_slm::cuda::selective_loss_select_workspace_bytes(G, n) + 7) / 8},
        scores.options().dtype(torch::kInt64));
    check_launch(megatron_slm::cuda::selective_loss_select(
                     scores.data_ptr<float>(),
                     reinterpret_cast<const uint8_t*>(eligible.data_ptr<bool>()),
                     kk.defined() ? kk.data_ptr<int64_t>() : nullptr, ratio, G, n,
                     reinterpret_cast<uint8_t*>(out.data_ptr<bool>()),
                     workspace.data_ptr(),
                     c10::cuda::getCurrentCUDAStream(scores.device().index()).stream()),
                 "select");
    return out;
#else
    TORCH_CHECK(false, "megatron_slm._C was built without CUDA kernels");
#endif
  }
  torch::Tensor kc = k.has_value() ? k->contiguous() : torch::Tensor();
  const float* sc = scores.data_ptr<float>();
  const bool* el = eligible.data_ptr<bool>();
  const int64_t* kp = kc.defined() ? kc.data_ptr<int64_t>() : nullptr;
  bool* o = out.data_ptr<bool>();
  at::parallel_for(0, G, G > 1 ? 1 : G, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<float, int64_t>> work;
    work.reserve(static_cast<size_t>(n));
    for (int64_t g = begin; g < end; ++g) {
      select_group(sc + g * n, el + g * n, n, kp != nullptr ? kp[g] : -1, ratio, o + g * n, work);
    }
  });
  return out;
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>
selective_loss_finalize(torch::Tensor stats, torch::Tensor target, int64_t v_global,
                        std::optional<torch::Tensor> ref, std::optional<torch::Tensor> mask,
                        int64_t flags) {
  namespace fin = megatron_slm::finalize;
  TORCH_CHECK(stats.dim() == 2 && stats.size(1) == 3 && stats.scalar_type() == torch::kFloat32 &&
                  stats.is_contiguous(),
              "selective_loss_finalize: stats must be contiguous fp32 [rows, 3]");
  const int64_t N = stats.size(0);
  const auto dev = stats.device();
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N && target.scalar_type() == torch::kInt64 &&
                  target.is_contiguous() && target.device() == dev,
              "selective_loss_finalize: target must be contiguous int64 [rows] on ", dev);
  if (ref) {
    TORCH_CHECK(ref->dim() == 1 && ref->size(0) == N && ref->scalar_type() == torch::kFloat32 &&
                    ref->is_contiguous() && ref->device() == dev,
                "selective_loss_finalize: ref must be contiguous fp32 [rows] on ", dev);
  }
  if (mask) {
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == N && mask->scalar_type() == torch::kBool &&
                    mask->is_contiguous() && mask->device() == dev,
                "selective_loss_finalize: mask must be contiguous bool [rows] on ", dev);
  }
  const auto f32 = stats.options();
  auto loss = torch::empty({N}, f32), lse = torch::empty({N}, f32), score = torch::empty({N}, f32);
  auto eligible = torch::empty({N}, f32.dtype(torch::kBool));
  auto selected = torch::empty({N}, f32.dtype(torch::kBool));
  auto totals = torch::empty({fin::kSums + 1}, f32);
  const float* rp = ref ? ref->data_ptr<float>() : nullptr;
  const uint8_t* mp = mask ? reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>()) : nullptr;
  auto* el = reinterpret_cast<uint8_t*>(eligible.data_ptr<bool>());
  auto* se = reinterpret_cast<uint8_t*>(selected.data_ptr<bool>());
  const int fl = static_cast<int>(flags);
  if (stats.is_cuda()) {
#ifdef MEGATRON_SLM_WITH_CUDA
    const c10::cuda::CUDAGuard guard(dev);
    auto partials = torch::empty(
        {megatron_slm::cuda::selective_loss_finalize_blocks(N) * fin::kSums},
        f32.dtype(torch::kFloat64));
    check_launch(megatron_slm::cuda::selective_loss_finalize(
                     stats.data_ptr<float>(), target.data_ptr<int64_t>(), rp, mp, N, v_global, fl,
                     loss.data_ptr<float>(), lse.data_ptr<float>(), score.data_ptr<float>(), el,
                     se, partials.data_ptr<double>(), totals.data_ptr<float>(),
                     c10::cuda::getCurrentCUDAStream(dev.index()).stream()),
                 "finalize");
    return {loss, lse, score, eligible, selected, totals};
#else
    TORCH_CHECK(false, "megatron_slm._C was built without CUDA kernels");
#endif
  }
  // Rows are cheap (a log each): one sequential pass, sums in row order.
  double acc[fin::kSums] = {};
  const float* st = stats.data_ptr<float>();
  const int64_t* tg = target.data_ptr<int64_t>();
  float* lp = loss.data_ptr<float>();
  float* lsp = lse.data_ptr<float>();
  float* sp = score.data_ptr<float>();
  for (int64_t r = 0; r < N; ++r) {
    fin::finalize_row(st + 3 * r, tg[r], v_global, rp != nullptr, rp ? rp[r] : 0.0f,
                      mp == nullptr || mp[r] != 0, fl, lp + r, lsp + r, sp + r, el + r, se + r,
                      acc);
  }
  float* tp = totals.data_ptr<float>();
  for (int j = 0; j < fin::kSums; ++j) tp[j] = static_cast<float>(acc[j]);
  tp[fin::kTargetsOk] = fin::targets_ok(acc[fin::kBadTargets]);
  return {loss, lse, score, eligible, selected, totals};
}

void selective_loss_add_top(torch::Tensor top, torch::Tensor loss, torch::Tensor selected,
                            torch::Tensor totals) {
  namespace fin = megatron_slm::finalize;
  const int64_t N = loss.numel();
  const auto dev = loss.device();
  TORCH_CHECK(loss.dim() == 1 && loss.scalar_type() == torch::kFloat32 && loss.is_contiguous(),
              "selective_loss_add_top: loss must be contiguous fp32 [rows]");
  for (const auto* t : {&top, &selected}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == N && t->scalar_type() == torch::kBool &&
                    t->is_contiguous() && t->device() == dev,
                "selective_loss_add_top: top and selected must be contiguous bool [rows] on ", dev);
  }
  TORCH_CHECK(totals.dim() == 1 && totals.size(0) == fin::kSums + 1 &&
                  totals.scalar_type() == torch::kFloat32 && totals.is_contiguous() &&
                  totals.device() == dev,
              "selective_loss_add_top: totals must be contiguous fp32 [", fin::kSums + 1, "] on ",
              dev);
  const auto* tp = reinterpret_cast<const uint8_t*>(top.data_ptr<bool>());
  auto* se = reinterpret_cast<uint8_t*>(selected.data_ptr<bool>());
  const float* lp = loss.data_ptr<float>();
  if (dev.is_cuda()) {
#ifdef MEGATRON_SLM_WITH_CUDA
    const c10::cuda::CUDAGuard guard(dev);
    check_launch(megatron_slm::cuda::selective_loss_add_top(
                     tp, lp, N, se, totals.data_ptr<float>(),
                     c10::cuda::getCurrentCUDAStream(dev.index()).stream()),
                 "add_top");
    return;
#else
    TORCH_CHECK(false, "megatron_slm._C was built without CUDA kernels");
#endif
  }
  double n = 0.0, sum = 0.0;
  for (int64_t r = 0; r < N; ++r) {
    if (tp[r] == 0) continue;
    se[r] = 1;
    n += 1.0;
    sum += static_cast<double>(lp[r]);
  }
  fin::add_top_sums(totals.data_ptr<float>(), n, sum);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef MEGATRON_SLM_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("selective_loss_fwd_stats", &selective_loss_fwd_stats,
        "Per-row {max, sumexp, target logit} of a vocab shard (one pass)", py::arg("logits"),
        py::arg("target"), py::arg("vocab_start"));
  m.def("selective_loss_backward", &selective_loss_backward,
        "(softmax - onehot) * scale in the logits dtype; zero rows are not read",
        py::arg("logits"), py::arg("target"), py::arg("vocab_start"), py::arg("lse"),
        py::arg("scale"), py::arg("inplace"));
  m.def("selective_loss_select", &selective_loss_select,
        "Exact per-group top-k (ties by lower index) with std::nth_element; k None: derived from "
        "the ratio and each group's eligible count",
        py::arg("scores"), py::arg("eligible"), py::arg("k") = py::none(), py::arg("ratio") = -1.0);
  m.def("selective_loss_finalize", &selective_loss_finalize,
        "Per-row loss/lse/score/selection flags and the op's statistics from combined row stats",
        py::arg("stats"), py::arg("target"), py::arg("v_global"), py::arg("ref"), py::arg("mask"),
        py::arg("flags"));
  m.def("selective_loss_add_top", &selective_loss_add_top,
        "ratio < 1: the top-k rows join the selection and its statistics (in place)",
        py::arg("top"), py::arg("loss"), py::arg("selected"), py::arg("totals"));
  // the fused SwiGLU (csrc/swiglu.cpp): one module for the extension's ops
  m.def("swiglu_forward", &swiglu_forward, "silu(x[..., :f]) * x[..., f:] in one pass",
        py::arg("x"));
  m.def("swiglu_backward", &swiglu_backward, "dx[..., 2f] of the fused SwiGLU in one pass",
        py::arg("dy"), py::arg("x"));
  // the fused RoPE (csrc/rope.cpp)
  m.def("rope", &rope,
        "megatron-core's rotate_half RoPE of x [s, b, heads, d] with fp32 cos/sin [s, d] in one "
        "pass (backward: the transposed rotation of the output's gradient)",
        py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("backward"));
  m.attr("FINALIZE_RANK_EXCESS") = megatron_slm::finalize::kRankExcess;
  m.attr("FINALIZE_KEEP_UNSCORED") = megatron_slm::finalize::kKeepUnscored;
  m.attr("FINALIZE_SELECT_ALL") = megatron_slm::finalize::kSelectAll;
}
