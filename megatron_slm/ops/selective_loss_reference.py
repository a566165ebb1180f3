"""Pure-PyTorch pieces of the selective loss op.

Two kinds of code live here:

* ``torch_*`` kernels: drop-in replacements of the ``megatron_slm._C`` kernels (same inputs and
  outputs), used by :func:`megatron_slm.ops.selective_cross_entropy` with ``impl="torch"`` and as
  the fallback when the extension is not built. They process rows in blocks so that no full
  ``[tokens, vocab]`` fp32 temporary is created.
* ``reference_*``: a deliberately simple, autograd-based implementation of the whole op on the
  full (unsharded) vocabulary, used by the tests as the ground truth. Its selection is a plain
  Python sort, independent of the kernels above.

Selection semantics (shared by every implementation; see ``selective_loss.py`` for the full
contract): among *scored* tokens keep ``k = floor(ratio * n_scored + 0.5)`` (at least one when any
token is scored) with the highest score; ties go to the lower position; NaN scores rank lowest.
"""

from __future__ import annotations

import math

import torch

_ROW_BLOCK = 256  # rows per block in the torch kernels (bounds the fp32 temporaries)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------
def _num_to_keep_t(ratio: float, n_scored: torch.Tensor) -> torch.Tensor:
    """Vectorized :func:`num_to_keep` (int64, on the counts' device: nothing is read back)."""
    n = n_scored.to(torch.int64)
    k = torch.floor(ratio * n.double() + 0.5).to(torch.int64)
    return torch.minimum(torch.clamp(k, min=1), n)


def num_to_keep(ratio: float, n_scored: int) -> int:
    """``round(ratio * n_scored)`` (half up), at least 1 when ``n_scored > 0``."""
    if n_scored <= 0:
        return 0
    if ratio >= 1.0:
        return n_scored
    k = int(math.floor(ratio * n_scored + 0.5))
    return min(max(k, 1), n_scored)


