"""Typed configuration of ``python -m megatron_slm.pretrain``.

Each dataclass is one concern; every field is one command-line flag (``--field-name``, Megatron-LM's
name where Megatron has the concept) whose help text is the field's ``help`` metadata. Validation
that needs only one group lives in its ``__post_init__``; checks across groups or against the world
size live in :func:`validate`. Every message names the flag.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import signal
from dataclasses import dataclass

import torch

from megatron_slm.checkpoint import NON_PERSISTENT_SUBDIR, checkpoint_at_step
from megatron_slm.cli import arg, check_at_least, check_choices, flag_name, parse_configs
from megatron_slm.cli import build_parser as build_cli_parser
from megatron_slm.data.tokenizer import TokenizerArgs
from megatron_slm.errors import ConfigError
from megatron_slm.models.args import ModelArgs, packed_documents_spec
from megatron_slm.models.pipeline_layout import (
    LAYOUT_FLAG,
    layout_virtual_size,
    parse_pipeline_layout,
)
from megatron_slm.models.presets import (
    GPTModelConfig,
    check_parallel_layout,
    virtual_pipeline_size,
)
from megatron_slm.ops.selection import (
    SELECT_SCOPES,
    needs_reference,
    ratio_error,
    select_mode_arg,
    unscored_arg,
)
from megatron_slm.platform import device_arg
from megatron_slm.training.batch_ramp import BatchRamp, batch_ramp, check_ramp_values
from megatron_slm.training.muon_args import MuonArgs
from megatron_slm.training.step_batch_schedule import (
    StepBatchSchedule,
    check_schedule_sizes,
    parse_step_schedule,
)

ACCOUNT_FOR_EMBEDDING = "--account-for-embedding-in-pipeline-split"
ACCOUNT_FOR_LOSS = "--account-for-loss-in-pipeline-split"


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = arg(1, "Tensor-parallel size (shards heads, FFN, vocab).")
    pipeline_model_parallel_size: int = arg(1, "Pipeline-parallel size (shards layers).")
    num_layers_per_virtual_pipeline_stage: int | None = arg(
        None, "Layers per virtual pipeline stage (interleaved 1F1B schedule)."
    )
    num_virtual_stages_per_pipeline_rank: int | None = arg(
        None,
        "Virtual pipeline stages per pipeline rank (interleaved 1F1B, Megatron-LM's flag): each "
        "stage's layers split evenly into that many chunks; unlike "
        "--num-layers-per-virtual-pipeline-stage it combines with "
        "--decoder-first/last-pipeline-num-layers.",
    )
    no_overlap_p2p_communication: bool = arg(
        False,
        "Interleaved schedule: do not overlap the pipeline's sends and receives with the "
        "forward and backward of other chunks (Megatron-LM's flag); they then go batched, "
        "which needs --pipeline-model-parallel-size > 2 (Megatron-LM's rule).",
    )
    microbatch_group_size_per_virtual_pipeline_stage: int | None = arg(
        None,
        "Interleaved schedule: micro-batches each virtual stage runs in a row (Megatron-LM's "
        "flag; default --pipeline-model-parallel-size). At least that, at most a step's "
        "micro-batches, and what is left of a step after whole groups is 0 or at least the "
        "pipeline size (megatron-core's rule).",
    )
    decoder_first_pipeline_num_layers: int | None = arg(
        None,
        "Layers of the first pipeline stage (Megatron-LM's uneven split, e.g. fewer beside the "
        "embedding); the stages between share the rest evenly.",
    )
    decoder_last_pipeline_num_layers: int | None = arg(
        None,
        "Layers of the last pipeline stage (e.g. fewer beside the output layer and the loss).",
    )
    pipeline_model_parallel_layout: str | None = arg(
        None,
        "Which layers each pipeline stage holds (Megatron-LM's flag): e.g. "
        '"Et*3|(tt|)*2t|tL" (E embedding, t transformer layer, m MTP head, L output layer '
        "and loss, | between stages); PP x V stages give V virtual stages per rank. Replaces "
        "the other stage flags.",
    )
    account_for_embedding_in_pipeline_split: bool = arg(
        False,
        "Count the embedding as one layer when splitting the layers over the pipeline stages "
        "(Megatron-LM's flag): every stage then holds as many, the first one layer fewer.",
    )
    account_for_loss_in_pipeline_split: bool = arg(
        False,
        "Count the output layer and the loss as one layer when splitting the layers over the "
        "pipeline stages (Megatron-LM's flag): the last stage holds one layer fewer.",
    )
    sequence_parallel: bool = arg(False, "Shard norm/dropout activations along the sequence.")
    use_distributed_optimizer: bool = arg(False, "Shard optimizer state across data parallel.")
    overlap_grad_reduce: bool = arg(
        False,
        "Reduce the data-parallel gradients in buckets during the backward of each step's last "
        "micro-batch, as each bucket's gradients are ready (asynchronous collectives), instead "
        "of all at once after it.",
    )
    overlap_param_gather: bool = arg(
        False,
        "With --use-distributed-optimizer and --overlap-grad-reduce: all-gather the updated "
        "parameters bucket by bucket during the next forward, instead of in the optimizer step.",
    )
    ddp_bucket_size: int | None = arg(
        None,
        "Elements per gradient bucket with --overlap-grad-reduce (default: megatron-core's, "
        "max(40M, 1M x data-parallel size)).",
    )
    ddp_num_buckets: int | None = arg(
        None,
        "With --overlap-grad-reduce: about this many gradient buckets (Megatron-LM's flag: each "
        "of the rank's parameter count / N elements) instead of --ddp-bucket-size.",
    )
    ddp_pad_buckets_for_high_nccl_busbw: bool = arg(
        False,
        "With --use-distributed-optimizer: pad each gradient bucket to a multiple of 2^16 "
        "elements (and of the DP size), Megatron-LM's flag for NCCL's bus bandwidth at large "
        "DP; the per-bucket optimizer state then resumes only with it.",
    )
    ddp_average_in_collective: bool = arg(
        False,
        "Refused (Megatron-LM's flag): megatron-slm's loss is a sum over tokens normalised once "
        "per step (Megatron-LM's --calculate-per-token-loss), whose gradients megatron-core "
        "cannot average in the collective (it refuses the pair too).",
    )
    no_align_grad_reduce: bool = arg(
        False,
        "With --overlap-grad-reduce and pipeline parallelism: each stage launches its gradient "
        "reductions as its backward readies them, instead of the schedule launching every "
        "stage's together (Megatron-LM's flag).",
    )
    distributed_backend: str | None = arg(
        None,
        "Accepted with the backend megatron-slm uses (Megatron-LM's flag): nccl on GPU, gloo on "
        "CPU.",
        choices=("nccl", "gloo"),
    )
    context_parallel_size: int = arg(
        1, "Accepted at 1 (Megatron-LM's flag): megatron-slm does not shard the sequence."
    )
    expert_tensor_parallel_size: int | None = arg(
        None,
        "Tensor-parallel size of the experts (Megatron-LM's flag; default the "
        "--tensor-model-parallel-size): e.g. 1 keeps each expert whole on its rank while the "
        "dense layers are split, the experts then spread over more expert-parallel ranks.",
    )
    use_tp_pp_dp_mapping: bool = arg(
        False,
        "Lay the ranks out tensor-parallel, then pipeline, then data-parallel (Megatron-LM's "
        "flag: a model replica's stages on neighbouring ranks, e.g. one node) instead of "
        "megatron-core's default, where the data-parallel replicas of a stage are neighbours.",
    )
    disable_gloo_process_groups: bool = arg(
        False,
        "Create none of megatron-core's gloo data-parallel side groups (Megatron-LM's flag: "
        "fewer CPU communicators at scale); the distributed optimizer's checkpoints then gather "
        "over the main groups.",
    )
    expert_model_parallel_size: int = arg(
        1,
        "With --num-experts: shard the experts over this many data-parallel ranks (each holds "
        "num_experts / EP of them; tokens reach them through the token dispatcher).",
    )
    distributed_timeout_minutes: int = arg(
        30,
        "How long a collective may wait for the other ranks before the job fails (Megatron-LM's "
        "flag; its default is 10).",
    )
    num_distributed_optimizer_instances: int = arg(
        1,
        "With --use-distributed-optimizer: split the data-parallel ranks into this many groups, "
        "each sharding a whole copy of the optimizer state (Megatron-LM's flag: gradients are "
        "reduce-scattered within a group, then all-reduced across groups, so the sharding "
        "collectives stay within fewer ranks, e.g. a node's, at the cost of N copies).",
    )
    dist_ckpt_optim_fully_reshardable: bool = arg(
        False,
        "With --use-distributed-optimizer: save its state per parameter (the fp32 weight and "
        "Adam's moments, sharded as the weight), resumable at any TP, PP, virtual stages, "
        "buckets and DP. Saving gathers it over the data-parallel group: each rank holds its "
        "model-parallel slice of the whole state in host memory. Default: per gradient bucket, "
        "every rank writes its shard, resumable at another DP only.",
    )

    def virtual_pipeline_size(self, num_layers: int) -> int | None:
        """megatron-core's virtual pipeline size of these flags (None: not interleaved)."""
        if self.pipeline_model_parallel_layout is not None:
            return layout_virtual_size(
                self.pipeline_model_parallel_layout, self.pipeline_model_parallel_size
            )
        return virtual_pipeline_size(
            num_layers,
            self.pipeline_model_parallel_size,
            self.num_layers_per_virtual_pipeline_stage,
            self.num_virtual_stages_per_pipeline_rank,
        )

    def _check_layout_alone(self) -> None:
        if self.pipeline_model_parallel_layout is None:
            return
        others = {
            "--decoder-first-pipeline-num-layers": self.decoder_first_pipeline_num_layers,
            "--decoder-last-pipeline-num-layers": self.decoder_last_pipeline_num_layers,
            "--num-layers-per-virtual-pipeline-stage": self.num_layers_per_virtual_pipeline_stage,
            "--num-virtual-stages-per-pipeline-rank": self.num_virtual_stages_per_pipeline_rank,
            ACCOUNT_FOR_EMBEDDING: self.account_for_embedding_in_pipeline_split or None,
            ACCOUNT_FOR_LOSS: self.account_for_loss_in_pipeline_split or None,
        }
        given = [flag for flag, value in others.items() if value is not None]
        if given:
            raise ConfigError(
                f"{LAYOUT_FLAG} says which layers each stage holds: give it or {given[0]}, not "
                "both (Megatron-LM's rule)"
            )
        parse_pipeline_layout(
            self.pipeline_model_parallel_layout, self.pipeline_model_parallel_size
        )

    def _accounted_flags(self) -> list[str]:
        """The --account-for-*-in-pipeline-split flags given."""
        flags = ((ACCOUNT_FOR_EMBEDDING, self.account_for_embedding_in_pipeline_split),
                 (ACCOUNT_FOR_LOSS, self.account_for_loss_in_pipeline_split))  # fmt: skip
        return [flag for flag, given in flags if given]

    def _check_accounted_split(self) -> None:
        given = self._accounted_flags()
        if not given:
            return
        if self.pipeline_model_parallel_size < 2:
            raise ConfigError(f"{given[0]} needs --pipeline-model-parallel-size > 1")
        uneven = (self.decoder_first_pipeline_num_layers, self.decoder_last_pipeline_num_layers)
        if any(n is not None for n in uneven):
            raise ConfigError(
                f"{given[0]} sets the first and last stages' layers: give it or "
                "--decoder-first/last-pipeline-num-layers, not both (Megatron-LM's rule)"
            )
        if (
            self.num_layers_per_virtual_pipeline_stage is not None
            or self.num_virtual_stages_per_pipeline_rank is not None
        ):
            raise ConfigError(
                f"{given[0]} is not offered with virtual pipeline stages (megatron-core takes the "
                "layer from the first and last virtual stages only): give "
                "--decoder-first/last-pipeline-num-layers with --num-virtual-stages-per-pipeline-"
                "rank"
            )

    def stage_split(self, num_layers: int) -> tuple[int | None, int | None]:
        """The first and last pipeline stages' layers (None: an even share): the
        --decoder-first/last-pipeline-num-layers given, or what the
        --account-for-{embedding,loss}-in-pipeline-split flags make them (megatron-core's rule:
        the embedding and the loss count as a layer each, then every stage holds as many)."""
        embedding = self.account_for_embedding_in_pipeline_split
        loss = self.account_for_loss_in_pipeline_split
        if not (embedding or loss):
            return self.decoder_first_pipeline_num_layers, self.decoder_last_pipeline_num_layers
        pp, counted = self.pipeline_model_parallel_size, num_layers + embedding + loss
        if counted % pp or counted // pp < 2:
            raise ConfigError(
                f"--num-layers {num_layers} with {' and '.join(self._accounted_flags())} counts "
                f"{counted} layers: "
                f"--pipeline-model-parallel-size {pp} must split them evenly, at least two per "
                "stage (a stage of only the embedding or the loss is not built here)"
            )
        return (counted // pp - 1 if embedding else None), (counted // pp - 1 if loss else None)

    def interleaved_schedule(self, num_layers: int) -> bool:
        return self.virtual_pipeline_size(num_layers) is not None

    def microbatch_group(self, num_layers: int) -> int | None:
        """The micro-batches each virtual stage runs in a row (None: not interleaved):
        --microbatch-group-size-per-virtual-pipeline-stage, else the pipeline size."""
        if not self.interleaved_schedule(num_layers):
            return None
        given = self.microbatch_group_size_per_virtual_pipeline_stage
        return given or self.pipeline_model_parallel_size

    @property
    def experts_tensor_parallel(self) -> int:
        """The experts' TP size: --expert-tensor-parallel-size, else the TP size."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    def __post_init__(self):
        if self.tensor_model_parallel_size < 1:
            raise ConfigError("--tensor-model-parallel-size must be >= 1")
        if self.pipeline_model_parallel_size < 1:
            raise ConfigError("--pipeline-model-parallel-size must be >= 1")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.overlap_param_gather and not (
            self.use_distributed_optimizer and self.overlap_grad_reduce
        ):
            raise ConfigError(
                "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce"
            )
        check_at_least(self, "ddp_bucket_size", "ddp_num_buckets", optional=True)
        if self.ddp_num_buckets is not None and self.ddp_bucket_size is not None:
            raise ConfigError("give either --ddp-num-buckets or --ddp-bucket-size, not both")
        check_at_least(self, "distributed_timeout_minutes")
        if self.distributed_backend is not None:
            check_choices(self, "distributed_backend")
        if self.context_parallel_size != 1:
            raise ConfigError(
                f"--context-parallel-size {self.context_parallel_size}: context parallelism is "
                "not supported (the selection and the reference losses are per whole sequence)"
            )
        check_at_least(self, "expert_model_parallel_size")
        check_at_least(self, "num_virtual_stages_per_pipeline_rank", optional=True)
        check_at_least(self, "expert_tensor_parallel_size", optional=True)
        check_at_least(self, "num_distributed_optimizer_instances")
        if self.num_distributed_optimizer_instances > 1 and not self.use_distributed_optimizer:
            raise ConfigError(
                "--num-distributed-optimizer-instances needs --use-distributed-optimizer"
            )
        if self.ddp_average_in_collective:
            raise ConfigError(
                "--ddp-average-in-collective is not offered: megatron-slm's loss is a sum over "
                "tokens normalised once per step (Megatron-LM's --calculate-per-token-loss), "
                "which megatron-core cannot average in the collective (drop the flag)"
            )
        if self.ddp_pad_buckets_for_high_nccl_busbw and not self.use_distributed_optimizer:
            raise ConfigError(
                "--ddp-pad-buckets-for-high-nccl-busbw needs --use-distributed-optimizer "
                "(megatron-core pads only its buckets)"
            )
        self._check_accounted_split()
        self._check_layout_alone()
        if self.dist_ckpt_optim_fully_reshardable and not self.use_distributed_optimizer:
            raise ConfigError(
                "--dist-ckpt-optim-fully-reshardable needs --use-distributed-optimizer "
                "(the plain optimizer's state is always per parameter)"
            )


MOE_BALANCING = ("aux_loss", "seq_aux_loss", "none")  # megatron-core's (sinkhorn: its own router)
MOE_DISPATCHERS = ("allgather", "alltoall")
MOE_ROUTER_DTYPES = ("fp32", "fp64")
MOE_DROP_POLICIES = ("probs", "position")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
# megatron-core's selective recompute (its layernorm needs TE, its moe_act the grouped GEMM)
RECOMPUTE_MODULES = ("core_attn", "mlp", "moe", "shared_experts")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "WSD", "inverse-square-root")
WD_INCR_STYLES = ("constant", "linear", "cosine")
DIST_CKPT_STRICTNESS = (  # megatron-core's StrictHandling values
    "assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected", "raise_all",
    "return_unexpected", "return_all", "ignore_all",
)  # fmt: skip
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")  # megatron-core's


LOSS_SCALE_FIELDS = (
    "loss_scale",
    "initial_loss_scale",
    "min_loss_scale",
    "loss_scale_window",
    "hysteresis",
)


@dataclass
class TrainingArgs:
    micro_batch_size: int = arg(1, "Sequences per micro-batch per data-parallel rank.")
    global_batch_size: int | None = arg(
        None, "Sequences per optimizer step (default: micro-batch x data-parallel size)."
    )
    seq_length: int = arg(256, "Training sequence length.")
    train_iters: int | None = arg(None, "Optimizer steps to train.")
    train_tokens: int | None = arg(None, "Tokens to train (alternative to --train-iters).")
    train_samples: int | None = arg(
        None,
        "Sequences to train (Megatron-LM's sample-based schedule): --train-samples // "
        "--global-batch-size steps; the schedule's lengths are then given in samples "
        "(--lr-warmup-samples, --lr-decay-samples, --lr-wsd-decay-samples).",
    )
    rampup_batch_size: list[int] = arg(
        [],
        "START INCREMENT SAMPLES: Megatron-LM's batch-size ramp-up (with --train-samples): the "
        "global batch grows from START by INCREMENT in equal shares of SAMPLES consumed samples, "
        "then trains at --global-batch-size; the learning-rate schedule counts samples.",
        nargs=3,
        metavar=("START", "INCREMENT", "SAMPLES"),
    )
    step_batch_size_schedule: str | None = arg(
        None,
        '"THRESHOLD:SIZE ...", e.g. "0:16 2.4B:320 12B:1536": Megatron-LM\'s step schedule '
        "of the global batch size over the tokens consumed (thresholds in tokens, K/M/B/T "
        "suffixes; the first is 0). The last size is the full global batch (--global-batch-size,"
        " if given, must equal it); the learning-rate schedule counts samples in full batches.",
    )
    lr: float = arg(3e-4, "Peak learning rate.")
    min_lr: float = arg(0.0, "Final learning rate after decay.")
    lr_warmup_iters: int = arg(0, "Linear warmup steps.")
    lr_decay_iters: int | None = arg(None, "Decay steps (default: the training steps).")
    lr_warmup_samples: int = arg(0, "Linear warmup in samples (with --train-samples).")
    lr_decay_samples: int | None = arg(
        None, "Decay in samples (with --train-samples; default: --train-samples)."
    )
    lr_warmup_fraction: float | None = arg(
        None,
        "Linear warmup as a fraction of the decay (instead of --lr-warmup-iters or "
        "--lr-warmup-samples), as Megatron-LM computes it.",
    )
    lr_decay_style: str = arg("cosine", "constant, linear, cosine or WSD.")
    lr_wsd_decay_iters: int | None = arg(
        None, "WSD: steps of the final decay (default: a tenth of the training steps)."
    )
    lr_wsd_decay_samples: int | None = arg(
        None, "WSD: the final decay in samples (with --train-samples)."
    )
    lr_wsd_decay_style: str = arg(
        "linear", "WSD: the shape of the final decay.", choices=WSD_DECAY_STYLES
    )
    decoupled_lr: float | None = arg(
        None,
        "Peak learning rate of the input embedding and the output layer, on the same schedule "
        "(Megatron-LM's flag; default: --lr).",
    )
    decoupled_min_lr: float | None = arg(
        None, "With --decoupled-lr: their final learning rate (default: --min-lr)."
    )
    lr_warmup_init: float = arg(
        0.0, "The learning rate the linear warmup starts from (Megatron-LM's flag)."
    )
    weight_decay: float = arg(0.1, "AdamW weight decay (constant: --weight-decay-incr-style).")
    start_weight_decay: float | None = arg(
        None, "Weight decay at the first step (--weight-decay-incr-style linear or cosine)."
    )
    end_weight_decay: float | None = arg(
        None, "Weight decay at the last training step (linear or cosine increment)."
    )
    weight_decay_incr_style: str = arg(
        "constant",
        "How the weight decay goes from --start-weight-decay to --end-weight-decay over the "
        "training steps (megatron-core's scheduler, as in Megatron-LM).",
        choices=WD_INCR_STYLES,
    )
    apply_wd_to_qk_layernorm: bool = arg(
        False,
        "Decay the QK norms' weights too (Megatron-LM's flag, Qwen3-Next's recipe); the other "
        "norms and the biases are never decayed.",
    )
    no_weight_decay_cond_type: str | None = arg(
        None,
        "Megatron-LM's newer form of the rule above: apply_wd_to_qk_layernorm is "
        "--apply-wd-to-qk-layernorm.",
        choices=("apply_wd_to_qk_layernorm",),
    )
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.95, "AdamW beta2.")
    adam_eps: float = arg(1e-8, "AdamW epsilon.")
    clip_grad: float = arg(1.0, "Gradient clipping by global norm (0 disables).")
    check_for_nan_in_loss_and_grad: bool = arg(
        True,
        "Stop at a step whose global gradient norm is NaN or inf (Megatron-LM's default), at "
        "the next log step or save, whichever comes first; no checkpoint of its state is "
        "written. Such a step's update is skipped on the device either way (torch's Adam; "
        "Transformer Engine's or Apex's FusedAdam cannot); with "
        "--no-check-for-nan-in-loss-and-grad training logs it and goes on.",
    )
    check_weight_hash_across_dp_replicas_interval: int | None = arg(
        None,
        "Every N steps, and before the first, compare each parameter's data-parallel replicas "
        "by hash (Megatron-LM's flag): replicas that drifted apart (a faulty device, a "
        "corrupted collective) stop the run, naming the parameters and the ranks. Copies the "
        "weights to the host each time.",
    )
    deterministic_mode: bool = arg(
        False,
        "Bitwise-reproducible training (Megatron-LM's flag): torch's deterministic algorithms "
        "(an op without one raises), megatron-core's deterministic paths, cuBLAS's reproducible "
        "workspace and Transformer Engine's deterministic attention; on GPU NCCL_ALGO must name "
        "a reproducible all-reduce (e.g. NCCL_ALGO=Ring). The fused loss is deterministic as "
        "is (its only atomics count integers).",
    )
    optimizer: str = arg(
        "adam",
        "adam: AdamW (the --adam-* flags); muon: Muon on the layers' 2-D weights and AdamW on "
        "the rest (embeddings, output layer, norms, biases), as Megatron-LM's --optimizer muon "
        "(the --muon-* flags; not with --use-distributed-optimizer or --fp16).",
        choices=("adam", "muon"),
    )
    dataloader_type: str = arg(
        "single",
        "Accepted with single (Megatron-LM's flag): samples are read in megatron-core's shuffled "
        "order from the consumed position, the order sidecars and batch lists are drawn in.",
        choices=("single",),
    )
    async_tensor_model_parallel_allreduce: bool = arg(
        True, "Accepted in either form: megatron-core decides this overlap itself."
    )
    bf16: bool = arg(False, "bf16 mixed precision.")
    grad_reduce_in_bf16: bool = arg(
        False,
        "With --bf16: accumulate and reduce the data-parallel gradients in bf16 instead of "
        "fp32 (Megatron-LM's flag): half the reduction's bytes, less precise sums.",
    )
    accumulate_allreduce_grads_in_fp32: bool = arg(
        False, "Accepted: gradients are summed and reduced in fp32 unless --grad-reduce-in-bf16."
    )
    calculate_per_token_loss: bool = arg(
        False,
        "Accepted: the loss is always the mean over the (selected) tokens of the whole global "
        "batch, not a mean of per-micro-batch means.",
    )
    cross_entropy_loss_fusion: bool = arg(
        False, "Accepted: the loss is megatron-slm's fused op by default (--cross-entropy-impl)."
    )
    cross_entropy_fusion_impl: str = arg(
        "native",
        "Accepted with native or te (Megatron-LM's choice of fused loss): the fused loss is "
        "megatron-slm's own (--cross-entropy-impl).",
        choices=("native", "te"),
    )
    rerun_mode: str = arg(
        "disabled",
        "Accepted with disabled (Megatron-LM's flag; its default, validate_results, reruns a "
        "step whose loss is NaN, inf or a spike to tell a faulty device from the data): not "
        "offered here, where a NaN or inf gradient norm stops the run "
        "(--check-for-nan-in-loss-and-grad).",
        choices=("disabled", "validate_results", "report_stats"),
    )
    manual_gc: bool = arg(
        False,
        "Turn Python's automatic garbage collection off while training and collect every "
        "--manual-gc-interval steps instead (Megatron-LM's flag): with many ranks, a collection "
        "that pauses one rank at a random step stalls them all at the next collective.",
    )
    manual_gc_interval: int = arg(
        0, "With --manual-gc: collect every N steps (0: only at the start and around evaluations)."
    )
    manual_gc_eval: bool = arg(True, "With --manual-gc: collect before and after each evaluation.")
    empty_unused_memory_level: int = arg(
        0,
        "Return the CUDA caching allocator's unused blocks to the device (Megatron-LM's flag): "
        "1 after each step's forward/backward, 2 also after its optimizer update; 0 never. "
        "Each return waits for the device.",
        choices=(0, 1, 2),
    )
    fp16: bool = arg(False, "fp16 mixed precision with loss scaling (GPU only).")
    # fp16's loss scaling (Megatron-LM's flags; unset: megatron-core's defaults, Megatron-LM's).
    loss_scale: float | None = arg(
        None, "With --fp16: a constant loss scale instead of the dynamic one (a power of 2)."
    )
    initial_loss_scale: float | None = arg(
        None, "With --fp16: the dynamic loss scale's start (default 2^32)."
    )
    min_loss_scale: float | None = arg(
        None, "With --fp16: the dynamic loss scale's floor (default 1)."
    )
    loss_scale_window: float | None = arg(
        None,
        "With --fp16: steps without an overflow before the dynamic scale doubles (default 1000).",
    )
    hysteresis: int | None = arg(
        None, "With --fp16: overflowing steps before the dynamic scale halves (default 2)."
    )
    seed: int = arg(1234, "Random seed (initialisation, data order, random selection).")
    device: str = device_arg()
    eval_interval: int = arg(1000, "Validation every N steps (0 disables).")
    eval_iters: int = arg(
        10,
        "Validation batches per evaluation; after the last step the validation sets (unless just "
        "evaluated) and the test split are evaluated on as many, as in Megatron-LM.",
    )
    full_validation: bool = arg(
        False,
        "Each evaluation reads the whole validation split, one epoch of it (the same samples "
        "every time; the last micro-batches that would not give every data-parallel rank one "
        "are left out), instead of --eval-iters global batches (Megatron-LM's flag); the test "
        "split keeps --eval-iters.",
    )
    skip_train: bool = arg(
        False,
        "No training: evaluate the validation sets and the test split at the --load step "
        "(--eval-iters batches each), then exit (Megatron-LM's flag).",
    )
    iterations_to_skip: list[int] = arg(
        [],
        "Iterations (1-based) not trained on (Megatron-LM's flag, to step past a loss spike): "
        "each one's global batch is read and dropped, the step counts, the weights, optimizer "
        "and learning-rate schedule stay as they were.",
        nargs="+",
    )
    recompute_activations: bool = arg(
        False,
        "Selective recompute, as in Megatron-LM: each layer's core attention (its [b, heads, s, "
        "s] probabilities where the kernel keeps them) is recomputed in backward "
        "(--recompute-granularity selective).",
    )
    moe_layer_recompute: bool = arg(
        False,
        "Megatron-LM's older flag for --recompute-granularity selective --recompute-modules moe "
        "(beside the modules given; core_attn by default): each mixture of experts is "
        "recomputed in backward.",
    )
    recompute_granularity: str | None = arg(
        None,
        "full: keep only each recompute unit's input and recompute the layers in backward "
        "(least memory); selective: recompute --recompute-modules only.",
        choices=RECOMPUTE_GRANULARITIES,
    )
    recompute_method: str | None = arg(
        None,
        "Full recompute: uniform (every group of --recompute-num-layers layers is one unit; the "
        "default) or block (the first --recompute-num-layers layers of each pipeline stage).",
        choices=RECOMPUTE_METHODS,
    )
    recompute_num_layers: int | None = arg(
        None, "Full recompute: layers per unit (uniform) or recomputed per stage (block); 1."
    )
    recompute_modules: list[str] = arg(
        [],
        "Selective recompute: which parts of each layer (core_attn, the default; mlp: a dense "
        "layer's; moe: a whole mixture of experts; shared_experts: its shared expert). "
        "layernorm is not offered: megatron-core's needs Transformer Engine; moe_act neither: "
        "its needs the grouped GEMM.",
        nargs="*",
    )
    moe_aux_loss_coeff: float = arg(
        0.0,
        "With --num-experts: weight of the load-balancing loss added to each MoE layer "
        "(Megatron-LM's default 0: none; 1e-2 is common).",
    )
    moe_router_load_balancing_type: str = arg(
        "aux_loss",
        "The load-balancing loss: aux_loss (Switch Transformer's, over the micro-batch), "
        "seq_aux_loss (per sequence) or none.",
        choices=MOE_BALANCING,
    )
    moe_z_loss_coeff: float | None = arg(
        None, "With --num-experts: weight of the router's z-loss (ST-MoE's); default none."
    )
    moe_token_dispatcher_type: str = arg(
        "allgather",
        "How tokens reach their experts (megatron-core's dispatchers): allgather or alltoall.",
        choices=MOE_DISPATCHERS,
    )
    moe_shared_expert_overlap: bool = arg(
        False,
        "With --moe-token-dispatcher-type alltoall and a shared expert: run the shared expert "
        "on a stream of its own while the tokens travel to their experts (Megatron-LM's flag, "
        "megatron-core's overlap); the same results (on CPU the streams run in order).",
    )
    moe_expert_capacity_factor: float | None = arg(
        None,
        "With --num-experts: each expert takes at most factor x (tokens x top-k / experts) "
        "tokens of a micro-batch, the rest dropped (GShard's and Switch Transformer's capacity; "
        "Megatron-LM's flag); default: dropless. Training only: scoring and evaluation never "
        "drop.",
    )
    moe_token_drop_policy: str = arg(
        "probs",
        "With --moe-expert-capacity-factor: an expert keeps the tokens it weighs most (probs) or "
        "those first in the micro-batch (position).",
        choices=MOE_DROP_POLICIES,
    )
    moe_pad_expert_input_to_capacity: bool = arg(
        False,
        "With --moe-expert-capacity-factor and the alltoall dispatcher: every expert's input "
        "padded to its capacity (static shapes).",
    )
    moe_router_dtype: str | None = arg(
        None,
        "With --num-experts: the router's logits, softmax and top-k in fp32 or fp64 while the "
        "model trains in bf16 or fp16 (Megatron-LM's flag); default: the model's dtype. Only "
        "training reads it (scoring and evaluation route in the model's dtype).",
        choices=MOE_ROUTER_DTYPES,
    )
    moe_router_bias_update_rate: float = arg(
        1e-3,
        "With --moe-router-enable-expert-bias: each step, every expert's bias moves by this "
        "much towards balance (up when it received fewer tokens than the mean, over the "
        "data-parallel ranks and micro-batches; megatron-core's rule).",
    )
    moe_grouped_gemm: bool = arg(
        False,
        "Accepted (Megatron-LM's flag, in its MoE scripts): the experts still run one after "
        "another as megatron-core's SequentialMLP, the same weights and results (its grouped "
        "GEMM needs Transformer Engine or the grouped_gemm package); a log line says so.",
    )
    moe_permute_fusion: bool = arg(
        False,
        "Accepted (Megatron-LM's flag): tokens are permuted to their experts by megatron-core's "
        "torch code, the same order and results (the fused kernel is Transformer Engine's); a "
        "log line says so.",
    )
    moe_router_fusion: bool = arg(
        False,
        "Accepted (Megatron-LM's flag): the router's top-k and auxiliary losses run as "
        "megatron-core's torch code, the same results (the fused kernel is Transformer "
        "Engine's); a log line says so.",
    )
    mtp_num_layers: int | None = arg(
        None,
        "Multi-token prediction (DeepSeek-V3's; Megatron-LM's flag): N extra heads on the last "
        "stage, the k-th predicting the token k+1 ahead from the (k-1)-th head's hidden state "
        "and the embedding of the token k ahead (megatron-core's MTP layers: norms, a "
        "projection, one transformer layer, the shared output layer). Training only: scoring, "
        "evaluation, generation and the Hugging Face export read the main model.",
    )
    mtp_loss_scaling_factor: float = arg(
        0.1,
        "With --mtp-num-layers: the weight of the heads' mean loss beside the main loss "
        "(Megatron-LM's default 0.1): factor / N x each head's loss over the loss mask.",
    )
    cross_entropy_impl: str = arg(
        "fused",
        "Plain training's loss: fused (megatron_slm's vocab-parallel op at ratio 1: "
        "megatron-core's per-token loss without its fp32 softmax kept for backward; "
        "megatron-core's function where megatron_slm._C has no kernels for the device) or "
        "megatron (megatron-core's vocab_parallel_cross_entropy). Selective training always "
        "runs the fused op.",
        choices=("fused", "megatron"),
    )

    def __post_init__(self):
        if self.no_weight_decay_cond_type == "apply_wd_to_qk_layernorm":
            self.apply_wd_to_qk_layernorm = True
        check_at_least(self, "micro_batch_size", "seq_length")
        check_choices(
            self, "cross_entropy_impl", "lr_wsd_decay_style", "optimizer", "dataloader_type"
        )
        lengths = (self.train_iters, self.train_tokens, self.train_samples)
        if sum(x is not None for x in lengths) != 1:
            raise ConfigError(
                "give exactly one of --train-iters, --train-tokens and --train-samples"
            )
        check_at_least(self, "train_iters", "train_tokens", "train_samples", optional=True)
        check_ramp_values(self.rampup_batch_size, self.train_samples)
        if self.step_batch_size_schedule is not None:
            if self.rampup_batch_size:
                raise ConfigError(
                    "give either --rampup-batch-size or --step-batch-size-schedule, not both"
                )
            schedule = self.step_schedule
            if self.global_batch_size not in (None, schedule.final):
                raise ConfigError(
                    f"--global-batch-size {self.global_batch_size} differs from the last size of "
                    f"--step-batch-size-schedule ({schedule.final}), the full global batch: "
                    "leave --global-batch-size out or make them equal"
                )
        self._check_schedule_units()
        if self.bf16 and self.fp16:
            raise ConfigError("--bf16 and --fp16 are exclusive")
        scaling = [
            f"--{n.replace('_', '-')}" for n in LOSS_SCALE_FIELDS if getattr(self, n) is not None
        ]
        if scaling and not self.fp16:
            raise ConfigError(f"{scaling[0]} sets fp16's loss scaling: add --fp16")
        if self.loss_scale is not None and len(scaling) > 1:
            raise ConfigError(
                f"--loss-scale is constant: {scaling[1]} sets the dynamic scale, give one of them"
            )
        if self.grad_reduce_in_bf16 and not self.bf16:
            raise ConfigError("--grad-reduce-in-bf16 needs --bf16")
        if self.grad_reduce_in_bf16 and self.accumulate_allreduce_grads_in_fp32:
            raise ConfigError(
                "--grad-reduce-in-bf16 and --accumulate-allreduce-grads-in-fp32 are exclusive"
            )
        if self.cross_entropy_loss_fusion and self.cross_entropy_impl != "fused":
            raise ConfigError(
                "--cross-entropy-loss-fusion asks for the fused loss: it contradicts "
                f"--cross-entropy-impl {self.cross_entropy_impl}"
            )
        check_choices(self, "cross_entropy_fusion_impl", "rerun_mode")
        if self.rerun_mode != "disabled":
            raise ConfigError(
                f"--rerun-mode {self.rerun_mode}: Megatron-LM's rerun state machine is not "
                "offered (a NaN or inf gradient norm stops the run: "
                "--check-for-nan-in-loss-and-grad); give --rerun-mode disabled or leave it out"
            )
        check_at_least(self, "manual_gc_interval", minimum=0)
        check_at_least(self, "check_weight_hash_across_dp_replicas_interval", optional=True)
        check_choices(self, "empty_unused_memory_level")
        if any(i < 1 for i in self.iterations_to_skip):
            raise ConfigError("--iterations-to-skip takes iterations >= 1 (the first is 1)")
        if self.skip_train and self.eval_iters < 1 and not self.full_validation:
            raise ConfigError("--skip-train evaluates: give --eval-iters >= 1")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style {self.lr_decay_style!r} is not supported")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        self._check_recompute()
        self._check_moe()
        check_at_least(self, "mtp_num_layers", optional=True)
        if self.mtp_loss_scaling_factor < 0:
            raise ConfigError("--mtp-loss-scaling-factor must be >= 0")
        self._check_rates_and_weight_decay()

    def _check_rates_and_weight_decay(self) -> None:
        """Megatron-LM's rules: a constant weight decay is --weight-decay, an increment goes from
        --start-weight-decay to --end-weight-decay (both given); the warmup's start and the
        decoupled rates lie within what megatron-core's scheduler takes."""
        check_choices(self, "weight_decay_incr_style")
        ends = (self.start_weight_decay, self.end_weight_decay)
        if self.weight_decay_incr_style == "constant":
            if any(v is not None for v in ends):
                raise ConfigError(
                    "--start-weight-decay / --end-weight-decay need --weight-decay-incr-style "
                    "linear or cosine (a constant decay is --weight-decay)"
                )
        elif any(v is None for v in ends):
            raise ConfigError(
                f"--weight-decay-incr-style {self.weight_decay_incr_style} needs "
                "--start-weight-decay and --end-weight-decay"
            )
        for name in ("weight_decay", "start_weight_decay", "end_weight_decay", "lr_warmup_init"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{flag_name(name)} must be >= 0")
        start, end = self.weight_decays
        if end < start:  # megatron-core's scheduler only increments
            raise ConfigError(
                f"--end-weight-decay {end} is below --start-weight-decay {start}: the weight "
                "decay can only increase"
            )
        if self.lr_warmup_init > self.lr:
            raise ConfigError(f"--lr-warmup-init {self.lr_warmup_init} exceeds --lr {self.lr}")
        if self.decoupled_min_lr is not None and self.decoupled_lr is None:
            raise ConfigError("--decoupled-min-lr needs --decoupled-lr")
        if self.decoupled_lr is not None:
            low = self.min_lr if self.decoupled_min_lr is None else self.decoupled_min_lr
            if not 0 <= low <= self.decoupled_lr:
                raise ConfigError(
                    f"--decoupled-lr {self.decoupled_lr} must be >= its final rate "
                    f"(--decoupled-min-lr, else --min-lr: {low}) >= 0"
                )

    @property
    def weight_decays(self) -> tuple[float, float]:
        """(first step's, last step's) weight decay."""
        if self.weight_decay_incr_style == "constant":
            return self.weight_decay, self.weight_decay
        return self.start_weight_decay, self.end_weight_decay

    def _check_recompute(self) -> None:
        """Megatron-LM's recompute flags; what megatron-core would assert, named by flag."""
        for name in ("recompute_activations", "moe_layer_recompute"):  # selective recompute's
            if getattr(self, name):
                if self.recompute_granularity == "full":
                    raise ConfigError(
                        f"{flag_name(name)} is selective recompute: it contradicts "
                        "--recompute-granularity full"
                    )
                self.recompute_granularity = "selective"
        if self.moe_layer_recompute and "moe" not in self.recompute_modules:
            # (megatron-core's default module kept beside it)
            self.recompute_modules = [*(self.recompute_modules or ["core_attn"]), "moe"]
        if self.recompute_granularity is not None:
            check_choices(self, "recompute_granularity")
        full = self.recompute_granularity == "full"
        for name in ("recompute_method", "recompute_num_layers"):
            if getattr(self, name) is not None and not full:
                raise ConfigError(f"{flag_name(name)} applies to --recompute-granularity full")
        if self.recompute_modules and self.recompute_granularity != "selective":
            raise ConfigError("--recompute-modules applies to selective recompute")
        if self.recompute_method is not None:
            check_choices(self, "recompute_method")
        check_at_least(self, "recompute_num_layers", optional=True)
        unknown = sorted(set(self.recompute_modules) - set(RECOMPUTE_MODULES))
        if unknown:
            raise ConfigError(
                f"--recompute-modules {' '.join(unknown)}: choose from "
                f"{', '.join(RECOMPUTE_MODULES)}"
            )

    def _check_moe(self) -> None:
        check_choices(self, "moe_router_load_balancing_type")
        check_choices(self, "moe_token_dispatcher_type")
        if self.moe_shared_expert_overlap and self.moe_token_dispatcher_type != "alltoall":
            raise ConfigError(
                "--moe-shared-expert-overlap needs --moe-token-dispatcher-type alltoall "
                "(megatron-core overlaps the shared expert with that dispatcher's exchange)"
            )
        if self.moe_router_dtype is not None:
            check_choices(self, "moe_router_dtype")
        check_choices(self, "moe_token_drop_policy")
        factor = self.moe_expert_capacity_factor
        if factor is not None and factor <= 0:
            raise ConfigError("--moe-expert-capacity-factor must be positive")
        if factor is None and (self.moe_pad_expert_input_to_capacity
                               or self.moe_token_drop_policy != "probs"):  # fmt: skip
            flag = ("--moe-pad-expert-input-to-capacity" if self.moe_pad_expert_input_to_capacity
                    else "--moe-token-drop-policy")  # fmt: skip
            raise ConfigError(f"{flag} needs --moe-expert-capacity-factor")
        if self.moe_pad_expert_input_to_capacity and self.moe_token_dispatcher_type != "alltoall":
            raise ConfigError(  # (megatron-core's allgather dispatcher does not pad)
                "--moe-pad-expert-input-to-capacity needs --moe-token-dispatcher-type alltoall"
            )
        for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_router_bias_update_rate"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{flag_name(name)} must be >= 0")

    @property
    def moe(self) -> dict:
        """megatron-core's TransformerConfig fields for the MoE training flags."""
        return {
            "moe_aux_loss_coeff": self.moe_aux_loss_coeff,
            "moe_router_load_balancing_type": self.moe_router_load_balancing_type,
            "moe_z_loss_coeff": self.moe_z_loss_coeff,
            "moe_token_dispatcher_type": self.moe_token_dispatcher_type,
            "moe_router_bias_update_rate": self.moe_router_bias_update_rate,
            "moe_router_dtype": self.moe_router_dtype,
            "moe_expert_capacity_factor": self.moe_expert_capacity_factor,
            "moe_token_drop_policy": self.moe_token_drop_policy,
            "moe_pad_expert_input_to_capacity": self.moe_pad_expert_input_to_capacity,
            "moe_shared_expert_overlap": self.moe_shared_expert_overlap,
        }

    @property
    def recompute(self) -> dict:
        """megatron-core's TransformerConfig fields for the recompute flags."""
        if self.recompute_granularity is None:
            return {}
        if self.recompute_granularity == "selective":
            modules = list(self.recompute_modules or ["core_attn"])
            return {"recompute_granularity": "selective", "recompute_modules": modules}
        return {
            "recompute_granularity": "full",
            "recompute_method": self.recompute_method or "uniform",
            "recompute_num_layers": self.recompute_num_layers or 1,
        }

    @property
    def step_schedule(self) -> StepBatchSchedule | None:
        """--step-batch-size-schedule, parsed (its thresholds in samples of --seq-length)."""
        if self.step_batch_size_schedule is None:
            return None
        return parse_step_schedule(self.step_batch_size_schedule, self.seq_length)

    def _check_schedule_units(self) -> None:
        """Megatron-LM's rule: with --train-samples the schedule's lengths count samples, else
        steps; one warmup flag at most."""
        pairs = [  # (steps flag, its value), (samples flag, its value)
            (("--lr-warmup-iters", self.lr_warmup_iters or None),
             ("--lr-warmup-samples", self.lr_warmup_samples or None)),
            (("--lr-decay-iters", self.lr_decay_iters),
             ("--lr-decay-samples", self.lr_decay_samples)),
            (("--lr-wsd-decay-iters", self.lr_wsd_decay_iters),
             ("--lr-wsd-decay-samples", self.lr_wsd_decay_samples)),
        ]  # fmt: skip
        in_samples = self.train_samples is not None
        for (steps_flag, steps_value), (samples_flag, samples_value) in pairs:
            if in_samples and steps_value is not None:
                raise ConfigError(
                    f"{steps_flag} counts steps; with --train-samples the schedule counts "
                    f"samples: use {samples_flag}"
                )
            if not in_samples and samples_value is not None:
                raise ConfigError(
                    f"{samples_flag} counts samples: use it with --train-samples, or {steps_flag}"
                )
            for flag, value in ((steps_flag, steps_value), (samples_flag, samples_value)):
                least = 0 if "warmup" in flag else 1
                if value is not None and value < least:
                    raise ConfigError(f"{flag} must be >= {least}")
        f = self.lr_warmup_fraction
        if f is not None:
            if not 0 <= f < 1:
                raise ConfigError(f"--lr-warmup-fraction must be in [0, 1), got {f}")
            if self.lr_warmup_iters or self.lr_warmup_samples:
                raise ConfigError(
                    "--lr-warmup-fraction replaces --lr-warmup-iters / --lr-warmup-samples: "
                    "give one"
                )
        wsd = self.lr_wsd_decay_iters or self.lr_wsd_decay_samples
        if wsd is not None and self.lr_decay_style != "WSD":
            raise ConfigError("--lr-wsd-decay-iters/-samples apply to --lr-decay-style WSD")


@dataclass
class DataArgs:
    data_path: list[str] = arg([], "Blend: PREFIX or WEIGHT PREFIX WEIGHT PREFIX ...", nargs="*")
    split: str = arg("969,30,1", "Train/valid/test split of each dataset.")
    train_data_path: list[str] = arg(
        [],
        "Training blend of its own, instead of --data-path and --split (Megatron-LM's per-split "
        "paths): every document of its datasets trains. Selective training needs sidecars for "
        "these datasets only.",
        nargs="*",
    )
    valid_data_path: list[str] = arg(
        [],
        "Validation blend of its own (with --train-data-path), e.g. a held-out set of the "
        "reference model's high-quality data; needs no sidecar.",
        nargs="*",
    )
    test_data_path: list[str] = arg(
        [], "Test blend of its own (with --train-data-path).", nargs="*"
    )
    data_args_path: str | None = arg(
        None,
        "A file holding the --data-path blend (whitespace-separated), for blends too long for "
        "a command line (Megatron-LM's flag).",
    )
    per_split_data_args_path: str | None = arg(
        None,
        'A JSON file {"train": [...], "valid": [...], "test": [...]} holding the per-split '
        "blends, each as --train-data-path takes it (Megatron-LM's flag).",
    )
    multiple_validation_sets: bool = arg(
        False,
        "Evaluate each --valid-data-path dataset on its own and log a loss for each (Megatron-LM's "
        "flag), e.g. held-out math and held-out web text.",
    )
    reset_attention_mask: bool = arg(
        False,
        "Each document of a packed sequence attends only to itself (a document ends with its "
        "end-of-document token), as the scorer and the online reference score it. Runs the torch "
        "spec with a dense [b, 1, s, s] mask: SDPA cannot use its flash kernel with one.",
    )
    reset_position_ids: bool = arg(
        False,
        "Position ids restart after each end-of-document token (Megatron-LM's flag). The rotary "
        "embedding rotates by the position in the row, so this changes nothing the model "
        "computes: --reset-attention-mask is what separates documents.",
    )
    eod_mask_loss: bool = arg(
        False,
        "No loss on the prediction that follows an end-of-document token (the next document's "
        "first token, which its context cannot predict; it has no reference loss either).",
    )
    mock_data: bool = arg(
        False,
        "Megatron-LM's synthetic data instead of --data-path: megatron-core's MockGPTDataset "
        "(documents of random length counting 1, 2, 3, ..., each ended by the end-of-document "
        "token; train, valid and test thirds), to measure throughput or try a cluster before any "
        "data exists. Plain training, or selection with --slm-ref-source online.",
    )
    data_cache_path: str | None = arg(None, "Where megatron-core caches sample indices.")
    num_dataset_builder_threads: int = arg(
        1,
        "Threads building the datasets of a blend (Megatron-LM's flag: for blends of many "
        "files, whose indices are built one per file); the samples are the same.",
    )
    mmap_bin_files: bool = arg(
        True,
        "Memory-map the datasets' .bin files; --no-mmap-bin-files reads each sample with a "
        "file read instead (Megatron-LM's flag: for file systems where mapping is slow).",
    )
    create_attention_mask_in_dataloader: bool = arg(
        True,
        "Accepted (Megatron-LM's flag): the data workers never build an attention mask; "
        "--reset-attention-mask builds it on the device.",
    )
    train_samples_from: str | None = arg(
        None,
        "Train on the batches of this list (tools/resample_batches.py), in its order; the data "
        "and sampling flags must be the ones it was drawn for.",
    )
    train_samples_record: str | None = arg(
        None, "Append the source sample ids each step consumed to this JSON-lines file (tests)."
    )
    num_workers: int = arg(
        2,
        "DataLoader worker processes per rank that read and stack micro-batches ahead of the "
        "step (0: read on the training thread).",
    )

    fim_data: bool = arg(
        False,
        "Fill-in-the-middle samples (Megatron-LM's flag): each document, with probability "
        "--fim-rate, cut at two random characters and laid out as <prefix> P <suffix> S <middle> "
        "M (or SPM, --fim-spm-rate); the tokenizer must have the sentinel tokens.",
    )
    fim_rate: float = arg(0.5, "With --fim-data: the share of documents rewritten.")
    fim_spm_rate: float = arg(
        0.5, "With --fim-data: the share of rewritten documents laid out suffix first (SPM)."
    )
    fim_split_sample: str | None = arg(
        None,
        "With --fim-data: a token (a repository's file separator) whose fragments are rewritten "
        "each with --fim-fragment-rate, in the documents chosen by --fim-rate.",
    )
    fim_fragment_rate: float | None = arg(None, "With --fim-split-sample: see there.")
    fim_no_prefix: str | None = arg(
        None, "With --fim-data: documents (fragments) whose text starts with this stay as they are."
    )
    fim_prefix_token: str = arg("<fim_prefix>", "FIM's prefix sentinel token.")
    fim_middle_token: str = arg("<fim_middle>", "FIM's middle sentinel token.")
    fim_suffix_token: str = arg("<fim_suffix>", "FIM's suffix sentinel token.")
    fim_pad_token: str = arg("<fim_pad>", "FIM's padding token (its labels train nothing).")
    fim_eod_token: str | None = arg(
        None, "The token FIM splits documents on (default: the tokenizer's end of document)."
    )

    # "--data-path is required" (unless --sft-data) is checked in validate().

    def __post_init__(self):
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers}")
        check_at_least(self, "num_dataset_builder_threads")
        self._check_fim()
        self._read_blend_files()
        if self.per_split and not self.train_data_path:
            raise ConfigError("--valid-data-path and --test-data-path need --train-data-path")
        if self.per_split and self.data_path:
            raise ConfigError(
                "give either --data-path (with --split) or --train-data-path (with "
                "--valid-data-path / --test-data-path), not both"
            )
        if self.mock_data and (self.data_path or self.per_split or self.train_samples_from):
            raise ConfigError(
                "--mock-data replaces the data: not with --data-path, --train-data-path or "
                "--train-samples-from"
            )
        if self.multiple_validation_sets and not self.valid_data_path:
            raise ConfigError("--multiple-validation-sets needs --valid-data-path")
        if self.per_split and self.train_samples_from:
            raise ConfigError(
                "--train-samples-from draws its batches from a --data-path/--split order; not "
                "with --train-data-path"
            )

    def _check_fim(self) -> None:
        rates = ("fim_rate", "fim_spm_rate", "fim_fragment_rate")
        for name in rates:
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {value:g}")
        if not self.fim_data:
            given = [f for f in ("fim_split_sample", "fim_fragment_rate", "fim_no_prefix")
                     if getattr(self, f) is not None]  # fmt: skip
            if given:
                raise ConfigError(f"--{given[0].replace('_', '-')} needs --fim-data")
            return
        if (self.fim_split_sample is None) != (self.fim_fragment_rate is None):
            raise ConfigError("--fim-split-sample and --fim-fragment-rate go together")
        if self.mock_data:
            raise ConfigError("--fim-data rewrites --data-path documents: not with --mock-data")

    def fim_settings(self, tokenizer):
        """--fim-data's settings with the tokenizer's ids (one line for a missing token)."""
        from megatron_slm.data.fim import FimSettings, FimTokens, token_id

        ids = {name: token_id(tokenizer, getattr(self, f"fim_{name}_token"), f"--fim-{name}-token")
               for name in ("prefix", "middle", "suffix", "pad")}  # fmt: skip
        eod = tokenizer.eod
        if self.fim_eod_token is not None:
            eod = token_id(tokenizer, self.fim_eod_token, "--fim-eod-token")
        split = self.fim_split_sample
        tokens = FimTokens(
            **ids,
            eod=eod,
            split=None if split is None else token_id(tokenizer, split, "--fim-split-sample"),
        )
        return FimSettings(
            self.fim_rate, self.fim_spm_rate, tokens, self.fim_fragment_rate, self.fim_no_prefix
        )

    def _read_blend_files(self) -> None:
        """--data-args-path / --per-split-data-args-path fill the blends they replace."""
        if self.data_args_path and self.per_split_data_args_path:
            raise ConfigError("give either --data-args-path or --per-split-data-args-path")
        if self.data_args_path:
            if self.data_path or self.per_split:
                raise ConfigError("--data-args-path replaces --data-path and the per-split paths")
            self.data_path = _read_text(self.data_args_path, "--data-args-path").split()
            if not self.data_path:
                raise ConfigError(f"--data-args-path {self.data_args_path}: no dataset in it")
        if self.per_split_data_args_path:
            if self.data_path or self.per_split:
                raise ConfigError(
                    "--per-split-data-args-path replaces --data-path and the per-split paths"
                )
            blends = _read_split_blends(self.per_split_data_args_path)
            if not blends.get("train"):
                raise ConfigError(
                    f'--per-split-data-args-path {self.per_split_data_args_path}: no "train" blend'
                )
            self.train_data_path = blends["train"]
            self.valid_data_path = blends.get("valid") or []
            self.test_data_path = blends.get("test") or []

    @property
    def per_split(self) -> bool:
        """Megatron-LM's per-split paths instead of one blend cut by --split."""
        return bool(self.train_data_path or self.valid_data_path or self.test_data_path)

    @property
    def train_blend(self) -> list[str]:
        """The blend the model trains on: --train-data-path, else --data-path."""
        return self.train_data_path if self.per_split else self.data_path

    def blend_per_split(self) -> list[list[str] | None] | None:
        """[train, valid, test] blends (None: that split has none); None with --data-path."""
        if not self.per_split:
            return None
        return [
            p or None for p in (self.train_data_path, self.valid_data_path, self.test_data_path)
        ]

    @property
    def eod_flags(self) -> dict[str, bool]:
        """What megatron-core's GPTDataset does at end-of-document tokens (the attention mask
        is the trainer's, from the tokens on the device: no [s, s] mask per sample)."""
        return {"reset_position_ids": self.reset_position_ids, "eod_mask_loss": self.eod_mask_loss}


