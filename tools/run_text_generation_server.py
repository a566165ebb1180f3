"""Serve a model over HTTP: Megatron-LM's text generation protocol and OpenAI's completions.

    python tools/run_text_generation_server.py --load ckpt/run --port 5000
    torchrun --nproc-per-node 2 tools/run_text_generation_server.py --load ckpt/run \\
        --tensor-model-parallel-size 2 --host 0.0.0.0
    curl -X PUT localhost:5000/api -H 'Content-Type: application/json' \\
        -d '{"prompts": ["The capital of France is"], "tokens_to_generate": 16}'
    curl localhost:5000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "2 + 2 =", "max_tokens": 8, "temperature": 0}'
    python tools/text_generation_cli.py --server localhost:5000

``--load`` is a megatron_slm checkpoint (its architecture and tokenizer are read from it) or a
Hugging Face directory. ``PUT /api`` takes Megatron-LM's fields (``prompts``,
``tokens_to_generate``, ``temperature``, ``top_k``, ``top_p``, ``logprobs``, ``add_BOS``,
``stop_on_eol``, ``stop_on_double_eol``, ``random_seed``) and answers ``text``, ``segments``,
``tokens`` (and ``logprobs``). ``POST /v1/completions`` is OpenAI's (``prompt`` as text or token
ids, ``max_tokens``, ``temperature`` (0: greedy), ``top_p``, ``top_k``, ``stop``, ``echo``,
``logprobs`` up to 5, ``seed``), so lm-evaluation-harness can evaluate the server:
``lm_eval --model local-completions --model_args base_url=http://HOST:PORT/v1/completions,...``.
Requests run one at a time; SIGTERM or Ctrl-C stops the server.
"""

import logging
import sys

import torch

from megatron_slm import launch
from megatron_slm.entry import entry_point
from megatron_slm.errors import ConfigError
from megatron_slm.runtime import load_model, plan_load
from megatron_slm.serving import serve
from megatron_slm.serving.config import ServerConfig

PROG = "run_text_generation_server"
GROUPS = {"server": ServerConfig}


@entry_point(PROG, log_level=logging.INFO, doc=__doc__, groups=GROUPS)
def main(cfg: ServerConfig) -> int:
    import torch.distributed as dist

    plan = plan_load(cfg, tokenizer="required")  # before any process group
    # (--seed is the requests' default seed; nothing here draws from the init seed)
    device = launch.initialize_for(cfg, seed=1234 if cfg.seed is None else cfg.seed)
    if dist.get_world_size() != cfg.tensor_model_parallel_size:
        raise ConfigError(
            f"--tensor-model-parallel-size {cfg.tensor_model_parallel_size}: the server runs one "
            f"model, so start {cfg.tensor_model_parallel_size} process(es), not "
            f"{dist.get_world_size()}"
        )
    dtype = torch.float32 if cfg.fp32 else plan.params_dtype or torch.float32
    model = load_model(plan, device, params_dtype=dtype)
    return serve(
        model,
        host=cfg.host,
        port=cfg.port,
        micro_batch_size=cfg.micro_batch_size,
        default_seed=cfg.seed,
        model_name=cfg.load,
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
    )


if __name__ == "__main__":
    sys.exit(main())
