"""The SLM pretraining loop on megatron-core.

One optimizer step: megatron-core's forward/backward schedule (no pipelining, 1F1B or interleaved)
runs every micro-batch of this rank; on the last pipeline stage the loss is the selective op's
per-token loss summed over the selected tokens, and megatron-core's ``calculate_per_token_loss``
divides the gradients by the number of selected tokens of the whole global batch (all micro-batches,
all data-parallel ranks): the optimised loss is the mean over all selected tokens, not a mean of
per-micro-batch means.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megatron_slm import checkpoint as checkpointing
from megatron_slm.checkpoint import (
    CheckpointInfo,
    read_checkpoint,
    resolve_architecture,
    resolve_tokenizer,
    tokenizer_record,
)
from megatron_slm.data.sft import packed_attention_mask
from megatron_slm.models import GPTModelConfig, ModelBuildOptions, build_model, default_spec_impl
from megatron_slm.models.sharding import unwrap
from megatron_slm.training.config import DerivedSizes, PretrainConfig, validate
from megatron_slm.training.data import MicroBatches, build_datasets, build_sft_dataset
from megatron_slm.training.metrics import STAT_KEYS, TrainingLogger
from megatron_slm.training.online_reference import OnlineReference
from megatron_slm.training.signals import ExitController
from megatron_slm.training.slm_loss import MicroBatchSelection, SelectiveLMLoss

logger = logging.getLogger("megatron_slm")


def _params_dtype(cfg: PretrainConfig) -> torch.dtype:
    if cfg.training.bf16:
        return torch.bfloat16
    if cfg.training.fp16:
        return torch.float16
    return torch.float32


def _build_optimizer(cfg: PretrainConfig, chunks, train_iters: int):
    t = cfg.training
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            adam_eps=t.adam_eps,
            clip_grad=t.clip_grad,
            bf16=t.bf16,
            fp16=t.fp16,
            params_dtype=_params_dtype(cfg),
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        ),
        chunks,
    )
    scheduler = OptimizerParamScheduler(
        opt,
        init_lr=0.0 if t.lr_warmup_iters else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=t.lr_decay_iters or train_iters,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=max(1, train_iters // 10) if t.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if t.lr_decay_style == "WSD" else None,
    )
    return opt, scheduler


@dataclass
class TrainingPlan:
    """What the flags and the --load checkpoint decide before any process group exists."""

    tokenizer: object
    tokenizer_record: dict
    arch: GPTModelConfig
    sizes: DerivedSizes
    checkpoint: CheckpointInfo | None
    sft_dataset: object | None = None  # --sft-data: built (and checked) before any work

    def virtual_pipeline_size(self, cfg: PretrainConfig) -> int | None:
        vstage = cfg.parallel.num_layers_per_virtual_pipeline_stage
        pp = cfg.parallel.pipeline_model_parallel_size
        return self.arch.num_layers // pp // vstage if vstage else None


def plan_training(cfg: PretrainConfig, world_size: int) -> TrainingPlan:
    """Tokenizer, architecture and sizes: the checkpoint's when resuming or fine-tuning (flags
    may only confirm them), else the flags'. Fails before any work, naming the flag."""
    ckpt = read_checkpoint(cfg.checkpoint.load) if cfg.checkpoint.load else None
    tokenizer, ttype, tmodel = resolve_tokenizer(cfg.tokenizer, ckpt)
    if cfg.sft.enabled:
        _set_chat_template(cfg, tokenizer, ckpt)
    arch = resolve_architecture(cfg.model, ckpt, tokenizer.vocab_size)
    sizes = validate(cfg, world_size, arch)
    sft = build_sft_dataset(cfg, sizes, tokenizer) if cfg.sft.enabled else None
    record = tokenizer_record(ttype, tmodel, tokenizer)
    return TrainingPlan(tokenizer, record, arch, sizes, ckpt, sft)


