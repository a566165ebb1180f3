"""The same tiny Llama-style GPT gives the same per-token losses and gradients at TP=1, TP=2, PP=2
(1F1B, 8 micro-batches), interleaved PP=2 and DP=2 (real gloo processes); the same tiny shape with
GPT-3's architecture (biases, learned positions, the output layer tied to the embedding on another
pipeline stage) at TP=2 x PP=2 with sequence parallelism, and Qwen's QK norm and QKV biases at TP=2.

Tolerances are derived, not picked: the TP=1 fp32 step is compared with the same step in float64;
a parallel layout may differ from the TP=1 fp32 result by at most 4x that fp32 error (reductions in
another order cost about as much rounding as the fp32 computation itself).
"""

import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.functional import model_parallel_worker as worker

pytestmark = pytest.mark.slow
ERROR_FACTOR = 4.0


def _reference(root, arch: str) -> dict:
    """The TP=1 step's losses and gradients, and the tolerances its float64 twin gives."""
    weights = str(root / "weights")
    run_distributed(worker.init_reference, 1, weights, arch)
    ((_, losses),) = run_distributed(
        worker.train_step, 1, 1, 1, weights, str(root / "grads_tp1"), None, arch
    )
    (grads,) = run_distributed(worker.read_full, 1, str(root / "grads_tp1"), torch.float32, arch)
    ((losses64, grads64),) = run_distributed(worker.fp64_step, 1, weights, arch)
    # fp32 error relative to each tensor's scale, worst over tensors.
    rel_grad_error = max(
        ((grads[n].double() - g).abs().max() / g.abs().max()).item() for n, g in grads64.items()
    )
    loss_error = (losses.double() - losses64).abs().max().item()
    assert rel_grad_error > 0 and loss_error > 0  # a float64 run must differ from fp32
    return dict(
        root=root,
        weights=weights,
        losses=losses,
        grads=grads,
        grads64=grads64,
        loss_tol=ERROR_FACTOR * loss_error,
        rel_grad_tol=ERROR_FACTOR * rel_grad_error,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _reference(tmp_path_factory.mktemp("model_parallel"), "llama")


def _check(reference, losses, grads):
    assert losses.shape == reference["losses"].shape
    torch.testing.assert_close(losses, reference["losses"], rtol=0, atol=reference["loss_tol"])
    assert grads.keys() == reference["grads"].keys()
    for name, grad in grads.items():
        scale = reference["grads64"][name].abs().max().item()
        torch.testing.assert_close(
            grad,
            reference["grads"][name],
            rtol=0,
            atol=reference["rel_grad_tol"] * scale,
            msg=lambda m, name=name: f"gradient of {name}: {m}",
        )


def _run(reference, name, world, tp, pp, vp_layers=None, arch="llama", sp=False, stages=None):
    """(the last stages' losses in DP rank order, the full gradients); with ``stages``, also
    each rank's layer count."""
    grads_dir = str(reference["root"] / f"grads_{name}")
    results = run_distributed(
        worker.train_step, world, tp, pp, reference["weights"], grads_dir, vp_layers, arch, sp,
        stages or (None, None),
    )  # fmt: skip
    (grads,) = run_distributed(worker.read_full, 1, grads_dir, torch.float32, arch)
    losses = [loss for _, loss in results if loss is not None]
    return (losses, grads, [n for n, _ in results]) if stages else (losses, grads)


def test_tensor_parallel_2(reference):
    losses, grads = _run(reference, "tp2", 2, 2, 1)
    _check(reference, losses[0], grads)


def test_pipeline_parallel_2(reference):
    losses, grads = _run(reference, "pp2", 2, 1, 2)
    _check(reference, losses[0], grads)


@pytest.mark.parametrize(
    "pp, stages, layers",
    [(2, (1, None), [1, 3]), (3, (None, 2), [1, 1, 2])],
    ids=["first-1-of-4", "last-2-of-4"],
)
def test_uneven_pipeline_stages(reference, pp, stages, layers):
    """--decoder-first/last-pipeline-num-layers: the stages hold the layers asked (megatron-core
    numbers them globally, so the weights load and the gradients compare by name)."""
    losses, grads, stage_layers = _run(reference, f"pp{pp}_uneven", pp, 1, pp, stages=stages)
    assert stage_layers == layers  # (ranks are pipeline stages in order here)
    _check(reference, losses[0], grads)


def test_interleaved_pipeline_parallel_2(reference):
    losses, grads = _run(reference, "vpp2", 2, 1, 2, vp_layers=1)
    _check(reference, losses[0], grads)


def test_data_parallel_2(reference):
    losses, grads = _run(reference, "dp2", 2, 1, 1)
    # Each DP rank reports its half of the global batch, in rank order.
    _check(reference, torch.cat(losses), grads)


def test_gpt3_architecture_at_tp2_pp2_sequence_parallel(tmp_path):
    """GPT-3's choices under every split at once: biases and the position table sharded or
    replicated over TP, LayerNorm's weight and bias gradients summed over the sequence shards,
    and the tied output layer's gradient added to the embedding's across the pipeline."""
    reference = _reference(tmp_path, "gpt3")
    assert any(n.endswith("position_embeddings.weight") for n in reference["grads"])
    assert not any(n.startswith("output_layer") for n in reference["grads"])  # tied
    losses, grads = _run(reference, "tp2pp2", 4, 2, 2, arch="gpt3", sp=True)
    _check(reference, losses[0], grads)


def test_qk_norm_and_qkv_biases_at_tp2(tmp_path):
    """Each TP rank normalises its own heads' queries and keys with the one shared pair of norms:
    their gradients are summed over TP (megatron-core finds them by name)."""
    reference = _reference(tmp_path, "qwen")
    assert any("q_layernorm" in n for n in reference["grads"])
    losses, grads = _run(reference, "tp2", 2, 2, 1, arch="qwen")
    _check(reference, losses[0], grads)
