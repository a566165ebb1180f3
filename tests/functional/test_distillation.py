"""Knowledge distillation (``--export-kd-teacher-load``, ``--export-kd-cfg``): the trainer's KD
loss and gradient against an independent float64 computation (the teacher built and loaded by
megatron-core directly, torch's ``kl_div`` over the padded vocabulary), at TP 2 as at TP 1, and
the refusals. CPU."""

from __future__ import annotations

import math

import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.functional.pretrain_helpers import (
    VOCAB,
    close_trainer,
    cpu_trainer,
    documents_and_checkpoint,
    read_steps,
    refusal,
    run_pretrain,
    tiny_args,
)

pytestmark = pytest.mark.slow
STEPS = 2


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return documents_and_checkpoint(tmp_path_factory.mktemp("distill"), 12, "--seed", 5)


def _settings_file(directory, **settings) -> str:
    path = directory / "kd.yaml"
    path.write_text("".join(f"{k}: {str(v).lower()}\n" for k, v in settings.items()))
    return str(path)


def _teacher_model(ckpt):
    """The teacher as megatron-core builds it from the checkpoint's architecture, weights read by
    the checkpoint loader (not the runtime's loader that the trainer uses)."""
    from megatron_slm.checkpoint import load_checkpoint, read_checkpoint
    from megatron_slm.models import ModelBuildOptions, build_model

    (model,) = build_model(read_checkpoint(ckpt).model, ModelBuildOptions())
    load_checkpoint(ckpt, [model], weights_only=True)
    return model.eval()


EOD = VOCAB - 1  # NullTokenizer's end-of-document id


def _documents_only(tokens, eod):
    """``[b, 1, s, s]`` True where a query may not see a key: a later position, or another
    document (a document ends with its EOD token)."""
    doc = torch.cumsum(tokens == eod, dim=1) - (tokens == eod).long()  # EODs before each token
    s = tokens.shape[1]
    later = torch.ones(s, s, dtype=torch.bool).triu(1)
    return (later | (doc[:, :, None] != doc[:, None, :]))[:, None]


def _expected(trainer, teacher, settings):
    """The next step's KD loss (mean KL over the trained tokens, at the temperature) and gradient
    norm, in float64: per micro-batch the KD sum alone, or ``CE + scale * KD * (CE / KD)`` (the
    ratio constant), summed and divided by the step's tokens."""
    import torch.nn.functional as F

    from megatron_slm.models import build_model
    from megatron_slm.models.sharding import unwrap
    from megatron_slm.training.data import MicroBatches

    student = unwrap(trainer.chunks[0])
    copy = build_model(trainer.arch, trainer.build_opts, device=trainer.device)[0].double()
    weights = {k: v.double() for k, v in student.state_dict().items() if torch.is_tensor(v)}
    missing, unexpected = copy.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
    teacher = teacher.double()
    peek = MicroBatches(
        trainer.train_ds, trainer.cfg.training.micro_batch_size, trainer.batches.consumed_samples
    )
    kd_total, total, n = 0.0, 0.0, 0
    for _ in range(trainer.sizes.num_microbatches):
        batch = next(peek)
        tokens, positions = batch["tokens"], batch["position_ids"]
        mask = batch["loss_mask"].double().flatten()
        attention = _documents_only(tokens, EOD) if settings.get("reset_attention_mask") else None
        logits = copy(tokens, positions, attention).flatten(0, 1)  # [b * s, v]
        t = settings.get("logit_kl_temperature", 1.0)
        with torch.no_grad():
            p_t = F.softmax(teacher(tokens, positions, attention).flatten(0, 1) / t, dim=-1)
        kl = F.kl_div(F.log_softmax(logits / t, dim=-1), p_t, reduction="none").sum(-1)
        ce = F.cross_entropy(logits, batch["labels"].flatten(), reduction="none")
        ratio = settings.get("slm_ratio")
        if ratio is not None:  # --slm-select-mode loss: the top of each micro-batch by loss
            k = math.floor(ratio * int(mask.sum()) + 0.5)  # (the op rounds half up)
            top = torch.where(mask.bool(), ce.detach(), -torch.inf).topk(k).indices
            mask = torch.zeros_like(mask).index_fill_(0, top, 1.0)
        kd_sum, ce_sum = (kl * mask).sum(), (ce * mask).sum()
        if settings.get("skip_lm_loss", True):
            total = total + kd_sum
        else:
            size = (ce_sum / kd_sum).detach()
            total = total + ce_sum + settings["kd_loss_scale"] * size * kd_sum
        kd_total += kd_sum.item()
        n += int(mask.sum())
    (total / n).backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in copy.parameters() if p.grad is not None))
    return kd_total / n, norm.item()


