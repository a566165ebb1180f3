"""Fill-in-the-middle training samples (Megatron-LM's ``--fim-data``; Bavarian et al. 2022,
"Efficient Training of Language Models to Fill in the Middle").

Each document of a sample (the tokens between end-of-document tokens) becomes, with probability
``rate``, its text cut at two random character positions into prefix, middle and suffix,
re-tokenized and laid out as PSM ``<prefix> P <suffix> S <middle> M`` or, with probability
``spm_rate``, SPM ``<prefix> <suffix> S <middle> P M``. With a split token (a repository's file
separator) a chosen sample's fragments between those tokens are transformed each with
``fragment_rate`` instead; a document whose text starts with ``no_prefix`` is kept. The sample
keeps its length: cut at the end, or padded with the FIM pad token (whose labels train nothing).

Megatron-LM's ``GPTFIMDataset`` rules, with two differences: the random draws come from a
generator seeded by the run's seed and the sample's index, not one stream in consumption order,
so a sample is the same in every data-loader worker and every resume; and an empty document
(two end-of-document tokens in a row) keeps its token (Megatron-LM's drops it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_slm.errors import ConfigError


@dataclass(frozen=True)
class FimTokens:
    """The ids of the FIM sentinels and of the tokens FIM splits on."""

    prefix: int
    middle: int
    suffix: int
    pad: int
    eod: int
    split: int | None = None


@dataclass(frozen=True)
class FimSettings:
    rate: float
    spm_rate: float
    tokens: FimTokens
    fragment_rate: float | None = None
    no_prefix: str | None = None


def token_id(tokenizer, token: str, flag: str) -> int:
    """The id of the single token ``token`` (a special or added token), else one line naming
    ``flag``."""
    try:
        ids = tokenizer.tokenize_with_specials(token)
    except NotImplementedError:
        ids = []
    if len(ids) != 1:
        raise ConfigError(
            f"{flag} {token!r} is not one token of the tokenizer ({type(tokenizer).__name__}; "
            f"it encodes as {ids}): FIM needs its sentinel tokens in the vocabulary"
        )
    return int(ids[0])


class FimTransform:
    """The FIM rewrite of a sample's token ids (see the module docstring)."""

    def __init__(self, settings: FimSettings, tokenizer, seed: int):
        self.s = settings
        self.tokenizer = tokenizer
        self.seed = seed

    def __call__(self, sample: np.ndarray, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        t = self.s.tokens
        parts = []
        breaks = np.flatnonzero(sample == t.eod)
        start = 0
        for end in [*breaks, len(sample)]:
            if end > start:  # (an empty document stays empty)
                parts.append(self._split_and_permute(sample[start:end], rng))
            if end < len(sample):
                parts.append(sample[end : end + 1])
            start = end + 1
        out = np.concatenate(parts) if parts else sample
        if len(out) >= len(sample):
            return out[: len(sample)].astype(sample.dtype)
        pad = np.full(len(sample) - len(out), t.pad, dtype=sample.dtype)
        return np.concatenate([out.astype(sample.dtype), pad])

    def _split_and_permute(self, document: np.ndarray, rng) -> np.ndarray:
        split = self.s.tokens.split
        if split is None or not (document == split).any():
            return self._permute(document, self.s.rate, rng)
        if not rng.binomial(1, self.s.rate):
            return document
        parts, start = [], 0
        for end in [*np.flatnonzero(document == split), len(document)]:
            if end > start:
                parts.append(self._permute(document[start:end], self.s.fragment_rate, rng))
            if end < len(document):
                parts.append(document[end : end + 1])
            start = end + 1
        return np.concatenate(parts)

    def _permute(self, tokens: np.ndarray, rate: float, rng) -> np.ndarray:
        if not rng.binomial(1, rate):
            return tokens
        bos = getattr(self.tokenizer, "bos", None)  # (a special token, not text to cut)
        text = self.tokenizer.detokenize(tokens[tokens != bos] if bos is not None else tokens)
        if self.s.no_prefix is not None and text.startswith(self.s.no_prefix):
            return tokens
        lo, hi = sorted(rng.integers(0, len(text) + 1, size=2))
        encode = self.tokenizer.tokenize_with_specials
        prefix, middle, suffix = (np.asarray(encode(x), dtype=np.int64)
                                  for x in (text[:lo], text[lo:hi], text[hi:]))  # fmt: skip
        t = self.s.tokens
        if rng.binomial(1, self.s.spm_rate):
            pieces = [[t.prefix, t.suffix], suffix, [t.middle], prefix, middle]
        else:
            pieces = [[t.prefix], prefix, [t.suffix], suffix, [t.middle], middle]
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces])
