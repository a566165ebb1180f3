"""Token choice (megatron_slm/runtime/sampling.py) against Hugging Face's logits warpers
(temperature, top-k, top-p: an independent implementation of the same filters), and the draw
against the filtered softmax it must follow."""

from __future__ import annotations

import pytest
import torch

from megatron_slm.errors import ConfigError
from megatron_slm.runtime.sampling import GREEDY, Sampling, choose_tokens, filter_logits


def _hf_filtered(logits, temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        out = TopKLogitsWarper(top_k)(None, out)
    if top_p < 1.0:
        out = TopPLogitsWarper(top_p)(None, out)
    return out


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (0.5, 0, 0.3), (1.0, 8, 0.6), (2.0, 1, 1.0)],
)
def test_filters_keep_what_hf_keeps(temperature, top_k, top_p):
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(3)) * 3
    ours = filter_logits(logits, Sampling(temperature, top_k, top_p))
    ref = _hf_filtered(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    kept = ~torch.isinf(ref)
    torch.testing.assert_close(ours[kept], ref[kept])
    if top_k or top_p < 1.0:
        assert torch.isinf(ref).any()  # the filters did filter


def test_draws_follow_the_filtered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 40000
    for sampling in (Sampling(1.0, 0, 1.0, seed=1), Sampling(0.8, 4, 1.0, seed=2),
                     Sampling(1.0, 0, 0.8, seed=3)):  # fmt: skip
        want = filter_logits(logits[None], sampling).softmax(-1)[0]
        g = sampling.generator(torch.device("cpu"))
        ids = choose_tokens(logits.expand(rows, -1), sampling, g)
        freq = torch.bincount(ids, minlength=len(logits)).double() / rows
        assert (freq - want.double()).abs().max() < 0.012  # ~5 sigma at 40k draws
        assert (freq[want == 0] == 0).all()  # a filtered token is never drawn


def test_same_seed_same_tokens_and_greedy_is_argmax():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(0))
    s = Sampling(1.0, 0, 1.0, seed=11)
    a = choose_tokens(logits, s, s.generator(torch.device("cpu")))
    b = choose_tokens(logits, s, s.generator(torch.device("cpu")))
    assert torch.equal(a, b)
    other = Sampling(1.0, 0, 1.0, seed=12)
    c = choose_tokens(logits, other, other.generator(torch.device("cpu")))
    assert not torch.equal(a, c)  # 8 rows of 30 tokens: a collision is ~impossible
    for greedy in (GREEDY, Sampling(1.0, 1, 1.0), Sampling(0.0, 0, 0.5)):
        assert greedy.is_greedy and greedy.generator(torch.device("cpu")) is None
        assert torch.equal(choose_tokens(logits, greedy, None), logits.argmax(-1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=101.0), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Sampling(**kwargs)
