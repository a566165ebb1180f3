"""Document-causal attention without a dense mask: the mask a DocumentMask stands for against one
built by hand from the tokens, its FlexAttention path (compiled, forced on CPU) against a float64
attention with that mask, no host syncs, and the online reference's path through a whole
megatron-core model (torch spec with FlexAttention vs megatron-core's local spec with the dense
mask, and each document scored alone)."""

import os

import pytest
import torch

from megatron_slm.errors import ConfigError
from megatron_slm.models.document_mask import (
    ENV,
    DocumentMask,
    document_attention_backend,
    reads_document_masks,
)
from tests.dist_helpers import run_distributed
from tests.sync_counter import SyncCounter
from tests.unit.models.test_specs import _attention, _naive_attention, tiny_torch_and_local_models

EOD = 0


def _tokens(b, s, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 50, (b, s), generator=g)
    # documents of very different lengths, one row without any end of document
    for row, ends in enumerate(([3, 4, 90, 150, s - 1], [], [0, 127, 128, 129])[:b]):
        tokens[row, ends] = EOD
    return tokens


def _allowed_by_hand(tokens):  # [b, s, s] True = may attend
    b, s = tokens.shape
    allowed = torch.zeros(b, s, s, dtype=torch.bool)
    for r in range(b):
        row = tokens[r].tolist()
        for q in range(s):
            # walk back from q to the previous end of document (it belongs to the one before)
            k = q
            while k >= 0 and (k == q or row[k] != EOD):
                allowed[r, q, k] = True
                k -= 1
    return allowed


def test_dense_mask_is_causal_within_each_document():
    tokens = _tokens(3, 200, 0)
    dense = DocumentMask.from_tokens(tokens, EOD).dense()
    assert dense.shape == (3, 1, 200, 200) and dense.dtype == torch.bool
    assert torch.equal(~dense[:, 0], _allowed_by_hand(tokens))


def test_positions_count_from_each_documents_start():
    """A position's place in its document is the number of earlier positions it may attend to."""
    tokens = _tokens(3, 200, 0)
    with SyncCounter() as counter:
        positions = DocumentMask.from_tokens(tokens, EOD).positions()
    assert counter.count == 0
    assert torch.equal(positions, _allowed_by_hand(tokens).sum(-1) - 1)


def test_backend_default_and_override(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert document_attention_backend(torch.device("cpu")) == "dense"
    assert document_attention_backend(torch.device("cuda")) == "flex"
    monkeypatch.setenv(ENV, "flex")
    assert document_attention_backend(torch.device("cpu")) == "flex"
    monkeypatch.setenv(ENV, "Dense")
    assert document_attention_backend(torch.device("cuda")) == "dense"
    monkeypatch.setenv(ENV, "sparse")
    with pytest.raises(ConfigError, match=f"{ENV}=sparse is not one of flex, dense"):
        document_attention_backend(torch.device("cpu"))


def test_flex_failing_as_the_default_falls_back_to_the_dense_mask(monkeypatch, caplog):
    """A first FlexAttention call that fails (here: a stand-in for a missing C compiler) warns
    once and the process goes on with the dense mask; asked for by name, the error is raised."""
    from megatron_slm.models import document_mask

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("Failed to find C compiler. Please specify via CC")

    monkeypatch.setattr(document_mask, "_compiled_flex", lambda: broken)
    monkeypatch.setattr(document_mask, "FLEX_BY_DEFAULT_ON", ("cpu",))
    monkeypatch.setattr(document_mask._Flex, "failed", None)
    monkeypatch.setattr(document_mask._Flex, "works", False)
    monkeypatch.delenv(ENV, raising=False)
    tokens = _tokens(2, 160, 5)
    q, k, v = _qkv(160, 2, 4, 2, 16, 6)
    expected = _attention()(q, k, v, DocumentMask.from_tokens(tokens, EOD).dense())
    assert document_attention_backend(torch.device("cpu")) == "flex"
    with caplog.at_level("WARNING", logger="megatron_slm"):
        out = _attention()(q, k, v, DocumentMask.from_tokens(tokens, EOD))
        again = _attention()(q, k, v, DocumentMask.from_tokens(tokens, EOD))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(again, expected)
    assert len(calls) == 1  # not retried
    assert document_attention_backend(torch.device("cpu")) == "dense"
    (warning,) = [r.getMessage() for r in caplog.records if "FlexAttention" in r.getMessage()]
    assert "Failed to find C compiler" in warning and f"{ENV}=flex" in warning

    monkeypatch.setenv(ENV, "flex")
    with pytest.raises(RuntimeError, match="C compiler"):
        _attention()(q, k, v, DocumentMask.from_tokens(tokens, EOD))


def _qkv(s, b, n, g, h, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, n, h, generator=gen)
    k, v = (torch.randn(s, b, g, h, generator=gen) for _ in range(2))
    return q, k, v


def test_flex_attention_matches_float64_with_the_dense_mask(monkeypatch):
    """Sequence 200: blocks of 128 with a partial last one; grouped heads (4 query, 2 key/value)."""
    monkeypatch.setenv(ENV, "flex")
    tokens = _tokens(3, 200, 1)
    mask = DocumentMask.from_tokens(tokens, EOD)
    q, k, v = _qkv(200, 3, 4, 2, 16, 2)
    out = _attention()(q, k, v, mask)
    assert mask._block_mask is not None  # the flex path ran (the dense mask was never built)
    assert mask._dense is None
    expected = _naive_attention(q.double(), k.double(), v.double(), mask.dense())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # The dense path (the default on CPU) gives the same.
    monkeypatch.setenv(ENV, "dense")
    dense_out = _attention()(q, k, v, DocumentMask.from_tokens(tokens, EOD))
    torch.testing.assert_close(dense_out, out, rtol=1e-5, atol=1e-5)

    # No host syncs in what the host does per micro-batch: the document ids and the block mask.
    # (The compiled kernel reads its block mask on the device; torch.compile cannot run under the
    # counter's dispatch mode, so the call itself is not counted.)
    with SyncCounter() as c:
        DocumentMask.from_tokens(_tokens(3, 200, 3), EOD).block_mask()
    assert c.count == 0, c.report()


def _model_forward(rank, world):
    from megatron_slm.models import get_preset
    from megatron_slm.runtime import LoadedModel
    from megatron_slm.runtime.forward import Rows, per_token_losses
    from megatron_slm.runtime.reference import OnlineReference

    ours, local = tiny_torch_and_local_models()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 512, (2, 160), generator=g)
    tokens[0, [30, 100]] = EOD
    tokens[1, 140] = EOD
    pos = torch.arange(160).expand(2, 160)
    mask = DocumentMask.from_tokens(tokens, EOD)
    with torch.no_grad():
        flex = ours(tokens, pos, mask)
        dense = local(tokens, pos, mask.dense())
        # the middle document of row 0 (positions 31..100), forwarded alone from its own start
        alone = ours(tokens[:1, 31:101], pos[:1, :70], None)

    # Through the runtime and the online reference: which mask each core attention is handed.
    seen = []
    for model in (ours, local):
        for layer in model.decoder.layers:
            layer.self_attention.core_attention.register_forward_pre_hook(
                lambda module, args: seen.append(type(args[3]).__name__)
            )
    labels = torch.roll(tokens, -1, dims=1)
    lms = [
        LoadedModel([m], get_preset("tiny"), None, 512, torch.device("cpu"), torch.float32, "mem")
        for m in (ours, local)
    ]
    runtime_losses = []
    for lm in lms:
        seen.clear()
        (loss,) = per_token_losses(lm, [Rows.causal(tokens, labels, DocumentMask(mask.doc_ids))])
        runtime_losses.append((loss, sorted(set(seen))))
    reference = OnlineReference.__new__(OnlineReference)
    reference.model, reference.eod = lms[0], EOD
    seen.clear()
    online = reference.per_token_loss(tokens, labels)
    # The reference's micro-batch reads nothing back to the host (counted in the dense form: the
    # counter's dispatch mode and torch.compile exclude each other; the block mask is counted in
    # the test above).
    os.environ[ENV] = "dense"
    with SyncCounter() as counter:
        reference.per_token_loss(tokens, labels)
    return (
        reads_document_masks([ours]),
        reads_document_masks([local]),
        mask._block_mask is not None,
        flex,
        dense,
        alone,
        runtime_losses,
        (online, sorted(set(seen))),
        counter.report() if counter.count else None,
    )


