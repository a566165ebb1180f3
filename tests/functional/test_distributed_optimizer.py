"""megatron-core's distributed optimizer and overlapped data-parallel communication in real
``megatron_slm.pretrain`` runs (torchrun, two data-parallel ranks, CPU): the launch scripts'
defaults at scale (``--use-distributed-optimizer``, ``--overlap-grad-reduce``,
``--overlap-param-gather``), the checkpoints of data-parallel runs (per-parameter optimizer
state, fully parallel and background saves), and a run that diverges (non-finite gradients).

Without clipping every update is elementwise (the reduced gradient is the same two-term sum in
any bucketing, and Adam is per element), so the plain optimizer, the distributed one and the
distributed one with overlapped communication must log the same losses bit for bit; where
the collectives were issued is recorded by ``collective_probe.py``.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megatron_slm.checkpoint import KILL_HOOK_ENV, iteration_dir, latest_iteration
from tests.functional.pretrain_helpers import (
    OVERLAP_ARGS,
    REPO,
    make_null_corpus,
    read_steps,
    run_pretrain,
    tiny_args,
)

pytestmark = pytest.mark.slow

PROBE = (os.path.join(REPO, "tests", "functional", "collective_probe.py"),)
DIST_OPT = ("--use-distributed-optimizer",)
OVERLAP = OVERLAP_ARGS  # buckets of 30000 elements (the refusal below names the number)
# Validation every 2 steps and a checkpoint every 3: both fall between an optimizer step and
# the next forward, where overlapped all-gathers have not run yet.
COMMON = ("--clip-grad", 0, "--split", "90,10,0", "--eval-interval", 2, "--eval-iters", 1)


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return make_null_corpus(str(tmp_path_factory.mktemp("distopt")), "docs", [31] * 96)


def _run(prefix, tmp_path, name, *extra, iters=6, probe=False, nproc=2):
    """Per-step records, validation losses and (with ``probe``) rank 0's recorded collectives."""
    log = tmp_path / f"{name}.jsonl"
    out = str(tmp_path / f"{name}.probe")
    run_pretrain(
        tiny_args(prefix, str(log), iters, *COMMON, *extra),
        nproc=nproc,
        entry=PROBE if probe else ("-m", "megatron_slm.pretrain"),
        env={"COLLECTIVE_PROBE_OUT": out},
    )
    with open(log) as f:
        records = [json.loads(line) for line in f]
    validation = {r["iteration"]: r["validation_loss"] for r in records if "validation_loss" in r}
    calls = None
    if probe:
        with open(f"{out}.0.json") as f:
            calls = json.load(f)
    return read_steps(str(log)), validation, calls


