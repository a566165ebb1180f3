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


def _longrope_decode(rank, world):
    from megatron_slm import launch
    from megatron_slm.models import ModelBuildOptions, build_model, get_preset
    from megatron_slm.models.presets import LongRope
    from megatron_slm.runtime import LoadedModel, greedy_generate

    dev = launch.initialize(device="cpu", seed=5)
    longrope = LongRope([1.0 + i / 4 for i in range(8)], [3.0**i for i in range(8)], 8, 1.5)
    arch = get_preset("tiny").replace(max_position_embeddings=48, longrope=longrope)
    (model,) = build_model(arch, ModelBuildOptions(transformer_impl="torch"), dev)
    model.eval()
    lm = LoadedModel([model], arch, None, model.vocab_size, dev, torch.float32, "in memory")
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(out[0, -1].clone()))
    g = torch.Generator().manual_seed(0)
    results = []
    for n in (5, 10):  # crossing the original length of 8; beyond it from the start
        prompt = torch.randint(1, arch.vocab_size, (n,), generator=g).tolist()
        seen.clear()
        cached = greedy_generate(lm, [prompt], max_new_tokens=10)
        cached_logits = torch.stack(seen)
        seen.clear()
        naive = greedy_generate(lm, [prompt], max_new_tokens=10, use_cache=False)
        results.append((cached, naive, cached_logits, torch.stack(seen)))
    return results


def test_cached_longrope_decoding_switches_factors_as_a_full_forward_does():
    """Without a cache every step is a forward of the whole sequence, whose rotary table (of its
    length) picks LongRoPE's short or long factors as transformers does; the cached decoder's
    logits at every step equal it, also across the switch at the original length (8)."""
    for cached, naive, cached_logits, naive_logits in run_distributed(_longrope_decode, 1)[0]:
        assert cached == naive
        torch.testing.assert_close(cached_logits, naive_logits, rtol=1e-4, atol=1e-4)
