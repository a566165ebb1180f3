"""Settings of ``tools/evaluate.py`` (the CLI is generated from these and ``FewShotConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_slm.cli import arg
from megatron_slm.data.tokenizer import TokenizerArgs
from megatron_slm.errors import ConfigError
from megatron_slm.models.args import ModelArgs


@dataclass
class EvaluateConfig(ModelArgs, TokenizerArgs):
    load: str | None = arg(
        None,
        "megatron_slm checkpoint (root or iter_N) or Hugging Face model directory.",
        required=True,
    )
    tensor_model_parallel_size: int = arg(1, "Tensor-parallel size (world = TP x replicas).")
    device: str = arg("auto", "auto, cpu or cuda.", choices=("auto", "cpu", "cuda"))
    output: str | None = arg(None, "JSON report path.")
    perplexity_data: list[str] = arg(
        [], "[name=]path ...: JSONL files or indexed dataset prefixes.", nargs="*"
    )
    seq_length: int | None = arg(
        None,
        "Longest scored segment (default: the model's training --seq-length, else its "
        "max_position_embeddings).",
    )
    micro_batch_size: int = arg(4, "Segments per forward.")
    json_key: str = arg("text", "JSONL field holding the text.")
    append_eod: bool = arg(False, "Score an EOD after each document.")
    max_documents: int | None = arg(None, "Evaluate at most this many documents per dataset.")
    fewshot_data: list[str] = arg([], "[name=]path.jsonl ... with question and answer.", nargs="*")

    def __post_init__(self):
        ModelArgs.__post_init__(self)
        TokenizerArgs.__post_init__(self)
        if not self.perplexity_data and not self.fewshot_data:
            raise ConfigError("nothing to do: give --perplexity-data and/or --fewshot-data")
        for name in ("tensor_model_parallel_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.seq_length is not None and self.seq_length < 2:
            raise ConfigError("--seq-length must be >= 2")