def _saved_tensors(checkpoint_dir, scratch) -> dict:
    """Every tensor as saved (torch's DCP reader: no process group)."""
    dcp_to_torch_save(checkpoint_dir, scratch)
    state = torch.load(scratch, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _model_tensors(checkpoint_dir, scratch) -> dict:
    """The model's tensors as saved."""
    return {
        k: v for k, v in _saved_tensors(checkpoint_dir, scratch).items()
        if not k.startswith("optimizer") and "_extra_state" not in k
    }  # fmt: skip


def _assert_same_checkpoints(ckpt, reference, scratch, read) -> None:
    """The tensors ``read`` returns from iterations 3 and 6 of both roots are equal."""
    for iteration in (3, 6):
        saved = read(iteration_dir(ckpt, iteration), scratch / "a.pt")
        expected = read(iteration_dir(reference, iteration), scratch / "b.pt")
        assert sorted(saved) == sorted(expected) and len(saved) > 5
        for key, value in expected.items():
            assert torch.equal(saved[key], value), key


def _bytes_written(checkpoint_dir) -> list[int]:
    """Bytes of tensor data each rank wrote (torch DCP's ``__<rank>_<thread>.distcp`` files)."""
    sizes = [0, 0]
    for name in os.listdir(checkpoint_dir):
        if name.endswith(".distcp"):
            sizes[int(name.split("_")[2])] += os.path.getsize(os.path.join(checkpoint_dir, name))
    return sizes


@pytest.fixture(scope="module")
def plain(prefix, tmp_path_factory):
    """The plain optimizer, checkpointed at iterations 3 and 6 by data-parallel rank 0 alone
    (every tensor is replicated over DP): the reference."""
    tmp = tmp_path_factory.mktemp("plain")
    ckpt = str(tmp / "ckpt")
    saves = ("--save", ckpt, "--save-interval", 3, "--no-ckpt-fully-parallel-save")
    return (*_run(prefix, tmp, "plain", *saves), ckpt)


@pytest.fixture(scope="module")
def overlapped(prefix, tmp_path_factory):
    """The launch scripts' settings at scale, checkpointed at iterations 3 and 6."""
    tmp = tmp_path_factory.mktemp("overlapped")
    ckpt = str(tmp / "ckpt")
    run = _run(prefix, tmp, "overlap", *OVERLAP, "--save", ckpt, "--save-interval", 3, probe=True)
    return (*run, ckpt)


def test_distributed_optimizer_and_overlap_match_the_plain_optimizer(
    prefix, plain, overlapped, tmp_path
):
    plain, plain_val, _, plain_ckpt = plain
    sharded, sharded_val, serial = _run(prefix, tmp_path, "sharded", *DIST_OPT, probe=True)
    overlap, overlap_val, overlapped_calls, ckpt = overlapped
    losses = [r["loss"] for r in plain]
    assert losses[-1] < losses[0] - 0.2, losses
    assert [r["loss"] for r in sharded] == losses
    assert [r["loss"] for r in overlap] == losses
    # Evaluations read every parameter of the step before (the pre-hooks' all-gathers had not
    # run): stale shards would change these.
    assert sorted(plain_val) == [2, 4, 6]
    assert sharded_val == plain_val and overlap_val == plain_val

    # The probe itself: without overlap, one reduce-scatter per step after the backward and the
    # all-gathers inside the optimizer step.
    def where(calls, kind):
        return [(c["in_backward"], c["in_optimizer_step"]) for c in calls if c["kind"] == kind]

    assert where(serial, "reduce_scatter") == [(False, False)] * 6
    assert where(serial, "all_gather") == [(False, True)] * 6
    # Overlapped: several buckets, each reduce-scattered asynchronously inside the last
    # micro-batch's backward (from step 2: megatron-core learns in step 1 when a bucket is
    # complete); no all-gather in the optimizer step (they run in the forwards, asynchronously,
    # or synchronously before an evaluation or a checkpoint).
    scattered = where(overlapped_calls, "reduce_scatter")
    buckets = len(scattered) // 6
    assert buckets > 1 and len(scattered) == 6 * buckets
    assert set(scattered[buckets:]) == {(True, False)}
    assert all(c["async"] for c in overlapped_calls if c["kind"] == "reduce_scatter")
    gathered = [c for c in overlapped_calls if c["kind"] == "all_gather"]
    assert not any(c["in_optimizer_step"] for c in gathered)
    # Synchronous: one per bucket before the evaluations at 2, 4, 6 and the checkpoint at 3.
    # Asynchronous: in the forwards of steps 1, 2 and 6; the others follow such a gather, which
    # already left every rank the parameters.
    assert sum(not c["async"] for c in gathered) == 4 * buckets
    assert sum(c["async"] for c in gathered) == 3 * buckets

    # The checkpoints hold the weights of their step (each rank's shards of the last update
    # were gathered first): what --finetune, the scorer and the exporters read.
    _assert_same_checkpoints(ckpt, plain_ckpt, tmp_path, _model_tensors)
    # ... and Adam's state (moments and step count): resuming at iteration 3 continues exactly
    # (each rank reading half of the weights, which they then exchange).
    load = ("--load", iteration_dir(ckpt, 3), "--ckpt-fully-parallel-load")
    resumed, _, _ = _run(prefix, tmp_path, "resumed", *OVERLAP, *load)
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == losses[3:]


def test_distributed_optimizer_checkpoint_resumes_at_another_data_parallel_size(
    prefix, overlapped, tmp_path
):
    """Its state is saved per gradient bucket (megatron-core's "dp_reshardable", Megatron-LM's
    default): DP may change; the optimizer, TP, PP and the buckets may not, which the trainer
    says before any work. Weights alone (--finetune) load anywhere."""
    straight, _, _, ckpt = overlapped
    at3 = iteration_dir(ckpt, 3)

    def pretrain(name, *extra, iters=6):
        log = tmp_path / f"{name}.jsonl"
        proc = run_pretrain(tiny_args(prefix, str(log), iters, *COMMON, *extra), check=False)
        return proc, (read_steps(str(log)) if proc.returncode == 0 else None)

    _, one_rank = pretrain("dp1", *OVERLAP, "--load", at3)
    assert [r["iteration"] for r in one_rank] == [4, 5, 6]
    for a, b in zip(straight[3:], one_rank):
        assert a["consumed_samples"] == b["consumed_samples"]
        # fp32 gradient sums differ in order across data-parallel sizes
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)

    for extra, message in [
        ((), "its optimizer state was saved with --use-distributed-optimizer; resume with it"),
        ((*DIST_OPT, "--overlap-grad-reduce", "--ddp-bucket-size", 50000),
         "resumes only with the same gradient buckets (--overlap-grad-reduce, --ddp-bucket-size):"
         " saved 30000, this run 50000"),
        ((*OVERLAP, "--ddp-pad-buckets-for-high-nccl-busbw"),
         "resumes only with the same bucket padding (--ddp-pad-buckets-for-high-nccl-busbw): "
         "saved False, this run True"),
    ]:  # fmt: skip
        proc, _ = pretrain("refused", *extra, "--load", at3)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"error: --load {at3}: " in proc.stderr and message in proc.stderr

    _, finetuned = pretrain("finetune", "--load", at3, "--finetune", "--lr-warmup-iters", 0,
                            iters=1)  # fmt: skip
    # step 1's batch again, on the weights of step 3: lower than the untrained model's loss
    assert [r["iteration"] for r in finetuned] == [1]
    assert finetuned[0]["loss"] < straight[0]["loss"] - 0.02


