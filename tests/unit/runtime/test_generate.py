"""Greedy decoding (megatron_slm/runtime/generate.py) of a GPT-3-architecture model: its learned
position table must read each new token's position through megatron-core's KV cache, so the
cached batch decoder gives what a full forward of the growing sequence picks, prompt by prompt."""

from __future__ import annotations

import torch

from tests.dist_helpers import run_distributed


def _decode(rank, world):
    from megatron_slm import launch
    from megatron_slm.models import ModelBuildOptions, build_model, get_preset
    from megatron_slm.models.presets import GPT3_KIND
    from megatron_slm.runtime import LoadedModel, greedy_generate

    dev = launch.initialize(device="cpu", seed=5)
    arch = get_preset("tiny").replace(**GPT3_KIND, max_position_embeddings=48)
    (model,) = build_model(arch, ModelBuildOptions(transformer_impl="torch"), dev)
    model.eval()
    lm = LoadedModel([model], arch, None, model.vocab_size, dev, torch.float32, "in memory")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, arch.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 7)]
    cached = greedy_generate(lm, prompts, max_new_tokens=12)
    naive = []
    with torch.no_grad():  # the whole sequence again at every step, one prompt at a time
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(12):
                tokens = torch.tensor([ids])
                logits = model(tokens, torch.arange(len(ids))[None], None)  # [1, n, v]
                ids.append(int(logits[0, -1, : arch.vocab_size].argmax()))
            naive.append(ids[len(prompt) :])
    # the table's last row is read too: a prompt of 40 tokens decoded up to 48 positions
    long = torch.randint(1, arch.vocab_size, (40,), generator=g).tolist()
    (to_the_end,) = greedy_generate(lm, [long], max_new_tokens=20)
    return cached, naive, to_the_end


def test_cached_greedy_decoding_reads_learned_positions():
    ((cached, naive, to_the_end),) = run_distributed(_decode, 1)
    assert cached == naive
    assert len(to_the_end) == 8  # stops at the 48 positions of the table
