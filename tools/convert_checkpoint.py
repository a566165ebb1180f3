"""Convert Hugging Face Llama/Mistral/Qwen2/Qwen3/Nemotron/Phi-3/GPT-2 checkpoints to megatron-core
distributed checkpoints and back (a GPT-3-architecture checkpoint exports as GPT-2).

    # HF directory (config.json + safetensors or .bin + tokenizer files) -> megatron, for TP=2 PP=1
    python tools/convert_checkpoint.py hf-to-megatron --load /models/TinyLlama-1.1B \\
        --save ckpt/tinyllama --tensor-model-parallel-size 2 --make-vocab-size-divisible-by 128

    # megatron checkpoint (root or iter_N directory, any TP/PP) -> HF directory: weights,
    # config.json, generation_config.json and a fast tokenizer with a chat template (a
    # SentencePiece model is converted to tokenizer.json; --chat-template FILE overrides)
    python tools/convert_checkpoint.py megatron-to-hf --load ckpt/run --save hf/run \\
        --max-shard-size 5GB --dtype bfloat16

    # Megatron-LM's own checkpoint (torch_dist, a GPT model saved by pretrain_gpt.py) -> megatron
    # checkpoint: the architecture and tokenizer from the args it saved (--tokenizer-* flags
    # where its tokenizer files are elsewhere); then --load it anywhere (--finetune to train on)
    python tools/convert_checkpoint.py megatron-lm-to-megatron --load /ckpts/llama-mlm \
        --save ckpt/from-mlm --tokenizer-model /models/llama-tokenizer

A tokenizer that is Python code its directory ships (an ``auto_map``) is read, and copied with its
code, only with --trust-remote-code (both directions), as every later job that reads it needs.

``--help`` after the direction lists its flags.

hf-to-megatron runs in one process (the usual way: the checkpoint is written for the target TP/PP,
whose only layout-dependent part is the padded vocabulary) or under torchrun with
TP x PP processes (each rank builds and fills its own shards). megatron-to-hf runs in one process
(megatron-core reshards the checkpoint to TP=1/PP=1 on load).
"""

import logging
import os
import sys
from dataclasses import dataclass

from megatron_slm import launch
from megatron_slm.checkpoint import checkpoint_at_step, overwrite_arg
from megatron_slm.cli import Command, arg
from megatron_slm.convert.hf import (
    ConversionError,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    import_layout,
)
from megatron_slm.convert.megatron_lm import convert_megatron_lm_to_megatron
from megatron_slm.data.tokenizer import TokenizerArgs
from megatron_slm.entry import entry_point
from megatron_slm.remote_code import RemoteCodeArgs
from megatron_slm.runtime.hf_source import READABLE_ARCHITECTURES

PROG = "convert_checkpoint"
DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


@dataclass
class _Paths:
    """What both directions take."""

    load: str | None = arg(None, "Source directory.", required=True)
    save: str | None = arg(None, "Destination directory.", required=True)
    overwrite: bool = overwrite_arg()


@dataclass
class HfToMegatronConfig(RemoteCodeArgs, _Paths):
    """``hf-to-megatron``: the target layout and dtype."""

    tensor_model_parallel_size: int = arg(1, "Target TP (sets the padding).")
    pipeline_model_parallel_size: int = arg(1, "Target PP.")
    make_vocab_size_divisible_by: int = arg(128, "Vocabulary padding multiple.")
    params_dtype: str = arg("float32", "dtype of the parameters.", choices=DTYPES)


@dataclass
class MegatronToHfConfig(RemoteCodeArgs, _Paths):
    """``megatron-to-hf``: what the Hugging Face directory gets."""

    architecture: str | None = arg(
        None,
        "Default: for Llama's architecture the imported model's, else LlamaForCausalLM; with "
        "QKV biases Qwen2ForCausalLM, with QK norm Qwen3ForCausalLM; with partial RoPE or "
        "LongRoPE Phi3ForCausalLM; a mixture of experts MixtralForCausalLM, with QKV biases "
        "and a gated shared expert Qwen2MoeForCausalLM, with QK norm Qwen3MoeForCausalLM, with "
        "a sigmoid router and an expert bias Glm4MoeForCausalLM; "
        "Nemotron's "
        "(LayerNorm 1p, squared ReLU, RoPE) exports as NemotronForCausalLM, GPT-3's as "
        "GPT2LMHeadModel.",
        choices=READABLE_ARCHITECTURES,
    )
    ckpt_step: int | None = arg(
        None, "Export this iteration of the --load checkpoint root instead of its latest."
    )
    dtype: str | None = arg(None, "safetensors dtype (default: the checkpoint's).", choices=DTYPES)
    max_shard_size: str = arg("5GB", "e.g. 5GB, 500MB.")
    tokenizer_model: str | None = arg(
        None,
        "HF tokenizer directory to copy or SentencePiece model to convert "
        "(default: the checkpoint's).",
    )
    chat_template: str | None = arg(
        None,
        "jinja chat template file written to tokenizer_config.json (default: the checkpoint's "
        "SFT template, else the tokenizer's own, else megatron_slm's default).",
    )

    def __post_init__(self):
        if self.ckpt_step is not None:
            self.load = checkpoint_at_step(self.load, self.ckpt_step)


@dataclass
class MegatronLmToMegatronConfig(TokenizerArgs, _Paths):
    """``megatron-lm-to-megatron``: the tokenizer flags, each defaulting to the checkpoint's
    (Megatron-LM's flags of the same names)."""


COMMANDS = {
    "hf-to-megatron": Command(HfToMegatronConfig, "Hugging Face directory -> megatron checkpoint."),
    "megatron-to-hf": Command(MegatronToHfConfig, "megatron checkpoint -> Hugging Face directory."),
    "megatron-lm-to-megatron": Command(
        MegatronLmToMegatronConfig, "Megatron-LM's torch_dist checkpoint -> megatron checkpoint."
    ),
}


@entry_point(PROG, log_level=logging.INFO, doc=__doc__, commands=COMMANDS,
             command_name="direction")  # fmt: skip
def main(direction: str, cfg) -> int:
    if direction == "megatron-lm-to-megatron":
        launch.initialize(device="cpu")
        result = convert_megatron_lm_to_megatron(cfg.load, cfg.save, cfg, overwrite=cfg.overwrite)
        print(f"wrote {result.checkpoint} (padded vocabulary {result.padded_vocab_size})")
    elif direction == "hf-to-megatron":
        tp, pp = import_layout(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size)
        launch.initialize(
            device="cpu", tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
        )
        result = convert_hf_to_megatron(
            cfg.load,
            cfg.save,
            tensor_model_parallel_size=cfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
            make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
            params_dtype=cfg.params_dtype,
            overwrite=cfg.overwrite,
            trust_remote_code=cfg.trust_remote_code,
        )
        print(f"wrote {result.checkpoint} (padded vocabulary {result.padded_vocab_size})")
    else:
        template = None
        if cfg.chat_template is not None:
            if not os.path.isfile(cfg.chat_template):
                raise ConversionError(f"--chat-template {cfg.chat_template}: no such file")
            with open(cfg.chat_template, encoding="utf-8") as f:
                template = f.read()
        launch.initialize(device="cpu")
        out = convert_megatron_to_hf(
            cfg.load,
            cfg.save,
            architecture_name=cfg.architecture,
            dtype=cfg.dtype,
            max_shard_size=cfg.max_shard_size,
            tokenizer_model=cfg.tokenizer_model,
            chat_template=template,
            overwrite=cfg.overwrite,
            trust_remote_code=cfg.trust_remote_code,
        )
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