def test_without_gloo_side_groups_the_steps_and_checkpoints_are_the_same(
    prefix, overlapped, tmp_path
):
    """--disable-gloo-process-groups (Megatron-LM's flag): megatron-core creates no gloo
    data-parallel groups and the distributed optimizer gathers over the main ones; a run saved
    at step 3 (both optimizer-state formats) and resumed gives the overlapped run's steps."""
    straight = [r["loss"] for r in overlapped[0]]
    for fmt in ((), ("--dist-ckpt-optim-fully-reshardable",)):
        ckpt = str(tmp_path / f"ckpt{len(fmt)}")
        flags = (*OVERLAP, "--disable-gloo-process-groups", *fmt)
        first, _, _ = _run(prefix, tmp_path, f"first{len(fmt)}", *flags, "--save", ckpt,
                           "--save-interval", 3, "--exit-interval", 3)  # fmt: skip
        rest, _, _ = _run(prefix, tmp_path, f"rest{len(fmt)}", *flags, "--load", ckpt)
        assert [r["loss"] for r in first + rest] == straight, fmt


def test_interleaved_pipeline_launches_the_gathers_from_the_schedule(prefix, tmp_path):
    """Two data-parallel ranks of an interleaved pipeline (PP 2, two virtual stages each): the
    schedule launches each model chunk's all-gathers (Megatron-LM's ``align_param_gather``,
    through ``param_sync_func``) and its gradient reductions; the same losses and validation
    losses as without overlap and the distributed optimizer. With --no-align-grad-reduce each
    stage's backward hooks launch its reductions instead; --ddp-num-buckets 2 makes two
    buckets, --ddp-pad-buckets-for-high-nccl-busbw pads each to a multiple of 2^16."""
    layout = ("--pipeline-model-parallel-size", 2, "--num-layers-per-virtual-pipeline-stage", 1)

    def losses(name, *extra):
        log, out = tmp_path / f"{name}.jsonl", str(tmp_path / f"{name}.probe")
        run_pretrain(
            tiny_args(prefix, str(log), 4, *COMMON, *layout, *extra),
            nproc=4,
            entry=PROBE,
            env={"COLLECTIVE_PROBE_OUT": out},
        )
        with open(f"{out}.0.json") as f:
            calls = json.load(f)
        with open(log) as f:
            return [(r.get("loss"), r.get("validation_loss")) for r in map(json.loads, f)], calls

    def of(kind, calls):
        return [c for c in calls if c["kind"] == kind]

    plain, _ = losses("plain")
    assert len(plain) == 4 + 2 and plain[-1][1] is not None
    overlapped, calls = losses("overlap", *OVERLAP)
    assert overlapped == plain
    launched = [c for c in of("all_gather", calls) if c["async"]]  # by the schedule
    assert launched and not any(c["in_forward_pre_hook"] for c in launched)
    assert not any(c["in_backward"] for c in of("reduce_scatter", calls))

    buckets = ("--ddp-num-buckets", 2, "--ddp-pad-buckets-for-high-nccl-busbw")
    overlap = ("--overlap-grad-reduce", "--overlap-param-gather", "--no-align-grad-reduce")
    unaligned, calls = losses("unaligned", *DIST_OPT, *overlap, *buckets)
    assert unaligned == plain
    scatters = of("reduce_scatter", calls)
    assert len(scatters) == 2 * 4 and all(c["numel"] % 2**16 == 0 for c in scatters)
    # (the first step's from the end of the step: megatron-core learns the order of readiness)
    assert sum(c["in_backward"] for c in scatters) == 2 * 3


