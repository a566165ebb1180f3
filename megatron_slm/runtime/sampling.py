"""How a decoding step picks the next token from its logits: greedy, or sampled after temperature,
top-k and top-p (nucleus) filtering, in that order (the order of Hugging Face's warpers and of
Megatron-LM's text generation).

Every TP rank holds the same gathered logits, so every rank must draw the same token: the draw is
an exponential race (``argmax(p / E)`` with ``E ~ Exp(1)``, which picks ``i`` with probability
``p_i``) whose noise comes from a generator seeded alike on every rank, on the logits' device
(no host copy of a ``[batch, vocab]`` tensor per step). A request carries its seed, so the same
request gives the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_slm.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """The sampling settings of one generation request (the defaults: a plain draw from the
    softmax; :data:`GREEDY` decodes greedily)."""

    temperature: float = 1.0
    """Logits are divided by it before filtering; 0 means greedy (OpenAI's convention)."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all; 1: greedy)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p (1: all)."""
    seed: int = 0
    """Seeds the draw (the same on every rank)."""

    def __post_init__(self):
        if not 0.0 <= self.temperature <= 100.0:
            raise ConfigError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The draw's generator on ``device`` (None when greedy: nothing is drawn)."""
        if self.is_greedy:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


GREEDY = Sampling(temperature=0.0)


def filter_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """``[b, v]`` logits -> fp32 logits after temperature, top-k then top-p; filtered-out tokens
    are ``-inf``. The most likely token always survives."""
    out = logits.float() / max(sampling.temperature, 1e-5)
    if 0 < sampling.top_k < out.shape[-1]:
        kth = out.topk(sampling.top_k, dim=-1).values[..., -1:]  # [b, 1]
        out = out.masked_fill(out < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= sampling.top_p  # the set already reached top_p without it
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def choose_tokens(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None
) -> torch.Tensor:
    """``[b, v]`` logits -> ``[b]`` chosen ids: the argmax when greedy (ties: the lowest id), else
    one draw per row from the filtered softmax with ``generator`` (see the module docstring)."""
    if sampling.is_greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, sampling).softmax(-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(-1)
