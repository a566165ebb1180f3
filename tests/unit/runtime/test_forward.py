"""Per-token losses of a loaded model (megatron_slm/runtime/forward.py) are taken inside the
model's forward, on the logits as its output layer wrote them: no ``[b, s, vocab]`` copy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.dist_helpers import run_distributed

B, S = 2, 24
COPIES = {"aten::copy_", "aten::clone", "aten::_to_copy"}


def _logits_copies(fn, numel: int) -> int:
    """How many copy operators ``fn()`` runs on a tensor of ``numel`` elements (the logits)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    n = 0
    for event in prof.events():
        if event.name in COPIES:
            sizes = [s for s in event.input_shapes if s]
            n += any(torch.Size(s).numel() == numel for s in sizes)
    return n


def _in_model_vs_logits_path(rank, world):
    from megatron_slm import launch
    from megatron_slm.models import ModelBuildOptions, build_model, get_preset
    from megatron_slm.runtime import LoadedModel
    from megatron_slm.runtime import forward as fw

    dev = launch.initialize(device="cpu", seed=3)
    cfg = get_preset("tiny")
    (model,) = build_model(cfg, ModelBuildOptions(transformer_impl="torch"), dev)
    model.eval()
    lm = LoadedModel([model], cfg, None, model.vocab_size, dev, torch.float32, "in memory")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=g)
    batch = fw.Rows.causal(tokens[:, :-1], tokens[:, 1:])
    own_hook = vars(model)["compute_language_model_loss"]  # the provider's
    numel = B * S * model.vocab_size
    out = {}

    def in_model():
        (out["in_model"],) = fw.per_token_losses(lm, [batch])

    def logits_path():
        with torch.no_grad():
            logits = fw._forward(lm, model, batch)  # [b, s, v]: the transposed copy
            out["logits"] = logits.clone()
            out["logits_path"] = fw._losses_of(lm, logits, batch.labels, False)

    out["copies_in_model"] = _logits_copies(in_model, numel)
    out["copies_logits_path"] = _logits_copies(logits_path, numel)
    out["hook_restored"] = vars(model)["compute_language_model_loss"] is own_hook
    out["labels"] = batch.labels
    return out


def test_losses_are_taken_inside_the_forward_without_a_logits_copy():
    """per_token_losses hands megatron-core's GPTModel the labels, and the op reads the
    ``[s, b, v]`` logits the output layer wrote; without labels the model returns them as a
    transposed copy (which the check sees). The losses are the same bits either way and match
    torch's cross entropy; the model's own loss hook is back in place afterwards."""
    (r,) = run_distributed(_in_model_vs_logits_path, 1)
    assert r["copies_in_model"] == 0
    assert r["copies_logits_path"] >= 1  # the check can see the copy
    assert torch.equal(r["in_model"], r["logits_path"])
    v = r["logits"].shape[-1]
    want = F.cross_entropy(r["logits"].reshape(-1, v), r["labels"].reshape(-1), reduction="none")
    torch.testing.assert_close(r["in_model"], want.view(B, S), rtol=1e-5, atol=1e-5)
    assert r["hook_restored"]