def test_fully_reshardable_checkpoint_resumes_at_another_layout(
    prefix, plain, overlapped, tmp_path
):
    """--dist-ckpt-optim-fully-reshardable saves the distributed optimizer's state per parameter
    (megatron-core's "fully_reshardable" keys, each weight's slice taken from its own bucket):
    it holds exactly the plain optimizer's Adam moments, and resumes at another TP and PP."""
    plain, _, _, plain_ckpt = plain
    straight = overlapped[0]
    ckpt = str(tmp_path / "ckpt")
    saves = ("--save", ckpt, "--save-interval", 3)
    fully = ("--dist-ckpt-optim-fully-reshardable",)
    steps, _, _ = _run(prefix, tmp_path, "fully", *OVERLAP, *fully, *saves)
    assert [r["loss"] for r in steps] == [r["loss"] for r in plain]

    at3 = iteration_dir(ckpt, 3)
    # This state is replicated over DP too; both ranks wrote their share of it (Megatron-LM's
    # fully parallel save, the default), where the plain run's rank 1 wrote nothing.
    assert _bytes_written(iteration_dir(plain_ckpt, 3))[1] == 0
    written = _bytes_written(at3)
    assert min(written) > 0.8 * max(written), written
    saved = _saved_tensors(at3, tmp_path / "a.pt")
    reference = _saved_tensors(iteration_dir(plain_ckpt, 3), tmp_path / "b.pt")
    weights = _model_tensors(at3, tmp_path / "c.pt")
    assert len(weights) > 5
    for key, weight in weights.items():
        # fp32 training: the main weight is the weight
        assert torch.equal(saved[f"optimizer.state.param.{key}"], weight), key
        for moment in ("exp_avg", "exp_avg_sq"):
            name = f"optimizer.state.{moment}.{key}"
            assert torch.equal(saved[name], reference[name]), name
            assert saved[name].abs().sum() > 0, name

    for name, layout in [
        ("tp2", ("--tensor-model-parallel-size", 2)),
        ("pp2", ("--pipeline-model-parallel-size", 2)),
    ]:
        log = tmp_path / f"{name}.jsonl"
        run_pretrain(
            tiny_args(prefix, str(log), 6, *COMMON, *DIST_OPT, *layout, "--load", at3), nproc=2
        )
        resumed = read_steps(str(log))
        assert [r["iteration"] for r in resumed] == [4, 5, 6]
        for a, b in zip(straight[3:], resumed):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), name


def test_optimizer_instances_train_as_one_and_resume_with_another_count(
    prefix, overlapped, tmp_path
):
    """--num-distributed-optimizer-instances 2 at DP 4 (Megatron-LM's flag): each pair of ranks
    shards a whole copy of the optimizer state (gradients reduce-scattered and parameters
    gathered over 2 ranks, each shard all-reduced across the 2 instances); the steps are one
    instance's (at DP 2: the same batches), and its checkpoints, per bucket and per parameter,
    resume at DP 2 with one."""
    straight = [r["loss"] for r in overlapped[0]]
    instances = ("--num-distributed-optimizer-instances", 2)
    for fmt in ((), ("--dist-ckpt-optim-fully-reshardable",)):
        ckpt, name = str(tmp_path / f"ckpt{len(fmt)}"), f"two{len(fmt)}"
        first, _, calls = _run(prefix, tmp_path, name, *OVERLAP, *instances, *fmt, "--save",
                               ckpt, "--save-interval", 3, "--exit-interval", 3,
                               iters=6, probe=True, nproc=4)  # fmt: skip
        # (fp32 gradient sums differ in order across data-parallel layouts)
        assert [r["loss"] for r in first] == pytest.approx(straight[:3], rel=1e-5)
        groups = {(c["kind"], c["group_size"]) for c in calls}
        assert groups == {("reduce_scatter", 2), ("all_reduce", 2), ("all_gather", 2)}, groups
        rest, _, _ = _run(prefix, tmp_path, f"rest{len(fmt)}", *OVERLAP, "--load", ckpt)
        assert [r["iteration"] for r in rest] == [4, 5, 6]
        assert [r["loss"] for r in rest] == pytest.approx(straight[3:], rel=1e-5), fmt


