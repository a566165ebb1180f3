"""Batched greedy generation with megatron-core's KV cache against the old batch-1 decoder.

    python benchmarks/bench_generate.py [--prompts 32] [--batch-size 32] [--new-tokens 64]

Same model (a random megatron-core GPTModel, preset ``tiny`` unless ``--preset``), same prompts,
shaped like a few-shot evaluation: one shared ``--prompt-length``-token prefix (the shots) plus a
question of 8-40 tokens, same number of new tokens per prompt (no EOD), in one run:

- ``anchor``: the decoder ``tools/evaluate.py`` had before lm-eval (kept below verbatim as
  ``old_greedy_generate``): one prompt at a time, every step re-running the whole sequence;
- ``kv``: ``megatron_slm.runtime.greedy_generate``: prompts sorted by length, batches of
  ``--batch-size`` (as lm-eval's collator forms them), megatron-core's ``StaticInferenceContext``
  KV cache.

Both produce the same tokens (checked). Prints generated tokens/s of each and the ratio kv /
anchor; acceptance (issue 20): >= 10. Best of ``--repeat`` runs each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

try:
    import megatron_slm  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_slm import launch  # noqa: E402
from megatron_slm.models import ModelBuildOptions, build_model, get_preset  # noqa: E402
from megatron_slm.runtime import LoadedModel, forward_logits, greedy_generate  # noqa: E402


@torch.no_grad()
def old_greedy_generate(m, prompt, *, max_new_tokens, eod=None, stop=None, max_length=None):
    """The batch-1, no-cache decoder of megatron_slm/evaluation/generate.py before issue 20."""
    if not prompt:
        raise ValueError("greedy_generate needs a non-empty prompt")
    limit = max_length or m.arch.max_position_embeddings
    tokens = list(int(t) for t in prompt)
    if len(tokens) >= limit:
        raise ValueError(
            f"prompt of {len(tokens)} tokens does not fit the model's {limit} positions"
        )
    new: list[int] = []
    while len(new) < max_new_tokens and len(tokens) < limit:
        logits = forward_logits(m, torch.tensor([tokens]))  # [1, s, v]
        next_id = int(logits[0, -1].argmax())
        tokens.append(next_id)
        new.append(next_id)
        if (eod is not None and next_id == eod) or (stop is not None and stop(new)):
            break
    return new


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-length", type=int, default=128, help="shared prefix tokens")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = launch.initialize(device="cpu")
    arch = get_preset(args.preset)
    chunks = build_model(arch, ModelBuildOptions(transformer_impl="torch"), device)
    for c in chunks:
        c.eval()
    m = LoadedModel(chunks, arch, None, chunks[0].vocab_size, device, torch.float32, "random")
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, arch.vocab_size, args.prompt_length).tolist()
    lengths = rng.integers(8, 41, args.prompts)
    prompts = [prefix + rng.integers(0, arch.vocab_size, int(n)).tolist() for n in lengths]
    if max(map(len, prompts)) + args.new_tokens > arch.max_position_embeddings:
        raise SystemExit("--prompt-length + 40 + --new-tokens exceeds the model's positions")
    lengths = [len(q) for q in prompts]
    n_new = args.prompts * args.new_tokens

    def run_anchor():
        return [old_greedy_generate(m, q, max_new_tokens=args.new_tokens) for q in prompts]

    def run_kv():
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out = [None] * len(prompts)
        for s in range(0, len(order), args.batch_size):
            rows = order[s : s + args.batch_size]
            gen = greedy_generate(m, [prompts[i] for i in rows], max_new_tokens=args.new_tokens)
            for i, g in zip(rows, gen):
                out[i] = g
        return out

    best = {"anchor": 0.0, "kv": 0.0}
    outputs = {}
    for _ in range(args.repeat):
        for name, fn in (("anchor", run_anchor), ("kv", run_kv)):
            t0 = time.perf_counter()
            outputs[name] = fn()
            best[name] = max(best[name], n_new / (time.perf_counter() - t0))
    same = outputs["anchor"] == outputs["kv"]
    print(
        f"preset {args.preset}, {args.prompts} prompts (median {int(np.median(lengths))} tokens), "
        f"{args.new_tokens} new tokens each, batch {args.batch_size}, {args.threads} thread(s)"
    )
    print(f"anchor (batch-1, no cache): {best['anchor']:10.1f} tokens/s")
    print(f"kv (batched, KV cache)    : {best['kv']:10.1f} tokens/s")
    print(f"ratio kv / anchor         : {best['kv'] / best['anchor']:10.2f}  (same tokens: {same})")
    launch.shutdown()


if __name__ == "__main__":
    main()