def _worker(rank, world, prefix, ckpt, log_file, settings):
    from tests.functional.pretrain_helpers import read_steps

    extra = ["--export-kd-teacher-load", ckpt]
    if "file" in settings:
        extra += ["--export-kd-cfg", settings.pop("file")]
    if "slm_ratio" in settings:
        extra += ["--slm-ratio", settings["slm_ratio"], "--slm-select-mode", "loss"]
    if settings.get("reset_attention_mask"):
        extra += ["--reset-attention-mask"]
    trainer = cpu_trainer(tiny_args(prefix, log_file, 2 * STEPS, *extra))
    teacher = _teacher_model(ckpt)
    expected = []
    for _ in range(STEPS):
        expected.append(_expected(trainer, teacher, settings))
        assert trainer.advance() is None
    close_trainer(trainer)
    return expected, read_steps(log_file)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"skip_lm_loss": False, "kd_loss_scale": 0.5, "logit_kl_temperature": 2.0},
        {"slm_ratio": 0.5},  # Rho-1's selection: the KD loss on the selected tokens only
        {"reset_attention_mask": True},  # the teacher sees the student's documents only
    ],
    ids=["kd-only", "with-lm-loss", "selected-tokens", "documents"],
)
def test_kd_loss_and_gradient_are_an_independent_computation(teacher, tmp_path, settings):
    """The logged KD loss and the gradient norm of each step (the gradient of the loss the
    trainer optimises) equal the independent computation's."""
    prefix, ckpt = teacher
    if "skip_lm_loss" in settings:
        settings = dict(settings, file=_settings_file(tmp_path, **settings))
    log = str(tmp_path / "kd.jsonl")
    ((expected, records),) = run_distributed(_worker, 1, prefix, ckpt, log, settings)
    assert len(records) == STEPS
    for (kd_loss, grad_norm), record in zip(expected, records):
        assert record["kd_loss"] == pytest.approx(kd_loss, rel=1e-5)
        assert record["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    assert records[0]["kd_loss"] > 1e-3  # a trained teacher, an untrained student


def test_tensor_parallel_distils_alike(teacher, tmp_path):
    """The teacher loaded at TP 2, the KL divergence over the two vocabulary shards: the same
    steps as at TP 1, with the LM loss beside the KD loss."""
    prefix, ckpt = teacher
    settings = _settings_file(tmp_path, skip_lm_loss=False, kd_loss_scale=2.0)
    kd = ("--export-kd-teacher-load", ckpt, "--export-kd-cfg", settings)
    runs = []
    for tp in (1, 2):
        log = str(tmp_path / f"tp{tp}.jsonl")
        layout = ("--tensor-model-parallel-size", tp)
        run_pretrain(tiny_args(prefix, log, 4, *kd, *layout), nproc=tp)
        runs.append(read_steps(log))
    for a, b in zip(*runs, strict=True):
        for key in ("loss", "kd_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert runs[0][-1]["kd_loss"] < runs[0][0]["kd_loss"]


BAD_SETTINGS = [
    ("skip_lm_loss: 3\n", "skip_lm_loss must be true or false, got 3"),
    ("kd_loss_scale: 0\n", "kd_loss_scale must be a positive number, got 0"),
    ("temperature: 2\n", "unknown setting 'temperature'"),
    ("intermediate_layer_pairs: [[a, b]]\n", "intermediate_layer_pairs are not offered"),
    ("logit_layers: [output_layer, lm_head]\n", "logit_layers ['output_layer', 'lm_head']: "),
    ("- 1\n", "expected a mapping of settings, got list"),
]


@pytest.mark.parametrize("text, message", BAD_SETTINGS)
def test_bad_settings_file_is_one_line(text, message, tmp_path, capsys):
    from megatron_slm.training.config import parse_config

    path = tmp_path / "kd.yaml"
    path.write_text(text)
    argv = ["--mock-data", "--train-iters", "1", "--export-kd-teacher-load", "t"]
    line = refusal(lambda: parse_config([*argv, "--export-kd-cfg", str(path)]), capsys)
    assert line.split("error: ")[-1].startswith(f"--export-kd-cfg {path}: {message}"), line


def test_refusals_name_the_flag(teacher, tmp_path, capsys):
    from megatron_slm.training.config import parse_config
    from megatron_slm.training.loop import plan_training

    prefix, ckpt = teacher
    argv = ["--mock-data", "--train-iters", "1", "--export-kd-cfg", "x.yaml"]
    line = refusal(lambda: parse_config(argv), capsys)
    assert "--export-kd-cfg needs --export-kd-teacher-load" in line

    def plan(*extra, world=1):
        argv = tiny_args(prefix, str(tmp_path / "x.jsonl"), 4, "--export-kd-teacher-load", ckpt)
        return plan_training(parse_config([str(a) for a in (*argv, *extra)]), world)

    line = refusal(lambda: plan("--pipeline-model-parallel-size", 2, world=2), capsys)
    assert "--export-kd-teacher-load is not supported with --pipeline-model-parallel-size" in line
    line = refusal(lambda: plan("--make-vocab-size-divisible-by", 1000), capsys)
    assert f"--export-kd-teacher-load {ckpt}: the teacher's padded vocabulary (512 rows)" in line
    assert "differs from the student's (1000)" in line
    line = refusal(lambda: plan("--vocab-size", 500), capsys)
    assert "--export-kd-teacher-load" in line and "tokenizer (501)" in line  # 500 and the EOD
