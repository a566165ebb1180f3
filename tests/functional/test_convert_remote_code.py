"""tools/convert_checkpoint.py with a tokenizer that is Python code its directory ships: both
directions refuse it in one line unless --trust-remote-code (its code never runs), and with the
flag copy its code along, so every later job (given the flag too) reads the ids that code gives."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests import zygote
from tests.functional import hf_worker
from tests.remote_code import (
    CODE,
    EOS_ID,
    REFUSED,
    VOCAB_SIZE,
    letters_ids,
    write_letters_tokenizer,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow


def test_both_directions_need_and_keep_the_tokenizer_code(tmp_path):
    modules = tmp_path / "modules"  # where transformers puts remote code it imports
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(modules))

    def convert(*argv):
        cmd = [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), *argv]
        return zygote.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    def error_line(proc):
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = [ln for ln in proc.stderr.splitlines() if "convert_checkpoint: error:" in ln]
        assert len(lines) == 1, proc.stderr[-3000:]
        return lines[0]

    hf = str(tmp_path / "hf")
    hf_worker.make_hf_model(hf, "llama", vocab_size=64)  # its eos 2; the tokenizer's is 1
    write_letters_tokenizer(hf)
    ckpt = str(tmp_path / "ckpt")
    line = error_line(convert("hf-to-megatron", "--load", hf, "--save", ckpt))
    assert line.endswith(f"--load {hf}: {REFUSED}"), line
    assert not modules.exists() and not os.path.exists(ckpt)

    proc = convert("hf-to-megatron", "--load", hf, "--save", ckpt, "--trust-remote-code")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, code in CODE.items():  # the code and the module it imports travel with it
        assert (tmp_path / "ckpt" / "tokenizer" / name).read_text() == code
    (meta_file,) = (tmp_path / "ckpt").glob("iter_*/megatron_slm.json")
    record = json.loads(meta_file.read_text())["tokenizer"]
    assert record["type"] == "HuggingFaceTokenizer" and record["vocab_size"] == VOCAB_SIZE

    out = str(tmp_path / "out")
    line = error_line(convert("megatron-to-hf", "--load", ckpt, "--save", out))
    assert line.endswith(f"{ckpt}/tokenizer: {REFUSED}"), line
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf", "modules"]  # nothing staged is left
    proc = convert("megatron-to-hf", "--load", ckpt, "--save", out, "--trust-remote-code")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, code in CODE.items():
        assert (tmp_path / "out" / name).read_text() == code
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eos_token_id"] == EOS_ID  # read through the tokenizer's code

    script = (
        "import sys\n"
        "from transformers import AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "print(tok('ab c', add_special_tokens=False).input_ids)\n"
    )
    proc = zygote.run([sys.executable, "-c", script, out], env=env, capture_output=True,
                      text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == str(letters_ids("ab c")), proc.stderr