def _read_text(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{flag} {path}: not UTF-8 text") from None


def _read_split_blends(path: str) -> dict[str, list[str]]:
    """Megatron-LM's per-split file: an object whose keys are among train, valid and test, each
    a list of strings (numbers allowed: weights) or null."""
    flag = "--per-split-data-args-path"
    try:
        blends = json.loads(_read_text(path, flag))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} {path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(blends, dict) or not set(blends) <= {"train", "valid", "test"}:
        raise ConfigError(
            f'{flag} {path}: must be an object with keys among "train", "valid" and "test"'
        )
    out = {}
    for split, blend in blends.items():
        if blend is None:
            continue
        ok = isinstance(blend, list) and all(
            isinstance(x, str) or (isinstance(x, (int, float)) and not isinstance(x, bool))
            for x in blend
        )
        if not ok:
            raise ConfigError(f'{flag} {path}: "{split}" must be a list of weights and prefixes')
        out[split] = [str(x) for x in blend]
    return out


@dataclass
class SFTArgs:
    """Supervised fine-tuning on chat-format JSONL instead of --data-path (data/sft.py)."""

    sft_data: list[str] = arg(
        [],
        "Chat-format JSONL ({'messages': [{'role', 'content'}, ...]}) to fine-tune on instead of "
        "--data-path; repeat or list several files. Loss on assistant tokens only; examples are "
        "packed into --seq-length rows with attention reset at their boundaries.",
        action="extend",
    )
    sft_epochs: int | None = arg(
        None, "Epochs of SFT data (default: as many as --train-iters needs, reshuffled each)."
    )
    sft_too_long: str = arg(
        "truncate",
        "Examples longer than --seq-length + 1 tokens: truncate (keep the start) or drop.",
        choices=("truncate", "drop"),
    )
    sft_chat_template: str | None = arg(
        None, "Jinja chat template file (default: the tokenizer's, else megatron_slm's default)."
    )

    def __post_init__(self):
        if self.sft_epochs is not None and self.sft_epochs < 1:
            raise ConfigError("--sft-epochs must be >= 1")

    @property
    def enabled(self) -> bool:
        return bool(self.sft_data)


@dataclass
class SLMArgs:
    slm_ratio: float | None = arg(
        None,
        "Fraction of tokens trained on. Unset: plain causal LM through megatron-core's own loss; "
        "1.0: every token, through the selective op (numerically the same as plain).",
    )
    slm_ref_source: str = arg("sidecar", "Reference losses: sidecar (offline) or online.",
                              choices=("sidecar", "online"))  # fmt: skip
    slm_ref_load: str | None = arg(None, "Reference model checkpoint (online source).")
    slm_select_scope: str = arg("microbatch", "sequence, microbatch or data-parallel.",
                                choices=SELECT_SCOPES)  # fmt: skip
    slm_select_mode: str = select_mode_arg()
    slm_unscored: str = unscored_arg()
    slm_start_iter: int = arg(0, "Plain training before this step, selective after.")

    def __post_init__(self):
        if self.slm_ratio is not None and ratio_error(self.slm_ratio):
            raise ConfigError(ratio_error(self.slm_ratio))
        check_choices(self, "slm_ref_source", "slm_select_scope", "slm_select_mode", "slm_unscored")

    @property
    def enabled(self) -> bool:
        """The loss goes through the selective op (any --slm-ratio given)."""
        return self.slm_ratio is not None

    @property
    def selective(self) -> bool:
        return self.slm_ratio is not None and self.slm_ratio < 1.0

    @property
    def needs_reference(self) -> bool:
        return self.slm_ratio is not None and needs_reference(self.slm_ratio, self.slm_select_mode)


@dataclass(frozen=True)
class DistillationSettings:
    """What ``--export-kd-cfg`` sets (ModelOpt's keys; these defaults without the file)."""

    skip_lm_loss: bool = True  # the student learns from the KD loss alone
    kd_loss_scale: float = 1.0  # beside the LM loss: the KD loss at its size, times this
    logit_kl_temperature: float = 1.0


# ModelOpt's logits-only configuration: the one pair of layers megatron-slm distils.
KD_LOGIT_LAYERS = ["output_layer", "output_layer"]


def read_distillation_settings(path: str) -> DistillationSettings:
    """``--export-kd-cfg`` (Megatron-LM's distillation YAML): every key checked, one line."""
    import yaml

    where = f"--export-kd-cfg {path}"
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not YAML ({str(exc).splitlines()[0]})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(DistillationSettings)}
    known |= {"logit_layers", "intermediate_layer_pairs"}
    for key in raw:
        if key not in known:
            names = ", ".join(sorted(known))
            raise ConfigError(f"{where}: unknown setting {key!r} (known: {names})")
    if raw.get("logit_layers", KD_LOGIT_LAYERS) != KD_LOGIT_LAYERS:
        raise ConfigError(
            f"{where}: logit_layers {raw['logit_layers']}: megatron-slm distils the output layers' "
            f"logits, {KD_LOGIT_LAYERS}"
        )
    if raw.get("intermediate_layer_pairs"):
        raise ConfigError(
            f"{where}: intermediate_layer_pairs are not offered (megatron-slm distils the logits "
            "only); leave the list empty"
        )
    skip = raw.get("skip_lm_loss", True)
    if not isinstance(skip, bool):
        raise ConfigError(f"{where}: skip_lm_loss must be true or false, got {skip!r}")
    values = {}
    for key in ("kd_loss_scale", "logit_kl_temperature"):
        value = raw.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{where}: {key} must be a positive number, got {value!r}")
        values[key] = float(value)
    return DistillationSettings(skip_lm_loss=skip, **values)


