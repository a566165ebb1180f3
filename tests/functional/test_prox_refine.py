"""ProX refinement end to end on CPU with a tiny random Hugging Face Llama built here.

The tokenizer (byte-level BPE trained here) carries a Zephyr-style chat template, so the expected
prompts are written out below byte for byte from the documented format, independently of the code:

    <s><|system|>\\n{SYSTEM}</s>\\n<|user|>\\n{user message}</s>\\n<|assistant|>\\n

with the user message the raw document (document level) or ``[doc]\\n[000]line\\n...\\n[/doc]``
(chunk level). The programs a random model writes are garbage, which is fine: they exercise the
error path, and the checks are about format, consistency, sharding and resumption."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from megatron_slm.refine.config import ApplyConfig, RunConfig
from megatron_slm.refine.pipeline import KILL_HOOK_ENV, refine_corpus
from tests import zygote
from tests.unit.refine import read_jsonl, run_tool, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
TOOL = os.path.join(REPO, "tools", "prox_refine.py")
SYSTEM = "You are a helpful, respectful and honest assistant."
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WORDS = ["remove", "line", "the", "page", "(x)", "a,b", '"q"', "cookie", "math", "1+1=2"]
SMALL = ["--doc-max-new-tokens", "6", "--chunk-max-new-tokens", "6"]


def expected_prompt(user_message):
    return f"<s><|system|>\n{SYSTEM}</s>\n<|user|>\n{user_message}</s>\n<|assistant|>\n"


def snapshot(root):
    """Every file's bytes; lock files by name only: a lock's holder record (pid, time) is not
    output, and one SIGKILLed while holding a finished shard's lock keeps the dead holder's."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = b"" if name.endswith(".lock") else f.read()
    return files


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.functional import hf_worker

    root = tmp_path_factory.mktemp("prox_model")
    return hf_worker.make_chat_model(str(root / "model"), TEMPLATE, seed=3,
                                     max_position_embeddings=1024)  # fmt: skip


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(1)
    raw = tmp_path / "raw"
    raw.mkdir()
    doc_id = 0
    for s in range(3):
        docs = []
        for _ in range(4):
            lines = [
                " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12)))
                for _ in range(rng.randint(1, 14))
            ]
            docs.append({"id": doc_id, "text": "\n".join(lines)})
            doc_id += 1
        if s == 1:
            docs.append({"id": doc_id, "text": "  \n "})
            doc_id += 1
        write_jsonl(raw / f"shard-{s}.jsonl", docs)
    return tmp_path


def model_argv(root, model_dir, out, *extra):
    return [
        "--input", str(root / "raw" / "*.jsonl"), "--output-dir", str(root / out),
        "--doc-model", model_dir, "--chunk-model", model_dir, "--stage", "doc,chunk",
        "--batch-size", "4", *SMALL, *extra,
    ]  # fmt: skip


def run_in_process(argv):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import prox_refine
    finally:
        sys.path.pop(0)
    run, mode = prox_refine.main.parse(argv)[1].values()
    return refine_corpus(run, mode, rank=0, world_size=1, log=lambda *_: None)


