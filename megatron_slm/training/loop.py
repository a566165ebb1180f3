"""The SLM pretraining loop on megatron-core.

One optimizer step: megatron-core's forward/backward schedule (no pipelining, 1F1B or interleaved)
runs every micro-batch of this rank; on the last pipeline stage the loss is the selective op's
per-token loss summed over the selected tokens, and megatron-core's ``calculate_per_token_loss``
divides the gradients by the number of selected tokens of the whole global batch (all micro-batches,
all data-parallel ranks): the optimised loss is the mean over all selected tokens, not a mean of
per-micro-batch means.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megatron_slm import checkpoint as checkpointing
from megatron_slm import launch
from megatron_slm.checkpoint import (
    CheckpointInfo,
    check_tokenizer,
    read_checkpoint,
    resolve_architecture,
    resolve_tokenizer,
    resolve_upcycled_architecture,
    tokenizer_record,
)
from megatron_slm.cli import flag_name
from megatron_slm.data.gpt_dataset import check_data_path, check_splits
from megatron_slm.data.indexed import blend_prefixes
from megatron_slm.data.sample_list import BatchList
from megatron_slm.errors import ConfigError, DivergenceError
from megatron_slm.models import GPTModelConfig, ModelBuildOptions, build_model, default_spec_impl
from megatron_slm.models.document_mask import DocumentMask
from megatron_slm.models.presets import padded_vocab_size
from megatron_slm.models.sharding import unwrap
from megatron_slm.models.upcycling import upcycle_chunks
from megatron_slm.ops.selection import needs_reference
from megatron_slm.runtime import LoadArgs, LoadPlan, plan_load
from megatron_slm.runtime.reference import OnlineReference
from megatron_slm.training.config import (
    DerivedSizes,
    PretrainConfig,
    runnable_microbatches,
    validate,
)
from megatron_slm.training.data import MicroBatches, build_datasets, build_sft_dataset
from megatron_slm.training.distillation import DistillationLoss, Teacher
from megatron_slm.training.housekeeping import ManualGC, StepProfiler
from megatron_slm.training.metrics import (
    KD_STATS,
    OP_STAT_KEYS,
    STAT_KEYS,
    TrainingLogger,
    excess_split,
    moe_aux_losses,
    params_norm,
    source_counts,
)
from megatron_slm.training.mtp import MultiTokenPrediction
from megatron_slm.training.optimizer import (
    NonFiniteSteps,
    OptimizerStep,
    build_optimizer,
    check_optimizer_resume,
    ddp_bucket_size,
    finalize_grads,
    logged_lr,
    optimizer_layout,
    restore_lr_schedule,
    resume_lr_schedule,
    use_fused_adam,
)
from megatron_slm.training.progress_log import ProgressLog
from megatron_slm.training.replica_check import check_replicas
from megatron_slm.training.rounds import SampleRecord, checkpoint_record, prepare_batch_list
from megatron_slm.training.signals import ExitController
from megatron_slm.training.slm_loss import (
    MicroBatchSelection,
    SelectiveLMLoss,
    install_plain_loss,
    plain_loss,
)
from megatron_slm.training.step_batch_schedule import parse_step_schedule

logger = logging.getLogger("megatron_slm")


def _params_dtype(cfg: PretrainConfig) -> torch.dtype:
    if cfg.training.bf16:
        return torch.bfloat16
    if cfg.training.fp16:
        return torch.float16
    return torch.float32


@dataclass
class TrainingPlan:
    """What the flags and the --load checkpoint decide before any process group exists."""

    tokenizer: object
    tokenizer_record: dict
    arch: GPTModelConfig
    sizes: DerivedSizes
    checkpoint: CheckpointInfo | None
    batch_list: BatchList | None = None  # --train-samples-from
    reference: LoadPlan | None = None  # --slm-ref-load (online reference), planned once
    teacher: LoadPlan | None = None  # --export-kd-teacher-load (distillation), planned once
    sft_dataset: object | None = None  # --sft-data: built (and checked) before any work
    lr_schedule: dict | None = None  # resume_lr_schedule: the flags', or the checkpoint's
    load_optimizer: bool = False  # resuming the checkpoint's optimizer state (and schedule step)

    def virtual_pipeline_size(self, cfg: PretrainConfig) -> int | None:
        return cfg.parallel.virtual_pipeline_size(self.arch.num_layers)


def plan_training(cfg: PretrainConfig, world_size: int) -> TrainingPlan:
    """Tokenizer, architecture and sizes: the checkpoint's when resuming or fine-tuning (flags
    may only confirm them), else the flags'. Fails before any work, naming the flag."""
    ckpt = _checkpoint_to_load(cfg.checkpoint)
    tokenizer, ttype, tmodel = resolve_tokenizer(cfg.tokenizer, ckpt)
    if cfg.sft.enabled:
        _set_chat_template(cfg, tokenizer, ckpt)
    if cfg.checkpoint.moe_use_upcycling:
        arch = _upcycled_architecture(cfg, ckpt, tokenizer.vocab_size)
    else:
        arch = resolve_architecture(cfg.model, ckpt, tokenizer.vocab_size)
    resuming = ckpt is not None and not cfg.checkpoint.finetune
    if ckpt is not None:
        _check_mtp_heads(cfg, ckpt, resuming)
    sizes = validate(cfg, world_size, arch, ckpt.meta["consumed_samples"] if resuming else 0)
    _vocab_divisor(cfg, ckpt, arch.vocab_size)  # (its refusals before any work)
    load_optimizer = resuming and not cfg.checkpoint.no_load_optim and not _starts_afresh(ckpt)
    if load_optimizer:
        check_optimizer_resume(cfg, sizes.data_parallel_size, ckpt)
    reference = _plan_reference(cfg, arch)
    teacher = _plan_teacher(cfg, arch, ckpt, tokenizer, ttype)
    sft, batch_list = None, None
    if cfg.sft.enabled:
        if cfg.data.train_samples_from:
            raise ConfigError("--train-samples-from draws --data-path batches; not with --sft-data")
        sft = build_sft_dataset(cfg, sizes, tokenizer)
    elif not cfg.data.mock_data:
        s = cfg.slm
        check_data_path(
            cfg.data.train_blend,
            tokenizer.vocab_size,
            require_sidecar=s.needs_reference and s.slm_ref_source == "sidecar",
        )
        if not cfg.data.per_split:
            check_splits(blend_prefixes(cfg.data.data_path), cfg.data.split)
        for blend in (cfg.data.valid_data_path, cfg.data.test_data_path):
            if blend:
                check_data_path(blend, tokenizer.vocab_size, require_sidecar=False)
        batch_list = prepare_batch_list(cfg, sizes, ckpt)
    if ckpt is not None and not cfg.checkpoint.finetune:
        _check_ramp_resume(cfg, ckpt)
    schedule = resume_lr_schedule(cfg, sizes.schedule_iters, ckpt, sizes.global_batch_size)
    record = tokenizer_record(ttype, tmodel, tokenizer)
    return TrainingPlan(
        tokenizer,
        record,
        arch,
        sizes,
        ckpt,
        batch_list=batch_list,
        sft_dataset=sft,
        reference=reference,
        teacher=teacher,
        lr_schedule=schedule,
        load_optimizer=load_optimizer,
    )