@dataclass
class DistillationArgs:
    export_kd_teacher_load: str | None = arg(
        None,
        "Knowledge distillation (Megatron-LM's flag): the teacher, a megatron_slm checkpoint or a "
        "Hugging Face directory with the data's tokenizer and the student's padded vocabulary. "
        "The student learns the teacher's next-token distribution: KL(teacher || student) of "
        "each trained token's logits. Loaded frozen at the run's TP size; not with PP > 1.",
    )
    export_kd_cfg: str | None = arg(
        None,
        "Distillation settings, a YAML file of Megatron-LM's (ModelOpt's) keys: skip_lm_loss "
        "(default true: the KD loss alone), kd_loss_scale (1.0; with skip_lm_loss false: the KD "
        "loss scaled to the LM loss's size, times this, added to it), logit_kl_temperature "
        "(1.0); logit_layers must be [output_layer, output_layer]; intermediate_layer_pairs are "
        "not offered.",
    )

    def __post_init__(self):
        if self.export_kd_cfg and not self.export_kd_teacher_load:
            raise ConfigError("--export-kd-cfg needs --export-kd-teacher-load (the teacher)")
        self.settings = (
            read_distillation_settings(self.export_kd_cfg)
            if self.export_kd_cfg
            else DistillationSettings()
        )

    @property
    def enabled(self) -> bool:
        return bool(self.export_kd_teacher_load)


