"""Muon (``training/newton_schulz.py``, ``training/muon.py``) against independent references.

* The Newton-Schulz iteration: Polar Express's coefficients converge to ``U V^T`` of the SVD
  (``torch.linalg.svd``); every coefficient set keeps the singular vectors (``U^T X V``
  diagonal) and moves the singular values towards 1.
* Tensor parallelism (two gloo ranks, each holding half of a matrix along either dimension):
  ``duplicated`` and ``distributed`` give each rank its slice of the whole matrix's result,
  ``blockwise`` the result of its own slice.
* The optimizer: several steps on a fused-QKV weight (grouped-query attention: the query, key
  and value blocks interleaved per group) and a plain one against the published rule written out
  in float64 here; a step told ``found_inf`` changes nothing.
* The assembly: on a tiny megatron-core GPT, the layers' 2-D weights take Muon's step and every
  other parameter torch AdamW's with megatron-core's groups (no decay on norms and biases).
"""

from __future__ import annotations

import pytest
import torch

from megatron_slm.training.newton_schulz import (
    coefficient_schedule,
    newton_schulz,
    newton_schulz_tp,
    scale_factor,
)
from tests.dist_helpers import run_distributed

SHAPES = [(24, 40), (40, 24), (32, 32)]


def _svd(g: torch.Tensor):
    return torch.linalg.svd(g.double(), full_matrices=False)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_polar_express_converges_to_the_polar_factor(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    u, _, vh = _svd(g)
    for steps in (8, 10):
        out = newton_schulz(g, coefficient_schedule("polar_express", steps))
        assert out.dtype == torch.float32 and out.shape == g.shape
        torch.testing.assert_close(out.double(), u @ vh, rtol=0, atol=1e-5)
    # bf16 iteration (Megatron-LM's default precision): close, not exact
    out = newton_schulz(g, coefficient_schedule("polar_express", 8), bf16=True)
    torch.testing.assert_close(out.double(), u @ vh, rtol=0, atol=2e-2)


@pytest.mark.parametrize("kind, steps", [("simple", 5), ("quintic", 5), ("quintic", 10),
                                         ("aol", 4)])  # fmt: skip
def test_every_coefficient_set_keeps_the_singular_vectors(kind, steps):
    for shape in SHAPES:
        g = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        u, s, vh = _svd(g)
        out = newton_schulz(g, coefficient_schedule(kind, steps)).double()
        d = u.mT @ out @ vh.mT
        diagonal = torch.diagonal(d)
        assert (d - torch.diag(diagonal)).abs().max() < 1e-5
        # singular values pushed up towards 1 from s / ||g|| (< 1), none past 1.2
        assert (diagonal > s / s.square().sum().sqrt()).all()
        assert diagonal.max() < 1.2
        if shape[0] != shape[1] and kind != "simple":  # a well-conditioned shape: near 1
            assert ((diagonal - 1).abs() < 0.05).all(), diagonal


def test_coefficient_schedules_and_scales():
    assert len(coefficient_schedule("simple", 3)) == 3
    quintic = coefficient_schedule("quintic", 10)
    assert quintic[:5] == quintic[5:] and len(set(quintic)) == 5
    polar = coefficient_schedule("polar_express", 10)
    assert polar[7] == polar[8] == polar[9] != polar[6]
    for kind, steps in (("quintic", 4), ("polar_express", 7), ("aol", 6)):
        with pytest.raises(ValueError):
            coefficient_schedule(kind, steps)
    assert scale_factor(64, 16, "spectral") == 8.0
    assert scale_factor(16, 64, "spectral") == 8.0
    assert scale_factor(64, 16, "unit_rms_norm") == 2.0
    assert scale_factor(16, 64, "unit_rms_norm") == 0.5
    assert scale_factor(64, 16, "shape_scaling") == 2.0
    assert scale_factor(16, 64, "shape_scaling") == 1.0


def _tp_worker(rank, world):
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    whole = torch.randn(48, 32, generator=torch.Generator().manual_seed(2))
    schedule = coefficient_schedule("quintic", 5)
    out = {}
    for dim in (0, 1):
        shard = whole.chunk(world, dim=dim)[rank]
        for mode in ("duplicated", "distributed", "blockwise"):
            for bf16 in (False, True):
                result = newton_schulz_tp(shard, schedule, bf16, mode, group, dim)
                out[dim, mode, bf16] = (result, shard)
    return out


def test_tensor_parallel_modes():
    whole = torch.randn(48, 32, generator=torch.Generator().manual_seed(2))
    schedule = coefficient_schedule("quintic", 5)
    ranks = run_distributed(_tp_worker, 2)
    for rank, results in enumerate(ranks):
        for (dim, mode, bf16), (result, shard) in results.items():
            if mode == "blockwise":
                expected = newton_schulz(shard, schedule, bf16)
            else:
                expected = newton_schulz(whole, schedule, bf16).chunk(2, dim=dim)[rank]
            # fp32: summed Gram matrices round differently; bf16: iterations in bf16
            atol = 2e-2 if bf16 else 1e-5
            torch.testing.assert_close(result, expected, rtol=0, atol=atol, msg=str((dim, mode)))
        blockwise = results[0, "blockwise", False][0]
        whole_slice = results[0, "duplicated", False][0]
        assert (blockwise - whole_slice).abs().max() > 0.05  # the modes differ


# ---- the optimizer -------------------------------------------------------------------------

HEADS, GROUPS, KV, HIDDEN = 4, 2, 6, 20  # grouped-query attention: 2 query heads per group
QKV_SPLIT = (HEADS // GROUPS * KV, KV, KV)


def _reference_orthogonal(m: torch.Tensor, split, scale_mode, extra, steps) -> torch.Tensor:
    """The scaled orthogonalisation of ``m`` in float64; a fused QKV weight's rows picked out
    block by block (per query group: queries, key, value) by index."""
    coefficients = coefficient_schedule("quintic", steps)

    def orthogonal(x):
        transpose = x.shape[0] > x.shape[1]
        x = x.T if transpose else x
        x = x / x.norm()
        for a, b, c in coefficients:
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        x = x.T if transpose else x
        return x * scale_factor(*x.shape, scale_mode) * extra

    if split is None:
        return orthogonal(m)
    out = torch.empty_like(m)
    group_rows = sum(split)
    starts = [0, split[0], split[0] + split[1]]
    for start, size in zip(starts, split):
        rows = [g * group_rows + start + i for g in range(m.shape[0] // group_rows)
                for i in range(size)]  # fmt: skip
        out[rows] = orthogonal(m[rows])
    return out


def _params():
    gen = torch.Generator().manual_seed(4)
    qkv = torch.nn.Parameter(torch.randn(GROUPS * sum(QKV_SPLIT), HIDDEN, generator=gen))
    proj = torch.nn.Parameter(torch.randn(HIDDEN, HEADS * KV, generator=gen))
    return qkv, proj


def _grads(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(GROUPS * sum(QKV_SPLIT), HIDDEN, generator=gen),
            torch.randn(HIDDEN, HEADS * KV, generator=gen)]  # fmt: skip


def _muon_worker(rank, world, nesterov, scale_mode):
    from megatron_slm import launch
    from megatron_slm.training.muon import _QKV_SPLIT, Muon

    launch.initialize(device="cpu")
    qkv, proj = _params()
    setattr(qkv, _QKV_SPLIT, QKV_SPLIT)
    lr, wd = 0.05, 0.1
    opt = Muon([qkv, proj], lr=lr, weight_decay=wd, momentum=0.8, nesterov=nesterov,
               scale_mode=scale_mode, extra_scale_factor=0.3, matmul_prec="highest")  # fmt: skip
    history = []
    for step in range(3):
        for p, g in zip((qkv, proj), _grads(step)):
            p.grad = g
        opt.step()
        history.append([qkv.detach().clone(), proj.detach().clone()])
    # A step told found_inf with a NaN gradient: weights and momentum as they were.
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in (qkv, proj)]
    qkv.grad = torch.full_like(qkv, float("nan"))
    opt.found_inf = torch.ones(())
    opt.step()
    unchanged = torch.equal(qkv, history[-1][0]) and torch.equal(proj, history[-1][1])
    unchanged &= all(
        torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip((qkv, proj), momentum)
    )
    # found_inf 0: the same step as without the flag, bit for bit
    opt.found_inf = torch.zeros(())
    flagged = _copy_step(opt, (qkv, proj), 3)
    opt.found_inf = None
    plain = _copy_step(opt, (qkv, proj), 3)
    same = all(torch.equal(a, b) for a, b in zip(flagged, plain))
    return history, unchanged, same


def _copy_step(opt, params, step):
    """One step from the current state, undone afterwards; the weights it gave."""
    saved = [p.detach().clone() for p in params]
    state = {p: opt.state[p]["momentum_buffer"].clone() for p in params}
    for p, g in zip(params, _grads(step)):
        p.grad = g
    opt.step()
    out = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
            opt.state[p]["momentum_buffer"].copy_(state[p])
    return out


@pytest.mark.parametrize("nesterov, scale_mode", [(False, "spectral"), (True, "unit_rms_norm")])
def test_muon_steps_match_the_published_rule(nesterov, scale_mode):
    ((history, unchanged, same),) = run_distributed(_muon_worker, 1, nesterov, scale_mode)
    weights = [p.detach().double() for p in _params()]
    momenta = [torch.zeros_like(w) for w in weights]
    lr, wd, beta = 0.05, 0.1, 0.8
    for step, ours in enumerate(history):
        for i, (w, g) in enumerate(zip(weights, _grads(step))):
            g = g.double()
            w -= lr * wd * w
            momenta[i] = beta * momenta[i] + (1 - beta) * g
            direction = (1 - beta) * g + beta * momenta[i] if nesterov else momenta[i]
            split = QKV_SPLIT if i == 0 else None
            w -= lr * _reference_orthogonal(direction, split, scale_mode, 0.3, 5)
            torch.testing.assert_close(ours[i].double(), w, rtol=0, atol=1e-5)
    assert unchanged and same


def _data_parallel_worker(rank, world):
    """Each rank a copy of the same weights and gradients: Muon sharing the work over the
    data-parallel group against Muon alone, and how many weights each rank orthogonalised."""
    import torch.distributed as dist

    from megatron_slm import launch
    from megatron_slm.training.muon import Muon

    launch.initialize(device="cpu")
    shapes = [(24, 40), (40, 24), (8, 8), (32, 32), (16, 48)]
    results, calls = {}, {}
    for name, group in (("shared", dist.group.WORLD), ("alone", None)):
        gen = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
        opt = Muon(params, lr=0.05, weight_decay=0.1, nesterov=True, dp_group=group)
        count = [0]
        inner = opt.orthogonalize

        def counted(p, d, inner=inner, count=count):
            count[0] += 1
            return inner(p, d)

        opt.orthogonalize = counted
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results[name], calls[name] = [p.detach().clone() for p in params], count[0]
    return results, calls


def test_data_parallel_ranks_share_the_orthogonalisation():
    from megatron_slm.training.muon import balanced_owners

    ranks = run_distributed(_data_parallel_worker, 2)
    for results, calls in ranks:
        assert all(map(torch.equal, results["shared"], results["alone"]))
        assert calls["alone"] == 10
    shares = [calls["shared"] for _, calls in ranks]
    assert sum(shares) == 10 and min(shares) >= 4  # 5 weights, 2 steps, split between ranks
    # largest first to the least-loaded rank: 1024 -> 0, 960 -> 1, 960 -> 1 (960 < 1024),
    # 768 -> 0, 64 -> 0 (1792 < 1920)
    assert balanced_owners([960, 960, 64, 1024, 768], 2) == [1, 1, 0, 0, 0]


# ---- the assembly on a megatron-core model --------------------------------------------------

LR, WD = 0.01, 0.1
BETAS, EPS = (0.9, 0.95), 1e-8


def _assembly_worker(rank, world):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_slm import launch
    from megatron_slm.models import ModelBuildOptions, build_model, get_preset
    from megatron_slm.optimizer_state import optimizer_parts
    from megatron_slm.training.config import parse_config
    from megatron_slm.training.muon import Muon
    from megatron_slm.training.optimizer import OptimizerStep, build_optimizer, finalize_grads

    launch.initialize(device="cpu")
    torch.manual_seed(3)
    model_parallel_cuda_manual_seed(3)
    (model,) = build_model(get_preset("tiny"), ModelBuildOptions())
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    cfg = parse_config(["--train-iters", "10", "--lr", str(LR), "--weight-decay", str(WD),
                        "--clip-grad", "0", "--optimizer", "muon", "--muon-momentum", "0.8",
                        "--muon-fp32-matmul-prec", "highest"])  # fmt: skip
    optimizer, _ = build_optimizer(cfg, [ddp], torch.float32, train_iters=10)
    before = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    tokens = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = ddp(tokens, torch.arange(16).expand(2, 16), None, labels=tokens)
    loss.sum().backward()
    finalize_grads([ddp], torch.tensor(loss.numel()))
    grads = {n: p.main_grad.detach().clone() for n, p in ddp.module.named_parameters()}
    assert OptimizerStep(optimizer, 0.0, torch.device("cpu")).step()[0]
    after = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    names = {id(p): n for n, p in ddp.module.named_parameters()}
    owners = {
        names[id(p)]: type(part.optimizer).__name__
        for part in optimizer_parts(optimizer)
        for group in part.optimizer.param_groups
        for p in group["params"]
    }
    assert any(isinstance(part.optimizer, Muon) for part in optimizer_parts(optimizer))
    c = model.config
    split = (c.num_attention_heads // c.num_query_groups * c.kv_channels, c.kv_channels,
             c.kv_channels)  # fmt: skip
    return before, grads, after, owners, split


def test_layers_2d_weights_take_muon_and_the_rest_adamw():
    ((before, grads, after, owners, split),) = run_distributed(_assembly_worker, 1)
    muon = {n for n, kind in owners.items() if kind == "Muon"}
    assert muon == {
        n
        for n in before
        if n.startswith("decoder.layers.")
        and n.endswith(
            ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")
        )
    }
    assert set(owners) == set(before)  # every parameter has one optimizer
    assert {owners[n] for n in set(owners) - muon} == {"AdamW"}
    assert "embedding.word_embeddings.weight" not in muon and "output_layer.weight" not in muon
    for name, w in before.items():
        g = grads[name]
        if name in muon:  # the first step: momentum (1 - beta) g
            w = w.double()
            w = w - LR * WD * w
            qkv = split if name.endswith("linear_qkv.weight") else None
            w = w - LR * _reference_orthogonal(0.2 * g.double(), qkv, "spectral", 1.0, 5)
            torch.testing.assert_close(after[name].double(), w, rtol=0, atol=1e-6, msg=name)
        else:  # torch's AdamW, no decay on the 1-D norms (megatron-core's groups)
            p = torch.nn.Parameter(w.clone())
            p.grad = g.clone()
            decay = WD if w.dim() > 1 else 0.0
            torch.optim.AdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=decay).step()
            torch.testing.assert_close(after[name], p.detach(), rtol=1e-6, atol=1e-7, msg=name)


def _refused(capsys, *argv) -> str:
    from megatron_slm.models.presets import get_preset
    from megatron_slm.training.config import parse_config, validate
    from tests.functional.pretrain_helpers import refusal

    base = ["--data-path", "A", "--tokenizer-type", "NullTokenizer", "--vocab-size", "511",
            "--train-iters", "4", "--model-preset", "tiny"]  # fmt: skip
    return refusal(
        lambda: validate(parse_config([*base, *map(str, argv)]), 1, get_preset("tiny")), capsys
    )


def test_refused_settings_are_one_line(capsys):
    assert _refused(capsys, "--muon-momentum", 0.5) == (
        "--muon-momentum is a flag of --optimizer muon: add it"
    )
    assert _refused(capsys, "--optimizer", "muon", "--use-distributed-optimizer").startswith(
        "--optimizer muon with --use-distributed-optimizer is not offered: the distributed "
        "optimizer shards flat gradient buckets"
    )
    # (the parser's checks: its one line, "python -m megatron_slm.pretrain: error: ...")
    parsed = {
        ("--muon-coefficient-type", "polar_express"): "--muon-num-ns-steps 5 with "
        "--muon-coefficient-type polar_express: polar_express takes at least 8 steps",
        ("--muon-num-ns-steps", 4): "--muon-num-ns-steps 4 with --muon-coefficient-type "
        "quintic: quintic cycles 5 coefficient sets: steps must be a multiple",
        ("--muon-use-syrk",): "--muon-use-syrk (a Triton kernel of the emerging_optimizers "
        "package) is not offered",
        ("--muon-scalar-optimizer", "lion"): "--muon-scalar-optimizer lion is not offered",
        ("--muon-fp32-matmul-prec", "low"): "argument --muon-fp32-matmul-prec: invalid choice",
    }
    for flags, message in parsed.items():
        line = _refused(capsys, "--optimizer", "muon", *flags)
        assert line.startswith("python -m megatron_slm.pretrain: error: ") and message in line