def _set_chat_template(cfg: PretrainConfig, tokenizer, ckpt: CheckpointInfo | None) -> None:
    """--sft-chat-template FILE, else the --load checkpoint's SFT template, else the
    tokenizer's own (data/chat.py's default for SentencePiece models)."""
    path = cfg.sft.sft_chat_template
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                tokenizer.chat_template = f.read()
        except OSError as exc:
            raise ValueError(f"--sft-chat-template {path}: cannot read ({exc.strerror})") from None
    elif ckpt is not None and ckpt.meta.get("chat_template"):
        tokenizer.chat_template = ckpt.meta["chat_template"]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
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
        self.build_opts = ModelBuildOptions(
            transformer_impl=cfg.model.transformer_impl or default_spec_impl(self.device),
            params_dtype=_params_dtype(cfg),
            sequence_parallel=p.sequence_parallel,
            num_layers_per_virtual_pipeline_stage=p.num_layers_per_virtual_pipeline_stage,
            # A loaded checkpoint keeps its padded vocabulary at any TP size that divides it.
            make_vocab_size_divisible_by=(
                plan.checkpoint.divisor_for(tp) if plan.checkpoint else cfg.model.vocab_divisor
            ),
            use_cpu_initialization=self.device.type == "cpu",
            recompute_activations=t.recompute_activations,
        )
        s = cfg.slm
        if plan.sft_dataset is not None:
            self.train_ds, self.valid_ds = plan.sft_dataset, None
        else:
            datasets = build_datasets(
                cfg,
                self.sizes,
                self.tokenizer,
                require_sidecar=s.needs_reference and s.slm_ref_source == "sidecar",
            )
            self.train_ds, self.valid_ds, _ = datasets
        self._build_model()
        # Built after the trained model, so its initialisation does not depend on the source.
        self.online = None
        if s.needs_reference and s.slm_ref_source == "online":
            self.online = OnlineReference(
                s.slm_ref_load,
                self.device,
                self.build_opts.params_dtype,
                self.tokenizer.eod,
            )
        self.iteration, consumed = 0, 0
        if cfg.checkpoint.load:
            state = checkpointing.load_checkpoint(
                plan.checkpoint.path,
                self.chunks,
                None if cfg.checkpoint.finetune else self.optimizer,
                None if cfg.checkpoint.finetune else self.scheduler,
                weights_only=cfg.checkpoint.finetune,
            )
            if not cfg.checkpoint.finetune:
                self.iteration, consumed = state.iteration, state.consumed_samples
            logger.info("loaded %s at iteration %d", cfg.checkpoint.load, self.iteration)
        self.batches = MicroBatches(self.train_ds, t.micro_batch_size, consumed)
        self.log = TrainingLogger(cfg, self.arch, self.sizes, self.device)
        self.exit = ExitController(cfg.checkpoint, self.device)

    def _build_model(self) -> None:
        cfg = self.cfg
        chunks = build_model(self.arch, self.build_opts, device=self.device)
        config = chunks[0].config
        if cfg.training.bf16 or cfg.training.fp16:
            chunks = [Float16Module(config, c) for c in chunks]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        )
        self.chunks = [
            DistributedDataParallel(config, ddp_config, c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)
        ]
        self._last_ref = None
        self.slm_loss = SelectiveLMLoss(
            cfg.slm.slm_select_scope, cfg.slm.slm_select_mode, cfg.slm.slm_unscored
        )
        if cfg.slm.enabled:
            for chunk in self.chunks:
                if unwrap(chunk).post_process:
                    self.slm_loss.install(unwrap(chunk))
        self.optimizer, self.scheduler = _build_optimizer(cfg, self.chunks, self.sizes.train_iters)
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        no_sync = [c.no_sync for c in self.chunks]
        config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
        self.config = config

    # -- one step ---------------------------------------------------------------------------

    def _ratio(self) -> float | None:
        """This step's ratio; None: plain causal LM (megatron-core's loss)."""
        s = self.cfg.slm
        if not s.enabled:
            return None
        return s.slm_ratio if self.iteration >= s.slm_start_iter else 1.0

    def _forward_step(self, ratio, seed_base, data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(self.device, non_blocking=True)  # [b, s]
        labels = batch["labels"].to(self.device, non_blocking=True)  # [b, s]
        loss_mask = batch["loss_mask"].to(self.device, non_blocking=True)
        position_ids = batch["position_ids"].to(self.device, non_blocking=True)
        attention_mask = None  # plain causal; packed SFT rows: block-diagonal causal
        if "segment_ids" in batch:
            attention_mask = packed_attention_mask(batch["segment_ids"].to(self.device))
        inner = unwrap(model)
        if inner.post_process and ratio is not None:
            ref = None
            if ratio < 1.0 and self.cfg.slm.slm_select_mode == "excess":
                if self.online is not None:
                    ref = self.online.per_token_loss(tokens, labels)
                else:
                    ref = batch["ref_loss"].to(self.device, non_blocking=True)
            self._micro += 1
            self.slm_loss.prepare(
                MicroBatchSelection(ref, loss_mask, ratio, seed_base + self._micro)
            )
            self._last_ref = ref
        output = model(tokens, position_ids, attention_mask, labels=labels)  # [b, s], last stage
        return output, partial(self._loss_func, ratio, loss_mask)

    def _loss_func(self, ratio, loss_mask, per_token_loss):
        if ratio is None:  # plain causal LM: megatron-core's per-token loss, masked
            mask = loss_mask.to(per_token_loss.dtype)
            loss = (per_token_loss.float() * mask).sum()
            n = mask.sum()
            zero = torch.zeros((), device=loss.device)
            stats = torch.stack([loss.detach(), n, loss.detach(), n, zero, zero])
            return loss, n.to(torch.int), {"slm": stats}
        out = self.slm_loss.last
        selected = out.selected.t()  # [b, s]
        loss = (per_token_loss * selected).sum()
        st = out.stats
        stats = torch.stack([st[k].float() for k in STAT_KEYS])
        return loss, selected.sum().to(torch.int), {"slm": stats.detach()}

    def _run_schedule(self, batches, forward_only: bool, ratio: float, seed_base: int):
        n_chunks = len(self.chunks)
        # Every model chunk reads the same micro-batch sequence (megatron-core's convention).
        if n_chunks > 1:
            micro = [next(batches) for _ in range(self.sizes.num_microbatches)]
            iterators = [iter(micro) for _ in range(n_chunks)]
        else:
            iterators = [batches]
        self._micro = 0
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, ratio, seed_base),
            data_iterator=iterators if n_chunks > 1 else iterators[0],
            model=self.chunks if n_chunks > 1 else self.chunks[0],
            num_microbatches=self.sizes.num_microbatches,
            seq_length=self.cfg.training.seq_length,
            micro_batch_size=self.cfg.training.micro_batch_size,
            forward_only=forward_only,
        )

    def _reduce_stats(self, outputs) -> torch.Tensor | None:
        """Sum the micro-batch statistics over this rank's micro-batches and the DP group."""
        total = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=self.device)
        for out in outputs:
            total += out["slm"].to(torch.float64)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
            return total
        return None

    def train_step(self):
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        ratio = self._ratio()
        outputs = self._run_schedule(
            self.batches, False, ratio, self.cfg.training.seed * 1_000_003 + self.iteration * 4099
        )
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        return self._reduce_stats(outputs), grad_norm, ratio

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.valid_ds is None or len(self.valid_ds) == 0:
            return None
        for chunk in self.chunks:
            chunk.eval()
        batches = MicroBatches(self.valid_ds, self.cfg.training.micro_batch_size)
        eval_ratio = 1.0 if self.cfg.slm.enabled else None
        total = None  # only the last pipeline stage has statistics
        try:
            for _ in range(self.cfg.training.eval_iters):
                stats = self._reduce_stats(self._run_schedule(batches, True, eval_ratio, 0))
                if stats is not None:
                    total = stats if total is None else total + stats
        except StopIteration:
            pass
        for chunk in self.chunks:
            chunk.train()
        if total is None:
            return None
        return (total[STAT_KEYS.index("loss_sum")] / total[STAT_KEYS.index("n_valid")]).item()

    # -- the loop ---------------------------------------------------------------------------

    def save(self) -> None:
        if not self.cfg.checkpoint.save:
            return
        checkpointing.save_checkpoint(
            self.cfg.checkpoint.save,
            self.iteration,
            self.chunks,
            self.optimizer,
            self.scheduler,
            consumed_samples=self.batches.consumed_samples,
            model_config=self.arch,
            metadata={
                "tokenizer": self.plan.tokenizer_record,
                "model_args": self.cfg.model.record(),
                "make_vocab_size_divisible_by": self.build_opts.make_vocab_size_divisible_by,
                "params_dtype": str(self.build_opts.params_dtype).removeprefix("torch."),
                "config": dataclasses.asdict(self.cfg),
                **self._chat_metadata(),
            },
        )

    def _chat_metadata(self) -> dict:
        """SFT runs record their chat template: the HF export writes it (same prompts)."""
        if not self.cfg.sft.enabled:
            return {}
        return {"chat_template": self.tokenizer.chat_template}

    def train(self) -> dict:
        cfg, total_iters = self.cfg, self.sizes.train_iters
        for chunk in self.chunks:
            chunk.train()
        last_saved = self.iteration if cfg.checkpoint.load else None
        reason = "finished"
        while self.iteration < total_iters:
            t0 = time.perf_counter()
            stats, grad_norm, ratio = self.train_step()
            self.iteration += 1
            self.log.step(
                self.iteration,
                stats,
                grad_norm,
                self.optimizer.param_groups[0]["lr"],
                time.perf_counter() - t0,
                self.batches.consumed_samples,
                ratio,
                self.slm_loss.last,
                self._last_ref,
            )
            t = cfg.training
            if t.eval_interval and self.iteration % t.eval_interval == 0:
                self.log.validation(self.iteration, self.evaluate())
            ck = cfg.checkpoint
            if ck.save and ck.save_interval and self.iteration % ck.save_interval == 0:
                self.save()
                last_saved = self.iteration
            reason = self.exit.should_exit(self.iteration)
            if reason:
                break
        else:
            reason = "finished"
        if cfg.checkpoint.save and last_saved != self.iteration:
            self.save()
        self.log.close()
        logger.info("training stopped at iteration %d (%s)", self.iteration, reason)
        return {"iteration": self.iteration, "reason": reason}


def pretrain(cfg: PretrainConfig, plan: TrainingPlan, device: torch.device) -> dict:
    """Train to the end (or a clean exit). The entry point initialised the parallel layout."""
    trainer = Trainer(cfg, plan, device)
    try:
        return trainer.train()
    finally:
        trainer.exit.restore()