@dataclass
class CheckpointArgs:
    save: str | None = arg(None, "Checkpoint directory to save to.")
    save_interval: int | None = arg(None, "Save every N steps (and at the end).")
    save_retain_interval: int | None = arg(
        None,
        "Keep only the checkpoints of multiples of N steps and the latest (Megatron-LM's flag): "
        "each save deletes the previous latest checkpoint unless its step is a multiple of N "
        "(a multiple of --save-interval); a symbolic link is never deleted.",
    )
    non_persistent_save_interval: int | None = arg(
        None,
        "Also save every N steps (where no --save-interval save falls) into the non-persistent "
        "directory, which keeps only its newest checkpoint (Megatron-LM's flag): frequent, "
        "cheap restart points. Resuming, --load takes the newer of its own latest checkpoint "
        "and the non-persistent one.",
    )
    non_persistent_ckpt_type: str | None = arg(
        None,
        "Megatron-LM's non-persistent checkpoint kind: global (the default with "
        "--non-persistent-save-interval), a whole checkpoint in --non-persistent-global-ckpt-dir.",
        choices=("global",),
    )
    non_persistent_global_ckpt_dir: str | None = arg(
        None,
        "Directory of the non-persistent checkpoints (default: non_persistent inside --save to "
        "write, inside --load to resume).",
    )
    load: str | None = arg(None, "Checkpoint to resume from (model, optimizer, data position).")
    ckpt_step: int | None = arg(
        None,
        "Resume from this iteration of the --load checkpoint root instead of its latest "
        "(Megatron-LM's flag); later checkpoints there are overwritten as training reaches them.",
    )
    finetune: bool = arg(False, "With --load: load weights only, start at step 0.")
    pretrained_checkpoint: str | None = arg(
        None,
        "Fine-tuning's starting point (Megatron-LM's flag): while --load holds no checkpoint "
        "(no --load, or --load the --save directory before its first save), this checkpoint's "
        "weights are loaded as --finetune loads them; once --load holds one, runs resume from it "
        "(a requeued job goes on where it stopped).",
    )
    moe_use_upcycling: bool = arg(
        False,
        "Start a mixture of experts (--num-experts and the other mixture flags) from the dense "
        "--load checkpoint (Megatron-LM's flag): every tensor is copied, each expert is the "
        "dense MLP (or a slice of it, --moe-upcycling-granularity), the routers are fresh; "
        "training starts at step 0 and the mixture is saved to --save (which must hold no "
        "checkpoint) before the first step. Later runs drop the flag and --load --save.",
    )
    moe_upcycling_granularity: int = arg(
        1,
        "With --moe-use-upcycling: each copy of the dense MLP is cut into this many experts of "
        "1/G its width (granular upcycling, arXiv 2410.07524; --num-experts a multiple of G).",
    )
    override_opt_param_scheduler: bool = arg(
        False,
        "Resuming: train on this run's learning-rate schedule (--lr, --min-lr, "
        "--lr-warmup-iters, --lr-decay-iters, --lr-decay-style, --weight-decay, and the training "
        "steps the decay defaults to) from the saved step on, where it differs from the "
        "checkpoint's (Megatron-LM's flag). Without it or --use-checkpoint-opt-param-scheduler "
        "a difference is refused.",
        aliases=("--override-opt_param-scheduler",),
    )
    use_checkpoint_opt_param_scheduler: bool = arg(
        False,
        "Resuming: keep the checkpoint's learning-rate schedule whatever the flags say "
        "(Megatron-LM's flag).",
        aliases=("--use-checkpoint-opt_param-scheduler",),
    )
    exit_signal_handler: bool = arg(False, "On --exit-signal: save a checkpoint and exit cleanly.")
    exit_signal: str = arg("SIGTERM", "Signal name for --exit-signal-handler.")
    exit_duration_in_mins: float | None = arg(None, "Save and exit after this many minutes.")
    exit_interval: int | None = arg(None, "Save and exit when the step is a multiple of this.")
    no_load_optim: bool = arg(
        False,
        "With --load: do not load the optimizer state and its learning-rate scheduler's step "
        "(Megatron-LM's flag): the weights, the step and the data position resume; Adam starts "
        "afresh.",
    )
    no_save_optim: bool = arg(
        False,
        "Save without the optimizer state and the scheduler (Megatron-LM's flag): smaller "
        "checkpoints that resume with --no-load-optim or --finetune only.",
    )
    no_save_rng: bool = arg(False, "Save without the random number generators' states.")
    exit_on_missing_checkpoint: bool = arg(
        False,
        "With --load: fail when it holds no checkpoint, also when it is the --save directory of a "
        "run that has not saved yet (which otherwise starts from scratch).",
    )
    use_checkpoint_args: bool = arg(
        False,
        "Accepted: a --load checkpoint's architecture and tokenizer are always used (the model "
        "flags may only confirm them).",
    )
    use_tokenizer_model_from_checkpoint_args: bool = arg(
        True,
        "Accepted in either form (Megatron-LM's flag): a --tokenizer-model given is used over "
        "the path the checkpoint records (checked against its recorded hash), else the "
        "recorded one.",
    )
    no_load_rng: bool = arg(
        False, "With --load: do not restore the random number generators' states."
    )
    ckpt_format: str = arg(
        "torch_dist",
        "Checkpoint format: megatron-core's distributed checkpoint (torch_dist), the only one.",
        choices=("torch_dist",),
    )
    use_dist_ckpt: bool = arg(
        False, "Accepted (Megatron-LM's older flag): checkpoints are always torch_dist."
    )
    auto_detect_ckpt_format: bool = arg(
        False, "Accepted (Megatron-LM's flag): every checkpoint megatron-slm reads is torch_dist."
    )
    ckpt_fully_parallel_save: bool = arg(
        True,
        "Spread the writing of state that data-parallel ranks hold alike (the weights; the "
        "plain or per-parameter optimizer state) over all of them, as Megatron-LM does by "
        "default, instead of writing it from data-parallel rank 0.",
    )
    async_save: bool = arg(
        False,
        "Write checkpoints in the background (Megatron-LM's flag): the step stages the tensors "
        "in host memory and a forked process writes them while training goes on; the "
        "checkpoint becomes the latest at a later log step, before the next save, or at exit.",
    )
    use_persistent_ckpt_worker: bool = arg(
        False,
        "Accepted (Megatron-LM 0.16 runs --async-save only with it): each background save forks "
        "its own writer.",
    )
    ckpt_assume_constant_structure: bool = arg(
        False,
        "Every save has the structure of the first (Megatron-LM's flag): its writer, plans and "
        "metadata are reused and the sharding's integrity is checked once, which shortens the "
        "saves of frequent checkpoints.",
    )
    dist_ckpt_strictness: str = arg(
        "assume_ok_unexpected",
        "How --load treats keys the model and the checkpoint do not share (Megatron-LM's flag, "
        "megatron-core's StrictHandling): assume_ok_unexpected (a weight the checkpoint lacks "
        "fails the load); log_unexpected, log_all (logged; _all also the checkpoint's keys "
        "nothing reads, e.g. its optimizer state under --finetune); raise_unexpected, raise_all "
        "(refused in one line, before reading); return_unexpected, return_all, ignore_all (the "
        "weights it lacks keep their initialisation, logged).",
        choices=DIST_CKPT_STRICTNESS,
    )
    ckpt_fully_parallel_load: bool = arg(
        False,
        "On --load, each data-parallel rank reads a share of what they all need and they "
        "exchange it (Megatron-LM's flag), instead of every rank reading all of it from storage.",
    )

    def __post_init__(self):
        if not isinstance(getattr(signal, self.exit_signal, None), signal.Signals):
            raise ConfigError(f"--exit-signal {self.exit_signal!r} is not a signal name")
        check_at_least(
            self, "save_interval", "save_retain_interval", "non_persistent_save_interval",
            optional=True,
        )  # fmt: skip
        self._check_retention()
        check_choices(self, "ckpt_format")
        if self.exit_on_missing_checkpoint and not self.load:
            raise ConfigError("--exit-on-missing-checkpoint needs --load")
        if self.ckpt_step is not None:
            self.load = checkpoint_at_step(self.load or "", self.ckpt_step)
        if (self.no_load_optim or self.no_load_rng) and self.finetune:
            flag = "--no-load-optim" if self.no_load_optim else "--no-load-rng"
            raise ConfigError(f"{flag}: --finetune already loads the weights only")
        self._check_upcycling()
        if self.pretrained_checkpoint and self.moe_use_upcycling:
            raise ConfigError(
                "--pretrained-checkpoint: --moe-use-upcycling starts from the dense --load "
                "checkpoint; give that one as --load"
            )
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ConfigError(
                "--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler are "
                "exclusive: the first trains on this run's schedule, the second on the saved one"
            )

    def _check_upcycling(self) -> None:
        if self.moe_upcycling_granularity < 1:
            raise ConfigError(
                f"--moe-upcycling-granularity must be >= 1, got {self.moe_upcycling_granularity}"
            )
        if not self.moe_use_upcycling:
            if self.moe_upcycling_granularity != 1:
                raise ConfigError("--moe-upcycling-granularity needs --moe-use-upcycling")
            return
        if not (self.load and self.save):
            raise ConfigError(
                "--moe-use-upcycling needs --load (the dense checkpoint) and --save (where the "
                "mixture is written)"
            )
        # Loaded as --finetune loads: the dense run's weights only (its optimizer state, data
        # position and random states are not the mixture's), from step 0.
        self.finetune = True

    def _check_retention(self) -> None:
        if self.save_retain_interval is not None:
            if not (self.save and self.save_interval):
                raise ConfigError("--save-retain-interval needs --save and --save-interval")
            if self.save_retain_interval % self.save_interval:
                raise ConfigError(
                    f"--save-retain-interval {self.save_retain_interval} must be a multiple of "
                    f"--save-interval {self.save_interval}"
                )
        if self.non_persistent_save_interval is not None:
            if not self.save:
                raise ConfigError("--non-persistent-save-interval needs --save")
            self.non_persistent_ckpt_type = self.non_persistent_ckpt_type or "global"
        if self.non_persistent_ckpt_type is not None:
            check_choices(self, "non_persistent_ckpt_type")

    def non_persistent_dir(self, root: str) -> str | None:
        """Where the non-persistent checkpoints of the checkpoint root ``root`` (--save or
        --load) are; None without --non-persistent-ckpt-type (or its interval)."""
        if self.non_persistent_ckpt_type is None:
            return None
        return self.non_persistent_global_ckpt_dir or os.path.join(root, NON_PERSISTENT_SUBDIR)


