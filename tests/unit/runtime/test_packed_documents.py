"""Models given rows that pack several documents are built with the torch spec, whatever the
device's default: megatron-core's local attention (and Transformer Engine's) apply their own
causal or sliding-window mask and ignore the block-diagonal one. A sliding window shows it on the
CPU: there megatron-core's local attention replaces the given mask by its band."""

from __future__ import annotations

import torch

from tests.dist_helpers import run_distributed
from tests.functional.hf_worker import make_hf_model

EOD = 7


def _losses_by_spec(rank, world, path):
    import megatron_slm.models as models
    from megatron_slm.models.document_mask import DocumentMask, reads_document_masks
    from megatron_slm.runtime import LoadArgs, load_model, plan_load
    from megatron_slm.runtime.forward import Rows, per_token_losses
    from megatron_slm.runtime.reference import OnlineReference

    models.default_spec_impl = lambda device: "local"  # a device whose default ignores masks
    plan = plan_load(LoadArgs(load=path), tokenizer="none")
    cpu = torch.device("cpu")
    packed = load_model(plan, cpu, documents="--packing rows")
    default = load_model(plan, cpu)
    reference = OnlineReference(plan, cpu, torch.float32, EOD)

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(10, 300, (1, 32), generator=g)
    tokens[0, 13] = EOD  # documents 0..13 and 14..31
    labels = torch.roll(tokens, -1, dims=1)
    documents = DocumentMask.from_tokens(tokens, EOD)
    rows = Rows(tokens, labels, documents.positions(), documents)
    (alone,) = per_token_losses(packed, [Rows.causal(tokens[:, 14:], labels[:, 14:])])
    (with_torch,) = per_token_losses(packed, [rows])
    (with_local,) = per_token_losses(default, [rows])
    online = reference.per_token_loss(tokens, labels)
    reads = [reads_document_masks(lm.chunks) for lm in (packed, default, reference.model)]
    return reads, alone, with_torch[:, 14:], with_local[:, 14:], online[:, 14:]


def test_packed_documents_load_the_torch_spec(tmp_path):
    """The scorer's packed rows and the online reference (``load_model(documents=...)``) score
    the second document of a row as if alone; the device's default spec, megatron-core's local
    one with the model's window, would let it attend to the first."""
    make_hf_model(str(tmp_path), "mistral", 300)  # a sliding window of 5
    ((reads, alone, with_torch, with_local, online),) = run_distributed(
        _losses_by_spec, 1, str(tmp_path)
    )
    assert reads == [True, False, True]
    torch.testing.assert_close(with_torch, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(online, alone, rtol=1e-5, atol=1e-5)
    # What the spec choice prevents: with the window, local attention ignored the documents.
    assert (with_local - alone).abs().max() > 1e-3