def _upcycled_architecture(cfg: PretrainConfig, ckpt, vocab_size: int) -> GPTModelConfig:
    """--moe-use-upcycling: the mixture the dense --load checkpoint starts, into an empty
    --save (Megatron-LM's rule: the flag is for the first run only)."""
    ck = cfg.checkpoint
    if ckpt is None:
        raise ConfigError(
            f"--moe-use-upcycling: --load {ck.load} holds no checkpoint (the dense model to "
            "upcycle)"
        )
    if checkpointing.holds_checkpoint(ck.save):
        raise ConfigError(
            f"--moe-use-upcycling: --save {ck.save} holds a checkpoint already; upcycling is for "
            "the first run only (later runs drop the flag and --load that directory)"
        )
    return resolve_upcycled_architecture(cfg.model, ckpt, vocab_size, ck.moe_upcycling_granularity)


def _saved_mtp_heads(ckpt: CheckpointInfo) -> int:
    return int(ckpt.meta.get("mtp_num_layers") or 0)


def _check_mtp_heads(cfg: PretrainConfig, ckpt: CheckpointInfo, resuming: bool) -> None:
    """A resumed run keeps the checkpoint's multi-token prediction heads (its optimizer state
    holds them); a fine-tuning run may add heads to a checkpoint without (they start
    initialised) or leave its heads out, not change their number."""
    saved, mine = _saved_mtp_heads(ckpt), cfg.training.mtp_num_layers or 0
    if saved == mine:
        return
    where = f"{ckpt.flag} {ckpt.path}"
    given = f"--mtp-num-layers {mine}" if mine else "no --mtp-num-layers"
    if resuming:
        raise ConfigError(
            f"{given}: the checkpoint {where} was trained with {saved} heads "
            f"(its optimizer state holds them): give --mtp-num-layers {saved}, or start from its "
            "weights with --finetune"
        )
    if saved and mine:
        raise ConfigError(
            f"--mtp-num-layers {mine}: the checkpoint {where} has {saved} heads; fine-tuning "
            f"keeps them (--mtp-num-layers {saved}), adds heads to a checkpoint without, or "
            "leaves them out"
        )


def _starts_afresh(ckpt: CheckpointInfo) -> bool:
    """A checkpoint of step 0 without optimizer state (an upcycled mixture's first save): a
    fresh Adam and learning-rate schedule are its optimizer state, so resuming it needs no
    --no-load-optim."""
    return ckpt.meta.get("iteration") == 0 and ckpt.meta.get("optimizer_saved") is False


def _check_ramp_resume(cfg: PretrainConfig, ckpt: CheckpointInfo) -> None:
    """A resumed run keeps its growing batch (--rampup-batch-size, --step-batch-size-schedule):
    the steps so far followed it, and the step count and the batch of each step to come are
    counted from the start on it. Schedules are compared as parsed (2.4B equals 2400M)."""
    saved = (ckpt.meta.get("config") or {}).get("training") or {}
    t = cfg.training
    shown = lambda v: " ".join(map(str, v)) if v else "none"  # noqa: E731
    ramps = (saved.get("rampup_batch_size") or [], t.rampup_batch_size)
    if list(ramps[0]) != list(ramps[1]):
        _refuse_other_growth(ckpt, "--rampup-batch-size", shown(ramps[0]), shown(ramps[1]))
    text = saved.get("step_batch_size_schedule")
    steps = parse_step_schedule(text, saved.get("seq_length") or t.seq_length) if text else None
    if steps != t.step_schedule:
        given = t.step_batch_size_schedule
        _refuse_other_growth(
            ckpt, "--step-batch-size-schedule", repr(text) if text else "none",
            repr(given) if given else "none",
        )  # fmt: skip


def _refuse_other_growth(ckpt: CheckpointInfo, flag: str, saved: str, given: str):
    raise ConfigError(
        f"--load {ckpt.path}: it was trained with {flag} {saved}, this run gives {given}: resume "
        "with the saved one (--finetune starts a new run from its weights)"
    )


def _checkpoint_to_load(ck) -> CheckpointInfo | None:
    """--load's checkpoint, or None. Megatron-LM's restart idiom gives the --save directory as
    --load from the first run on: while that directory holds no checkpoint, training starts
    from scratch (a log line says so), or with --pretrained-checkpoint from that checkpoint's
    weights (``ck.finetune`` is then set, as Megatron-LM sets it). Any other --load must be a
    checkpoint."""
    if not ck.load:
        return _pretrained(ck)
    newer = _newer_non_persistent(ck)
    if newer is not None:
        return newer
    first_run = (
        ck.save is not None
        and not ck.finetune
        and os.path.realpath(ck.load) == os.path.realpath(ck.save)
        and not checkpointing.holds_checkpoint(ck.load)
    )
    if first_run and ck.pretrained_checkpoint:
        return _pretrained(ck)
    if first_run and ck.exit_on_missing_checkpoint:
        raise ConfigError(f"--load {ck.load}: no checkpoint there (--exit-on-missing-checkpoint)")
    if first_run:
        if launch.process_info().rank == 0:
            logger.info("--load %s holds no checkpoint yet: training starts from scratch", ck.load)
        return None
    return read_checkpoint(ck.load)


def _pretrained(ck) -> CheckpointInfo | None:
    """--pretrained-checkpoint while --load holds none: its weights, as --finetune loads them."""
    if not ck.pretrained_checkpoint:
        return None
    info = read_checkpoint(ck.pretrained_checkpoint, "--pretrained-checkpoint")
    ck.finetune = True
    if launch.process_info().rank == 0:
        where = f"--load {ck.load} holds no checkpoint yet" if ck.load else "no --load"
        logger.info(
            "%s: fine-tuning from --pretrained-checkpoint %s (weights only, step 0)",
            where, info.path,
        )  # fmt: skip
    return info


def _newer_non_persistent(ck) -> CheckpointInfo | None:
    """Megatron-LM's resume with non-persistent checkpoints: the non-persistent directory's
    latest when it is newer than --load's (not when --load names an iteration directory or
    --ckpt-step one, nor with --finetune)."""
    root = ck.non_persistent_dir(ck.load)
    if root is None or ck.finetune or os.path.isfile(os.path.join(ck.load, checkpointing.METADATA)):
        return None
    newer = checkpointing.latest_iteration(root)  # (None: no tracker there)
    if newer is None:
        return None
    latest = checkpointing.latest_iteration(ck.load)
    loud = launch.process_info().rank == 0
    if latest is not None and newer <= latest:
        if loud:
            logger.info(
                "the non-persistent checkpoint %s (iteration %d) is not newer than --load's "
                "latest (%d): resuming from --load", root, newer, latest,
            )  # fmt: skip
        return None
    if loud:
        logger.info(
            "resuming from the non-persistent checkpoint %s (iteration %d; --load %s: %s)",
            root, newer, ck.load, "none" if latest is None else f"iteration {latest}",
        )  # fmt: skip
    return read_checkpoint(root, flag="--non-persistent-global-ckpt-dir")


