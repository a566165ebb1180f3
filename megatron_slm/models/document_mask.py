"""Causal attention inside each document of a packed row, without a dense mask where it costs.

A :class:`DocumentMask` says which document each position of a ``[b, s]`` row belongs to: a
query attends to the keys of its own document at or before it. The torch spec's core attention
(:class:`~megatron_slm.models.specs.TorchSDPAttention`) takes it as its ``attention_mask`` and
runs it one of two ways (``document_attention_backend``):

* ``flex`` (default on CUDA): FlexAttention with a block mask, compiled. It skips the blocks no
  query may see (every block above the diagonal, and those across documents) instead of reading a
  mask, where SDPA given a dense mask cannot use flash attention and computes all ``s x s`` scores.
  Forward only (the online reference, the scorer): FlexAttention has no backward on CPU, so a
  backward could not be tested here; with a gradient the dense mask is used.
* ``dense`` (default elsewhere): the ``[b, 1, s, s]`` bool mask, through SDPA. On CPU the
  compiled block-sparse kernel is no faster at the sizes we run there, and compiling costs seconds.

``MEGATRON_SLM_DOCUMENT_ATTENTION=flex|dense`` overrides the default (benchmarks compare the two).
If FlexAttention fails on its first use as the default (no C compiler for Triton, an unsupported
GPU), the process warns once and goes on with the dense mask; asked for by name, it raises.
Other core attentions (megatron-core's ``local``, Transformer Engine) take the dense tensor
(``reads_document_masks`` tells which a model needs).
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import torch

from megatron_slm.errors import ConfigError

logger = logging.getLogger("megatron_slm")

BACKENDS = ("flex", "dense")
ENV = "MEGATRON_SLM_DOCUMENT_ATTENTION"


class _Flex:
    works = False  # a call has succeeded in this process: later errors are real errors
    failed: str | None = None  # why its first use failed (then: dense for the process)


def _chosen() -> str:
    chosen = os.environ.get(ENV, "").strip().lower()
    if chosen and chosen not in BACKENDS:
        raise ConfigError(f"{ENV}={chosen} is not one of {', '.join(BACKENDS)}")
    return chosen


def document_attention_backend(device: torch.device) -> str:
    """``flex`` or ``dense`` for attention on ``device`` (see the module doc)."""
    return _chosen() or _default_backend(device)


FLEX_BY_DEFAULT_ON = ("cuda",)


def _default_backend(device: torch.device) -> str:
    usable = _has_flex() and _Flex.failed is None
    return "flex" if device.type in FLEX_BY_DEFAULT_ON and usable else "dense"


@lru_cache(maxsize=1)
def _has_flex() -> bool:  # asked by every attention layer of every forward: import once
    try:
        from torch.nn.attention import flex_attention  # noqa: F401  (torch >= 2.5)
    except ImportError:
        return False
    return True


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # A new block mask (its mask_mod closes over another micro-batch's document ids) does not
    # recompile; training and the scorer have one shape, so one compilation. Shapes that vary
    # (the selection report's documents) get a dynamic-shape graph at the second length (measured
    # on CPU: 3 compilations for 6 lengths) instead of one compilation per length.
    return torch.compile(flex_attention, fullgraph=True)


class DocumentMask:
    """Document index of every position of a ``[b, s]`` micro-batch (a row may hold several)."""

    def __init__(self, doc_ids: torch.Tensor):
        self.doc_ids = doc_ids  # [b, s] int
        self._dense: torch.Tensor | None = None
        self._block_mask = None

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, eod: int) -> DocumentMask:
        """A document ends with (and includes) its end-of-document token."""
        ends = (tokens == eod).to(torch.int32)
        return cls(torch.cumsum(ends, dim=1) - ends)

    def to(self, device, non_blocking: bool = False) -> DocumentMask:
        # A batch's mask moves to the model's device as a tensor mask does: [b, s] ids, not s x s.
        if self.doc_ids.device == torch.device(device):
            return self  # keeps what was built from it
        return DocumentMask(self.doc_ids.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> DocumentMask:
        return DocumentMask(self.doc_ids.pin_memory())

    def positions(self) -> torch.Tensor:
        """``[b, s]`` int64: each position's place in its document (0 at its first token), what
        a learned position table reads for a document seen alone. On the device, no host read."""
        doc = self.doc_ids
        column = torch.arange(doc.shape[1], device=doc.device).expand_as(doc)  # [b, s]
        starts = torch.ones_like(doc, dtype=torch.bool)
        starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
        first = torch.where(starts, column, 0).cummax(dim=1).values  # [b, s] document's start
        return column - first

    def dense(self) -> torch.Tensor:
        """bool ``[b, 1, s, s]``, True = masked (megatron-core's convention)."""
        if self._dense is None:
            doc, s = self.doc_ids, self.doc_ids.shape[1]
            causal = torch.ones(s, s, dtype=torch.bool, device=doc.device).triu(1)
            self._dense = ((doc[:, :, None] != doc[:, None, :]) | causal)[:, None]
        return self._dense

    def block_mask(self):
        """FlexAttention's block mask, built once per micro-batch (all layers share it)."""
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            doc = self.doc_ids
            b, s = doc.shape

            def same_document_causal(batch, head, q, kv):
                return (doc[batch, q] == doc[batch, kv]) & (kv <= q)

            self._block_mask = create_block_mask(
                same_document_causal, b, None, s, s, device=doc.device
            )
        return self._block_mask

    def attend(self, q, k, v, scale: float) -> torch.Tensor | None:
        """FlexAttention over ``q [b, n, s, h]``, ``k``/``v`` ``[b, g, s, h]`` (``g`` divides
        ``n``: grouped heads as SDPA's ``enable_gqa``) -> ``[b, n, s, h]``.

        None when its first use fails and it was the default rather than asked for by name (no
        C compiler for Triton, an unsupported GPU, ...): logged once, and the process uses the
        dense mask from then on instead of stopping a job that has a slower way to go on."""
        gqa = k.shape[1] != q.shape[1]
        try:
            out = _compiled_flex()(
                q, k, v, block_mask=self.block_mask(), scale=scale, enable_gqa=gqa
            )
        except Exception as e:  # noqa: BLE001 - any failure of the first compilation
            if _Flex.works or _chosen() == "flex":
                raise
            first_line = (str(e).strip().splitlines() or [""])[0][:300]
            _Flex.failed = f"{type(e).__name__}: {first_line}"
            logger.warning(
                "FlexAttention failed on its first use (%s); packed documents use a dense "
                "attention mask from now on (%s=flex makes this an error)",
                _Flex.failed,
                ENV,
            )
            return None
        _Flex.works = True
        return out


def reads_document_masks(modules) -> bool:
    """Whether the attention of these model chunks takes a :class:`DocumentMask` (the torch
    spec's); the others (``local``, Transformer Engine) need :meth:`DocumentMask.dense`."""
    from megatron_slm.models.specs import TorchSDPAttention

    cores = [m.core_attention for c in modules for m in c.modules() if hasattr(m, "core_attention")]
    return all(isinstance(m, TorchSDPAttention) for m in cores)  # no attention: nothing to read
