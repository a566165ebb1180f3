"""Batched decoding of a :class:`~megatron_slm.runtime.loader.LoadedModel` (any TP, PP=1), greedy
or sampled (``runtime.sampling``), with megatron-core's static KV cache
(``StaticInferenceContext``) or without a cache.

Prompts of different lengths share a batch the way Megatron-LM's own text generation does: the
batch starts decoding at the shortest prompt's length; a row still inside its prompt takes its
next prompt token instead of the model's choice. No row ever attends to padding, so no attention
mask is needed and each row's logits are those of the row decoded alone (up to rounding). The
longer prompts are fed one token per step, so a batch whose lengths spread more than
``max(8, max_new_tokens // 2)`` tokens is split into groups of similar length first.

With the cache the prompt prefix shared by the batch (``min(len)`` tokens) is one causal forward;
then one token per row per step, attending to the cached keys and values (megatron-core switches
attention to ``no_mask`` once ``sequence_len_offset > 0``). Without the cache every step re-runs
the whole sequence: the reference the cached decoder is tested against.

Every TP rank runs the same loop; the choice is over the TP-gathered real vocabulary (padding
rows never win) with a draw seeded alike on every rank, so all ranks pick the same token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from megatron_slm.runtime.loader import LoadedModel
from megatron_slm.runtime.sampling import GREEDY, Sampling, choose_tokens

# stop(row, new_ids) -> True when row ``row`` (index into the prompts) is finished.
StopFn = Callable[[int, list[int]], bool]


def _length_groups(lengths: Sequence[int], max_new_tokens: int) -> list[list[int]]:
    """Indices grouped by prompt length so that no group spans more than
    ``max(8, max_new_tokens // 2)`` tokens: inside a group the longer prompts are fed one token
    per step from the shortest one's length, which is cheap only for a small spread (lm-eval's
    length-sorted batches have one; a batch of mixed lengths is split instead)."""
    spread = max(8, max_new_tokens // 2)
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and lengths[i] - lengths[groups[-1][0]] <= spread:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@torch.no_grad()
def generate(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    eod: int | None = None,
    stop: StopFn | None = None,
    max_length: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Continuations of ``prompts`` (lists of ids), one batch, chosen by ``sampling``. A row stops
    after ``max_new_tokens``, at ``eod`` (included, like ``transformers`` ``generate``), when
    ``stop(row, new_ids)`` is true, or at ``max_length`` tokens in all (default: the model's
    max position embeddings)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generation needs non-empty prompts")
    groups = _length_groups([len(p) for p in prompts], max_new_tokens)
    if len(groups) > 1:
        out: list[list[int]] = [[] for _ in prompts]
        for group in groups:

            def group_stop(row, new, group=group):
                return stop(group[row], new)

            results = generate(
                lm,
                [prompts[i] for i in group],
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                eod=eod,
                stop=None if stop is None else group_stop,
                max_length=max_length,
                use_cache=use_cache,
            )
            for i, r in zip(group, results):
                out[i] = r
        return out
    if len(lm.chunks) != 1:
        raise ValueError("generation needs --pipeline-model-parallel-size 1")
    limit = max_length or lm.arch.max_position_embeddings
    lengths = [len(p) for p in prompts]
    if max(lengths) >= limit:
        raise ValueError(f"a prompt of {max(lengths)} tokens does not fit {limit} positions")
    b = len(prompts)
    total = min(limit, max(lengths) + max_new_tokens)
    tokens = torch.zeros(b, total, dtype=torch.long)  # [b, total], rows filled as they go
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    positions = torch.arange(total).expand(b, total)
    model = lm.chunks[0]
    # LongRoPE switches to its long factors once the sequence outgrows the original length, and
    # megatron-core sizes the rotary table by the cache's length: the cache covers the original
    # length first (short factors), then the sequence is encoded again with a cache of the whole
    # length (long factors), as transformers' Phi-3 recomputes its cache at that step.
    longrope = lm.arch.longrope
    switch = None
    if use_cache and longrope and min(lengths) <= longrope.original_max_positions < total:
        switch = longrope.original_max_positions
    ctx = StaticInferenceContext(b, switch or total) if use_cache else None
    draw = sampling.generator(lm.device)
    new: list[list[int]] = [[] for _ in range(b)]
    done = [max_new_tokens <= 0] * b
    prev = 0
    for cur in range(min(lengths), total):
        if all(done):
            break
        if switch is not None and cur > switch:
            ctx, prev, switch = StaticInferenceContext(b, total), 0, None
        start = prev if use_cache else 0
        inputs, pos = tokens[:, start:cur], positions[:, start:cur]
        # TP-gathered logits (megatron-core requires it with an inference context).
        logits = model(
            inputs.to(lm.device),
            pos.to(lm.device),
            None,
            inference_context=ctx,
            runtime_gather_output=True,
        )  # [b, s or 1, v_padded]
        if ctx is not None:
            ctx.increment_sequence_len_offset(cur - start)
            ctx.enable_decode_mode()
        prev = cur
        chosen = choose_tokens(logits[:, -1, : lm.vocab_size], sampling, draw).cpu()  # [b]
        for i in range(b):
            if cur < lengths[i]:
                continue  # still inside its prompt: tokens[i, cur] is the prompt's
            tokens[i, cur] = chosen[i]
            if done[i]:
                continue
            new[i].append(int(chosen[i]))
            done[i] = (
                len(new[i]) >= max_new_tokens
                or (eod is not None and new[i][-1] == eod)
                or (stop is not None and stop(i, new[i]))
            )
    return new


def greedy_generate(lm: LoadedModel, prompts: Sequence[Sequence[int]], **options):
    """:func:`generate` with greedy choices (the evaluator's decoding)."""
    return generate(lm, prompts, sampling=GREEDY, **options)
