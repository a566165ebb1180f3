"""``--backend openai`` against a scripted HTTP server in this process: what goes over the wire
(text when the server's own tokenization gives the ids meant, else ids), the journal (a second
run asks nothing), retries, and errors. The real-server test is
tests/functional/test_prox_refine_openai.py."""

import http.server
import json
import threading

import pytest

from megatron_slm.refine.backends import BackendError, OpenAIGenerator
from megatron_slm.refine.config import ModelConfig
from megatron_slm.refine.journal import Journal
from megatron_slm.refine.prompts import prox_chunk_prompt_ids
from tests.unit.refine.test_prox_prompts import ids_of, model_dir, zephyr  # noqa: F401


class Scripted(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.bodies = []
        self.fail = []  # statuses to answer first, one per request

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        status = server.fail.pop(0) if server.fail else 200
        if status == 200:
            server.bodies.append((self.path, body))
            prompt = body["prompt"]
            kind = "ids" if isinstance(prompt, list) else "text"
            data = {"choices": [{"text": f" {kind} {len(prompt)} "}]}
        else:
            data = {"error": "scripted"}
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture
def server():
    s = Scripted()
    threading.Thread(target=s.serve_forever, daemon=True).start()
    yield s
    s.shutdown()


def generator(model_dir, server, **options):  # noqa: F811
    config = ModelConfig(
        doc_model=model_dir, stage="doc", backend="openai", endpoint=server.url,
        retry_backoff=0.01, **options,
    )  # fmt: skip
    return OpenAIGenerator(model_dir, "--doc-model", config)


def test_wire_format_and_answers(model_dir, server):  # noqa: F811
    gen = generator(model_dir, server)
    text = zephyr("ab")  # the tokenizer adds a BOS to text: the server would see two
    chunk = prox_chunk_prompt_ids(gen.tokenizer, "[doc]\n[000]ab\n[/doc]")  # means the two
    out = gen.generate([text, chunk], max_new_tokens=7)
    sent = {json.dumps(b["prompt"]): b for _, b in server.bodies}
    assert len(sent) == 2
    assert all(path == "/v1/completions" for path, _ in server.bodies)
    body = sent[json.dumps(ids_of(text))]  # the ids meant, as ids
    assert body["max_tokens"] == 7 and body["temperature"] == 0.0
    assert body["model"] == model_dir  # `vllm serve DIR` names it DIR
    wire_text = zephyr("[doc]\n[000]ab\n[/doc]")  # the server adds the first BOS itself
    assert json.dumps(wire_text) in sent
    # answers come back in prompt order, stripped of spaces as ProX strips them
    assert out == [f"ids {len(ids_of(text))}", f"text {len(wire_text)}"]


def test_journal_means_nothing_is_asked_twice(model_dir, server, tmp_path):  # noqa: F811
    prompts = [zephyr(f"doc {i}") for i in range(5)] + [zephyr("doc 0")]
    path = str(tmp_path / "j.jsonl")
    gen = generator(model_dir, server, model="served-name")
    gen.journal = Journal(path)
    first = gen.generate(prompts[:3], 4)
    gen.journal.close()
    assert len(server.bodies) == 3 and all(b["model"] == "served-name" for _, b in server.bodies)
    with open(path, "ab") as f:
        f.write(b'{"key": "torn')  # a killed run's half-written line is cut off
    gen = generator(model_dir, server, model="served-name")
    gen.journal = Journal(path)
    out = gen.generate(prompts, 4)
    assert out[:3] == first and out[5] == out[0]
    assert len(server.bodies) == 5  # only doc 3 and doc 4 were new; the repeat is asked once
    gen.journal.close()
    with open(path, encoding="utf-8") as f:
        assert len([json.loads(line) for line in f]) == 5
    # another generation limit is another request
    gen = generator(model_dir, server, model="served-name")
    gen.journal = Journal(path)
    gen.generate(prompts[:1], 5)
    assert len(server.bodies) == 6


def test_retries_then_errors(model_dir, server):  # noqa: F811
    gen = generator(model_dir, server, max_retries=3)
    server.fail = [503, 429]
    assert gen.generate([zephyr("x")], 2) == [f"ids {len(ids_of(zephyr('x')))}"]
    assert gen.client.retries == 2
    server.fail = [400]
    with pytest.raises(
        BackendError, match=r"^--endpoint http://127\.0\.0\.1:\d+/v1/completions: HTTP 400"
    ):
        gen.generate([zephyr("y")], 2)
    server.fail = [503] * 4
    with pytest.raises(BackendError, match="giving up after 3 retries"):
        gen.generate([zephyr("z")], 2)