def evaluation_sets(datasets, paths: list[str]) -> list[tuple[str, object]]:
    """``(name, dataset)`` of each validation (or test) set: ``("", dataset)`` for one (none
    without that split), each --valid-data-path dataset by name with --multiple-validation-sets
    (megatron-core builds them in the order of the flag)."""
    if datasets is None or (not isinstance(datasets, list) and len(datasets) == 0):
        return []
    if not isinstance(datasets, list):
        return [("", datasets)]
    return list(zip(source_names(paths), datasets, strict=True))


def source_names(data_path: list[str]) -> list[str]:
    """A blend's datasets as logs name them: file names, or whole prefixes where two share one."""
    prefixes = blend_prefixes(data_path)
    names = [os.path.basename(p) for p in prefixes]
    return names if len(set(names)) == len(names) else prefixes


def _plan_frozen_model(
    cfg: PretrainConfig, arch: GPTModelConfig, path: str, flag: str, what: str
) -> LoadPlan:
    """A frozen model beside the trained one (online reference, distillation teacher): its
    metadata read once, at the run's TP size; its vocabulary the data's tokenizer's."""
    args = LoadArgs(load=path, device=cfg.training.device,
                    tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size)  # fmt: skip
    plan = plan_load(args, tokenizer="none", flag=flag)
    if plan.arch.vocab_size != arch.vocab_size:
        raise ConfigError(
            f"{flag} {path}: the {what}'s vocabulary ({plan.arch.vocab_size}) differs from the "
            f"data's tokenizer ({arch.vocab_size})"
        )
    return plan


def _vocab_divisor(cfg: PretrainConfig, ckpt: CheckpointInfo | None, vocab: int) -> int:
    """The run's --make-vocab-size-divisible-by for a tokenizer of ``vocab`` ids: a loaded
    checkpoint keeps its padded vocabulary at any TP size that divides it; --padded-vocab-size
    P gives P rows (P / TP per rank)."""
    tp, rows = cfg.parallel.tensor_model_parallel_size, cfg.model.padded_vocab_size
    if ckpt is not None:
        divisor = ckpt.divisor_for(tp)
        if rows is not None and rows != padded_vocab_size(vocab, divisor, tp):
            raise ConfigError(
                f"--padded-vocab-size {rows}: the checkpoint {ckpt.flag} {ckpt.path} has "
                f"{ckpt.padded_vocab_size} vocabulary rows"
            )
        return divisor
    if rows is None:
        return cfg.model.vocab_divisor
    if rows < vocab or rows % tp:
        raise ConfigError(
            f"--padded-vocab-size {rows} must be at least the tokenizer's {vocab} ids and a "
            f"multiple of --tensor-model-parallel-size {tp}"
        )
    return rows // tp


def _plan_reference(cfg: PretrainConfig, arch: GPTModelConfig) -> LoadPlan | None:
    """The online reference model (--slm-ref-load)."""
    s = cfg.slm
    if not (s.needs_reference and s.slm_ref_source == "online"):
        return None
    return _plan_frozen_model(cfg, arch, s.slm_ref_load, "--slm-ref-load", "reference model")


def _plan_teacher(
    cfg: PretrainConfig, arch: GPTModelConfig, ckpt, tokenizer, tokenizer_type: str
) -> LoadPlan | None:
    """The distillation teacher (--export-kd-teacher-load): its tokenizer the data's, its padded
    vocabulary the student's (the two softmaxes compare the same columns on each TP rank)."""
    d = cfg.distillation
    if not d.enabled:
        return None
    flag, where = "--export-kd-teacher-load", f"--export-kd-teacher-load {d.export_kd_teacher_load}"
    teacher = _plan_frozen_model(cfg, arch, d.export_kd_teacher_load, flag, "teacher")
    check_tokenizer(teacher.checkpoint, tokenizer, tokenizer_type, flag)
    tp = cfg.parallel.tensor_model_parallel_size
    student = padded_vocab_size(arch.vocab_size, _vocab_divisor(cfg, ckpt, arch.vocab_size), tp)
    if teacher.padded_vocab_size != student:
        hint = "" if ckpt is not None else "; set --make-vocab-size-divisible-by to match"
        raise ConfigError(
            f"{where}: the teacher's padded vocabulary ({teacher.padded_vocab_size} rows) "
            f"differs from the student's ({student}){hint}"
        )
    return teacher


def _set_chat_template(cfg: PretrainConfig, tokenizer, ckpt: CheckpointInfo | None) -> None:
    """--sft-chat-template FILE, else the --load checkpoint's SFT template, else the
    tokenizer's own (data/chat.py's default for SentencePiece models)."""
    path = cfg.sft.sft_chat_template
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                tokenizer.chat_template = f.read()
        except OSError as exc:
            raise ConfigError(f"--sft-chat-template {path}: cannot read ({exc.strerror})") from None
    elif ckpt is not None and ckpt.meta.get("chat_template"):
        tokenizer.chat_template = ckpt.meta["chat_template"]
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"--sft-data needs a tokenizer with a chat template; {type(tokenizer).__name__} has "
            "none (use SentencePieceTokenizer or HuggingFaceTokenizer)"
        )


