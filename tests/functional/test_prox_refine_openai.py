"""``tools/prox_refine.py --backend openai`` against a REAL ``transformers serve`` on a tiny random
Llama exported here: greedy answers over HTTP give the same output bytes as the in-process
transformers backend (both semantics); a run SIGKILLed mid-generation and run again asks the server
only what its journal lacks and writes the same bytes, while the server is restarted under it."""

import json
import os
import random
import sys
import threading

import pytest

from megatron_slm.refine.journal import request_key
from megatron_slm.refine.pipeline import KILL_HOOK_ENV, refine_corpus
from megatron_slm.refine.teachers import OpenAICompletions
from tests import zygote
from tests.functional.test_prox_annotate import Server
from tests.functional.test_prox_refine import TEMPLATE, WORDS, snapshot
from tests.unit.refine import write_jsonl

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "prox_refine.py")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.functional import hf_worker

    root = tmp_path_factory.mktemp("refine_serve")
    model = hf_worker.make_chat_model(str(root / "model"), TEMPLATE, seed=3,
                                      max_position_embeddings=1024)  # fmt: skip
    server = Server(model, str(root / "serve.log"))
    server.start()
    yield model, server
    server.stop()


def make_corpus(root):
    rng = random.Random(7)
    raw = root / "raw"
    raw.mkdir()
    for s in range(2):
        docs = []
        for d in range(3):
            lines = [
                " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
                for _ in range(rng.randint(2, 9))
            ]
            docs.append({"id": 10 * s + d, "text": "\n".join(lines)})
        write_jsonl(raw / f"shard-{s}.jsonl", docs)


def argv(root, model, out, *extra):
    return [
        "--input", str(root / "raw" / "*.jsonl"), "--output-dir", str(root / out),
        "--doc-model", model, "--chunk-model", model, "--doc-max-new-tokens", "6",
        "--chunk-max-new-tokens", "6", "--chunk-max-tokens", "40", *extra,
    ]  # fmt: skip


def openai_args(server):
    return ["--backend", "openai", "--endpoint", f"http://127.0.0.1:{server.port}/v1",
            "--concurrency", "2", "--retry-backoff", "0.2", "--max-retries", "40"]  # fmt: skip


def run_here(args):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import prox_refine
    finally:
        sys.path.pop(0)
    run, mode = prox_refine.main.parse(args)[1].values()
    return refine_corpus(run, mode, rank=0, world_size=1, log=lambda *_: None)


def test_openai_backend_matches_transformers_and_survives_kill_and_restart(
    served, tmp_path, monkeypatch
):
    model, server = served
    make_corpus(tmp_path)
    run_here(argv(tmp_path, model, "ref", "--batch-size", "4"))
    reference = snapshot(tmp_path / "ref")

    # 1) killed right after its 5th journaled answer
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update({KILL_HOOK_ENV: "answer:5", "OMP_NUM_THREADS": "1"})
    killed = zygote.run(
        [sys.executable, TOOL, *argv(tmp_path, model, "oa", *openai_args(server))],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    journal = tmp_path / "oa" / "shards" / "shard-0.journal.jsonl"
    done = {json.loads(line)["key"] for line in journal.read_text().splitlines()}
    assert len(done) == 5 and not (tmp_path / "oa" / "stats.json").exists()

    # 2) rerun in this process; the server is stopped and started again after 2 requests
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    requested, restarted = [], threading.Event()
    original = OpenAICompletions.complete

    def complete(self, prompt, max_tokens):
        ids = prompt if isinstance(prompt, list) else tok(prompt)["input_ids"]
        requested.append(request_key(model, max_tokens, ids))
        if len(requested) == 2:
            restarted.set()
            server.stop()
            threading.Thread(target=server.start, daemon=True).start()
        return original(self, prompt, max_tokens)

    monkeypatch.setattr(OpenAICompletions, "complete", complete)
    starts = len(server.start_seconds)
    run_here(argv(tmp_path, model, "oa", *openai_args(server)))
    assert restarted.is_set() and len(server.start_seconds) == starts + 1
    # nothing journaled was asked again; every other prompt was
    assert requested and not set(requested) & done
    assert snapshot(tmp_path / "oa") == reference
    monkeypatch.undo()

    # 3) prox semantics (token-id prompts; this tokenizer adds no BOS, so they go as text)
    run_here(argv(tmp_path, model, "ref_prox", "--semantics", "prox"))
    run_here(argv(tmp_path, model, "oa_prox", "--semantics", "prox", *openai_args(server)))
    assert snapshot(tmp_path / "oa_prox") == snapshot(tmp_path / "ref_prox")
