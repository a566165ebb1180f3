"""The optimizer and the gradient path of a step, without host synchronisations.

megatron-core's ``optimizer.step()`` reads the global gradient norm back to the host to decide
whether to clip (``clip_grad_norm`` → ``.item()``), ``finalize_model_grads`` tests
``if num_tokens > 0`` before dividing the gradients by the token count, and torch's non-fused
Adam reads each parameter's step count (``_get_value(step)``). Each is a host wait per step.
Here:

* :func:`finalize_grads` is megatron-core's ``finalize_model_grads`` with the per-token scaling
  on the device (``1 / max(num_tokens, 1)``: with no token the gradients are zero either way);
* :class:`OptimizerStep` runs megatron-core's own stages, ``prepare_grads`` →
  clip → ``step_with_ready_grads``, with the clip coefficient computed and applied on the device
  (``min(1, clip / (norm + 1e-6))``, a multiply by 1.0 being exact) and no zero count;
* :func:`use_fused_adam` switches torch's Adam to its fused kernel (step counts on the device);
* a step whose global gradient norm is not finite is skipped on the device: the fused kernel's
  ``found_inf`` input (the flag torch's own ``GradScaler`` passes it) leaves the weights, Adam's
  moments and its step count as they were, with no host read. :class:`NonFiniteSteps` tells the
  host at log steps and before saves (Megatron-LM's ``--check-for-nan-in-loss-and-grad``).

fp16 keeps megatron-core's dynamic loss scaler: ``prepare_grads`` reads the found-inf flag on the
host, because skipping the update and backing off the scale are host decisions; fp16 therefore
still syncs once per step. bf16 and fp32 have no grad scaler and do not.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel.utils import get_pp_last_rank

from megatron_slm.errors import CheckpointError, ConfigError, DivergenceError
from megatron_slm.models.pipeline_layout import canonical_layout
from megatron_slm.models.presets import virtual_pipeline_size
from megatron_slm.optimizer_state import DP_RESHARDABLE, FULLY_RESHARDABLE, optimizer_parts
from megatron_slm.training.config import (
    LOSS_SCALE_FIELDS,
    LR_DECAY_STYLES,
    WD_INCR_STYLES,
    WSD_DECAY_STYLES,
    PretrainConfig,
    schedule_steps,
)
from megatron_slm.training.muon import Muon, build_muon_optimizer

logger = logging.getLogger(__name__)


def optimizer_layout(cfg: PretrainConfig, data_parallel_size: int, num_layers: int) -> dict:
    """What a checkpoint's optimizer state depends on beyond the model. ``format`` is the
    distributed optimizer's (``optimizer_state``): per gradient bucket by default
    ("dp_reshardable", Megatron-LM's default), so resuming it needs the same optimizer, TP, PP
    (and virtual stages) and buckets, only DP may change; per parameter with
    --dist-ckpt-optim-fully-reshardable, any layout.
    ``bucket_size`` is megatron-core's: none without --overlap-grad-reduce (one bucket), else
    --ddp-bucket-size or max(40M, 1M x DP), or none with ``num_buckets`` (--ddp-num-buckets:
    the size follows from the rank's parameters, fixed by the model and TP/PP, recorded too);
    ``pad_buckets``: --ddp-pad-buckets-for-high-nccl-busbw (other padding, other shards).
    ``virtual_pipeline_size``: the model chunks per pipeline rank (None: one), whichever flag
    gave them; the stage split is the one --account-for-*-in-pipeline-split gives, or the
    --pipeline-model-parallel-layout written out."""
    p = cfg.parallel
    bucket = num_buckets = None
    if p.use_distributed_optimizer and p.overlap_grad_reduce:
        num_buckets = p.ddp_num_buckets
        if num_buckets is None:
            bucket = p.ddp_bucket_size or max(40_000_000, 1_000_000 * data_parallel_size)
    sharding = None
    if p.use_distributed_optimizer:
        sharding = FULLY_RESHARDABLE if p.dist_ckpt_optim_fully_reshardable else DP_RESHARDABLE
    first_stage_layers, last_stage_layers = p.stage_split(num_layers)
    return {
        "optimizer": cfg.training.optimizer,
        "distributed": p.use_distributed_optimizer,
        "format": sharding,
        "tensor_model_parallel_size": p.tensor_model_parallel_size,
        "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
        # with expert parallelism the experts have an optimizer of their own (megatron-core's
        # ChainedOptimizer), and buffers of their own
        "expert_model_parallel_size": p.expert_model_parallel_size,
        "expert_tensor_parallel_size": p.experts_tensor_parallel,
        # one bucket buffer per model chunk of the interleaved schedule
        "num_layers_per_virtual_pipeline_stage": p.num_layers_per_virtual_pipeline_stage,
        "virtual_pipeline_size": p.virtual_pipeline_size(num_layers),
        # an uneven split's stages hold other parameters, so other buckets
        "decoder_first_pipeline_num_layers": first_stage_layers,
        "decoder_last_pipeline_num_layers": last_stage_layers,
        "pipeline_model_parallel_layout": canonical_layout(p.pipeline_model_parallel_layout),
        "bucket_size": bucket,
        "num_buckets": num_buckets,
        "pad_buckets": p.use_distributed_optimizer and p.ddp_pad_buckets_for_high_nccl_busbw,
    }


def ddp_bucket_size(p, chunks) -> int | None:
    """megatron-core's ``bucket_size`` for these parallel flags (None: its default with
    --overlap-grad-reduce, one bucket without). --ddp-num-buckets N: the rank's parameters
    (every model chunk's) over N, as Megatron-LM computes it."""
    if not p.overlap_grad_reduce:
        return None
    if p.ddp_num_buckets is None:
        return p.ddp_bucket_size
    return sum(param.nelement() for c in chunks for param in c.parameters()) // p.ddp_num_buckets


def check_optimizer_resume(cfg: PretrainConfig, data_parallel_size: int, ckpt) -> None:
    """Resuming ``ckpt`` (--load without --finetune) can restore its optimizer state in this
    run's layout; else one line naming --load and what differs. Checkpoints without the record
    were written before the distributed optimizer could save: plain optimizer state."""
    where = f"--load {ckpt.path}"
    weights_only = "or pass --finetune to load its weights only"
    if ckpt.meta.get("optimizer_saved") is False:  # (older records: always saved)
        raise ConfigError(
            f"{where}: it holds no optimizer state (saved with --no-save-optim, or written by a "
            "tool): resume with --no-load-optim (a fresh optimizer) or --finetune"
        )
    # (records from before expert parallelism: none)
    saved = {"optimizer": "adam", "expert_model_parallel_size": 1, "num_buckets": None,
             "pad_buckets": False,
             **(ckpt.meta.get("optimizer_layout") or {"distributed": False})}  # fmt: skip
    num_layers = ckpt.model.num_layers
    run = optimizer_layout(cfg, data_parallel_size, num_layers)
    saved.setdefault("expert_tensor_parallel_size", saved.get("tensor_model_parallel_size"))
    if "virtual_pipeline_size" not in saved:  # (older records: layers per virtual stage only)
        vstage = saved.get("num_layers_per_virtual_pipeline_stage")
        pp = saved.get("pipeline_model_parallel_size", 1)
        saved["virtual_pipeline_size"] = virtual_pipeline_size(num_layers, pp, vstage)
    if saved["optimizer"] != run["optimizer"]:
        raise ConfigError(
            f"{where}: its optimizer state is {saved['optimizer']}'s; this run trains with "
            f"--optimizer {run['optimizer']}: resume with --optimizer {saved['optimizer']}, with "
            f"--no-load-optim (a fresh optimizer), {weights_only}"
        )
    if saved["distributed"] != run["distributed"]:
        saved_by = "with" if saved["distributed"] else "without"
        raise ConfigError(
            f"{where}: its optimizer state was saved {saved_by} --use-distributed-optimizer; "
            f"resume {saved_by} it, {weights_only}"
        )
    saved_ep, run_ep = saved["expert_model_parallel_size"], run["expert_model_parallel_size"]
    if (saved_ep > 1) != (run_ep > 1):
        kept = "apart from" if saved_ep > 1 else "with"
        resume = "> 1" if saved_ep > 1 else "1"
        raise ConfigError(
            f"{where}: its optimizer state was saved at --expert-model-parallel-size {saved_ep}, "
            f"the experts' state {kept} the other parameters' (megatron-core keeps them apart "
            f"with expert parallelism); this run has {run_ep}: resume at {resume}, with "
            f"--no-load-optim (a fresh optimizer), {weights_only}"
        )
    if not run["distributed"] or saved.get("format") == FULLY_RESHARDABLE:
        return  # per parameter: any layout
    flags = {
        "tensor_model_parallel_size": "--tensor-model-parallel-size",
        "pipeline_model_parallel_size": "--pipeline-model-parallel-size",
        "expert_model_parallel_size": "--expert-model-parallel-size",
        "expert_tensor_parallel_size": "--expert-tensor-parallel-size",
        "virtual_pipeline_size": "virtual pipeline stages per rank "
        "(--num-virtual-stages-per-pipeline-rank, --num-layers-per-virtual-pipeline-stage)",
        "decoder_first_pipeline_num_layers": "--decoder-first-pipeline-num-layers",
        "decoder_last_pipeline_num_layers": "--decoder-last-pipeline-num-layers",
        "pipeline_model_parallel_layout": "--pipeline-model-parallel-layout",
        "bucket_size": "gradient buckets (--overlap-grad-reduce, --ddp-bucket-size)",
        "num_buckets": "gradient buckets (--overlap-grad-reduce, --ddp-num-buckets)",
        "pad_buckets": "bucket padding (--ddp-pad-buckets-for-high-nccl-busbw)",
    }
    if ckpt.model.num_experts is None:  # (no expert parameters)
        del flags["expert_tensor_parallel_size"]
    for key, flag in flags.items():
        if saved.get(key) != run[key]:
            raise ConfigError(
                f"{where}: the distributed optimizer's state is saved per gradient bucket and "
                f"resumes only with the same {flag}: saved {_shown(saved.get(key))}, this run "
                f"{_shown(run[key])}; resume with the saved value (with "
                f"--dist-ckpt-optim-fully-reshardable its next checkpoint resumes at any layout), "
                f"{weights_only}"
            )


def _shown(value) -> str:
    return "unset" if value is None else str(value)


# What each value of a learning-rate schedule is set by, for messages.
_SCHEDULE_FLAGS = {
    "lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_iters": "the warmup steps (--lr-warmup-iters, -samples or -fraction)",
    "lr_decay_iters": "--lr-decay-iters (default: the training steps)",
    "lr_decay_style": "--lr-decay-style",
    "wsd_decay_iters": "WSD's decay steps (--lr-wsd-decay-iters; default a tenth of the steps)",
    "lr_wsd_decay_style": "--lr-wsd-decay-style",
    "decoupled_lr": "--decoupled-lr",
    "decoupled_min_lr": "--decoupled-min-lr (default: --min-lr)",
    "lr_warmup_init": "--lr-warmup-init",
    "weight_decay": "--weight-decay (--start-weight-decay with an increment)",
    "end_weight_decay": "--end-weight-decay",
    "weight_decay_incr_style": "--weight-decay-incr-style",
    "weight_decay_incr_iters": "the weight decay's increment steps (the training steps)",
}
# What a record from before a key existed meant (its run could not set it).
_SCHEDULE_DEFAULTS = {
    "lr_warmup_init": 0.0,
    "weight_decay_incr_style": "constant",
    "decoupled_lr": None,
    "decoupled_min_lr": None,
}


def lr_schedule(
    cfg: PretrainConfig, train_iters: int, global_batch_size: int | None = None
) -> dict:
    """The learning-rate and weight-decay schedule the flags ask for, resolved in optimizer steps
    (``config.schedule_steps``: the decay over the training steps unless --lr-decay-iters,
    lengths in samples divided by ``global_batch_size``, default --global-batch-size): what a
    checkpoint records and a resume checks."""
    t = cfg.training
    gbs = global_batch_size or t.global_batch_size
    warmup, decay, wsd = schedule_steps(t, train_iters, gbs)
    start_wd, end_wd = t.weight_decays
    decoupled_min_lr = t.min_lr if t.decoupled_min_lr is None else t.decoupled_min_lr
    # megatron-core increments over the training length: its steps, or its samples in steps.
    incr = None
    if t.weight_decay_incr_style != "constant":
        incr = t.train_samples / gbs if t.train_samples is not None else train_iters
        incr = int(incr) if float(incr).is_integer() else incr
    return {
        "lr": t.lr,
        "min_lr": t.min_lr,
        "lr_warmup_iters": warmup,
        "lr_decay_iters": decay,
        "lr_decay_style": t.lr_decay_style,
        "wsd_decay_iters": wsd,
        "lr_wsd_decay_style": t.lr_wsd_decay_style if wsd is not None else None,
        "decoupled_lr": t.decoupled_lr,
        "decoupled_min_lr": None if t.decoupled_lr is None else decoupled_min_lr,
        "lr_warmup_init": t.lr_warmup_init if warmup else 0.0,
        "weight_decay": start_wd,
        "end_weight_decay": end_wd,
        "weight_decay_incr_style": t.weight_decay_incr_style,
        "weight_decay_incr_iters": incr,
    }


def resume_lr_schedule(
    cfg: PretrainConfig, train_iters: int, ckpt, global_batch_size: int | None = None
) -> dict:
    """The schedule a run trains on: the flags', or on resuming (--load without --finetune) the
    checkpoint's where it differs and --use-checkpoint-opt-param-scheduler says so. A difference
    with neither that flag nor --override-opt-param-scheduler is refused, naming the flags:
    megatron-core's scheduler would silently keep the saved schedule (a run extended by raising
    --train-iters would train at the saved run's final learning rate)."""
    run = lr_schedule(cfg, train_iters, global_batch_size)
    c = cfg.checkpoint
    saved = ckpt.meta.get("lr_schedule") if ckpt is not None and not c.finetune else None
    if ckpt is not None and not (c.finetune or c.no_load_optim):
        saved_decoupled = (saved or {}).get("decoupled_lr")
        if (saved_decoupled is None) != (run["decoupled_lr"] is None):
            had = "with" if saved_decoupled is not None else "without"
            raise ConfigError(
                f"--load {ckpt.path}: it was trained {had} --decoupled-lr, which gives the "
                "optimizer other parameter groups: resume it so, or with --no-load-optim (a "
                "fresh optimizer)"
            )
    if saved is None or c.override_opt_param_scheduler:
        return run  # checkpoints that predate the record: the flags
    if "lr_wsd_decay_style" not in saved:  # recorded before the flag: WSD decayed linearly
        wsd = saved.get("lr_decay_style") == "WSD"
        saved = {**saved, "lr_wsd_decay_style": "linear" if wsd else None}
    saved = {**_SCHEDULE_DEFAULTS, **saved}
    if "end_weight_decay" not in saved:  # recorded before the increment flags: constant
        saved = {**saved, "end_weight_decay": saved.get("weight_decay"),
                 "weight_decay_incr_iters": None}  # fmt: skip
    # A constant rate ignores the decay's length and floor (megatron-core's get_lr).
    ignored = {"lr_decay_iters", "min_lr", "wsd_decay_iters", "lr_wsd_decay_style"} if all(
        s.get("lr_decay_style") == "constant" for s in (saved, run)
    ) else set()  # fmt: skip
    differing = [k for k in _SCHEDULE_FLAGS if k not in ignored and saved.get(k) != run[k]]
    if not differing:
        return run
    if c.use_checkpoint_opt_param_scheduler:
        _check_saved_schedule(saved, run, f"--load {ckpt.path}")
        return saved
    differences = "; ".join(
        f"{_SCHEDULE_FLAGS[key]} saved {_shown(saved.get(key))}, this run {_shown(run[key])}"
        for key in differing
    )
    raise ConfigError(
        f"--load {ckpt.path}: its learning-rate schedule differs from this run's: {differences}",
        hint="--override-opt-param-scheduler trains on this run's schedule from the saved step, "
        "--use-checkpoint-opt-param-scheduler on the saved one",
    )


def _check_saved_schedule(saved, run: dict, where: str) -> None:
    """A recorded schedule holds what the flags would: non-negative numbers (step counts may be
    fractional: lengths given in samples), a decay of at least one step, a known decay style,
    and WSD's decay steps exactly with WSD."""
    for key in run:
        got = saved.get(key)
        if key == "lr_decay_style":
            ok = got in LR_DECAY_STYLES
        elif key == "wsd_decay_iters":
            wsd = saved.get("lr_decay_style") == "WSD"  # (samples: a fraction of a step is one)
            ok = _is_number(got, 0) and got > 0 if wsd else got is None
        elif key == "lr_wsd_decay_style":
            ok = got is None if saved.get("lr_decay_style") != "WSD" else got in WSD_DECAY_STYLES
        elif key == "weight_decay_incr_style":
            ok = got in WD_INCR_STYLES
        elif key in ("decoupled_lr", "decoupled_min_lr"):
            ok = got is None or _is_number(got, 0)
        elif key == "weight_decay_incr_iters":
            constant = saved.get("weight_decay_incr_style") == "constant"
            ok = got is None if constant else _is_number(got, 0) and got > 0
        else:
            ok = _is_number(got, 1 if key == "lr_decay_iters" else 0)
        if not ok:
            raise CheckpointError(f"{where}: its lr_schedule.{key} is invalid: {got!r:.80}")


def _is_number(value, minimum: int) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= minimum


def build_optimizer(
    cfg: PretrainConfig,
    chunks,
    params_dtype: torch.dtype,
    train_iters: int,
    schedule: dict | None = None,
):
    """megatron-core's mixed-precision Adam(W) (fused where torch's), or with --optimizer muon
    Muon beside it (``training.muon``), and its LR scheduler, on ``schedule``
    (:func:`resume_lr_schedule`; default: the flags')."""
    t = cfg.training
    config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        apply_wd_to_qk_layernorm=t.apply_wd_to_qk_layernorm,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=t.bf16,
        fp16=t.fp16,
        **{n: getattr(t, n) for n in LOSS_SCALE_FIELDS if getattr(t, n) is not None},
        params_dtype=params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        decoupled_lr=t.decoupled_lr,
        decoupled_min_lr=t.decoupled_min_lr,
    )
    use_gloo = not cfg.parallel.disable_gloo_process_groups
    if t.optimizer == "muon":
        opt = build_muon_optimizer(config, chunks, cfg.muon, use_gloo)
    else:
        opt = get_megatron_optimizer(config, chunks, use_gloo_process_groups=use_gloo)
    use_fused_adam(opt)
    mark_decoupled_groups(opt)
    return opt, lr_scheduler(opt, schedule or lr_schedule(cfg, train_iters), train_iters)


def lr_scheduler(optimizer, schedule: dict, train_iters: int) -> OptimizerParamScheduler:
    """megatron-core's scheduler on ``schedule`` (:func:`lr_schedule`), decided before: loading
    a checkpoint's scheduler state restores its step count only (see :func:`resume_lr_schedule`
    and :func:`restore_lr_schedule`)."""
    s, wsd = schedule, schedule["lr_decay_style"] == "WSD"
    return OptimizerParamScheduler(
        optimizer,
        init_lr=s["lr_warmup_init"] if s["lr_warmup_iters"] else s["lr"],
        max_lr=s["lr"],
        min_lr=s["min_lr"],
        lr_warmup_steps=s["lr_warmup_iters"],
        lr_decay_steps=s["lr_decay_iters"],
        lr_decay_style=s["lr_decay_style"],
        start_wd=s["weight_decay"],
        end_wd=s["end_weight_decay"],
        wd_incr_steps=s["weight_decay_incr_iters"] or train_iters,
        wd_incr_style=s["weight_decay_incr_style"],
        wsd_decay_steps=s["wsd_decay_iters"] if wsd else None,
        lr_wsd_decay_style=s["lr_wsd_decay_style"] if wsd else None,
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )


def use_fused_adam(optimizer) -> None:
    """Make every torch ``Adam``/``AdamW`` inside megatron-core's ``optimizer`` fused (one kernel
    for all parameters, step counts on the device). Call again after loading a checkpoint: its
    saved param groups replace these flags, and its step counts may be host tensors.
    (Transformer Engine's or Apex's FusedAdam, used when installed, are left alone.)"""
    for part in optimizer_parts(optimizer):
        inner = getattr(part, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam):  # AdamW derives from Adam
            continue
        inner.defaults.update(fused=True, foreach=None)
        for group in inner.param_groups:
            group.update(fused=True, foreach=None)
            for p in group["params"]:
                state = inner.state.get(p)
                if state and "step" in state:
                    state["step"] = torch.as_tensor(
                        state["step"], dtype=torch.float32, device=p.device
                    ).clone()


def restore_lr_schedule(optimizer, scheduler, schedule: dict) -> None:
    """After a checkpoint load: megatron-core's scheduler takes each parameter group's
    ``max_lr``/``min_lr`` over its own, and the loaded groups carry the saved run's. Set them to
    ``schedule`` (:func:`resume_lr_schedule`) and recompute the learning rate at the loaded step,
    which the next update uses."""
    decoupled = schedule.get("decoupled_lr")
    for group in optimizer.param_groups:
        if decoupled is not None and is_decoupled(group):
            group["max_lr"], group["min_lr"] = decoupled, schedule["decoupled_min_lr"]
        else:
            group["max_lr"], group["min_lr"] = schedule["lr"], schedule["min_lr"]
    scheduler.step(increment=0)


def is_decoupled(group: dict) -> bool:
    """A parameter group on --decoupled-lr (megatron-core's: the embedding and output layer,
    whose group overrides the learning rate, so is not on the ``default_config`` schedule)."""
    return not group.get("default_config", True)


def mark_decoupled_groups(optimizer) -> None:
    """Set ``is_decoupled_lr`` on the --decoupled-lr groups. megatron-core 0.16 builds them
    with it False, the default group's value; loading a checkpoint matches groups by
    ``(wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr)``, and two groups with one key
    would load the decoupled group's hyperparameters and sizes into the default one."""
    for part in optimizer_parts(optimizer):
        for group in part.param_groups:
            if is_decoupled(group):
                group["is_decoupled_lr"] = True


def logged_lr(optimizer) -> float:
    """The learning rate of the parameters on --lr (the first group on the default schedule)."""
    groups = optimizer.param_groups
    return next((g for g in groups if not is_decoupled(g)), groups[0])["lr"]


def finalize_grads(model, num_tokens=None, pg_collection=None, force_all_reduce=False) -> None:
    """``config.finalize_model_grads_func``: megatron-core's ``finalize_model_grads`` (DP
    all-reduce, sequence-parallel norms, embeddings), then the per-token scaling on the device."""
    finalize_model_grads(
        model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce
    )
    if num_tokens is None:
        return
    if pg_collection is not None:
        pp_group, dp_cp_group = pg_collection.pp, pg_collection.dp_cp
    else:
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    # The count lives on the last pipeline stage; every rank scales its own gradients.
    dist.broadcast(num_tokens, src=get_pp_last_rank(pp_group), group=pp_group)
    dist.all_reduce(num_tokens, group=dp_cp_group)
    scaling = 1.0 / num_tokens.clamp(min=1)
    for chunk in model:
        chunk.scale_gradients(scaling)


class OptimizerStep:
    """``step()`` -> ``(updated, grad_norm)``; ``grad_norm`` is the global gradient norm, a 0-dim
    fp32 device tensor (None when fp16's scaler skipped the step). A step whose norm is not
    finite changes nothing where :attr:`skips_on_device` (torch's Adam, this project's default;
    Transformer Engine's or Apex's FusedAdam take no such flag). See the module docstring."""

    def __init__(self, optimizer, clip_grad: float, device: torch.device):
        self.optimizer, self.clip_grad, self.device = optimizer, clip_grad, device
        parts = optimizer_parts(optimizer)
        self.parts = [p for p in parts if not getattr(p, "is_stub_optimizer", False)]
        # Each part's statistics over its own group, in one order on every rank: the dense
        # parameters' (model-parallel) and, with expert parallelism, the experts' (expert
        # model-parallel: the ranks holding the other experts), as megatron-core's
        # ChainedOptimizer sums them.
        # A rank whose part holds no parameters (a stub) still joins its group's reduction.
        self.stat_groups: dict = {}
        for part in parts:
            real = self.stat_groups.setdefault(part.get_grad_stats_parallel_group(), [])
            if not getattr(part, "is_stub_optimizer", False):
                real.append(part)
        inner = [getattr(p, "optimizer", None) for p in self.parts]
        # torch's Adam and Muon skip a step on the device when told ``found_inf``
        self._skippers = [o for o in inner if isinstance(o, (torch.optim.Adam, Muon))]
        self.skips_on_device = len(self._skippers) == len(inner)
        self.num_zeros: torch.Tensor | None = None  # the last step's, when it counted them

    @torch.no_grad()
    def step(self, count_zeros: bool = False) -> tuple[bool, torch.Tensor | None]:
        """``count_zeros``: also set :attr:`num_zeros` (:meth:`count_zeros`), where megatron-core
        counts them: after clipping, before the update."""
        self.num_zeros = None
        if self.optimizer.prepare_grads():  # fp16 only: found inf/nan (read on the host)
            return False, None
        grad_norm = self._norm()
        if self.clip_grad > 0:
            self._clip(grad_norm)
        if count_zeros:
            self.num_zeros = self.count_zeros()
        # torch's fused Adam skips the update (and undoes its step count) where found_inf is 1;
        # Muon leaves its weights and momentum as they were.
        found_inf = (~torch.isfinite(grad_norm)).float()
        for inner in self._skippers:
            inner.grad_scale, inner.found_inf = None, found_inf
        return self.optimizer.step_with_ready_grads(), grad_norm

    def _norm(self) -> torch.Tensor:
        # Same tensors and groups as megatron-core's get_grad_norm_fp32.
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for group, parts in self.stat_groups.items():
            for_norm = [g for p in parts for g in p.get_main_grads_for_grad_norm()]
            squares = torch.zeros((), dtype=torch.float32, device=self.device)
            if for_norm:
                squares = torch.stack(torch._foreach_norm(for_norm)).float().square().sum()
            dist.all_reduce(squares, group=group)
            total = total + squares
        return total.sqrt()

    def _clip(self, norm: torch.Tensor) -> None:
        # megatron-core's clip_grad_norm, on the device.
        coeff = self.clip_grad / (norm + 1.0e-6)
        # Like megatron-core, scale only when coeff < 1 (a NaN norm leaves the gradients as is).
        coeff = torch.where(coeff < 1.0, coeff, torch.ones_like(coeff))
        grads = [g for p in self.parts for g in self._grads(p)]
        if grads:
            torch._foreach_mul_(grads, coeff)

    @torch.no_grad()
    def count_zeros(self) -> torch.Tensor:
        """megatron-core's ``count_zeros_fp32`` kept on the device (an int64 0-dim tensor): the
        zero entries of the optimizer's gradients, shared and tensor-parallel duplicate
        parameters once, summed over the gradient-statistics group (the gradients
        ``prepare_grads`` readied: :meth:`step` calls it)."""
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
        from megatron.core.transformer.module import param_is_not_shared

        total = torch.zeros((), dtype=torch.int64, device=self.device)
        for group, parts in self.stat_groups.items():
            zeros = torch.zeros((), dtype=torch.int64, device=self.device)
            for part in parts:
                grads = self._grads(part, counted=lambda p: param_is_not_shared(p)
                                    and param_is_not_tensor_parallel_duplicate(p))  # fmt: skip
                for grad in grads:
                    zeros += grad.numel() - torch.count_nonzero(grad)
            dist.all_reduce(zeros, group=group)
            total += zeros
        return total

    @staticmethod
    def _grads(part, counted=None) -> list[torch.Tensor]:
        attr = (
            "decoupled_grad"
            if part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
            else "grad"
        )
        params = [p for p in part.get_parameters() if counted is None or counted(p)]
        return [g for g in (getattr(p, attr, None) for p in params) if g is not None]


class NonFiniteSteps:
    """The steps whose gradient norm was not finite, told to the host when it reads anyway (log
    steps, saves): ``record`` keeps each step's norm on the device, ``check`` reads them all with
    one transfer. The norm is global, so every rank finds the same steps and stops at the same
    point. ``stop`` (``--check-for-nan-in-loss-and-grad``, Megatron-LM's default) raises
    :class:`~megatron_slm.errors.DivergenceError` on the first such step found, before a save
    could write its state; without it each one is logged and training goes on."""

    def __init__(self, stop: bool, skips_on_device: bool):
        self.stop, self.skips_on_device = stop, skips_on_device
        self._norms: list[tuple[int, torch.Tensor]] = []
        self.total = 0  # such steps so far in this run

    def record(self, iteration: int, grad_norm: torch.Tensor | None) -> None:
        if grad_norm is not None:
            self._norms.append((iteration, grad_norm))

    def check(self) -> None:
        """Tell the steps found since the last check: raise with ``stop``, else log them."""
        if not self._norms:
            return
        iterations, norms = zip(*self._norms)
        self._norms = []
        finite = torch.stack(norms).isfinite().tolist()  # the one host read
        bad = [it for it, ok in zip(iterations, finite) if not ok]
        if not bad:
            return
        self.total += len(bad)
        first = f"iteration {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
        if self.skips_on_device:
            effect = "the update was skipped: the weights and the optimizer's state are unchanged"
        else:
            effect = "the update was applied (this optimizer cannot skip on the device)"
        if self.stop:
            raise DivergenceError(
                f"{first}: the gradient norm is not finite; {effect}. Stopped before any "
                "checkpoint of that state",
                hint="resume from the last checkpoint with a lower --lr (and "
                "--override-opt-param-scheduler) or other data; "
                "--no-check-for-nan-in-loss-and-grad skips such steps and goes on",
            )
        if dist.get_rank() == 0:  # the same on every rank
            logger.warning(
                "%s: the gradient norm is not finite; %s (%d such steps so far)", first, effect,
                self.total,
            )  # fmt: skip
