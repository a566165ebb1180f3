"""Fused selective loss: vocab-parallel per-token cross entropy with top-k token selection.

:func:`selective_cross_entropy` is a drop-in for
``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` (logits ``[s, b, v/tp]`` = this
rank's vocabulary shard, target ``[s, b]`` global ids, same per-token loss for any TP size) that
also selects the tokens to train on (Selective Language Modeling, Rho-1).

Selection contract
------------------
* *valid* tokens: ``loss_mask == 1`` (all tokens when ``loss_mask`` is None).
* *scored* tokens: valid tokens that take part in the ranking. In ``mode="excess"`` these are the
  valid tokens whose reference loss is finite; in ``"loss"`` and ``"random"`` all valid tokens.
* *unscored* tokens (``excess`` mode only): valid tokens whose reference loss is NaN/inf (e.g. the
  first token of a document). ``unscored="keep"`` always selects them (on top of the top-k),
  ``unscored="drop"`` never does. They do not count in ``n_scored`` nor in ``k``.
* Per scope group, ``k = floor(ratio * n_scored + 0.5)`` (round half up), at least 1 when the group
  has a scored token; exactly ``k`` scored tokens with the highest score are selected. Ties go to
  the lower position: flat index of the ``[s, b]`` tensor (row-major) for ``microbatch``, position
  ``s`` for ``sequence``, and (DP rank, flat index) for ``data-parallel``. NaN scores rank lowest.
* Scores: ``excess`` = loss - ref_loss; ``loss`` = loss; ``random`` = uniform numbers from a CPU
  generator seeded with ``seed + dp_rank`` (reproducible; pass e.g. ``base_seed + iteration`` to
  draw a new subset each step).
* Scopes: ``sequence`` (each column ``b`` of ``[s, b]`` separately), ``microbatch`` (the whole
  tensor), ``data-parallel`` (one threshold for the whole DP group: the per-token scores, never
  logits, are all-gathered, every rank computes the global top-k of the concatenation and keeps
  its own slice; all DP ranks must pass the same ``[s, b]`` shape).
* ``ratio == 1`` selects every scored token (and the unscored ones with ``keep``): plain cross
  entropy over the valid tokens.
* In ``excess`` mode without ``ref_loss`` only ``ratio == 1`` is allowed (all valid tokens scored).

Outputs
-------
``SelectiveLossOutput(loss, selected, stats)``:

* ``loss`` ``[s, b]`` fp32, cross entropy of *every* token (masked ones included, for logging).
  It is differentiable w.r.t. the logits, but the gradient flowing back is multiplied by
  ``selected``: rows not selected get exactly zero gradient and their logits are not read in
  backward. The training loss is ``(loss * selected).sum() / n_selected`` (see
  :func:`selective_loss_mean`).
* ``selected`` ``[s, b]`` bool.
* ``stats``: 0-dim fp32 tensors for logging, local to this rank (identical on all TP ranks):
  ``n_valid``, ``n_scored``, ``n_selected``, ``loss_sum`` (over valid), ``selected_loss_sum``,
  ``excess_sum`` (loss - ref over valid tokens with a finite reference; 0 without ``ref_loss``).

Tensor parallelism: each rank computes ``{max, sum exp, target logit}`` per row over its shard in
one pass; the ``[rows, 3]`` stats are combined with a single ``all_gather`` (one collective).
Backward needs no communication.

Fixed cost: one *finalize* kernel derives loss, lse, the score, the scored/selected flags and all
statistics from the combined row stats (no selection pass at ratio 1), and nothing is read back
to the host: the select kernel derives ``k`` from each group's eligible count, one *add_top*
kernel joins the top rows to the selection and its statistics, and target ids are checked with a
device-side assert on the finalize's ``targets_ok`` total.

Implementations (``impl``): ``"cpp"`` (``megatron_slm._C`` CPU kernels), ``"cuda"`` (CUDA kernels
in ``_C``), ``"torch"`` (pure PyTorch, :mod:`.selective_loss_reference`), ``"auto"`` (the compiled
kernel for the tensor's device when built, else torch).

``inplace_backward=True`` writes the gradient into the logits buffer (like megatron-core's fused
cross entropy): the logits must not be used after backward.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_slm import _extension
from megatron_slm.ops import selective_loss_reference as _ref
from megatron_slm.ops.selection import SELECT_MODES as _MODES
from megatron_slm.ops.selection import SELECT_SCOPES as _SCOPES
from megatron_slm.ops.selection import UNSCORED_POLICIES as _UNSCORED
from megatron_slm.ops.selection import needs_reference, ranks_by_excess, ratio_error

_IMPLS = ("auto", "cpp", "cuda", "torch")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STAT_NAMES = (
    "n_valid",
    "n_scored",
    "n_selected",
    "loss_sum",
    "selected_loss_sum",
    "excess_sum",
)


class SelectiveLossOutput(NamedTuple):
    loss: torch.Tensor
    selected: torch.Tensor
    stats: dict


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
class _Kernels(NamedTuple):
    fwd_stats: object
    backward: object
    select: object
    finalize: object
    add_top: object
    name: str


_TORCH_KERNELS = _Kernels(
    _ref.torch_fwd_stats,
    _ref.torch_backward,
    _ref.torch_select,
    _ref.torch_finalize,
    _ref.torch_add_top,
    "torch",
)


def _compiled_kernels(name: str) -> _Kernels:
    c = _extension._C
    return _Kernels(
        c.selective_loss_fwd_stats,
        c.selective_loss_backward,
        c.selective_loss_select,
        c.selective_loss_finalize,
        c.selective_loss_add_top,
        name,
    )


def _pick_kernels(impl: str, device: torch.device) -> _Kernels:
    if impl == "torch":
        return _TORCH_KERNELS
    if impl == "cpp":
        if device.type != "cpu":
            raise ValueError(f"impl='cpp' needs CPU tensors, got {device}")
        if not _extension.HAS_C:
            raise RuntimeError("impl='cpp' requested but megatron_slm._C is not built")
        return _compiled_kernels("cpp")
    if impl == "cuda":
        if device.type != "cuda":
            raise ValueError(f"impl='cuda' needs CUDA tensors, got {device}")
        if not _extension.HAS_CUDA_KERNELS:
            raise RuntimeError("impl='cuda' requested but megatron_slm._C has no CUDA kernels")
        return _compiled_kernels("cuda")
    # auto
    _extension.report_once()
    if device.type == "cpu" and _extension.HAS_C:
        return _compiled_kernels("cpp")
    if device.type == "cuda" and _extension.HAS_CUDA_KERNELS:
        return _compiled_kernels("cuda")
    return _TORCH_KERNELS


def compiled_kernels_for(device: torch.device) -> str | None:
    """``"cpp"`` or ``"cuda"``: the compiled kernels ``impl="auto"`` runs on ``device``; None where
    it would run the pure-PyTorch reference (no ``megatron_slm._C``, or built without CUDA)."""
    kernels = _pick_kernels("auto", torch.device(device))
    return None if kernels is _TORCH_KERNELS else kernels.name


# --------------------------------------------------------------------------------------------
# Process groups
# --------------------------------------------------------------------------------------------
def _megatron_state():
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return parallel_state
    except Exception:  # noqa: BLE001 - megatron missing or half-initialized: no default groups
        pass
    return None


def _resolve_tp_group(tp_group):
    if tp_group is None:
        ps = _megatron_state()
        if ps is None:
            return None, 1, 0
        tp_group = ps.get_tensor_model_parallel_group()
    if not dist.is_available() or not dist.is_initialized():
        return None, 1, 0
    size = dist.get_world_size(group=tp_group)
    if size == 1:
        return None, 1, 0
    return tp_group, size, dist.get_rank(group=tp_group)


def _resolve_dp_group(dp_group):
    if dp_group is None:
        ps = _megatron_state()
        if ps is None:
            return None, 1, 0
        dp_group = ps.get_data_parallel_group()
    if not dist.is_available() or not dist.is_initialized():
        return None, 1, 0
    return dp_group, dist.get_world_size(group=dp_group), dist.get_rank(group=dp_group)


# --------------------------------------------------------------------------------------------
# Forward pieces
# --------------------------------------------------------------------------------------------
# Launch budget (what a GPU pays per call, and why the epilogue is one kernel): fwd_stats, the
# finalize kernel (loss, lse, score, flags and every statistic; 2 launches), the target check
# (2), and at ratio < 1 the top-k pass; backward: the scale (1) and the gradient kernel.
# tests/unit/ops/test_selective_loss.py counts the aten calls so that a regression shows on CPU.


def _combine_tp(stats: torch.Tensor, tp_group, tp_size: int) -> torch.Tensor:
    """Per-shard ``[N, 3]`` row stats -> the whole vocabulary's ``{max, sumexp, target logit}``
    (one all_gather)."""
    if tp_size == 1:
        return stats
    parts = [torch.empty_like(stats) for _ in range(tp_size)]
    dist.all_gather(parts, stats.contiguous(), group=tp_group)
    allst = torch.stack(parts)  # [tp, N, 3]
    m = allst[..., 0].max(dim=0).values
    scale = torch.exp(allst[..., 0] - m)
    scale = torch.where(allst[..., 1] > 0, scale, torch.zeros_like(scale))
    s = (allst[..., 1] * scale).sum(dim=0)
    t = allst[..., 2].sum(dim=0)
    return torch.stack([m, s, t], dim=1).contiguous()


def _finalize_flags(mode: str, has_ref: bool, unscored: str, ratio: float) -> int:
    rank_excess = ranks_by_excess(mode, has_ref)
    return (
        (_ref.FINALIZE_RANK_EXCESS if rank_excess else 0)
        | (_ref.FINALIZE_KEEP_UNSCORED if rank_excess and unscored == "keep" else 0)
        | (_ref.FINALIZE_SELECT_ALL if ratio >= 1.0 else 0)
    )


def _top_k(score, eligible, shape, cfg, kernels) -> torch.Tensor:
    """The top-k selection ``[N]`` bool of the scored rows (ratio < 1) for the config's scope."""
    ratio, scope, mode = cfg["ratio"], cfg["scope"], cfg["mode"]
    dp_group, dp_size, dp_rank = cfg["dp_info"]
    if mode == "random":
        score = _ref.random_scores(shape, cfg["seed"], dp_rank if scope == "data-parallel" else 0)
        # drawn on the host (the same draw on every device); not a blocking copy (from pageable
        # memory CUDA stages it, which may still wait on the stream: an ablation mode)
        score = score.to(eligible.device, non_blocking=True).reshape(-1)
    # k of each group is derived by the select kernel from its eligible count (no launches here)
    if scope == "sequence":
        if len(shape) != 2:
            raise ValueError("scope='sequence' needs [s, b] inputs")
        sc = score.view(shape).t().contiguous()  # [b, s]: one group per sequence
        el = eligible.view(shape).t().contiguous()
        return kernels.select(sc, el, None, ratio).t().reshape(-1)
    if scope == "microbatch" or dp_size == 1:
        return kernels.select(score.view(1, -1), eligible.view(1, -1), None, ratio).view(-1)
    # data-parallel: exchange per-token scores and eligibility (one all_gather)
    n = score.numel()
    packed = torch.stack([score.float(), eligible.float()])
    parts = [torch.empty_like(packed) for _ in range(dp_size)]
    dist.all_gather(parts, packed.contiguous(), group=dp_group)
    allp = torch.cat(parts, dim=1)  # [2, dp * n], rank-major
    sc = allp[0].reshape(1, -1).contiguous()
    el = (allp[1] > 0.5).reshape(1, -1).contiguous()
    return kernels.select(sc, el, None, ratio)[0, dp_rank * n : (dp_rank + 1) * n]


