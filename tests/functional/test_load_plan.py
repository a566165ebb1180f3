"""The one front door of every job that reads a model (``runtime.plan_load``), end to end:

- scoring, evaluation, selection pictures, parameter inheritance, export and remapping each read
  the model's description exactly once (the one reader of each kind, counted around the tools'
  ``main``);
- ``--load HF_DIR`` (a tiny random Llama, converted in memory) gives what ``--load`` of its
  converted checkpoint gives (the converter is checked against transformers in
  test_hf_interop.py): the same sidecar values, perplexity, selection page and inherited weights;
- a tokenizer file swapped under the recorded path (same path, other content) is refused by a
  load (tools/evaluate.py, tools/score_corpus.py) and by an export, in a real process: exit 2,
  one line naming both digests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import numpy as np
import pytest

from tests import zygote
from tests.dist_helpers import run_distributed
from tests.functional import load_plan_worker as worker

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOBS = ("score", "evaluate", "visualize", "inherit")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("load_plan"))
    (out,) = run_distributed(worker.build_and_run, 1, root)
    return out


@pytest.mark.parametrize("job", JOBS)
def test_each_job_reads_the_description_once(runs, job):
    ran = runs["ckpt"][job]
    assert ran["rc"] == 0, ran["err"][-2000:]
    assert ran["reads"] == {"megatron": 1, "hf": 0}, job
    ran = runs["hf"][job]
    assert ran["rc"] == 0, ran["err"][-2000:]
    assert ran["reads"] == {"megatron": 0, "hf": 1}, job


@pytest.mark.parametrize("job", ("export", "remap"))
def test_export_and_remap_read_the_metadata_once(runs, job):
    assert runs[job]["rc"] == 0, runs[job]["err"][-2000:]
    assert runs[job]["reads"] == {"megatron": 1, "hf": 0}


def test_load_hf_dir_scores_like_its_converted_checkpoint(runs):
    ckpt, hf = runs["ckpt"]["sidecar"], runs["hf"]["sidecar"]
    assert len(ckpt) == len(hf) == 4
    for a, b in zip(ckpt, hf):
        assert np.isnan(a[0]) and np.isnan(b[0])
        assert np.isfinite(a[1:]).all() and a[1:].size == len(b) - 1
        np.testing.assert_allclose(b[1:], a[1:], rtol=0, atol=1e-6)


def test_load_hf_dir_evaluates_like_its_converted_checkpoint(runs):
    (ckpt,), (hf,) = runs["ckpt"]["report"], runs["hf"]["report"]
    assert ckpt["tokens"] == hf["tokens"] > 0
    assert hf["perplexity"] == pytest.approx(ckpt["perplexity"], rel=1e-6)


def test_load_hf_dir_visualizes_like_its_converted_checkpoint(runs):
    assert runs["hf"]["html"] == runs["ckpt"]["html"]
    assert "selected share" in runs["hf"]["visualize"]["out"]
    assert runs["hf"]["visualize"]["out"] == runs["ckpt"]["visualize"]["out"].replace(
        "selection_ckpt", "selection_hf"
    )


def test_load_hf_dir_inherits_like_its_converted_checkpoint(runs):
    ckpt, hf = runs["ckpt"]["inherited"], runs["hf"]["inherited"]
    assert ckpt.keys() == hf.keys() and any("decoder.layers.0" in k for k in ckpt)
    assert not any("decoder.layers.1" in k for k in ckpt)  # one layer kept
    for name, tensor in ckpt.items():
        assert tensor.equal(hf[name]), name


# ---------------------------------------------------------------------------------------------
# a swapped tokenizer file
# ---------------------------------------------------------------------------------------------
def _tool(*argv):
    cmd = [sys.executable, os.path.join(REPO, "tools", argv[0]), *map(str, argv[1:])]
    return zygote.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.fixture
def swapped(runs, tmp_path):
    """A copy of the SentencePiece checkpoint whose recorded tokenizer file now holds another
    model (same path, other content); returns (checkpoint, recorded digest, new digest)."""
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(runs["sp_ckpt"], ckpt)
    meta_path = os.path.join(ckpt, "iter_0000001", "megatron_slm.json")
    with open(meta_path) as f:
        meta = json.load(f)
    model = str(tmp_path / "tokenizer.model")
    shutil.copy(runs["sp"], model)
    meta["tokenizer"]["model"] = model
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    recorded = meta["tokenizer"]["sha256"]
    assert hashlib.sha256(open(model, "rb").read()).hexdigest()[:16] == recorded
    shutil.copy(runs["other"], model)  # the swap
    now = hashlib.sha256(open(model, "rb").read()).hexdigest()[:16]
    assert now != recorded
    return ckpt, recorded, now


def _refused(proc, recorded, now, prog):
    """Exit 2, one error line naming both digests, no traceback (library import warnings aside,
    as in test_bad_input.py)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: "), proc.stderr[-2000:]
    assert recorded in errors[0] and now in errors[0]


def test_swapped_tokenizer_is_refused_by_load_and_export(runs, swapped, tmp_path):
    ckpt, recorded, now = swapped
    proc = _tool("evaluate.py", "--load", ckpt, "--perplexity-data", runs["docs"],
                 "--device", "cpu")  # fmt: skip
    _refused(proc, recorded, now, "evaluate")
    out = tmp_path / "hf"
    proc = _tool("convert_checkpoint.py", "megatron-to-hf", "--load", ckpt, "--save", out)
    _refused(proc, recorded, now, "convert_checkpoint")
    assert not (out / "tokenizer.json").exists()


def test_load_model_from_plain_python_without_a_process_group(runs):
    """A notebook's two lines: plan_load + load_model, no launch.initialize; the model's losses
    equal those of the same model loaded after launch.initialize (the tools' way)."""
    code = (
        "import sys, torch\n"
        "from megatron_slm.runtime import LoadArgs, load_model, plan_load, sequence_losses\n"
        "plan = plan_load(LoadArgs(load=sys.argv[1], device='cpu'), tokenizer='none')\n"
        "if sys.argv[2] == 'initialized':\n"
        "    from megatron_slm import launch\n"
        "    launch.initialize(device='cpu')\n"
        "lm = load_model(plan, torch.device('cpu'))\n"
        "ids = torch.arange(1, 18).unsqueeze(0) % lm.arch.vocab_size\n"
        "print(sequence_losses(lm, ids).tolist())\n"
    )
    out = {}
    for mode in ("plain", "initialized"):
        proc = zygote.run([sys.executable, "-c", code, runs["sp_ckpt"], mode],
                              capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[mode] = proc.stdout.strip().splitlines()[-1]
        created = "created a one-process group" in proc.stderr
        assert created == (mode == "plain"), proc.stderr[-2000:]
    assert out["plain"] == out["initialized"]
