"""Settings of ``tools/run_text_generation_server.py`` (the CLI is generated from them)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_slm.cli import arg, check_at_least
from megatron_slm.data.tokenizer import TokenizerArgs
from megatron_slm.errors import ConfigError
from megatron_slm.models.args import ModelArgs
from megatron_slm.runtime.plan import LoadArgs


@dataclass
class ServerConfig(LoadArgs, ModelArgs, TokenizerArgs):
    """``--load``, ``--device``, ``--tensor-model-parallel-size``: ``LoadArgs`` (the world is one
    model: run under torchrun with one process per TP rank)."""

    host: str = arg(
        "127.0.0.1", "Address to listen on (0.0.0.0: every interface, to serve other machines)."
    )
    port: int = arg(5000, "Port to listen on (Megatron-LM's default; 0: any free port).")
    micro_batch_size: int = arg(8, "Prompts of a request decoded together.")
    seed: int | None = arg(
        None,
        "Seed of the requests that give none (random_seed / seed): with it the server answers a "
        "request the same way every time; default: a random seed per request.",
    )
    fp32: bool = arg(
        False,
        "Run the model in float32 even when the checkpoint was trained in bfloat16/float16 "
        "(default: the checkpoint's recorded params_dtype, float32 when none is recorded).",
    )

    def __post_init__(self):
        LoadArgs.__post_init__(self)
        ModelArgs.__post_init__(self)
        TokenizerArgs.__post_init__(self)
        check_at_least(self, "tensor_model_parallel_size", "micro_batch_size")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in [0, 65535], got {self.port}")
        if self.seed is not None and self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