class _SelectiveCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ref_loss, loss_mask, cfg):
        # selected and stats get no gradient: no zeros are made for them (two launches a call)
        ctx.set_materialize_grads(False)
        kernels = cfg["kernels"]
        v_local = logits.shape[-1]
        vocab_start = cfg["tp_rank"] * v_local
        logits2d = logits.reshape(-1, v_local)
        if not logits2d.is_contiguous():
            logits2d = logits2d.contiguous()
        target1d = target.reshape(-1).to(torch.int64).contiguous()
        ref1d = None if ref_loss is None else ref_loss.reshape(-1).to(torch.float32).contiguous()
        mask1d = None if loss_mask is None else loss_mask.reshape(-1).to(torch.bool).contiguous()

        stats = _combine_tp(
            kernels.fwd_stats(logits2d, target1d, vocab_start), cfg["tp_group"], cfg["tp_size"]
        )
        flags = _finalize_flags(cfg["mode"], ref1d is not None, cfg["unscored"], cfg["ratio"])
        v_global = v_local * cfg["tp_size"]
        loss1d, lse, score, eligible, selected, totals = kernels.finalize(
            stats, target1d, v_global, ref1d, mask1d, flags
        )
        _check_targets(totals, target1d, v_global, v_local, cfg["tp_size"])
        if cfg["ratio"] < 1.0:
            top = _top_k(score, eligible, tuple(target.shape), cfg, kernels)
            # selected held the always-kept unscored rows; the top rows join it and its sums
            kernels.add_top(top, loss1d, selected, totals)
        loss = loss1d.view(target.shape)
        selected = selected.view(target.shape)
        st = totals[: len(_STAT_NAMES)]
        ctx.save_for_backward(logits2d, target1d, lse, selected)
        ctx.kernels = kernels
        ctx.vocab_start = vocab_start
        ctx.inplace = cfg["inplace_backward"]
        ctx.logits_shape = logits.shape
        ctx.mark_non_differentiable(selected, st)
        return loss, selected, st

    @staticmethod
    def backward(ctx, grad_loss, grad_selected, grad_stats):
        logits2d, target1d, lse, selected = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        if grad_loss is None:
            scale = torch.zeros(target1d.shape, dtype=torch.float32, device=logits2d.device)
        else:
            scale = (grad_loss.to(torch.float32) * selected).reshape(-1).contiguous()
        grad = ctx.kernels.backward(logits2d, target1d, ctx.vocab_start, lse, scale, ctx.inplace)
        return grad.view(ctx.logits_shape), None, None, None, None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _check_inputs(logits, target, ref_loss, loss_mask, ratio, scope, mode, unscored, impl):
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError("vocab_parallel_logits and target must be tensors")
    if ratio_error(ratio, "ratio"):
        raise ValueError(ratio_error(ratio, "ratio"))
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if unscored not in _UNSCORED:
        raise ValueError(f"unscored must be one of {_UNSCORED}, got {unscored!r}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if logits.dtype not in _DTYPES:
        raise ValueError(f"logits dtype must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() < 2 or logits.shape[-1] == 0:
        raise ValueError(
            f"logits must be [..., vocab_shard] with a non-empty shard: {logits.shape}"
        )
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"shape mismatch: target {tuple(target.shape)} vs logits {tuple(logits.shape)} "
            "(expected target == logits.shape[:-1])"
        )
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor, got {target.dtype}")
    for name, t in (("ref_loss", ref_loss), ("loss_mask", loss_mask)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor or None")
        if tuple(t.shape) != tuple(target.shape):
            raise ValueError(
                f"shape mismatch: {name} {tuple(t.shape)} vs target {tuple(target.shape)}"
            )
    if ref_loss is not None and not ref_loss.dtype.is_floating_point:
        raise ValueError(f"ref_loss must be floating point, got {ref_loss.dtype}")
    if needs_reference(ratio, mode) and ref_loss is None:
        raise ValueError("mode='excess' with ratio < 1 needs ref_loss (the reference-model loss)")
    if scope == "sequence" and target.dim() != 2:
        raise ValueError("scope='sequence' needs [s, b] target")


CHECK_TARGETS_ENV = "MEGATRON_SLM_CHECK_TARGETS"


def _check_targets(totals, target1d, v_global: int, v_local: int, tp_size: int) -> None:
    """Target ids must lie in the global vocabulary (the finalize kernel counted the others; the
    row kernels never read outside the shard). The check stays on the device: a device-side
    assert, reported at the next sync on a GPU and at once on the CPU, where the full message
    follows. ``MEGATRON_SLM_CHECK_TARGETS=1`` asks for the eager, synchronising check on GPU."""
    eager = target1d.device.type != "cpu" and os.environ.get(CHECK_TARGETS_ENV) == "1"
    if not eager:
        try:
            torch._assert_async(totals[7], f"target ids outside [0, {v_global})")  # targets_ok
            return
        except RuntimeError:
            if target1d.device.type != "cpu":
                raise
    lo, hi = (int(x) for x in torch.aminmax(target1d))
    if lo < 0 or hi >= v_global:
        raise ValueError(
            f"target ids must be in [0, {v_global}) (global vocabulary = {v_local} "
            f"x TP {tp_size}), got min {lo}, max {hi}"
        )


def selective_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ref_loss: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    ratio: float = 1.0,
    scope: str = "microbatch",
    mode: str = "excess",
    unscored: str = "keep",
    tp_group=None,
    dp_group=None,
    seed: int = 0,
    impl: str = "auto",
    inplace_backward: bool = False,
) -> SelectiveLossOutput:
    """Vocab-parallel per-token cross entropy plus top-k token selection (see module doc)."""
    logits = vocab_parallel_logits
    _check_inputs(logits, target, ref_loss, loss_mask, ratio, scope, mode, unscored, impl)
    tp_group, tp_size, tp_rank = _resolve_tp_group(tp_group)
    dp_info = _resolve_dp_group(dp_group) if scope == "data-parallel" else (None, 1, 0)
    if ref_loss is not None:
        ref_loss = ref_loss.to(device=logits.device)
    if loss_mask is not None:
        loss_mask = loss_mask.to(device=logits.device)
    cfg = dict(
        kernels=_pick_kernels(impl, logits.device),
        tp_group=tp_group,
        tp_size=tp_size,
        tp_rank=tp_rank,
        dp_info=dp_info,
        ratio=float(ratio),
        scope=scope,
        mode=mode,
        unscored=unscored,
        seed=int(seed),
        inplace_backward=bool(inplace_backward),
    )
    loss, selected, st = _SelectiveCrossEntropy.apply(logits, target, ref_loss, loss_mask, cfg)
    stats = {name: st[i] for i, name in enumerate(_STAT_NAMES)}
    return SelectiveLossOutput(loss, selected, stats)


class _SelectedMean(torch.autograd.Function):
    """``sum(loss over selected) / n`` from the op's own ``selected_loss_sum``: the forward
    launches no product and no sum over the rows; the gradient is ``selected / n``."""

    @staticmethod
    def forward(ctx, loss, selected, selected_loss_sum, n):
        n = n.clamp(min=1.0)
        ctx.save_for_backward(selected, n)
        return selected_loss_sum / n

    @staticmethod
    def backward(ctx, grad):
        selected, n = ctx.saved_tensors
        return selected * (grad / n), None, None, None


def selective_loss_mean(out: SelectiveLossOutput, n_selected=None) -> torch.Tensor:
    """Training loss ``sum(loss over selected) / n_selected`` (``n_selected`` defaults to this
    rank's count; pass the DP-reduced count for a global mean). Zero when nothing is selected.
    The sum is the op's ``selected_loss_sum`` (float64 sums): rows not selected never enter it,
    not even as ``NaN * 0``."""
    n = out.stats["n_selected"] if n_selected is None else n_selected
    n = torch.as_tensor(n, dtype=torch.float32, device=out.loss.device)
    return _SelectedMean.apply(out.loss, out.selected, out.stats["selected_loss_sum"], n)