def random_scores(shape, seed: int, dp_rank: int = 0) -> torch.Tensor:
    """Scores of ``mode="random"``: uniform [0, 1) from a CPU generator seeded with
    ``seed + dp_rank`` (identical on every tensor-parallel rank, reproducible across runs)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed) + int(dp_rank))
    return torch.rand(tuple(shape), generator=gen, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# torch kernels (same contract as the C++/CUDA ones)
# --------------------------------------------------------------------------------------------
def torch_fwd_stats(logits: torch.Tensor, target: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """Per row of ``logits[N, V]``: ``{max, sum exp(x - max), target logit or 0}`` as ``[N, 3]``.

    An all -inf row gives ``{-inf, 0, ...}`` (not the NaN of ``exp(-inf - -inf)``), as the C++ and
    CUDA kernels do: another shard's stats then combine correctly, and the loss of a row that is
    -inf everywhere is NaN like :func:`reference_token_loss`'s. A row with NaN: max of the
    non-NaN entries, sum NaN (the kernels' rule)."""
    n, v = logits.shape
    stats = torch.empty(n, 3, dtype=torch.float32, device=logits.device)
    local = target - vocab_start
    in_shard = (local >= 0) & (local < v)
    local = torch.where(in_shard, local, torch.zeros_like(local))
    for r0 in range(0, n, _ROW_BLOCK):
        r1 = min(n, r0 + _ROW_BLOCK)
        x = logits[r0:r1].float()
        # The kernels' NaN rule: the max ignores NaN (-inf if every entry is NaN), any NaN makes
        # the sum NaN (csrc/selective_loss_kernels.h).
        nan = torch.isnan(x)
        m = torch.where(nan, -math.inf, x).amax(dim=-1)
        s = torch.exp(x - m.unsqueeze(-1)).sum(dim=-1)
        s = torch.where((m == -math.inf) & ~nan.any(dim=-1), torch.zeros_like(s), s)
        t = x.gather(1, local[r0:r1].unsqueeze(-1)).squeeze(-1)
        stats[r0:r1, 0] = m
        stats[r0:r1, 1] = s
        stats[r0:r1, 2] = torch.where(in_shard[r0:r1], t, torch.zeros_like(t))
    return stats


# Flags of the finalize kernels (csrc/selective_loss_finalize.h).
FINALIZE_RANK_EXCESS = 1  # score = loss - ref; valid rows with a non-finite ref are unscored
FINALIZE_KEEP_UNSCORED = 2  # unscored valid rows are always selected
FINALIZE_SELECT_ALL = 4  # ratio 1: every scored row is selected


def torch_finalize(stats, target, v_global: int, ref, mask, flags: int):
    """The per-row epilogue of the op from combined row stats ``[N, 3]``: ``(loss, lse, score,
    eligible, selected, totals)`` with ``totals[8] = {n_valid, n_scored, n_selected, loss_sum,
    selected_loss_sum, excess_sum, n_bad_targets, targets_ok}`` (fp32; sums taken in float64;
    ``targets_ok`` is 1 when ``n_bad_targets`` is 0, else 0). Same
    arithmetic as the C++/CUDA kernels: ``log`` in float64 rounded once, then ``+ max``."""
    lse = torch.log(stats[:, 1].double()).float() + stats[:, 0]
    loss = lse - stats[:, 2]
    valid = torch.ones_like(loss, dtype=torch.bool) if mask is None else mask
    finite = torch.isfinite(ref) if ref is not None else torch.zeros_like(valid)
    excess = loss - ref if ref is not None else loss
    rank_excess = bool(flags & FINALIZE_RANK_EXCESS)
    scored = valid & finite if rank_excess else valid
    unscored = valid & ~finite if rank_excess else torch.zeros_like(valid)
    selected = scored & bool(flags & FINALIZE_SELECT_ALL)
    selected = selected | (unscored & bool(flags & FINALIZE_KEEP_UNSCORED))
    zero = torch.zeros_like(loss, dtype=torch.float64)
    ld = loss.double()
    bad_targets = ((target < 0) | (target >= v_global)).double().sum()
    totals = torch.stack(
        [
            valid.double().sum(),
            scored.double().sum(),
            selected.double().sum(),
            torch.where(valid, ld, zero).sum(),
            torch.where(selected, ld, zero).sum(),
            torch.where(valid & finite, excess.double(), zero).sum(),
            bad_targets,
            (bad_targets == 0).double(),
        ]
    ).float()
    score = excess if rank_excess else loss
    return loss, lse, score.contiguous(), scored, selected, totals


def torch_add_top(top, loss, selected, totals) -> None:
    """Ratio < 1: ``selected |= top``; ``totals``' n_selected and selected_loss_sum grow by the
    top rows' count and loss sum (float64 sums, one rounding each). In place, as the kernels."""
    selected |= top
    sums = torch.stack([top.double().sum(), torch.where(top, loss.double(), 0.0).sum()])
    totals[2:5:2] = (totals[2:5:2].double() + sums).float()


def torch_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    vocab_start: int,
    lse: torch.Tensor,
    scale: torch.Tensor,
    inplace: bool,
) -> torch.Tensor:
    """``(softmax - onehot) * scale`` in the logits dtype; rows with zero scale are exactly zero
    (even where their logits are NaN); written into ``logits`` when ``inplace``."""
    n, v = logits.shape
    grad = logits if inplace else torch.empty_like(logits)
    # Every row is computed and zero-scale rows are masked, rather than gathering the active
    # rows: a row list would be read back to the host (a sync per call on a GPU).
    local = target - vocab_start
    in_shard = (local >= 0) & (local < v)
    for i0 in range(0, n, _ROW_BLOCK):
        rows = slice(i0, i0 + _ROW_BLOCK)
        g = torch.exp(logits[rows].float() - lse[rows].unsqueeze(-1))  # [rows, v]
        hit = in_shard[rows]
        g.scatter_add_(1, local[rows].clamp(0, v - 1).unsqueeze(-1), -hit.float().unsqueeze(-1))
        s = scale[rows].unsqueeze(-1)
        grad[rows] = torch.where(s != 0, g * s, 0.0).to(logits.dtype)
    return grad


