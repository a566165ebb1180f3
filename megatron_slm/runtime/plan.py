"""The front door of every job that runs a trained model: ``LoadArgs`` (the flags every such tool
shares) -> :func:`plan_load` -> ``runtime.load_model(plan, device)``.

:func:`plan_load` runs before any process group and reads the model's description exactly once:
a megatron_slm checkpoint's ``megatron_slm.json``, or a Hugging Face Llama/Mistral directory's
``config.json`` (the model is then converted in memory by ``runtime.hf_source``, nothing written).
It resolves the architecture and the tokenizer once, with the checkpoint rules of
``megatron_slm.checkpoint`` (flags may only confirm what the checkpoint records; the recorded
tokenizer file must still hash to the recorded digest), and checks that the padded vocabulary
splits over the requested TP size. Everything later reads the plan, never the files again.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from megatron_slm.checkpoint import (
    FORMAT_VERSION,
    METADATA,
    TRACKER,
    CheckpointInfo,
    check_recorded_tokenizer,
    checkpoint_at_step,
    read_checkpoint,
    resolve_architecture,
    resolve_tokenizer,
)
from megatron_slm.cli import arg
from megatron_slm.data.tokenizer import TokenizerArgs
from megatron_slm.errors import CheckpointError, ConfigError
from megatron_slm.models.args import DEFAULT_VOCAB_DIVISOR, ModelArgs
from megatron_slm.models.presets import GPTModelConfig, check_parallel_layout, padded_vocab_size
from megatron_slm.platform import device_arg

TOKENIZER_MODES = ("optional", "required", "none")


@dataclass
class DeviceArgs:
    """The device flag of every job that runs a model (one default for all of them)."""

    device: str = device_arg()


@dataclass
class LoadArgs(DeviceArgs):
    """The flags of a job that loads one model: what, where, at which TP size."""

    load: str | None = arg(
        None,
        "The model: a megatron_slm checkpoint (root or iter_N) or a Hugging Face Llama/Mistral "
        "directory (converted in memory).",
        required=True,
    )
    tensor_model_parallel_size: int = arg(
        1, "Tensor-parallel size the model runs with (run under torchrun)."
    )
    ckpt_step: int | None = arg(
        None,
        "Load this iteration of the --load checkpoint root instead of its latest "
        "(Megatron-LM's flag).",
    )

    def __post_init__(self):
        if self.tensor_model_parallel_size < 1:
            raise ConfigError("--tensor-model-parallel-size must be >= 1")
        if self.ckpt_step is not None:
            if self.load and is_hf_dir(self.load):
                raise ConfigError(f"--ckpt-step: --load {self.load} is a Hugging Face directory")
            self.load = checkpoint_at_step(self.load or "", self.ckpt_step)


def is_hf_dir(path: str) -> bool:
    """A Hugging Face model directory (config.json), not a megatron_slm checkpoint."""
    return (
        os.path.isfile(os.path.join(path, "config.json"))
        and not os.path.isfile(os.path.join(path, METADATA))
        and not os.path.isfile(os.path.join(path, TRACKER))
    )


@dataclass(frozen=True)
class LoadPlan:
    """Everything known about a model before its weights are read."""

    checkpoint: CheckpointInfo
    """The recorded facts (for a HF directory: the ones its config.json implies, ``meta["hf"]``)."""
    arch: GPTModelConfig
    tokenizer: object | None
    """The resolved tokenizer (None: not asked for, or none given or recorded)."""
    tokenizer_type: str | None
    tokenizer_model: str | None
    tensor_model_parallel_size: int
    transformer_impl: str | None = None
    """``--transformer-impl`` of the flags (None: the device's default)."""
    hf_config: dict | None = None
    """A Hugging Face directory's config.json (None: a megatron_slm checkpoint)."""

    @property
    def path(self) -> str:
        """The checkpoint's iteration directory, or the HF directory."""
        return self.checkpoint.path

    @property
    def flag(self) -> str:
        return self.checkpoint.flag

    @property
    def is_hf(self) -> bool:
        return self.hf_config is not None

    @property
    def params_dtype(self) -> torch.dtype | None:
        """The recorded parameter dtype (None: not recorded; HF directories load as float32)."""
        return self.checkpoint.params_dtype

    @property
    def seq_length(self) -> int | None:
        return self.checkpoint.seq_length

    @property
    def padded_vocab_size(self) -> int:
        return self.checkpoint.padded_vocab_size

    def divisor_for(self, tensor_model_parallel_size: int) -> int:
        return self.checkpoint.divisor_for(tensor_model_parallel_size)


def _hf_facts(path: str, flag: str, tp: int) -> tuple[CheckpointInfo, dict]:
    """What a HF directory's config.json says, in the shape of a checkpoint's metadata: the
    architecture (convert's mapping), the vocabulary padded as megatron pads it at this TP, and
    its tokenizer files when it has them (no digest: nothing recorded one)."""
    from megatron_slm.runtime.hf_source import (
        architecture,
        gpt_config_from_hf,
        read_hf_config,
        tokenizer_files,
    )

    path = os.path.abspath(path)
    hf_cfg = read_hf_config(path)
    arch = gpt_config_from_hf(hf_cfg, os.path.join(path, "config.json"))
    meta = {
        "format_version": FORMAT_VERSION,
        "source": f"hf-dir:{path}",
        "model": dataclasses.asdict(arch),
        "padded_vocab_size": padded_vocab_size(arch.vocab_size, DEFAULT_VOCAB_DIVISOR, tp),
        "make_vocab_size_divisible_by": DEFAULT_VOCAB_DIVISOR,
        "hf": {"architecture": architecture(hf_cfg), "config": hf_cfg},
    }
    if tokenizer_files(path):
        meta["tokenizer"] = {"type": "HuggingFaceTokenizer", "model": path}
    return CheckpointInfo(path, meta, flag), hf_cfg


def plan_load(
    args: LoadArgs,
    *,
    model_args: ModelArgs | None = None,
    tokenizer_args: TokenizerArgs | None = None,
    tokenizer: str = "optional",
    flag: str = "--load",
) -> LoadPlan:
    """Read ``args.load`` once and decide what to build. ``model_args``/``tokenizer_args``
    default to ``args`` itself when it carries those flags (they may only confirm the
    checkpoint's); ``tokenizer``: ``optional`` (the flags', else the recorded one, else none),
    ``required`` (an error without one) or ``none`` (not built; the recorded file is still
    hash-checked). ``args.pipeline_model_parallel_size`` (when the config has one) is checked
    with the TP size. Errors are UserErrors naming ``flag`` or the file."""
    if tokenizer not in TOKENIZER_MODES:
        raise ValueError(f"tokenizer must be one of {TOKENIZER_MODES}, got {tokenizer!r}")
    if not args.load:
        raise ConfigError(f"{flag}: give the model to load")
    if model_args is None:
        model_args = args if isinstance(args, ModelArgs) else ModelArgs()
    if tokenizer_args is None:
        tokenizer_args = args if isinstance(args, TokenizerArgs) else TokenizerArgs()
    tp = args.tensor_model_parallel_size
    if is_hf_dir(args.load):
        info, hf_cfg = _hf_facts(args.load, flag, tp)
    else:
        info, hf_cfg = read_checkpoint(args.load, flag), None
    tok, ttype, tmodel = None, None, None
    if tokenizer == "none":
        check_recorded_tokenizer(info)
    else:
        tok, ttype, tmodel = resolve_tokenizer(tokenizer_args, info, tokenizer == "required")
    arch = resolve_architecture(model_args, info, None)
    rows = getattr(model_args, "padded_vocab_size", None)
    if rows is not None and rows != info.padded_vocab_size:  # (flags only confirm it)
        raise CheckpointError(
            f"--padded-vocab-size {rows}: {flag} {args.load} has {info.padded_vocab_size} "
            "vocabulary rows"
        )
    if tok is not None and tok.vocab_size > info.padded_vocab_size:
        raise CheckpointError(
            f"{flag} {args.load}: the tokenizer has {tok.vocab_size} ids, more than the model's "
            f"{info.padded_vocab_size} embedding rows"
        )
    # The layout fits the model (heads, groups, FFN over TP; layers over PP) and the padded
    # vocabulary splits over TP: refused here, before any process group or weight.
    check_parallel_layout(arch, tp, getattr(args, "pipeline_model_parallel_size", 1))
    info.divisor_for(tp)
    impl = getattr(model_args, "spec_impl", None)
    return LoadPlan(info, arch, tok, ttype, tmodel, tp, impl, hf_cfg)