@dataclass
class LoggingArgs:
    log_interval: int = arg(
        10,
        "Console line every N steps. The host reads the steps' statistics back from the device "
        "at these steps only (and before evaluation, checkpoints and selection pictures); "
        "per-step records and TensorBoard scalars are written then. With several ranks, exit "
        "signals and --exit-duration-in-mins are also checked at these steps.",
    )
    tensorboard_dir: str | None = arg(None, "TensorBoard event directory.")
    log_progress: bool = arg(
        False,
        "Append to <save>/progress.txt (Megatron-LM's flag and format): a line when the job "
        "starts, at each checkpoint (iteration, the job's and the cumulative TFLOP/s per device, "
        "the training FLOPs and tokens so far) and for each checkpoint deleted.",
    )
    logging_level: int | None = arg(
        None,
        "Python logging level of every logger, megatron-core's included (Megatron-LM's flag, "
        "also its MEGATRON_LOGGING_LEVEL variable; 10 debug, 20 info, 30 warning). Default: "
        "megatron-slm's INFO records, megatron-core's from WARNING.",
    )
    log_loss_file: str | None = arg(
        None,
        "Append one JSON line per step (losses, selection) to this file (tests, analysis); "
        "step_seconds is the mean over the steps read back together.",
    )
    log_selection_interval: int | None = arg(
        None,
        "Every N steps: a picture of one training sample's selection (tokens coloured by excess "
        "loss, selected ones underlined) to TensorBoard (needs --tensorboard-dir, matplotlib).",
    )

    log_throughput: bool = arg(
        False, "Accepted: the log line always shows tokens/s, TFLOP/s per device and MFU."
    )
    moe_per_layer_logging: bool = arg(
        False,
        "With --num-experts: each mixture's auxiliary losses besides their mean (Megatron-LM's "
        "flag): the step's record (moe_<loss>_layer_<i>) and TensorBoard (slm/moe/...).",
    )
    log_params_norm: bool = arg(
        False,
        "At log steps: the L2 norm of the weights as the model holds them (tensor-parallel "
        "copies once, summed over the model-parallel ranks, in fp32), on the console, in "
        "TensorBoard (slm/params_norm) and the step's record.",
    )
    log_num_zeros_in_grad: bool = arg(
        False,
        "At log steps: the zero entries of the step's gradients (megatron-core's count over the "
        "optimizer's gradients), on the console, in TensorBoard (slm/num_zeros_in_grad) and the "
        "step's record.",
    )
    log_memory_to_tensorboard: bool = arg(
        False,
        "At log steps: the writing rank's memory to TensorBoard and the step's record: on CUDA "
        "the allocator's allocated, reserved and peak allocated bytes, on CPU the process's "
        "peak resident set (slm/memory/*).",
    )
    log_timers_to_tensorboard: bool = arg(
        False,
        "The step time to TensorBoard (slm/step_seconds). megatron-slm times whole steps: the "
        "host does not wait for the device inside a step to time its parts.",
    )
    timing_log_level: int = arg(
        0, "Accepted: every level times whole steps (see --log-timers-to-tensorboard).",
        choices=(0, 1, 2),
    )  # fmt: skip
    timing_log_option: str = arg(
        "minmax", "Accepted: see --timing-log-level.", choices=("max", "minmax", "all")
    )
    log_validation_ppl_to_tensorboard: bool = arg(
        False, "Accepted: validation perplexity always goes to TensorBoard (slm/validation_ppl)."
    )
    log_batch_size_to_tensorboard: bool = arg(
        False, "The step's global batch size to TensorBoard (slm/global_batch_size)."
    )
    log_world_size_to_tensorboard: bool = arg(
        False, "The number of ranks to TensorBoard (slm/world_size)."
    )
    tensorboard_log_interval: int = arg(
        1, "TensorBoard scalars of every N-th step (the console and --log-loss-file keep all)."
    )
    tensorboard_queue_size: int = arg(
        1000, "TensorBoard events held in memory before a write (SummaryWriter's max_queue)."
    )
    wandb_project: str | None = arg(
        None,
        "Weights & Biases project: the TensorBoard scalars also go to a W&B run (Megatron-LM's "
        "flag; needs `pip install wandb`; WANDB_MODE=offline keeps the run on disk).",
    )
    wandb_exp_name: str | None = arg(None, "With --wandb-project: the run's name.")
    wandb_entity: str | None = arg(None, "With --wandb-project: the W&B team or user.")
    wandb_save_dir: str | None = arg(
        None, "With --wandb-project: W&B's local files (default: <--save>/wandb, else ./wandb)."
    )
    profile: bool = arg(
        False,
        "Profile the steps from --profile-step-start to --profile-step-end (Megatron-LM's flag): "
        "under nsys (GPU; run as `nsys profile --capture-range=cudaProfilerApi ...`) the range "
        "is opened and closed with cudaProfilerStart/Stop; with --use-pytorch-profiler, "
        "torch.profiler writes a trace to --tensorboard-dir (CPU and GPU).",
    )
    use_pytorch_profiler: bool = arg(False, "With --profile: torch.profiler instead of nsys.")
    profile_step_start: int = arg(10, "With --profile: the first profiled step.")
    profile_step_end: int = arg(12, "With --profile: the step that ends the profiled range.")
    profile_ranks: list[int] = arg([0], "With --profile: the ranks that profile.")

    def __post_init__(self):
        if self.profile:
            if self.profile_step_end <= self.profile_step_start or self.profile_step_start < 0:
                raise ConfigError(
                    f"--profile-step-start {self.profile_step_start} must be >= 0 and before "
                    f"--profile-step-end {self.profile_step_end}"
                )
            if self.use_pytorch_profiler and not self.tensorboard_dir:
                raise ConfigError("--use-pytorch-profiler writes its trace to --tensorboard-dir")
        check_at_least(self, "log_interval", "tensorboard_log_interval", "tensorboard_queue_size")
        check_choices(self, "timing_log_level", "timing_log_option")
        for name in ("wandb_exp_name", "wandb_entity", "wandb_save_dir"):
            if getattr(self, name) and not self.wandb_project:
                raise ConfigError(f"{flag_name(name)} needs --wandb-project")
        if self.wandb_project and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "--wandb-project: the wandb package is not installed (pip install wandb)"
            )
        if self.log_selection_interval is not None and self.log_selection_interval < 1:
            raise ValueError("--log-selection-interval must be >= 1")


