"""``tools/compact_tokenizer.py``: flags come from the config dataclasses; bad flags and bad input
exit with status 2 and one ``prog: error:`` line naming the flag or file."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from megatron_slm.tinylm.compact_config import CountConfig, PruneConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location(
        "compact_tokenizer", os.path.join(REPO, "tools", "compact_tokenizer.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "argv,message",
    [
        (["count", "--data-path", "d", "--output", "c.npy", "--workers", "0"], "--workers must"),
        (["count", "--data-path", "d", "--output", "c.npy"], "--tokenizer-model is required"),
        (["count", "--data-path", "d", "--tokenizer-model", "m", "--output", "c"], "end in .npy"),
        (
            ["prune", "--tokenizer-model", "m", "--counts", "c.npy", "--vocab-size", "0",
             "--output", "s.model"],
            "--vocab-size must be >= 1",
        ),
        (["remap-checkpoint", "--load", "a", "--id-map", "b"], "--save"),
        (["prune", "--tokenizer-model", "m", "--counts", "c.npy", "--output", "s.model"],
         "--vocab-size / --coverage: give exactly one"),
        (["prune", "--tokenizer-model", "m", "--counts", "c.npy", "--output", "s.model",
          "--vocab-size", "300", "--coverage", "0.99"], "--vocab-size / --coverage: give exactly"),
        (["prune", "--tokenizer-model", "m", "--counts", "c.npy", "--output", "s.model",
          "--coverage", "0"], "--coverage must be in (0, 1], got 0.0"),
        (["count", "--data-path", "d", "--tokenizer-model", "m", "--output", "c.npy",
          "--curve-coverages", "0.99", "1.5"], "--curve-coverages must be in (0, 1], got 1.5"),
        (["count", "--data-path", "d", "--tokenizer-model", "m", "--output", "c.npy",
          "--curve-sizes", "0"], "--curve-sizes must be >= 1"),
        (["count", "--data-path", "d", "--tokenizer-type", "NullTokenizer", "--vocab-size", "9",
          "--output", "c.npy", "--heldout", "h.jsonl"],
         "--heldout: the coverage curve needs a SentencePiece --tokenizer-model"),
    ],
)  # fmt: skip
def test_flag_errors(tool, capsys, argv, message):
    assert tool.main(argv) == 2  # the runner reports argparse and config errors too
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("compact_tokenizer ") and "error:" in err and message in err


def test_input_errors_name_the_file(tool, capsys, tmp_path, models):
    counts = tmp_path / "c.npy"
    np.save(counts, models["bpe"]["counts"])
    argv = ["prune", "--tokenizer-model", models["bpe"]["model"], "--counts", str(counts)]
    argv += ["--vocab-size", "300", "--output", str(tmp_path / "s.model")]
    assert tool.main(argv) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err  # (import warnings may precede it)
    assert "the tokenizer that made them is unknown" in errors[0] and str(counts) in errors[0]
    missing = ["count", "--data-path", str(tmp_path / "nope"), "--tokenizer-model"]
    missing += [models["bpe"]["model"], "--output", str(tmp_path / "x.npy")]
    assert tool.main(missing) == 2
    assert "nope.idx not found" in capsys.readouterr().err


def test_configs_validate_in_python():
    with pytest.raises(ValueError, match="--tokenizer-type NullTokenizer cannot be pruned"):
        PruneConfig("m", "NullTokenizer", "c.npy", 10, "s.model")
    assert CountConfig(tokenizer_model="m", data_path=["d"], output="c.npy").workers == 1