class Trainer:
    """Call after ``launch.initialize`` with the plan's layout (the entry point owns it)."""

    def __init__(self, cfg: PretrainConfig, plan: TrainingPlan, device: torch.device):
        self.cfg, self.plan, self.device = cfg, plan, device
        self.tokenizer, self.arch, self.sizes = plan.tokenizer, plan.arch, plan.sizes
        p, t = cfg.parallel, cfg.training
        tp = p.tensor_model_parallel_size
        first_stage_layers, last_stage_layers = p.stage_split(self.arch.num_layers)
        self.build_opts = ModelBuildOptions(
            # SFT, --reset-attention-mask: the torch spec, the one that honours the packed
            # block-diagonal mask.
            transformer_impl=cfg.model.spec_impl
            or (
                "torch"
                if cfg.sft.enabled or cfg.data.reset_attention_mask
                else default_spec_impl(self.device)
            ),
            params_dtype=_params_dtype(cfg),
            sequence_parallel=p.sequence_parallel,
            num_layers_per_virtual_pipeline_stage=p.num_layers_per_virtual_pipeline_stage,
            virtual_stages=p.num_virtual_stages_per_pipeline_rank,
            first_stage_layers=first_stage_layers,
            last_stage_layers=last_stage_layers,
            pipeline_layout=p.pipeline_model_parallel_layout,
            overlap_p2p_comm=not p.no_overlap_p2p_communication,
            microbatch_group_size_per_vp_stage=p.microbatch_group_size_per_virtual_pipeline_stage,
            make_vocab_size_divisible_by=_vocab_divisor(cfg, plan.checkpoint, plan.arch.vocab_size),
            use_cpu_initialization=self.device.type == "cpu" or cfg.model.use_cpu_initialization,
            recompute=t.recompute,
            moe=t.moe,
            attention_dropout=cfg.model.attention_dropout,
            hidden_dropout=cfg.model.hidden_dropout,
            attention_backend=cfg.model.attention_backend,
            apply_query_key_layer_scaling=cfg.model.apply_query_key_layer_scaling,
            xavier_uniform_init=cfg.model.init_method_xavier_uniform,
            mtp_num_layers=t.mtp_num_layers,
            mtp_loss_scaling_factor=t.mtp_loss_scaling_factor,
            deterministic_mode=t.deterministic_mode,
        )
        s = cfg.slm
        if plan.sft_dataset is not None:
            self.train_ds, valid, test = plan.sft_dataset, None, None
        else:
            datasets = build_datasets(
                cfg,
                self.sizes,
                self.tokenizer,
                require_sidecar=s.needs_reference and s.slm_ref_source == "sidecar",
                batch_list=plan.batch_list,
            )
            self.train_ds, valid, test = datasets
        self.valid_sets = evaluation_sets(valid, cfg.data.valid_data_path)
        self.test_sets = evaluation_sets(test, cfg.data.test_data_path)
        rope = self.arch.position_embedding_type == "rope"
        if cfg.data.reset_position_ids and rope and torch.distributed.get_rank() == 0:
            logger.warning(
                "--reset-position-ids changes nothing this model computes: megatron-core's rotary "
                "embedding rotates by the position in the row; --reset-attention-mask is what "
                "keeps each document to itself"
            )
        self.sources = source_names(cfg.data.train_blend)
        self.n_sources = len(self.sources)
        if torch.distributed.get_rank() == 0:
            padded = padded_vocab_size(
                self.arch.vocab_size, self.build_opts.make_vocab_size_divisible_by, tp
            )
            logger.info("model: %s", self.arch.describe(padded))
            kernels = [flag_name(n) for n in ("moe_grouped_gemm", "moe_permute_fusion",
                                              "moe_router_fusion") if getattr(t, n)]  # fmt: skip
            if kernels and self.arch.num_experts:
                logger.info(
                    "%s: kernels of Transformer Engine (or grouped_gemm), not used here: the "
                    "mixture runs as megatron-core's torch code (SequentialMLP experts), the same "
                    "results",
                    ", ".join(kernels),
                )
        self._build_model()
        # Built after the trained model, so its initialisation does not depend on the source.
        self.online = None
        if s.needs_reference and s.slm_ref_source == "online":
            self.online = OnlineReference(
                plan.reference,
                self.device,
                self.build_opts.params_dtype,
                self.tokenizer.eod,
            )
        self.teacher = None
        if plan.teacher is not None:
            self.teacher = Teacher(
                plan.teacher, self.device, self.build_opts.params_dtype, self._packed_flag()
            )
        self.iteration, consumed = 0, 0
        self.global_batch = None  # the last step's (it changes along a --rampup-batch-size ramp)
        ck = cfg.checkpoint
        self.upcycled_from = None  # --moe-use-upcycling: the dense checkpoint (recorded)
        if plan.checkpoint is not None and ck.moe_use_upcycling:
            self._upcycle(plan.checkpoint)
        elif plan.checkpoint is not None:
            optimizer_too = plan.load_optimizer
            state = checkpointing.load_checkpoint(
                plan.checkpoint,  # read once by plan_training
                self.chunks,
                self.optimizer if optimizer_too else None,
                self.scheduler if optimizer_too else None,
                weights_only=ck.finetune,
                fully_parallel=ck.ckpt_fully_parallel_load,
                load_rng=not ck.no_load_rng,
                # heads added to a checkpoint without: initialised (_check_mtp_heads)
                fresh=("mtp.",)
                if t.mtp_num_layers and not _saved_mtp_heads(plan.checkpoint)
                else (),
                strict=ck.dist_ckpt_strictness,
            )
            if not optimizer_too:
                # bf16/fp16: the optimizer's fp32 main parameters were cloned from the random
                # initialisation when it was built; without this the first step would write
                # them back over the loaded weights (Megatron-LM's load_checkpoint does the same)
                self.optimizer.reload_model_params()
            if not ck.finetune:
                self.iteration, consumed = state.iteration, state.consumed_samples
                if optimizer_too:  # the checkpoint's param groups replaced ours
                    use_fused_adam(self.optimizer)
                else:  # a fresh Adam; the learning rate continues at the loaded step
                    self.scheduler.num_steps = self._schedule_position(self.iteration, consumed)
                restore_lr_schedule(self.optimizer, self.scheduler, plan.lr_schedule)
            logger.info("loaded %s at iteration %d", plan.checkpoint.path, self.iteration)
        self.batches = self._micro_batches(self.train_ds, consumed)
        self.valid_batches = {}  # per (split, set), built at its first evaluation
        self._announced: set = set()  # the full validations whose size was logged
        self.sample_record = SampleRecord(cfg.data.train_samples_record, self.batches)
        self.log = TrainingLogger(
            cfg, self.arch, self.sizes, self.device, self.sources, self.distill is not None,
            t.mtp_num_layers or 0,
        )  # fmt: skip
        self.exit = ExitController(cfg.checkpoint, self.device)
        self.manual_gc = ManualGC(cfg)
        self.profiler = StepProfiler(cfg, dist.get_rank(), self.device)
        self.progress = None
        if cfg.logging.log_progress:
            seq = t.seq_length
            flops_per_sample = self.arch.flops_per_token(seq, t.mtp_num_layers or 0) * seq
            self.progress = ProgressLog(
                cfg.checkpoint.save, dist.get_world_size(), flops_per_sample,
                active=dist.get_rank() == 0,
            )  # fmt: skip
            self.progress.start(consumed)
        # --ckpt-assume-constant-structure: the writers kept across saves (checkpoint.py)
        self.save_strategies = {} if cfg.checkpoint.ckpt_assume_constant_structure else None
        self.async_saves = None
        if cfg.checkpoint.async_save and cfg.checkpoint.save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_saves = AsyncCallsQueue()
        if self.upcycled_from is not None:  # Megatron-LM's: the mixture saved before any step
            self.save(weights_only=True)
            self.finish_saves()

    def _upcycle(self, dense_ckpt: CheckpointInfo) -> None:
        """--moe-use-upcycling: the dense checkpoint loaded into a dense model at this layout,
        its weights spread into the mixture (``models.upcycling``), which starts at step 0."""
        cfg = self.cfg
        dense = build_model(dense_ckpt.model, self.build_opts, device=self.device)
        if cfg.training.bf16 or cfg.training.fp16:
            dense = [Float16Module(dense[0].config, c) for c in dense]
        checkpointing.load_checkpoint(
            dense_ckpt,
            dense,
            weights_only=True,
            fully_parallel=cfg.checkpoint.ckpt_fully_parallel_load,
        )
        granularity = cfg.checkpoint.moe_upcycling_granularity
        upcycle_chunks(dense, self.chunks, self.arch, granularity, cfg.training.seed)
        self.optimizer.reload_model_params()  # (bf16/fp16: the fp32 main copies)
        self.upcycled_from = {
            "load": dense_ckpt.path,
            "iteration": dense_ckpt.meta.get("iteration"),
            "granularity": granularity,
        }
        if dist.get_rank() == 0:
            logger.info(
                "upcycled %s into %d experts (granularity %d)",
                dense_ckpt.path, self.arch.num_experts, granularity,
            )  # fmt: skip

    def _build_model(self) -> None:
        cfg = self.cfg
        chunks = build_model(self.arch, self.build_opts, device=self.device)
        config = chunks[0].config
        if cfg.training.bf16 or cfg.training.fp16:
            chunks = [Float16Module(config, c) for c in chunks]
        par = cfg.parallel
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=not cfg.training.grad_reduce_in_bf16,
            overlap_grad_reduce=par.overlap_grad_reduce,
            overlap_param_gather=par.overlap_param_gather,
            # Megatron-LM's rule: stages launch their all-gathers together only in the
            # interleaved schedule (the only one that calls param_sync_func); otherwise each
            # bucket's forward pre-hook launches the next bucket's.
            align_param_gather=par.overlap_param_gather and len(chunks) > 1,
            use_distributed_optimizer=par.use_distributed_optimizer,
            num_distributed_optimizer_instances=par.num_distributed_optimizer_instances,
            bucket_size=ddp_bucket_size(par, chunks),
            pad_buckets_for_high_nccl_busbw=par.ddp_pad_buckets_for_high_nccl_busbw,
        )
        self.chunks = [
            DistributedDataParallel(config, ddp_config, c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)
        ]
        self._last_ref = self._last_labels = None
        self.slm_loss = SelectiveLMLoss(
            cfg.slm.slm_select_scope, cfg.slm.slm_select_mode, cfg.slm.slm_unscored
        )
        for chunk in self.chunks:
            if not unwrap(chunk).post_process:
                continue
            built_loss = unwrap(chunk).compute_language_model_loss  # (megatron-core's, sync-free)
            if cfg.slm.enabled:
                self.slm_loss.install(unwrap(chunk))
            else:
                impl = cfg.training.cross_entropy_impl
                logger.info("plain loss: %s", install_plain_loss(unwrap(chunk), impl, self.device))
        self.distill = None  # --export-kd-teacher-load: the KD loss beside the installed one
        if cfg.distillation.enabled:
            tp_group = parallel_state.get_tensor_model_parallel_group()
            self.distill = DistillationLoss(cfg.distillation.settings, tp_group)
            for chunk in self.chunks:
                if unwrap(chunk).post_process:
                    self.distill.install(unwrap(chunk))
        self.mtp = None  # --mtp-num-layers: the heads' losses, around the others
        if cfg.training.mtp_num_layers:
            # (plain training's loss: --cross-entropy-impl; megatron-core's where it is chosen)
            head_loss = plain_loss(cfg.training.cross_entropy_impl, self.device)[0] or built_loss
            self.mtp = MultiTokenPrediction(cfg.training.mtp_num_layers, head_loss)
            for chunk in self.chunks:
                if unwrap(chunk).post_process:
                    self.mtp.install(unwrap(chunk))
        self.optimizer, self.scheduler = build_optimizer(
            cfg,
            self.chunks,
            self.build_opts.params_dtype,
            self.sizes.schedule_iters,
            schedule=self.plan.lr_schedule,
        )
        self.optimizer_step = OptimizerStep(self.optimizer, cfg.training.clip_grad, self.device)
        self.nonfinite = NonFiniteSteps(
            cfg.training.check_for_nan_in_loss_and_grad, self.optimizer_step.skips_on_device
        )
        config.finalize_model_grads_func = finalize_grads
        config.grad_scale_func = self.optimizer.scale_loss
        self.model_config = config
        # megatron-core weighs a mixture's auxiliary losses by each micro-batch's tokens over
        # the step's trained ones, the selected ones under SLM: at ratio r they would weigh 1/r
        # of their coefficient beside the selected tokens' mean loss. Each step's coefficients
        # are the built ones times its ratio (megatron-core reads them at every forward).
        self._aux_coeffs = (
            (config.moe_aux_loss_coeff, config.moe_z_loss_coeff) if self.arch.mixture else None
        )
        no_sync = [c.no_sync for c in self.chunks]
        config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
        if par.overlap_grad_reduce and not par.no_align_grad_reduce:  # (Megatron-LM's default)
            grad_sync = [c.start_grad_sync for c in self.chunks]
            config.grad_sync_func = grad_sync if len(grad_sync) > 1 else grad_sync[0]
        if ddp_config.align_param_gather:
            config.param_sync_func = [c.start_param_sync for c in self.chunks]
        self.config = config

    @contextlib.contextmanager
    def params_gathered(self):
        """Inside, every rank holds all the parameters of the last optimizer step. With
        --overlap-param-gather a step's all-gathers run in the next step's forward (pre-hooks);
        an evaluation or a checkpoint in between would read stale shards. Megatron-LM's way:
        the pre-hooks are removed with one synchronous all-gather, and put back after."""
        hooked = [c for c in self.chunks if getattr(c, "use_forward_hook", False)]
        for chunk in hooked:
            chunk.disable_forward_pre_hook(param_sync=True)
        param_sync = self.config.param_sync_func
        self.config.param_sync_func = None  # the schedule must not launch them either
        try:
            yield
        finally:
            self.config.param_sync_func = param_sync
            for chunk in hooked:
                chunk.enable_forward_pre_hook()

    def _micro_batches(self, dataset, consumed: int = 0) -> MicroBatches:
        return MicroBatches(
            dataset,
            self.cfg.training.micro_batch_size,
            consumed,
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            ignored_signals=self._exit_signals(),
        )

    def _exit_signals(self) -> tuple[int, ...]:
        ck = self.cfg.checkpoint
        return (getattr(signal, ck.exit_signal),) if ck.exit_signal_handler else ()

    # -- one step ---------------------------------------------------------------------------

    def _ratio(self) -> float | None:
        """This step's ratio; None: plain causal LM (megatron-core's loss)."""
        s = self.cfg.slm
        if not s.enabled:
            return None
        return s.slm_ratio if self.iteration >= s.slm_start_iter else 1.0

    def _packed_flag(self) -> str | None:
        """The flag whose rows hold several documents, each attending to itself (None: plain
        causal rows)."""
        if self.cfg.sft.enabled:
            return "--sft-data"
        return "--reset-attention-mask" if self.cfg.data.reset_attention_mask else None

    def _forward_step(self, ratio, seed_base, data_iterator, model, training=True):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(self.device, non_blocking=True)  # [b, s]
        labels = batch["labels"].to(self.device, non_blocking=True)  # [b, s]
        loss_mask = batch["loss_mask"].to(self.device, non_blocking=True)
        position_ids = batch["position_ids"].to(self.device, non_blocking=True)
        documents = None  # plain causal; packed SFT rows, documents: block-diagonal causal
        if "segment_ids" in batch:
            segments = batch["segment_ids"].to(self.device, non_blocking=True)  # [b, s]
            documents = DocumentMask(segments)
        elif self.cfg.data.reset_attention_mask:
            # The documents as the scorer and the online reference cut them (each ends with its
            # EOD token), found on the device: no [s, s] mask per sample, no host read.
            documents = DocumentMask.from_tokens(tokens, self.tokenizer.eod)
        # dense: with a gradient the torch spec runs the mask through SDPA anyway, and the
        # other specs read only the dense form (models/document_mask.py)
        attention_mask = None if documents is None else documents.dense()
        if self.mtp is not None:  # (the heads' losses stop at document ends: mtp.py)
            self.mtp.prepare(None if documents is None else documents.doc_ids)
        inner = unwrap(model)
        ref = None
        if inner.post_process and ratio is not None:
            if needs_reference(ratio, self.cfg.slm.slm_select_mode):
                if self.online is not None:
                    ref = self.online.per_token_loss(tokens, labels)
                else:
                    ref = batch["ref_loss"].to(self.device, non_blocking=True)
            elif ratio < 1.0 and "ref_loss" in batch and self.online is None:
                # Ablation modes rank without a reference; a sidecar, when there is one, still
                # measures the excess loss of what they select (the op ignores it for ranking).
                ref = batch["ref_loss"].to(self.device, non_blocking=True)
            self._micro += 1
            self.slm_loss.prepare(
                MicroBatchSelection(ref, loss_mask, ratio, seed_base + self._micro)
            )
            self._last_ref, self._last_labels = ref, labels
        if inner.post_process and training and self.teacher is not None:
            self.distill.prepare(self.teacher.logits(tokens, position_ids, attention_mask))
        # (the MTP heads' targets: the loss mask shifted by megatron-core; without it, every token)
        extra = {"loss_mask": loss_mask} if self.mtp is not None else {}
        output = model(tokens, position_ids, attention_mask, labels=labels, **extra)  # [b, s]
        # Per-source counts are the training blend's; a validation blend of its own has others.
        source = batch.get("dataset_id") if training else None
        return output, partial(self._loss_func, ratio, loss_mask, ref, source)

    def _loss_func(self, ratio, loss_mask, ref, source, per_token_loss):
        if ratio is None:  # plain causal LM: megatron-core's per-token loss, masked
            mask = loss_mask.to(per_token_loss.dtype)
            loss = (per_token_loss.float() * mask).sum()
            n = mask.sum()
            zero = torch.zeros((), device=loss.device)
            stats = torch.stack([loss.detach(), n, loss.detach(), n] + [zero] * 6)
            stats = self._with_sources(stats, mask, mask, source)
            stats = self._with_heads(stats, loss_mask)
            loss, stats = self._distilled(loss, mask, stats)
            return loss, n.to(torch.int), {"slm": stats}
        out = self.slm_loss.last
        selected = out.selected.t()  # [b, s]
        loss = (per_token_loss * selected).sum()
        st = out.stats
        stats = torch.cat([torch.stack([st[k].float() for k in OP_STAT_KEYS]),
                           excess_split(out.loss.t(), ref, loss_mask, selected)])  # fmt: skip
        stats = self._with_sources(stats.detach(), loss_mask, selected, source)
        stats = self._with_heads(stats, loss_mask)
        loss, stats = self._distilled(loss, selected, stats)
        return loss, selected.sum().to(torch.int), {"slm": stats}

    def _distilled(self, lm_loss, trained, stats):
        """With a teacher: the loss to optimise (metrics.KD_STATS appended to the statistics:
        the KD loss summed over the ``trained`` tokens, and their count; zeros in validation)."""
        if self.distill is None:
            return lm_loss, stats
        divergence = self.distill.take()
        if divergence is None:  # validation: the LM loss
            return lm_loss, torch.cat([stats, stats.new_zeros(len(KD_STATS))])
        weights = trained.to(divergence.dtype)
        loss, kd_sum = self.distill.combine(lm_loss, divergence, weights)
        kd_stats = torch.stack([kd_sum, weights.sum()]).to(stats.dtype)
        return loss, torch.cat([stats, kd_stats])

    def _with_heads(self, stats, loss_mask):
        """With --mtp-num-layers: each head's loss sum over its tokens, then their counts."""
        if self.mtp is None:
            return stats
        return torch.cat([stats, self.mtp.statistics(loss_mask).to(stats.dtype)])

    def _with_sources(self, stats, valid, selected, source):
        """Append per-blend-source (valid, selected) token counts (see metrics.source_counts)."""
        if self.n_sources < 2:
            return stats
        return torch.cat([stats, source_counts(valid, selected, source, self.n_sources)])

    def _schedule_position(self, iteration: int, consumed_samples: int):
        """Where the learning-rate schedule stands after ``iteration`` steps: the steps, or with
        a growing batch the full global batches the consumed samples make (Megatron-LM's
        scheduler counts samples; ours counts them in full batches)."""
        if self.sizes.batch_schedule is None:
            return iteration
        return consumed_samples / self.sizes.global_batch_size

    def _run_schedule(
        self, batches, forward_only: bool, ratio: float, seed_base: int, num_microbatches: int
    ):
        n_chunks = len(self.chunks)
        # Every model chunk reads the same micro-batch sequence (megatron-core's convention).
        if n_chunks > 1:
            micro = [next(batches) for _ in range(num_microbatches)]
            iterators = [iter(micro) for _ in range(n_chunks)]
        else:
            iterators = [batches]
        self._micro = 0
        return get_forward_backward_func()(
            forward_step_func=partial(
                self._forward_step, ratio, seed_base, training=not forward_only
            ),
            data_iterator=iterators if n_chunks > 1 else iterators[0],
            model=self.chunks if n_chunks > 1 else self.chunks[0],
            num_microbatches=num_microbatches,
            seq_length=self.cfg.training.seq_length,
            micro_batch_size=self.cfg.training.micro_batch_size,
            forward_only=forward_only,
        )

    def _reduce_stats(self, outputs) -> torch.Tensor | None:
        """Sum the micro-batch statistics over this rank's micro-batches and the DP group."""
        n = len(STAT_KEYS) + (2 * self.n_sources if self.n_sources > 1 else 0)
        n += 2 * self.mtp.num_layers if self.mtp is not None else 0
        n += len(KD_STATS) if self.distill is not None else 0
        total = torch.zeros(n, dtype=torch.float64, device=self.device)
        for out in outputs:
            total += out["slm"].to(torch.float64)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
            return total
        return None

    def train_step(self, count_zeros: bool = False):
        """One optimizer step: (statistics, gradient norm, ratio), on the device.
        ``count_zeros``: the optimizer step also counts the gradients' zeros."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        ratio = self._ratio()
        if self._aux_coeffs is not None and ratio is not None:
            aux, z = self._aux_coeffs
            self.model_config.moe_aux_loss_coeff = aux * ratio
            self.model_config.moe_z_loss_coeff = None if z is None else z * ratio
        if self.mtp is not None and ratio is not None:  # (the same reasoning: mtp.py)
            factor = self.cfg.training.mtp_loss_scaling_factor
            self.model_config.mtp_loss_scaling_factor = factor * ratio
        t = self.cfg.training
        consumed = self.batches.consumed_samples
        self.global_batch = self.sizes.global_batch_at(consumed)
        outputs = self._run_schedule(
            self.batches,
            False,
            ratio,
            t.seed * 1_000_003 + self.iteration * 4099,
            self.sizes.microbatches_at(consumed),
        )
        if t.empty_unused_memory_level >= 1:
            torch.cuda.empty_cache()
        # No host sync (but fp16's loss scaler).
        ok, grad_norm = self.optimizer_step.step(count_zeros=count_zeros)
        if ok:  # (a step of b samples: b / global of a full one, as Megatron-LM counts)
            growing, full = self.sizes.batch_schedule, self.sizes.global_batch_size
            self.scheduler.step(increment=1 if growing is None else self.global_batch / full)
        if t.empty_unused_memory_level >= 2:
            torch.cuda.empty_cache()
        return self._reduce_stats(outputs), grad_norm, ratio

    @torch.no_grad()
    def evaluate(self, split: str = "validation") -> dict[str, float]:
        """Mean loss of each validation set (``split="test"``: of the test split) over its first
        --eval-iters global batches (``""`` names the only set; more with
        --multiple-validation-sets), at ratio 1."""
        for chunk in self.chunks:
            chunk.eval()
        losses = {}
        for name, dataset in self.valid_sets if split == "validation" else self.test_sets:
            loss = self._validation_loss((split, name), dataset)
            if loss is not None:  # None: not the last pipeline stage, or no batch
                losses[name] = loss
        for chunk in self.chunks:
            chunk.train()
        return losses

    def _validation_loss(self, key: tuple[str, str], dataset) -> float | None:
        if key not in self.valid_batches:
            self.valid_batches[key] = self._micro_batches(dataset)
        else:
            self.valid_batches[key].rewind()  # the same first batches, on the same workers
        batches = self.valid_batches[key]
        eval_ratio = 1.0 if self.cfg.slm.enabled else None
        total = None  # only the last pipeline stage has statistics
        try:
            for n in self._evaluation_rounds(key, dataset):
                stats = self._reduce_stats(self._run_schedule(batches, True, eval_ratio, 0, n))
                if stats is not None:
                    total = stats if total is None else total + stats
        except StopIteration:
            pass
        if total is None:
            return None
        return (total[STAT_KEYS.index("loss_sum")] / total[STAT_KEYS.index("n_valid")]).item()

    def _evaluation_rounds(self, key: tuple[str, str], dataset) -> list[int]:
        """The micro-batches of each schedule one evaluation runs: --eval-iters global batches,
        or with --full-validation the validation split's every micro-batch that each
        data-parallel rank has (every rank runs as many), the last schedule a partial batch."""
        num = self.sizes.num_microbatches
        if not (self.cfg.training.full_validation and key[0] == "validation"):
            return [num] * self.cfg.training.eval_iters
        per_rank = self.cfg.training.micro_batch_size * self.sizes.data_parallel_size
        whole, rest = divmod(len(dataset) // per_rank, num)
        par = self.cfg.parallel
        group = par.microbatch_group(self.arch.num_layers)
        if group is not None:  # (the interleaved schedule runs only some counts)
            rest = runnable_microbatches(rest, group, par.pipeline_model_parallel_size)
        if key not in self._announced and torch.distributed.get_rank() == 0:
            self._announced.add(key)
            read = (whole * num + rest) * per_rank
            left = len(dataset) - read
            logger.info(
                "full validation%s: %d samples per evaluation%s", f" of {key[1]}" * bool(key[1]),
                read, f" ({left} left out: too few for a micro-batch on every data-parallel "
                "rank)" if left else "",
            )  # fmt: skip
        return [num] * whole + ([rest] if rest else [])

    # -- the loop ---------------------------------------------------------------------------

    def save(self, non_persistent: bool = False, weights_only: bool = False) -> None:
        """A checkpoint of this step in --save (``non_persistent``: in the non-persistent
        directory, which keeps only its newest; ``weights_only``: without the optimizer state
        and the schedule, as --no-save-optim)."""
        if not self.cfg.checkpoint.save:
            return
        self.check_finite()  # never a checkpoint of a diverged state
        self.finish_saves()  # one background save at a time
        ck = self.cfg.checkpoint
        weights_only = weights_only or ck.no_save_optim
        checkpointing.save_checkpoint(
            ck.non_persistent_dir(ck.save) if non_persistent else ck.save,
            self.iteration,
            self.chunks,
            None if weights_only else self.optimizer,
            None if weights_only else self.scheduler,
            consumed_samples=self.batches.consumed_samples,
            model_config=self.arch,
            metadata={
                "tokenizer": self.plan.tokenizer_record,
                "model_args": self.cfg.model.record(),
                "make_vocab_size_divisible_by": self.build_opts.make_vocab_size_divisible_by,
                "params_dtype": str(self.build_opts.params_dtype).removeprefix("torch."),
                "config": dataclasses.asdict(self.cfg),
                "optimizer_layout": optimizer_layout(
                    self.cfg, self.sizes.data_parallel_size, self.arch.num_layers
                ),
                "lr_schedule": self.plan.lr_schedule,
                "mtp_num_layers": self.cfg.training.mtp_num_layers or 0,
                **checkpoint_record(self.plan.batch_list),
                **self._chat_metadata(),
                **({"upcycled_from": self.upcycled_from} if self.upcycled_from else {}),
            },
            fully_parallel=ck.ckpt_fully_parallel_save,
            async_queue=self.async_saves,
            save_rng=not ck.no_save_rng,
            retain_interval=None if non_persistent else ck.save_retain_interval,
            keep_latest_only=non_persistent,
            on_published=None if non_persistent else self._progress_line(),
            strategies=self.save_strategies,
        )

    def _progress_line(self):
        """--log-progress: what a persistent save of this step adds to progress.txt once it is
        published (its figures as of now), and the checkpoints it deleted."""
        if self.progress is None or not self.progress.active:
            return None
        line = self.progress.saved(
            self.iteration, self.batches.consumed_samples, self.cfg.training.seq_length
        )

        def published(dropped: list[int]) -> None:
            self.progress.append(line)
            for iteration in dropped:
                self.progress.append(f"Deleted checkpoint\tIteration: {iteration}")

        return published

    def finish_saves(self, blocking: bool = True) -> None:
        """Publish the background saves whose writers finished on every rank (``blocking``:
        wait for them). A collective with a host read: at log steps, saves and the end only."""
        if self.async_saves is not None:
            self.async_saves.maybe_finalize_async_calls(blocking=blocking)

    def check_finite(self) -> None:
        """Steps with a non-finite gradient norm since the last check: logged, or (with
        --check-for-nan-in-loss-and-grad) the end of the run, after the log has written them and
        a background save of an earlier step is published."""
        try:
            self.nonfinite.check()
        except DivergenceError:
            self.log.close(self.iteration)
            self.finish_saves()
            raise

    def _chat_metadata(self) -> dict:
        """SFT runs record their chat template: the HF export writes it (same prompts)."""
        if not self.cfg.sft.enabled:
            return {}
        return {"chat_template": self.tokenizer.chat_template}

    def advance(self) -> str | None:
        """One training step and what its iteration asks for: a log line, a selection picture,
        an evaluation, a checkpoint, the exit check. Returns the reason to stop, or None.

        Between log steps the host never waits for the device: the step's statistics stay there
        until the logger reads them (``metrics.TrainingLogger``)."""
        cfg = self.cfg
        t, ck = cfg.training, cfg.checkpoint
        log_step = self.log.is_log_step(self.iteration + 1)
        skipped = self.iteration + 1 in t.iterations_to_skip
        ratio = None
        if skipped:
            self.skip_step()
        else:
            ratio = self._train_and_record(log_step)
        if log_step:
            last = None if skipped else self.slm_loss.last
            self.log.log(self.iteration, last, self._last_ref)
            self.check_finite()
            self.finish_saves(blocking=False)
        interval = cfg.logging.log_selection_interval
        picture = bool(interval and self.iteration % interval == 0 and ratio is not None)
        evaluate = bool(t.eval_interval and self.iteration % t.eval_interval == 0)
        save = bool(ck.save and ck.save_interval and self.iteration % ck.save_interval == 0)
        # Megatron-LM's: a non-persistent save where no persistent one falls (nor the end's)
        n, final = ck.non_persistent_save_interval, self.iteration >= self.sizes.train_iters
        save_non_persistent = bool(not (save or final) and n and self.iteration % n == 0)
        hashes = t.check_weight_hash_across_dp_replicas_interval
        compare = bool(hashes and self.iteration % hashes == 0)
        if picture or evaluate or save or save_non_persistent or compare:
            self.log.read()  # the steps so far are timed without this work
            if picture:
                self.log.selection_image(
                    self.iteration, self.slm_loss.last, self._last_ref, self._last_labels,
                    self.tokenizer,
                )  # fmt: skip
            gather = evaluate or save or save_non_persistent or compare
            with self.params_gathered() if gather else contextlib.nullcontext():
                if compare:  # (before a save: never a checkpoint of diverged replicas)
                    check_replicas(self.chunks, self.iteration, self.device)
                if evaluate:
                    with self.manual_gc.evaluation():
                        losses = self.evaluate()
                    self.log.validation(self.iteration, losses)
                if save:
                    self.save()
                    self._last_saved = self.iteration
                elif save_non_persistent:
                    self.save(non_persistent=True)
            self.log.restart_clock()
        return self.exit.should_exit(self.iteration, vote=log_step)

    def _train_and_record(self, log_step: bool) -> float | None:
        """One optimizer step, its statistics kept for the log (on the device); the ratio."""
        lg = self.cfg.logging
        self.profiler.before_step(self.iteration)
        before = self.global_batch
        stats, grad_norm, ratio = self.train_step(count_zeros=log_step and lg.log_num_zeros_in_grad)
        if self.sizes.batch_schedule and before != self.global_batch and dist.get_rank() == 0:
            logger.info("global batch size %d from step %d", self.global_batch, self.iteration + 1)
        self.iteration += 1
        self.profiler.step(self.iteration)
        self.manual_gc.after_step(self.iteration)
        self.nonfinite.record(self.iteration, grad_norm)
        self.sample_record.step(self.iteration)
        lr = logged_lr(self.optimizer)
        extras = {}  # Megatron-LM's log-step figures
        if log_step and lg.log_params_norm:
            extras["params_norm"] = params_norm(self.chunks)
        if self.optimizer_step.num_zeros is not None:
            extras["num_zeros_in_grad"] = self.optimizer_step.num_zeros
        if self.arch.num_experts:
            dp = parallel_state.get_data_parallel_world_size()
            microbatches = self.global_batch // (self.cfg.training.micro_batch_size * dp)
            per_layer = self.cfg.logging.moe_per_layer_logging
            extras.update(moe_aux_losses(log_step, microbatches, self.arch.moe_layers, per_layer))
        self.log.step(
            self.iteration, stats, grad_norm, lr, self.batches.consumed_samples, ratio,
            self.global_batch, extras,
        )  # fmt: skip
        return ratio

    def skip_step(self) -> None:
        """--iterations-to-skip (Megatron-LM's): this iteration's global batch is read and
        dropped on every rank; the iteration counts, nothing is computed or updated (the
        learning-rate schedule does not advance)."""
        consumed = self.batches.consumed_samples
        for _ in range(self.sizes.microbatches_at(consumed)):
            next(self.batches)
        self.iteration += 1
        self.sample_record.skip()
        if dist.get_rank() == 0:
            logger.info(
                "iteration %d skipped (--iterations-to-skip): its %d samples are not trained on",
                self.iteration, self.batches.consumed_samples - consumed,
            )  # fmt: skip

    def _final_evaluation(self) -> None:
        """Megatron-LM's evaluation once training is done (not after an exit before the end):
        the validation sets, unless this step's --eval-interval evaluation just ran, then the
        test split, --eval-iters batches each; with --skip-train, both at the loaded step."""
        t = self.cfg.training
        if not (t.eval_iters or t.full_validation) or not (t.eval_interval or t.skip_train):
            return
        just_ran = t.eval_interval and self.iteration % t.eval_interval == 0 and not t.skip_train
        splits = [("validation", self.valid_sets), ("test", self.test_sets if t.eval_iters else [])]
        splits = [name for name, sets in splits if sets and not (name == "validation" and just_ran)]
        if not splits:
            return
        self.log.read()
        with self.params_gathered(), self.manual_gc.evaluation():
            for split in splits:
                self.log.validation(self.iteration, self.evaluate(split), split)

    def train(self) -> dict:
        """Steps until the end or a clean exit; a checkpoint of the last step (with --save)."""
        for chunk in self.chunks:
            chunk.train()
        self._last_saved = self.iteration if self.plan.checkpoint is not None else None
        reason = "finished"
        t = self.cfg.training
        if t.check_weight_hash_across_dp_replicas_interval and not t.skip_train:
            with self.params_gathered():  # (Megatron-LM's: the loaded or initial weights too)
                check_replicas(self.chunks, self.iteration, self.device)
        self.log.restart_clock()
        while self.iteration < self.sizes.train_iters and not t.skip_train:
            reason = self.advance()
            if reason:
                break
        else:
            reason = "skip-train" if t.skip_train else "finished"
            self._final_evaluation()
        self.profiler.close()
        self.batches.close()
        for batches in self.valid_batches.values():
            batches.close()
        self.log.close(self.iteration)
        if self.cfg.checkpoint.save and self._last_saved != self.iteration and not t.skip_train:
            with self.params_gathered():
                self.save()
        self.finish_saves()
        logger.info("training stopped at iteration %d (%s)", self.iteration, reason)
        return {"iteration": self.iteration, "reason": reason}


def pretrain(cfg: PretrainConfig, plan: TrainingPlan, device: torch.device) -> dict:
    """Train to the end (or a clean exit). The entry point initialised the parallel layout."""
    trainer = Trainer(cfg, plan, device)
    try:
        return trainer.train()
    finally:
        trainer.profiler.close()
        trainer.manual_gc.close()
        trainer.exit.restore()