def test_async_save_writes_the_same_checkpoints_while_training_goes_on(prefix, plain, tmp_path):
    """--async-save: the checkpoints hold exactly what a blocking save writes, and the steps
    after a save run before it is published (a SIGKILL at the publication leaves the steps
    logged and no checkpoint named latest: the directory is still ``.partial``)."""
    plain, _, _, plain_ckpt = plain
    ckpt = str(tmp_path / "ckpt")
    # (--use-persistent-ckpt-worker: Megatron-LM 0.16's scripts need it for --async-save)
    saves = ("--save", ckpt, "--save-interval", 3, "--async-save", "--use-persistent-ckpt-worker")
    steps, _, _ = _run(prefix, tmp_path, "async", *saves)
    assert [r["loss"] for r in steps] == [r["loss"] for r in plain]
    _assert_same_checkpoints(ckpt, plain_ckpt, tmp_path, _saved_tensors)
    assert latest_iteration(ckpt) == 6

    killed = str(tmp_path / "killed")
    log = tmp_path / "killed.jsonl"
    proc = run_pretrain(
        tiny_args(prefix, str(log), 6, *COMMON, "--save", killed, "--save-interval", 3,
                  "--async-save"),
        nproc=2, check=False, env={KILL_HOOK_ENV: "swap:1"},
    )  # fmt: skip
    assert proc.returncode != 0
    assert 4 in [r["iteration"] for r in read_steps(str(log))]
    assert latest_iteration(killed) is None
    assert os.path.isdir(iteration_dir(killed, 3) + ".partial")


def test_a_non_finite_gradient_norm_stops_the_run_or_changes_nothing(prefix, tmp_path):
    """``--lr 1e30`` (after tiny_args' two warmup steps, the first at lr 0): step 2 sends the
    weights to about 1e29 and every later gradient is NaN. By default (Megatron-LM's
    --check-for-nan-in-loss-and-grad) both ranks stop at step 3 with one line, before a
    checkpoint of it; without the check such steps are skipped on the device: the sharded
    optimizer's moments and the weights saved after steps 3 to 5 are those saved after step 2,
    bit for bit."""
    diverge = (*COMMON, "--lr", "1e30", "--save-interval", 1)
    stopped = tmp_path / "stopped"
    proc = run_pretrain(
        tiny_args(prefix, str(tmp_path / "stopped.jsonl"), 6, *diverge, "--save", stopped),
        nproc=2,
        check=False,
    )
    both = proc.stdout + proc.stderr
    errors = [ln for ln in both.splitlines() if ": error: " in ln]
    assert proc.returncode != 0 and len(errors) == 1, both[-4000:]
    assert errors[0].startswith(
        "python -m megatron_slm.pretrain: error: iteration 3: the gradient norm is not finite; "
        "the update was skipped"
    ), errors
    assert latest_iteration(str(stopped)) == 2
    assert not os.path.exists(iteration_dir(str(stopped), 3))

    went_on = tmp_path / "went_on"
    log = tmp_path / "went_on.jsonl"
    proc = run_pretrain(
        tiny_args(prefix, str(log), 5, *diverge, *DIST_OPT, *OVERLAP, "--save", went_on,
                  "--no-check-for-nan-in-loss-and-grad"),
        nproc=2,
    )  # fmt: skip
    norms = [r["grad_norm"] for r in read_steps(str(log))]
    assert all(map(math.isfinite, norms[:2])) and not any(map(math.isfinite, norms[2:])), norms
    warnings = [ln for ln in proc.stderr.splitlines() if "the gradient norm is not finite" in ln]
    assert len(warnings) == 3 and "iteration 3: " in warnings[0], proc.stderr[-4000:]
    before = _saved_tensors(iteration_dir(str(went_on), 2), tmp_path / "a.pt")
    after = _saved_tensors(iteration_dir(str(went_on), 5), tmp_path / "b.pt")
    assert sorted(before) == sorted(after)
    assert any(key.startswith("optimizer") for key in before), sorted(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
