"""``--check-weight-hash-across-dp-replicas-interval``: the data-parallel replicas compared by
hash before the first step and every N steps, in real processes. A run with it trains exactly as
one without (and checks at the right steps); a mixture with its experts spread over two ranks
raises no false alarm (experts compare over their own replicas); one element changed on one
replica stops both ranks naming the parameter and the rank. CPU."""

from __future__ import annotations

import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.functional.pretrain_helpers import (
    close_trainer,
    cpu_trainer,
    make_null_corpus,
    read_steps,
    run_pretrain,
    tiny_args,
)

pytestmark = pytest.mark.slow
CHECK = ("--check-weight-hash-across-dp-replicas-interval", 2)
MIXTURE = ("--num-experts", 4, "--moe-router-topk", 2, "--expert-model-parallel-size", 2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_null_corpus(str(tmp_path_factory.mktemp("replicas")), "docs", [31] * 64)


@pytest.mark.parametrize("extra", [(), MIXTURE], ids=["dense", "experts-ep2"])
def test_checks_change_nothing_and_run_at_their_steps(corpus, tmp_path, extra):
    runs = []
    for flags in ((), CHECK):
        log = str(tmp_path / f"run{len(runs)}.jsonl")
        proc = run_pretrain(tiny_args(corpus, log, 4, *extra, *flags), nproc=2)
        runs.append((read_steps(log), proc.stdout + proc.stderr))
    (plain, _), (checked, output) = runs
    for a, b in zip(plain, checked, strict=True):
        assert b["loss"] == a["loss"] and b["grad_norm"] == a["grad_norm"]
    steps = [int(line.rsplit(" ", 1)[-1]) for line in output.splitlines()
             if "weights match across the data-parallel replicas after step" in line]  # fmt: skip
    assert steps == [0, 2, 4]


def _diverge(rank, world, corpus, log_file, name):
    """Two data-parallel ranks; after step 1 rank 1 changes one element of ``name``; step 2
    checks. Returns the error each rank raised."""
    from megatron_slm.errors import DivergenceError
    from megatron_slm.models.sharding import unwrap

    trainer = cpu_trainer(tiny_args(corpus, log_file, 4, *CHECK), world)
    assert trainer.advance() is None
    if rank == 1:
        with torch.no_grad():
            dict(unwrap(trainer.chunks[0]).named_parameters())[name].view(-1)[7] += 1e-6
    try:
        trainer.advance()
    except DivergenceError as e:
        return str(e)
    finally:
        close_trainer(trainer)
    return None


def test_a_changed_replica_stops_every_rank_naming_it(corpus, tmp_path):
    name = "decoder.layers.2.mlp.linear_fc1.weight"
    errors = run_distributed(_diverge, 2, corpus, str(tmp_path / "x.jsonl"), name)
    expected = (
        f"after step 2 the data-parallel replicas' weights differ: {name} on global rank(s) 1 "
        "against rank 0"
    )
    assert len(errors) == 2 and all(e is not None and e.startswith(expected) for e in errors)
