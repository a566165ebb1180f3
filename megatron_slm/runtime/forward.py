"""Forward passes of a :class:`~megatron_slm.runtime.loader.LoadedModel`: per-token losses over
packed or length-sorted micro-batches (any TP/PP), logits for generation (PP=1).

A *batch* is any object with ``tokens``, ``labels``, ``position_ids`` (``[b, s]`` int64) and
``attention_mask`` (``[b, 1, s, s]`` bool, True = masked; a ``models.document_mask.DocumentMask``,
given to the model as it is where its attention reads one, else as its dense mask; or None for
plain causal attention), such as ``megatron_slm.scoring.packing.Batch`` or :class:`Rows`.

Losses are the fused vocab-parallel cross entropy (``megatron_slm.ops.selective_cross_entropy``,
ratio 1, no gradient) on the ``[s, b, v/tp]`` logits as the output layer wrote them (taken inside
the model's forward): no gathered ``[tokens, vocab]`` tensor at any TP size, and no copy. By
default the softmax spans the padded vocabulary, as in training (Megatron-LM's convention, and
what the offline scorer has always written); ``real_vocab_only`` drops the padding rows, which
makes losses of an imported model equal Hugging Face's.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from megatron_slm.errors import ConfigError
from megatron_slm.models.document_mask import DocumentMask
from megatron_slm.models.sharding import unwrap
from megatron_slm.runtime.loader import LoadedModel


@dataclass
class Rows:
    """A plain micro-batch: one sequence per row."""

    tokens: torch.Tensor  # [b, s]
    labels: torch.Tensor  # [b, s]
    position_ids: torch.Tensor  # [b, s]
    attention_mask: object = None  # [b, 1, s, s] bool (True = masked), a DocumentMask, or None

    @classmethod
    def causal(cls, tokens: torch.Tensor, labels: torch.Tensor, attention_mask=None) -> Rows:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return cls(tokens, labels, positions, attention_mask)


def _forward(lm: LoadedModel, chunk, batch, labels=None):
    """One chunk's forward: logits ``[b, s, v/tp]`` on the last stage (with ``labels``: what the
    model's ``compute_language_model_loss`` returns), hidden ``[s, b, h]`` else.

    megatron-core's RoPE rotates by the position in the row, not by ``position_ids`` (passed
    anyway: learned absolute embeddings would use them). Rotary attention depends only on the
    distance between query and key, so a document packed at offset ``o`` scores as if alone, up to
    rounding (the scorer's exactness tests bound it)."""
    dev = lm.device
    mask = batch.attention_mask
    if mask is not None:
        mask = mask.to(dev)
        if isinstance(mask, DocumentMask) and not lm.reads_document_masks:
            mask = mask.dense()
    if labels is None:
        return chunk(batch.tokens.to(dev), batch.position_ids.to(dev), mask)
    return chunk(batch.tokens.to(dev), batch.position_ids.to(dev), mask, labels=labels)


def _mask_padding_rows(lm: LoadedModel, logits: torch.Tensor) -> torch.Tensor:
    """-inf on the columns of this TP rank's vocabulary shard that are padding rows."""
    from megatron.core import parallel_state

    v_local = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * v_local
    first_pad = max(0, lm.vocab_size - start)
    if first_pad < v_local:
        logits[..., first_pad:] = float("-inf")
    return logits


def _losses_of(lm: LoadedModel, logits: torch.Tensor, labels: torch.Tensor, real_vocab_only: bool):
    """Loss of each label: ``logits [x, y, v/tp]`` and ``labels [x, y]`` in either order
    (``[s, b]`` or ``[b, s]``): at ratio 1 each token's loss depends on its row alone, so the op
    reads the logits in the layout they are in (a transposed view would make it copy them).
    fp32; the TP all-reduce happens inside the op."""
    from megatron_slm.ops import selective_cross_entropy

    if real_vocab_only:
        logits = _mask_padding_rows(lm, logits)
    out = selective_cross_entropy(logits, labels.to(lm.device))
    return out.loss.float()


@contextmanager
def _loss_hooks(lm: LoadedModel, real_vocab_only: bool):
    """While open, each chunk's GPTModel turns the labels it is given into ``[b, s]`` per-token
    losses, on the ``[s, b, v/tp]`` logits its output layer wrote. (Without labels a GPTModel
    returns them as a transposed copy, ``[b, s, v/tp]``: every logit read and written once more
    before the loss reads them.) The chunks' own hooks (the provider's, models/cross_entropy.py)
    are put back on exit."""

    def loss_hook(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return _losses_of(lm, logits, labels.t(), real_vocab_only).t()  # [s, b] -> [b, s]

    models = [unwrap(chunk) for chunk in lm.chunks]
    own = [vars(model).get("compute_language_model_loss") for model in models]
    for model in models:
        model.compute_language_model_loss = loss_hook
    try:
        yield
    finally:
        for model, hook in zip(models, own):
            if hook is None:
                del model.compute_language_model_loss
            else:
                model.compute_language_model_loss = hook


def _takes_labels(chunk) -> bool:
    """Whether the chunk computes its loss from labels (a GPTModel; not, e.g., a stand-in)."""
    return hasattr(unwrap(chunk), "compute_language_model_loss")


@torch.no_grad()
def per_token_losses(lm: LoadedModel, batches: list, real_vocab_only: bool = False):
    """``[b, s]`` float32 loss of every label of each batch (tensors on the model's device) on the
    last pipeline stage; an empty list on the others. With PP > 1 the batches are one forward-only
    pipeline schedule, so they must share one shape."""
    single = len(lm.chunks) == 1 and _pp_size() == 1
    if single and not _takes_labels(lm.chunks[0]):  # a stand-in for a model: it gives logits
        chunk = lm.chunks[0]
        return [_losses_of(lm, _forward(lm, chunk, b), b.labels, real_vocab_only) for b in batches]
    with _loss_hooks(lm, real_vocab_only):
        if single:
            (chunk,) = lm.chunks
            return [_forward(lm, chunk, b, b.labels.to(lm.device)).contiguous() for b in batches]
        return _pipeline_losses(lm, batches)


def _pp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size()


def _pipeline_losses(lm: LoadedModel, batches: list):
    """The batches as one forward-only schedule (inside :func:`_loss_hooks`: the last stage's
    output is the losses)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    collected: list[torch.Tensor] = []

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        output = _forward(lm, chunk, batch, batch.labels.to(lm.device))

        def loss_func(losses):
            collected.append(losses.contiguous())
            zero = torch.zeros((), device=lm.device)
            return zero, torch.ones((), dtype=torch.int, device=lm.device), {}

        return output, loss_func

    tokens = batches[0].tokens
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=lm.chunks[0] if len(lm.chunks) == 1 else lm.chunks,
        num_microbatches=len(batches),
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=True,
    )
    return collected if lm.is_last_stage else []


@torch.no_grad()
def selective_losses(lm: LoadedModel, batch, *, ref_loss=None, loss_mask=None, **selection):
    """The trainer's selection on one batch (PP=1): the selective op on the model's ``[s, b, v/tp]``
    logits, exactly as ``training.slm_loss`` calls it (padded vocabulary, same ratio/scope/mode/
    unscored/seed keywords). ``ref_loss``/``loss_mask`` are ``[b, s]``. Returns
    ``(loss [b, s] fp32, selected [b, s] bool)`` on the model's device."""
    from megatron_slm.ops import selective_cross_entropy

    _require_single_stage()
    logits = _forward(lm, lm.chunks[0], batch)  # [b, s, v/tp]
    dev = lm.device
    t = lambda x: None if x is None else x.to(dev).transpose(0, 1)  # noqa: E731 - [b, s] -> [s, b]
    out = selective_cross_entropy(
        logits.transpose(0, 1),
        t(batch.labels),
        ref_loss=t(ref_loss),
        loss_mask=t(loss_mask),
        **selection,
    )
    return out.loss.transpose(0, 1).float(), out.selected.transpose(0, 1)


@torch.no_grad()
def sequence_losses(lm: LoadedModel, tokens: torch.Tensor, real_vocab_only: bool = True):
    """``tokens [b, s + 1]`` -> loss ``[b, s]`` of tokens 1..s given the ones before (PP=1)."""
    _require_single_stage()
    tokens = tokens.to(torch.long)
    (losses,) = per_token_losses(lm, [Rows.causal(tokens[:, :-1], tokens[:, 1:])], real_vocab_only)
    return losses.cpu()


def _vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``[b, s, v/tp]`` -> ``[b, s]`` global argmax ids without gathering the vocabulary: each
    rank's (max, argmax) is all-gathered over TP; the first shard holding the maximum wins, so
    ties go to the lowest id, as with a full argmax."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    local_arg = logits.argmax(-1)  # [b, s]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return local_arg
    local_max = logits.gather(-1, local_arg[..., None])[..., 0].float().contiguous()
    offset = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    group = parallel_state.get_tensor_model_parallel_group()
    maxes = [torch.empty_like(local_max) for _ in range(tp)]
    args = [torch.empty_like(local_arg) for _ in range(tp)]
    dist.all_gather(maxes, local_max, group=group)
    dist.all_gather(args, (local_arg + offset).contiguous(), group=group)
    best = torch.stack(maxes).argmax(0)  # [b, s], first shard on ties
    return torch.stack(args).gather(0, best[None])[0]


@torch.no_grad()
def sequence_scores(lm: LoadedModel, tokens: torch.Tensor):
    """``tokens [b, s + 1]`` -> (loss ``[b, s]`` of tokens 1..s given the ones before, ``[b, s]``
    bool: the token is the greedy choice), over the real vocabulary, any TP (PP=1): what
    lm-eval's ``loglikelihood`` needs, with no gathered ``[tokens, vocab]`` tensor."""
    _require_single_stage()
    tokens = tokens.to(torch.long)
    batch = Rows.causal(tokens[:, :-1], tokens[:, 1:])
    logits = _mask_padding_rows(lm, _forward(lm, lm.chunks[0], batch))  # [b, s, v/tp]
    greedy = _vocab_parallel_argmax(logits).cpu() == tokens[:, 1:]
    losses = _losses_of(lm, logits, batch.labels, real_vocab_only=False)  # padding masked
    return losses.cpu(), greedy


@torch.no_grad()
def forward_logits(lm: LoadedModel, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens [b, s]`` -> fp32 logits over the real vocabulary ``[b, s, vocab]`` (TP-gathered,
    PP=1): the padding rows never win a greedy step."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    _require_single_stage()
    tokens = tokens.to(torch.long)
    logits = _forward(lm, lm.chunks[0], Rows.causal(tokens, tokens))  # [b, s, v/tp]
    logits = gather_from_tensor_model_parallel_region(logits)  # [b, s, v_padded]
    return logits[..., : lm.vocab_size].float()


def _require_single_stage() -> None:
    if _pp_size() > 1:
        raise ConfigError(
            "this evaluation needs --pipeline-model-parallel-size 1 (use tensor parallelism)"
        )