def spawn(argv, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", KILL_HOOK_ENV)}
    env.update({"OMP_NUM_THREADS": "1", **(env_extra or {})})
    return zygote.Popen(
        [sys.executable, TOOL, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# prompts, byte for byte
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def recorded_prompts(monkeypatch):
    from megatron_slm.refine import backends

    prompts = []
    original = backends.TransformersGenerator.generate

    def record(self, batch, max_new_tokens):
        prompts.append((max_new_tokens, list(batch)))
        return original(self, batch, max_new_tokens)

    monkeypatch.setattr(backends.TransformersGenerator, "generate", record)
    return prompts


def test_prompts_are_the_documented_format(tmp_path, model_dir, recorded_prompts):
    raw = tmp_path / "raw"
    raw.mkdir()
    docs = ['first line, with "quotes"\nsecond (line)\n\nfourth', "one line only here"]
    write_jsonl(raw / "d.jsonl", [{"id": i, "text": t} for i, t in enumerate(docs)])
    run_in_process(model_argv(tmp_path, model_dir, "out"))
    (doc_tokens, doc_prompts), (chunk_tokens, chunk_prompts) = recorded_prompts
    assert (doc_tokens, chunk_tokens) == (6, 6)
    assert doc_prompts == [expected_prompt(docs[0]), expected_prompt(docs[1])]
    records = read_jsonl(tmp_path / "out" / "d.jsonl")
    records += read_jsonl(tmp_path / "out" / "dropped" / "d.jsonl")
    # random document programs never spell drop_doc(): both documents reach the chunk stage
    assert sorted(r["id"] for r in records) == [0, 1]
    assert all(r["metadata"]["prox"]["decision"] != "drop_doc" for r in records)
    assert chunk_prompts == [
        expected_prompt(
            '[doc]\n[000]first line, with "quotes"\n[001]second (line)\n[002]\n[003]fourth\n[/doc]'
        ),
        expected_prompt("[doc]\n[000]one line only here\n[/doc]"),
    ]


def test_long_documents_truncate_the_document_and_chunk(tmp_path, model_dir, recorded_prompts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    count = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = [f"line {i} " + "cookie page " * (i % 5) for i in range(30)]
    lines[7] = "toolong " * 60  # one line over the chunk limit
    text = "\n".join(lines)
    write_jsonl(raw / "d.jsonl", [{"id": 0, "text": text}])
    run_in_process(
        model_argv(
            tmp_path, model_dir, "out", "--doc-max-prompt-tokens", "80", "--chunk-max-tokens", "60"
        )
    )
    (_, [doc_prompt]), (_, chunk_prompts) = recorded_prompts
    # document level: the template is whole, the document is a truncated prefix, <= 80 tokens
    head, tail = expected_prompt("\x00").split("\x00")
    assert doc_prompt.startswith(head) and doc_prompt.endswith(tail)
    shown = doc_prompt[len(head) : -len(tail)]
    assert 0 < len(shown) < len(text) and text.startswith(shown)
    assert 75 <= count(doc_prompt) <= 80
    # chunk level: consecutive numbered lines, <= 60 tokens each, line 7 never sent
    numbered = [f"[{i:03d}]{line}" for i, line in enumerate(lines)]
    bodies = []
    for prompt in chunk_prompts:
        head, tail = expected_prompt("[doc]\n\x00\n[/doc]").split("\x00")
        assert prompt.startswith(head) and prompt.endswith(tail)
        bodies.append(prompt[len(head) : -len(tail)].split("\n"))
    assert len(bodies) > 2
    assert [line for body in bodies for line in body] == numbered[:7] + numbered[8:]
    assert all(sum(count(line) for line in body) <= 60 for body in bodies)
    # greedy: adding the next line to a chunk would have crossed the limit
    for body, following in zip(bodies, bodies[1:]):
        if body[-1] != numbered[6]:
            assert sum(count(line) for line in body + following[:1]) > 60
    [record] = read_jsonl(tmp_path / "out" / "d.jsonl") or read_jsonl(
        tmp_path / "out" / "dropped" / "d.jsonl"
    )
    assert record["metadata"]["prox"]["long_lines"] == [7]
    assert record["metadata"]["prox"]["doc_prompt_truncated"] is True


# ---------------------------------------------------------------------------------------------
# the pipeline: consistency, apply-mode replay, sharding, SIGKILL
# ---------------------------------------------------------------------------------------------
def test_both_stages_consistent_outputs_and_stats(corpus, model_dir):
    run_in_process(model_argv(corpus, model_dir, "out", "--chunk-max-tokens", "40"))
    out = corpus / "out"
    inputs = {r["id"]: r["text"] for p in (corpus / "raw").glob("*.jsonl") for r in read_jsonl(p)}
    kept = [r for p in sorted(out.glob("*.jsonl")) for r in read_jsonl(p)]
    dropped = [r for p in sorted((out / "dropped").glob("*.jsonl")) for r in read_jsonl(p)]
    assert sorted(r["id"] for r in kept + dropped) == sorted(inputs)
    stats = json.loads((out / "stats.json").read_text())["totals"]
    assert (stats["documents"], stats["kept"], stats["dropped"]) == (
        len(inputs), len(kept), len(dropped),
    )  # fmt: skip
    assert sum(stats["decisions"].values()) == len(inputs)
    assert stats["tokens_before"] > 0 and "tokens_after" in stats
    assert stats["words_after"] == sum(len(r["text"].split()) for r in kept)
    for r in kept + dropped:
        meta = r["metadata"]
        assert meta["raw_text"] == inputs[r["id"]]
        if meta["prox"]["decision"] == "drop_empty":
            assert meta["doc_program"] is None and meta["chunk_program"] is None
        else:
            assert isinstance(meta["doc_program"], str) and isinstance(meta["chunk_program"], str)

    # replaying the recorded programs in apply mode gives the same documents
    programs = [
        {"id": r["id"], "doc_program": r["metadata"]["doc_program"],
         "chunk_program": r["metadata"]["chunk_program"]}
        for r in kept + dropped
    ]  # fmt: skip
    write_jsonl(corpus / "programs.jsonl", programs)
    refine_corpus(
        RunConfig(input=[str(corpus / "raw" / "*.jsonl")], output_dir=str(corpus / "replay")),
        ApplyConfig(programs=str(corpus / "programs.jsonl"), tokenizer=model_dir),
        rank=0, world_size=1, log=lambda *_: None,
    )  # fmt: skip
    replay = json.loads((corpus / "replay" / "stats.json").read_text())["totals"]
    assert replay == stats
    for p in sorted(out.glob("*.jsonl")):
        a = [(r["id"], r["text"]) for r in read_jsonl(p)]
        b = [(r["id"], r["text"]) for r in read_jsonl(corpus / "replay" / p.name)]
        assert a == b


@pytest.mark.slow
def test_two_ranks_and_sigkill_rerun_give_the_same_bytes(corpus, model_dir):
    extra = ("--chunk-max-tokens", "40")
    run_in_process(model_argv(corpus, model_dir, "ref", *extra))
    reference = snapshot(corpus / "ref")

    ranks = [
        spawn(model_argv(corpus, model_dir, "ranks", *extra), {"RANK": str(r), "WORLD_SIZE": "2"})
        for r in (0, 1)
    ]
    for p in ranks:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert snapshot(corpus / "ranks") == reference

    p = spawn(model_argv(corpus, model_dir, "killed", *extra), {KILL_HOOK_ENV: "document:6"})
    p.communicate(timeout=300)
    assert p.returncode == -9
    assert "stats.json" not in snapshot(corpus / "killed")
    p = spawn(model_argv(corpus, model_dir, "killed", *extra))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert snapshot(corpus / "killed") == reference

    # an outside SIGKILL at an arbitrary moment: as soon as the first shard is committed
    p = spawn(model_argv(corpus, model_dir, "outside", *extra))
    first = corpus / "outside" / "shards" / "shard-0.json"
    deadline = time.monotonic() + 300
    while not first.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert first.exists() and "stats.json" not in snapshot(corpus / "outside")
    p = spawn(model_argv(corpus, model_dir, "outside", *extra))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert snapshot(corpus / "outside") == reference


# ---------------------------------------------------------------------------------------------
# bad model directories
# ---------------------------------------------------------------------------------------------
def test_model_dir_without_tokenizer(corpus, model_dir, tmp_path, capsys):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(model_dir, "config.json")).read())
    code, err = run_tool(model_argv(corpus, str(empty), "out"), capsys)
    assert code == 2 and err.startswith("prox_refine: error: --doc-model ")
    assert "no tokenizer (none of tokenizer.json" in err
    assert not (corpus / "out").exists()  # nothing claimed


def test_model_dir_without_chat_template(corpus, model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    plain = str(tmp_path / "plain")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = None
    tok.save_pretrained(plain)
    for name in ("chat_template.jinja",):
        if os.path.exists(os.path.join(plain, name)):
            os.remove(os.path.join(plain, name))
    argv = model_argv(corpus, model_dir, "out")
    argv[argv.index("--chunk-model") + 1] = plain
    code, err = run_tool(argv, capsys)
    assert code == 2 and f"--chunk-model {plain}: the tokenizer has no chat template" in err


@pytest.fixture(scope="module")
def remote_model(model_dir, tmp_path_factory):
    """``model_dir``'s model and tokenizer as code of their own (tests/remote_code.py)."""
    from tests.remote_code import as_remote_code

    remote = str(tmp_path_factory.mktemp("remote") / "model")
    as_remote_code(model_dir, remote)
    return remote


def test_a_model_of_remote_code_refines_only_with_trust_remote_code(model_dir, remote_model,
                                                                    corpus):  # fmt: skip
    """A refining model (and tokenizer) that is code its directory ships: refused in one line
    without --trust-remote-code, its code never imported; with it, the same output as the same
    weights under transformers' own Llama classes."""
    import shutil

    from megatron_slm.refine.backends import BackendError, TransformersGenerator
    from tests.remote_code import REFUSED

    remote = remote_model
    model_only = str(corpus / "model_only")  # only the model is code: its own line
    shutil.copytree(remote, model_only)
    shutil.copy(os.path.join(model_dir, "tokenizer_config.json"), model_only)
    with pytest.raises(BackendError) as refused:
        TransformersGenerator(model_only, "--doc-model", "cpu", "float32", 4)
    model_refused = REFUSED.replace("its tokenizer", "its model")
    assert str(refused.value) == f"--doc-model {model_only}: {model_refused}"
    modules = corpus / "modules"
    env = {"HF_MODULES_CACHE": str(modules)}
    argv = ["--input", str(corpus / "raw" / "*.jsonl"), "--doc-model", remote, "--stage", "doc",
            "--batch-size", "4", *SMALL]  # fmt: skip
    proc = spawn(["model", *argv, "--output-dir", str(corpus / "refused")], env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert err.strip().splitlines()[-1].endswith(f"--doc-model {remote}: {REFUSED}"), err[-3000:]
    assert not modules.exists() and not (corpus / "refused").exists()

    proc = spawn(["model", *argv, "--output-dir", str(corpus / "out"), "--trust-remote-code"], env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert (modules / "transformers_modules").is_dir()  # (its code ran)
    plain = [a if a != remote else model_dir for a in argv]
    proc = spawn(["model", *plain, "--output-dir", str(corpus / "plain")])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    refined = {k: v for k, v in snapshot(corpus / "out").items() if k.endswith(".jsonl")}
    assert refined and refined == {
        k: v for k, v in snapshot(corpus / "plain").items() if k.endswith(".jsonl")
    }


def test_annotation_and_evaluation_run_a_model_of_remote_code(remote_model, tmp_path):
    """tools/prox_annotate.py (a local --teacher) and tools/prox_eval.py (--model) take
    --trust-remote-code too: without it one line, with it the model's code answers."""
    from tests.remote_code import REFUSED

    tools = os.path.join(REPO, "tools")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    docs = [{"id": i, "text": f"document {i} about the water cycle"} for i in range(3)]
    write_jsonl(tmp_path / "docs.jsonl", docs)
    annotate = [sys.executable, os.path.join(tools, "prox_annotate.py"), "--input",
                str(tmp_path / "docs.jsonl"), "--stage", "doc", "--teacher", remote_model,
                "--output", str(tmp_path / "seeds.jsonl"), "--max-new-tokens", "4"]  # fmt: skip
    seeds = [{"messages": [{"role": "system", "content": SYSTEM},
                           {"role": "user", "content": "a document"},
                           {"role": "assistant", "content": "keep_doc()"}]}]  # fmt: skip
    write_jsonl(tmp_path / "heldout.jsonl", seeds)
    evaluate = [sys.executable, os.path.join(tools, "prox_eval.py"), "--model", remote_model,
                "--data", str(tmp_path / "heldout.jsonl"), "--doc-max-new-tokens", "4"]  # fmt: skip
    for cmd, flag in ((annotate, "--teacher"), (evaluate, "--model")):
        proc = zygote.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.endswith(f"{flag} {remote_model}: {REFUSED}"), proc.stderr[-3000:]
    assert not (tmp_path / "modules").exists()
    proc = zygote.run([*annotate, "--trust-remote-code"], env=env, capture_output=True,
                      text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "seeds.jsonl.stats.json").read_text())
    assert stats["requests_sent"] == len(docs), stats
    proc = zygote.run([*evaluate, "--trust-remote-code"], env=env, capture_output=True,
                      text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["examples"] == {"chunk": 0, "doc": 1}, report