GROUPS = {
    "parallel": ParallelConfig,
    "model": ModelArgs,
    "training": TrainingArgs,
    "muon": MuonArgs,
    "data": DataArgs,
    "sft": SFTArgs,
    "tokenizer": TokenizerArgs,
    "slm": SLMArgs,
    "distillation": DistillationArgs,
    "checkpoint": CheckpointArgs,
    "logging": LoggingArgs,
}


@dataclass
class PretrainConfig:
    parallel: ParallelConfig
    model: ModelArgs
    training: TrainingArgs
    muon: MuonArgs
    data: DataArgs
    sft: SFTArgs
    tokenizer: TokenizerArgs
    slm: SLMArgs
    distillation: DistillationArgs
    checkpoint: CheckpointArgs
    logging: LoggingArgs


def build_parser():
    return build_cli_parser(
        "python -m megatron_slm.pretrain",
        "Pretrain a Llama-style GPT on megatron-core with Selective Language Modeling.",
        GROUPS,
    )


def parse_config(argv: list[str] | None = None) -> PretrainConfig:
    return PretrainConfig(**parse_configs(build_parser(), GROUPS, argv))


def schedule_steps(
    t: TrainingArgs, train_iters: int, global_batch_size: int | None
) -> tuple[int | float, int | float, int | float | None]:
    """(warmup, decay, WSD's final decay or None) in optimizer steps, as Megatron-LM resolves
    its flags: lengths in samples (--train-samples) are divided by the global batch size, and
    Megatron-LM's scheduler, which counts samples, gives the same rates at every step; a
    fraction of a step stays (e.g. 100 warmup samples at 8 per step: 12.5 steps). Whole
    numbers are ints."""
    if t.train_samples is not None:
        if not global_batch_size:
            raise ValueError("a schedule in samples needs the global batch size")
        decay = (t.lr_decay_samples or t.train_samples) / global_batch_size
        warmup = t.lr_warmup_samples / global_batch_size
        wsd_samples = t.lr_wsd_decay_samples
        wsd = None if wsd_samples is None else wsd_samples / global_batch_size
    else:
        decay, warmup, wsd = (
            t.lr_decay_iters or train_iters,
            t.lr_warmup_iters,
            t.lr_wsd_decay_iters,
        )
    if t.lr_warmup_fraction is not None:
        warmup = t.lr_warmup_fraction * decay
    if t.lr_decay_style != "WSD":
        wsd = None
    elif not wsd:
        wsd = max(1, train_iters // 10)
    return _whole(warmup), _whole(decay), _whole(wsd)


def _whole(steps):
    return int(steps) if steps is not None and float(steps).is_integer() else steps


def _check_muon(cfg: PretrainConfig) -> None:
    """--optimizer muon's flags need it, and it needs the plain optimizer in bf16 or fp32."""
    given = cfg.muon.given()
    if cfg.training.optimizer != "muon":
        if given:
            raise ConfigError(f"{given[0]} is a flag of --optimizer muon: add it")
        return
    if cfg.parallel.use_distributed_optimizer:
        raise ConfigError(
            "--optimizer muon with --use-distributed-optimizer is not offered: the distributed "
            "optimizer shards flat gradient buckets, which cut the matrices Muon orthogonalises "
            "(Megatron-LM turns this into its experimental layer-wise optimizer); leave "
            "--use-distributed-optimizer out (DISTRIBUTED_OPTIMIZER=0 for examples/pretrain_*.sh)"
        )
    if cfg.training.fp16:
        raise ConfigError(
            "--optimizer muon with --fp16 is not offered (megatron-core's rule: no loss "
            "scaling): use --bf16"
        )


def _check_interleaved_flags(p: ParallelConfig, interleaved: bool) -> None:
    """The interleaved schedule's flags need it (Megatron-LM's rules)."""
    pp, group = p.pipeline_model_parallel_size, p.microbatch_group_size_per_virtual_pipeline_stage
    named = {
        "--no-overlap-p2p-communication": p.no_overlap_p2p_communication,
        "--microbatch-group-size-per-virtual-pipeline-stage": group is not None,
    }
    for flag, given in named.items():
        if given and not interleaved:
            raise ConfigError(
                f"{flag} is a flag of the interleaved schedule: give virtual pipeline stages "
                "(--num-virtual-stages-per-pipeline-rank, ...)"
            )
    if p.no_overlap_p2p_communication and pp < 3:
        raise ConfigError(
            "--no-overlap-p2p-communication needs --pipeline-model-parallel-size > 2 "
            "(Megatron-LM's rule: batched sends and receives between the same two ranks)"
        )
    if group is not None and group < pp:
        raise ConfigError(
            f"--microbatch-group-size-per-virtual-pipeline-stage {group} is less than "
            f"--pipeline-model-parallel-size {pp}"
        )


def microbatches_fit(num_micro: int, group: int, pp: int) -> bool:
    """Whether megatron-core's interleaved schedule runs a step of ``num_micro`` micro-batches
    in groups of ``group`` at pipeline size ``pp``: at least one group, and what is left after
    whole groups none or at least ``pp`` (at the default group, ``pp``: a multiple of it)."""
    return num_micro >= group and not 0 < num_micro % group < pp


def runnable_microbatches(num_micro: int, group: int, pp: int) -> int:
    """The most of ``num_micro`` micro-batches one step of the interleaved schedule runs (0:
    none), e.g. the last, partial batch of a full validation."""
    return next((m for m in range(num_micro, 0, -1) if microbatches_fit(m, group, pp)), 0)


def _check_microbatch_groups(p: ParallelConfig, num_micro: int, group: int, size: int | None):
    """:func:`microbatches_fit` for a step (of a global batch of ``size`` while it grows)."""
    pp = p.pipeline_model_parallel_size
    if microbatches_fit(num_micro, group, pp):
        return
    rule = (
        f"--microbatch-group-size-per-virtual-pipeline-stage {group}"
        if p.microbatch_group_size_per_virtual_pipeline_stage
        else f"the interleaved schedule (--pipeline-model-parallel-size {pp})"
    )
    step = f"a step of {num_micro} micro-batches" + (f" (global batch {size})" if size else "")
    raise ConfigError(
        f"{rule} runs micro-batches in groups of {group}: {step} needs at least one group and "
        f"leaves none or at least {pp} after whole groups (megatron-core's rule)"
    )


@dataclass(frozen=True)
class DerivedSizes:
    data_parallel_size: int
    global_batch_size: int  # the full one (the last size of a growing batch)
    num_microbatches: int  # of a full global batch, per data-parallel rank
    train_iters: int
    # A growing global batch: --rampup-batch-size or --step-batch-size-schedule.
    batch_schedule: BatchRamp | StepBatchSchedule | None = None
    length_in_steps: bool = False  # the run's length was given in steps (--train-iters)

    def global_batch_at(self, consumed_samples: int) -> int:
        """The global batch size of the step that starts after ``consumed_samples``."""
        if self.batch_schedule is None:
            return self.global_batch_size
        return self.batch_schedule.size_at(consumed_samples)

    def microbatches_at(self, consumed_samples: int) -> int:
        """This rank's micro-batches in the step that starts after ``consumed_samples``."""
        per_micro_batch = self.global_batch_size // self.num_microbatches
        return self.global_batch_at(consumed_samples) // per_micro_batch

    @property
    def train_samples(self) -> int:
        """Samples the training steps consume (the training split's length)."""
        if self.batch_schedule is None:
            return self.train_iters * self.global_batch_size
        return self.batch_schedule.consumed_after(self.train_iters)

    @property
    def schedule_iters(self) -> int:
        """The training length in full global batches, the unit of the learning-rate schedule's
        step counts: the steps, unless the batch grows and the length was given in samples or
        tokens (then the full batches those samples make)."""
        if self.batch_schedule is None or self.length_in_steps:
            return self.train_iters
        return self.train_samples // self.global_batch_size


def _check_experts(cfg: PretrainConfig, architecture: GPTModelConfig) -> None:
    """The MoE training flags need a mixture of experts; megatron-core's rule for TP."""
    t, p = cfg.training, cfg.parallel
    ep = p.expert_model_parallel_size
    recomputed = set(t.recompute_modules or ()) if t.recompute_granularity == "selective" else set()
    if "moe" in recomputed and architecture.num_experts is None:
        raise ConfigError("--recompute-modules moe needs --num-experts (the model is dense)")
    if cfg.logging.moe_per_layer_logging and architecture.num_experts is None:
        raise ConfigError("--moe-per-layer-logging needs --num-experts (the model is dense)")
    if "shared_experts" in recomputed and not architecture.moe_shared_expert_intermediate_size:
        raise ConfigError(
            "--recompute-modules shared_experts needs --moe-shared-expert-intermediate-size"
        )
    if t.moe_shared_expert_overlap and architecture.num_experts is not None:
        if not architecture.moe_shared_expert_intermediate_size:
            raise ConfigError(
                "--moe-shared-expert-overlap needs a shared expert "
                "(--moe-shared-expert-intermediate-size)"
            )
        if "shared_experts" in recomputed:  # (megatron-core's rule)
            raise ConfigError(
                "--moe-shared-expert-overlap cannot recompute the shared expert "
                "(--recompute-modules shared_experts)"
            )
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArgs)}
    given = [name for name in t.moe if getattr(t, name) != defaults[name]]
    if architecture.num_experts is None:
        if ep > 1:
            given.insert(0, "expert_model_parallel_size")
        if given:
            raise ConfigError(f"{flag_name(given[0])} needs --num-experts (the model is dense)")
        return
    if "moe_router_bias_update_rate" in given and not architecture.moe_router_enable_expert_bias:
        raise ConfigError("--moe-router-bias-update-rate needs --moe-router-enable-expert-bias")
    if architecture.num_experts % ep:
        raise ConfigError(
            f"--expert-model-parallel-size {ep} does not divide --num-experts "
            f"{architecture.num_experts}"
        )
    etp, tp = p.experts_tensor_parallel, p.tensor_model_parallel_size
    if etp > tp:
        raise ConfigError(
            f"--expert-tensor-parallel-size {etp} above --tensor-model-parallel-size {tp} is not "
            "offered"
        )
    if etp < tp and ep == 1:
        # megatron-core 0.16 marks expert weights for the expert-parallel reduction only at EP > 1
        raise ConfigError(
            f"--expert-tensor-parallel-size {etp} below --tensor-model-parallel-size {tp} needs "
            "--expert-model-parallel-size > 1: with one expert-parallel rank megatron-core "
            "reduces the experts' gradients over the dense data-parallel group only, leaving out "
            "the tensor-parallel ranks that hold the same experts"
        )
    if p.tensor_model_parallel_size > 1 and not p.sequence_parallel:
        raise ConfigError(
            f"--num-experts {architecture.num_experts} with --tensor-model-parallel-size "
            f"{p.tensor_model_parallel_size} needs --sequence-parallel (megatron-core's rule)"
        )


