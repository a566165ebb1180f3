"""Logits of a checkpoint on given ids at TP = world size (run with python or torchrun):

python tests/functional/tinylm_logits_worker.py CKPT TOKENS.npy OUT.npy
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(load: str, tokens: str, out: str) -> None:
    import torch.distributed as dist

    from megatron_slm import launch
    from megatron_slm.runtime import LoadArgs, load_model, plan_load
    from megatron_slm.runtime.forward import forward_logits

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = launch.initialize(device="cpu", tensor_model_parallel_size=world)
    try:
        plan = plan_load(LoadArgs(load=load, tensor_model_parallel_size=world), tokenizer="none")
        lm = load_model(plan, device)
        ids = torch.from_numpy(np.load(tokens)).long()[None]  # [1, s]
        logits = forward_logits(lm, ids)[0]  # [s, vocab]
        if dist.get_rank() == 0:
            np.save(out, logits.numpy())
    finally:
        launch.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
