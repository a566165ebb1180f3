"""Greedy decoding with a megatron-core GPT model (TP allowed).

No KV cache: each new token recomputes the forward pass over the whole sequence, which is exact
(same logits as an incremental decoder up to rounding) and good enough for evaluation sets of a
few thousand short answers. Every TP rank runs the same loop; the argmax is taken over the
TP-gathered logits of the real vocabulary, so all ranks pick the same token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from megatron_slm.runtime import LoadedModel, forward_logits


@torch.no_grad()
def greedy_generate(
    m: LoadedModel,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    eod: int | None = None,
    stop: Callable[[list[int]], bool] | None = None,
    max_length: int | None = None,
) -> list[int]:
    """Greedy continuation of ``prompt`` (ids). Stops after ``max_new_tokens``, at ``eod``
    (included in the result, like ``transformers`` ``generate``), when ``stop(new_ids)`` is true,
    or at ``max_length`` total tokens (default: the model's max position embeddings)."""
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