def _check_deterministic(cfg: PretrainConfig, on_cpu: bool) -> None:
    """--deterministic-mode: what Megatron-LM asserts, in one line naming the flag or variable."""
    from megatron_slm.launch import DETERMINISTIC_NCCL_ALGOS

    if cfg.model.use_flash_attn:
        raise ConfigError(
            "--deterministic-mode with --use-flash-attn: flash attention's backward is not "
            "reproducible (drop --use-flash-attn)"
        )
    algo = os.environ.get("NCCL_ALGO")
    if not on_cpu and algo not in DETERMINISTIC_NCCL_ALGOS:
        raise ConfigError(
            f"--deterministic-mode on GPU needs NCCL_ALGO set to one of "
            f"{', '.join(DETERMINISTIC_NCCL_ALGOS)} (got {algo!r}): NCCL's default picks "
            "all-reduce algorithms whose sums differ run to run"
        )


def _check_optimizer_instances(p: ParallelConfig, dp: int, expert_dp: int) -> None:
    """megatron-core's parallel state splits the data-parallel ranks (the experts' too) into the
    instances evenly."""
    n = p.num_distributed_optimizer_instances
    for size, which in ((dp, "data-parallel"), (expert_dp, "expert data-parallel")):
        if size % n:
            raise ConfigError(
                f"--num-distributed-optimizer-instances {n} does not divide the {which} size {size}"
            )