def test_torch_spec_flex_matches_local_spec_dense_and_documents_alone(monkeypatch):
    """The torch spec on FlexAttention against megatron-core's local spec on the dense mask,
    directly, through ``per_token_losses`` (each model handed the form it reads) and through the
    online reference (NaN after each end of document: a new document has no context)."""
    monkeypatch.setenv(ENV, "flex")  # inherited by the spawned rank
    (result,) = run_distributed(_model_forward, 1)
    ours_reads, local_reads, used_flex, flex, dense, alone, runtime, online, syncs = result
    assert syncs is None, syncs
    assert ours_reads and not local_reads
    assert used_flex
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(flex[:1, 31:101], alone, rtol=1e-4, atol=1e-4)
    (ours_loss, ours_seen), (local_loss, local_seen) = runtime
    assert ours_seen == ["DocumentMask"] and local_seen == ["Tensor"]
    torch.testing.assert_close(ours_loss, local_loss, rtol=1e-4, atol=1e-4)
    online_loss, online_seen = online
    assert online_seen == ["DocumentMask"]
    eod = torch.zeros_like(online_loss, dtype=torch.bool)
    eod[0, [30, 100]] = eod[1, 140] = True
    assert torch.equal(online_loss.isnan(), eod)
    torch.testing.assert_close(online_loss[~eod], ours_loss[~eod])


def _gpt3_online_reference(rank, world):
    from megatron_slm.models import get_preset
    from megatron_slm.models.presets import GPT3_KIND
    from megatron_slm.runtime.loader import LoadedModel
    from megatron_slm.runtime.reference import OnlineReference

    arch = get_preset("tiny").replace(**GPT3_KIND)
    ours, _ = tiny_torch_and_local_models(arch)
    ours.eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 512, (1, 160), generator=g)
    tokens[0, [30, 100]] = EOD
    labels = torch.roll(tokens, -1, dims=1)
    reference = OnlineReference.__new__(OnlineReference)
    reference.eod = EOD
    reference.model = LoadedModel(
        [ours], arch, None, 512, torch.device("cpu"), torch.float32, "mem"
    )
    online = reference.per_token_loss(tokens, labels)
    with torch.no_grad():  # the middle document (positions 31..100) alone, from position 0
        alone = ours(tokens[:, 31:101], torch.arange(70)[None], None, labels=labels[:, 31:101])
    return online, alone


def test_online_reference_gives_learned_positions_each_documents_own():
    """GPT-3's learned position table: the online reference's losses of a document in the middle
    of a row are those of the document forwarded alone, whose positions start at 0."""
    ((online, alone),) = run_distributed(_gpt3_online_reference, 1)
    torch.testing.assert_close(online[:, 31:100], alone[:, :69], rtol=1e-5, atol=1e-5)