def torch_select(
    scores: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor | None = None, ratio: float = -1.0
) -> torch.Tensor:
    """Exact top-k per row of ``scores[G, n]`` among ``eligible``; ties by lower index. With
    ``k=None``, each row's k is :func:`num_to_keep` of ``ratio`` and its eligible count (as the
    compiled kernels derive it)."""
    g, n = scores.shape
    if g == 0 or n == 0:
        return torch.zeros_like(eligible)
    if k is None:
        k = _num_to_keep_t(ratio, eligible.sum(dim=1))
    key = (-scores.double()).nan_to_num(nan=1e300, posinf=1e300)
    key = torch.where(eligible, key, torch.full_like(key, math.inf))
    order = torch.sort(key, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=scores.device).expand(g, n).contiguous())
    return (rank < k.to(scores.device).unsqueeze(1)) & eligible


# --------------------------------------------------------------------------------------------
# Reference (tests): full vocabulary, autograd, Python-sort selection
# --------------------------------------------------------------------------------------------
def reference_select(scores, eligible, k: int) -> list[bool]:
    """Top-k of a flat list by (score desc, index asc); NaN ranks lowest."""
    scores = [float(x) for x in torch.as_tensor(scores).reshape(-1).tolist()]
    eligible = [bool(x) for x in torch.as_tensor(eligible).reshape(-1).tolist()]
    cand = [
        (-math.inf if math.isnan(s) else s, i) for i, (s, e) in enumerate(zip(scores, eligible))
    ]
    cand = [c for c, e in zip(cand, eligible) if e]
    cand.sort(key=lambda c: (-c[0], c[1]))
    out = [False] * len(scores)
    for _, i in cand[:k]:
        out[i] = True
    return out


def reference_scores_and_masks(loss, ref_loss, loss_mask, mode, seed=0, dp_rank=0):
    """(score, scored, unscored, valid) tensors of the selection, all ``loss``-shaped."""
    valid = torch.ones_like(loss, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    if mode == "excess" and ref_loss is not None:
        finite = torch.isfinite(ref_loss.float())
        scored = valid & finite
        unscored = valid & ~finite
        score = loss - ref_loss.float()
    else:
        scored = valid
        unscored = torch.zeros_like(valid)
        if mode == "random":
            score = random_scores(loss.shape, seed, dp_rank).to(loss.device)
        else:
            score = loss.clone()
    return score, scored, unscored, valid


def reference_selection(
    loss, ref_loss, loss_mask, ratio, scope, mode, unscored="keep", seed=0, dp_rank=0
):
    """Selection mask of one rank (scopes ``sequence`` and ``microbatch``)."""
    score, scored, uns, _ = reference_scores_and_masks(
        loss.detach(), ref_loss, loss_mask, mode, seed, dp_rank
    )
    sel = torch.zeros_like(scored)
    if scope == "sequence":
        for j in range(loss.shape[1]):
            k = num_to_keep(ratio, int(scored[:, j].sum()))
            sel[:, j] = torch.tensor(reference_select(score[:, j], scored[:, j], k))
    else:
        k = num_to_keep(ratio, int(scored.sum()))
        sel = torch.tensor(reference_select(score, scored, k)).reshape(loss.shape)
    if unscored == "keep":
        sel = sel | uns
    return sel


def reference_token_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy over the full vocabulary, fp32, differentiable."""
    x = logits.float()
    return torch.logsumexp(x, dim=-1) - x.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)


def reference_selective_cross_entropy(
    logits,
    target,
    *,
    ref_loss=None,
    loss_mask=None,
    ratio=1.0,
    scope="microbatch",
    mode="excess",
    unscored="keep",
    seed=0,
    selected=None,
):
    """(loss, selected): loss carries gradient only for selected tokens (like the op).

    ``selected`` may be given (e.g. a data-parallel selection computed by the test)."""
    loss = reference_token_loss(logits, target)
    if selected is None:
        selected = reference_selection(
            loss, ref_loss, loss_mask, ratio, scope, mode, unscored, seed
        )
    selected = selected.to(loss.device)
    gated = loss.detach() + (loss - loss.detach()) * selected.float()
    return gated, selected