def _check_full_validation(d: DataArgs) -> None:
    """--full-validation reads one epoch of each validation dataset: megatron-core builds that
    only for datasets without weights (a weighted blend is drawn by its weights)."""
    from megatron_slm.data.gpt_dataset import parse_data_path

    if d.mock_data:
        raise ConfigError(
            "--full-validation with --mock-data: megatron-core's mock split holds 100000 random "
            "documents; evaluate --eval-iters batches of it"
        )
    flag = "--valid-data-path" if d.per_split else "--data-path"
    blend = d.valid_data_path if d.per_split else d.data_path
    if blend and parse_data_path(blend)[1] is not None:
        raise ConfigError(
            f"--full-validation reads one epoch of each validation dataset, which a weighted "
            f"{flag} blend has not: give the validation datasets without weights"
            + ("" if d.per_split else " (--valid-data-path A B, with --train-data-path)")
        )


def validate(
    cfg: PretrainConfig, world_size: int, architecture: GPTModelConfig, resumed_samples: int = 0
) -> DerivedSizes:
    """Cross-group checks; every failure names the flag. Returns the derived sizes.
    ``resumed_samples``: the samples a resumed run has consumed (the sizes of a step schedule
    before them were trained and need not suit this run's data-parallel size)."""
    p, t = cfg.parallel, cfg.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    d = cfg.data
    if not d.train_blend and not cfg.sft.enabled and not d.mock_data:
        raise ConfigError(
            "--data-path is required (or --train-data-path, --sft-data or --mock-data)"
        )
    if d.mock_data and cfg.sft.enabled:
        raise ConfigError("give either --mock-data or --sft-data, not both")
    if t.full_validation:
        _check_full_validation(d)
    if cfg.logging.log_progress and not cfg.checkpoint.save:
        raise ConfigError("--log-progress writes progress.txt into --save: give --save")
    if d.mock_data and cfg.slm.needs_reference and cfg.slm.slm_ref_source == "sidecar":
        raise ConfigError(
            "--mock-data has no reference-loss sidecar: select with --slm-ref-source online"
        )
    if d.train_blend and cfg.sft.enabled:
        flag = "--train-data-path" if d.per_split else "--data-path"
        raise ConfigError(f"give either {flag} or --sft-data, not both")
    if d.fim_data and cfg.sft.enabled:
        raise ConfigError("--fim-data rewrites --data-path documents: not with --sft-data")
    if d.fim_data and cfg.slm.needs_reference and cfg.slm.slm_ref_source == "sidecar":
        raise ConfigError(
            "--fim-data moves the tokens, so a sidecar's reference losses no longer line up with "
            "them: select with --slm-ref-source online (the reference scores the rewritten rows)"
        )
    if cfg.sft.enabled and (d.reset_attention_mask or d.reset_position_ids or d.eod_mask_loss):
        raise ConfigError(
            "--reset-attention-mask, --reset-position-ids and --eod-mask-loss apply to "
            "--data-path documents; --sft-data rows already separate their examples"
        )
    masked = None  # the flag whose rows hold several documents, each attending to itself only
    if cfg.sft.enabled:
        masked = "--sft-data"
    elif d.reset_attention_mask:
        masked = "--reset-attention-mask"
    if masked:
        packed_documents_spec(cfg.model.spec_impl, masked)
    _check_experts(cfg, architecture)
    if cfg.model.spec_impl == "local":
        from megatron_slm.models.specs import check_local_norms

        check_local_norms(architecture.apply_layernorm_1p)
    if cfg.slm.enabled and t.cross_entropy_impl == "megatron":
        raise ConfigError(
            "--cross-entropy-impl megatron cannot select tokens: selective training "
            "(--slm-ratio) runs the fused op; leave --cross-entropy-impl at fused"
        )
    if cfg.sft.enabled and cfg.slm.needs_reference:
        raise ConfigError("--sft-data has no reference losses: use --slm-ratio 1 or leave it unset")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp}"
        )
    check_parallel_layout(
        architecture, tp, pp, p.num_layers_per_virtual_pipeline_stage,
        *p.stage_split(architecture.num_layers),
        p.num_virtual_stages_per_pipeline_rank, p.expert_tensor_parallel_size,
        p.pipeline_model_parallel_layout, cfg.training.mtp_num_layers,
    )  # fmt: skip
    dp = world_size // (tp * pp)
    etp, ep = p.experts_tensor_parallel, p.expert_model_parallel_size
    if etp == tp and dp % ep:  # (megatron-core's experts: ETP x EP x expert-DP x PP ranks)
        raise ConfigError(
            f"--expert-model-parallel-size {ep} does not divide the "
            f"data-parallel size {dp} (world size {world_size} / TP {tp} / PP {pp})"
        )
    if (world_size // pp) % (etp * ep):
        raise ConfigError(
            f"--expert-tensor-parallel-size {etp} x --expert-model-parallel-size {ep} does not "
            f"divide the {world_size // pp} ranks of a pipeline stage (world size {world_size} / "
            f"PP {pp})"
        )
    _check_optimizer_instances(p, dp, world_size // (pp * etp * ep))
    _check_muon(cfg)
    gbs = t.global_batch_size or t.micro_batch_size * dp
    if t.step_batch_size_schedule:
        gbs = t.step_schedule.final
    if gbs % (t.micro_batch_size * dp):
        raise ConfigError(
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp}"
        )
    num_micro = gbs // (t.micro_batch_size * dp)
    _check_interleaved_flags(p, p.interleaved_schedule(architecture.num_layers))
    group = p.microbatch_group(architecture.num_layers)
    if group is not None:
        _check_microbatch_groups(p, num_micro, group, None)
    if t.seq_length > architecture.max_position_embeddings:
        raise ConfigError(
            f"--seq-length {t.seq_length} exceeds --max-position-embeddings "
            f"{architecture.max_position_embeddings}"
        )
    on_cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())
    backend = "gloo" if on_cpu else "nccl"
    if p.distributed_backend not in (None, backend):
        raise ConfigError(
            f"--distributed-backend {p.distributed_backend}: megatron-slm runs {backend} on "
            f"{'CPU' if on_cpu else 'GPU'}"
        )
    if cfg.logging.profile and not cfg.logging.use_pytorch_profiler and on_cpu:
        raise ConfigError(
            "--profile without --use-pytorch-profiler opens a range for nsys, which needs a "
            "GPU: add --use-pytorch-profiler"
        )
    if t.deterministic_mode:
        _check_deterministic(cfg, on_cpu)
    if (t.bf16 or t.fp16) and on_cpu:
        # megatron-core's mixed-precision optimizer only wraps torch.cuda.*Tensor parameters.
        raise ConfigError(f"--{'bf16' if t.bf16 else 'fp16'} needs a GPU (--device cuda)")
    growing, iters = None, None
    if (t.rampup_batch_size or t.step_batch_size_schedule) and d.train_samples_from:
        flag = "--rampup-batch-size" if t.rampup_batch_size else "--step-batch-size-schedule"
        raise ConfigError(
            f"{flag}: --train-samples-from trains the batches of its list, each of the list's "
            "global batch size"
        )
    if t.rampup_batch_size:
        growing = batch_ramp(t.rampup_batch_size, gbs, t.micro_batch_size * dp)
        iters = growing.train_iters(t.train_samples)
    elif t.step_batch_size_schedule:
        growing = t.step_schedule
        check_schedule_sizes(growing, resumed_samples, t.micro_batch_size * dp)
        if t.train_iters is None:  # Megatron-LM: steps until the samples are consumed
            samples = t.train_samples or math.ceil(t.train_tokens / t.seq_length)
            iters = growing.train_iters(samples)
    elif t.train_samples is not None:  # Megatron-LM: the whole global batches in them
        iters = t.train_samples // gbs
        if iters < 1:
            raise ConfigError(
                f"--train-samples {t.train_samples} is less than one global batch ({gbs})"
            )
    elif t.train_iters is None:
        iters = math.ceil(t.train_tokens / (gbs * t.seq_length))
    if iters is None:
        iters = t.train_iters
    if growing is not None and group is not None:  # every step's micro-batches form groups
        sizes = growing.sizes() if t.rampup_batch_size else growing.sizes_from(resumed_samples)
        for size in sizes:
            _check_microbatch_groups(p, size // (t.micro_batch_size * dp), group, size)
    s = cfg.slm
    if s.needs_reference and s.slm_ref_source == "online":
        if not s.slm_ref_load:
            raise ConfigError("--slm-ref-source online needs --slm-ref-load")
        if pp > 1:
            raise ConfigError(
                "--slm-ref-source online is not supported with --pipeline-model-parallel-size > 1:"
                " score the corpus offline with tools/score_corpus.py and train with "
                "--slm-ref-source sidecar (the scalable path)"
            )
    if t.mtp_num_layers and cfg.checkpoint.moe_use_upcycling:
        raise ConfigError(
            "--mtp-num-layers with --moe-use-upcycling is not offered: upcycle first, then add "
            "the heads when training from the mixture's checkpoint"
        )
    if cfg.distillation.enabled and pp > 1:
        raise ConfigError(
            "--export-kd-teacher-load is not supported with --pipeline-model-parallel-size > 1 "
            "(the teacher is not split into stages): use --tensor-model-parallel-size"
        )
    sizes = DerivedSizes(dp, gbs, num_micro, iters, growing, t.train_iters is not None)
    warmup, decay, wsd = schedule_steps(t, sizes.schedule_iters, gbs)
    unit = "samples" if t.train_samples is not None else "iters"
    if warmup and warmup >= decay:  # (a fraction of the decay is always shorter)
        given = t.lr_warmup_samples if t.train_samples is not None else t.lr_warmup_iters
        raise ConfigError(
            f"--lr-warmup-{unit} {given} ({warmup:g} steps) must be smaller than the decay "
            f"steps ({decay:g}: --lr-decay-{unit} or the training length)"
        )
    if wsd is not None and wsd > decay:
        raise ConfigError(
            f"WSD's final decay (--lr-wsd-decay-{unit}: {wsd:g} steps) exceeds the decay "
            f"(--lr-decay-{unit} or the training length: {decay:g} steps)"
        )
    ck = cfg.checkpoint
    if ck.finetune and not (ck.load or ck.pretrained_checkpoint):
        raise ConfigError("--finetune needs --load")
    return sizes
