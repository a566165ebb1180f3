"""tools/prox_annotate.py against a REAL OpenAI-compatible server: ``transformers serve`` on
localhost serving a tiny random Llama (and a BPE tokenizer with a chat template) written here.

A random model writes garbage, so a small stdlib HTTP proxy sits between the client and the
server: every request goes over real HTTP to the real server and its real answer comes back,
with a grade or program appended by rule from markers in the document (``EDU=n``, ``FMT=n``,
``BAD``), so the labels are known. The proxy also counts requests per prompt, which is how the
test sees that a resumed run never asks again for an answer it already has, and it answers 502
while the server is restarted mid-run (the client's retries must carry the run through). From the
restart until the new server is up, every request gets 502, even one the old server would still
answer during its graceful shutdown: so the run cannot finish without the restarted server.
"""

import http.client
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from megatron_slm.refine.annotate import KILL_HOOK_ENV, annotate
from megatron_slm.refine.annotate_config import AnnotateConfig
from megatron_slm.refine.prompts import chat_messages
from tests import zygote
from tests.dist_helpers import free_port
from tests.unit.refine import read_jsonl, write_jsonl

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "prox_annotate.py")
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def transformers_cli() -> str:
    return os.path.join(os.path.dirname(sys.executable), "transformers")


class Server:
    """``transformers serve`` in a subprocess; ``start`` returns once it accepts connections."""

    def __init__(self, model, log_path):
        self.model = model
        self.port = free_port()
        self.log_path = log_path
        self.proc = None
        self.start_seconds = []

    def start(self):
        t0 = time.perf_counter()
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [transformers_cli(), "serve", self.model, "--device", "cpu", "--dtype", "float32"]
            + ["--host", "127.0.0.1", "--port", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                with open(self.log_path) as f:
                    raise RuntimeError(f"transformers serve exited:\n{f.read()[-3000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                ok = conn.getresponse().status == 200
                conn.close()
            except OSError:
                ok = False
            if ok:
                self.start_seconds.append(time.perf_counter() - t0)
                return
            time.sleep(0.2)
        raise RuntimeError("transformers serve did not start in 120 s")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def rewrite(content: str, answer: str) -> str:
    """The scripted part of the teacher: a grade or program chosen by the document's markers."""
    if "[doc]" in content:  # chunk stage: remove the lines marked NOISE (or a bad range on BAD)
        if "BAD" in content:
            return "remove_lines(line_start=900, line_end=901)"
        noise = [int(n) for n in re.findall(r"^\[(\d+)\]NOISE", content, re.MULTILINE)]
        lines = [f"remove_lines(line_start={n}, line_end={n})" for n in noise]
        return "```\n" + ("\n".join(lines) or "keep_chunk()") + "\n```"
    if "BAD" in content:
        return answer + "\nI would rather not grade this."
    key = "EDU" if "educational value" in content else "FMT"
    grade = re.search(key + r"=(\d)", content).group(1)
    return f"{answer}\nScore: {grade}"


class Proxy(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, server: Server):
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.upstream = server
        self.counts: dict[str, int] = {}  # answers the real server gave, per prompt
        self.forwarded = 0
        self.active = 0  # requests being handled
        self.restart_after = None  # restart the server after this many forwarded answers
        self.lock = threading.Lock()
        self.real_answers = []
        self.restarting = False  # from the restart until the new server answers /health

    def restart_upstream(self):
        self.upstream.stop()
        self.upstream.start()
        with self.lock:
            self.restarting = False

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        proxy: Proxy = self.server
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = json.loads(body)
        content = request["messages"][-1]["content"]
        with proxy.lock:
            proxy.active += 1
        try:
            self._forward(proxy, body, content)
        finally:
            with proxy.lock:
                proxy.active -= 1

    def _forward(self, proxy, body, content):
        if proxy.restarting:
            return self._reply(502, b'{"error": "upstream restarting"}')
        try:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream.port, timeout=60)
            conn.request("POST", self.path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            conn.close()
        except OSError:
            return self._reply(502, b'{"error": "upstream down"}')
        if response.status != 200:
            return self._reply(response.status, data)
        reply = json.loads(data)
        answer = reply["choices"][0]["message"]["content"]
        with proxy.lock:
            proxy.counts[content] = proxy.counts.get(content, 0) + 1
            proxy.real_answers.append(answer)
        reply["choices"][0]["message"]["content"] = rewrite(content, answer)
        with proxy.lock:
            proxy.forwarded += 1
            restart = proxy.forwarded == proxy.restart_after
            proxy.restarting = proxy.restarting or restart
        self._reply(200, json.dumps(reply).encode())
        if restart:  # the server goes away mid-run and comes back a little later
            threading.Thread(target=proxy.restart_upstream, daemon=True).start()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.functional import hf_worker

    root = tmp_path_factory.mktemp("teacher")
    model = hf_worker.make_chat_model(str(root / "model"), TEMPLATE, seed=5,
                                      max_position_embeddings=2048)  # fmt: skip
    server = Server(model, str(root / "serve.log"))
    server.start()
    proxy = Proxy(server)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield model, server, proxy
    proxy.shutdown()
    server.stop()
    print(f"transformers serve start times: {[round(s, 1) for s in server.start_seconds]} s")


def annotate_here(args):
    """The tool's code in this process (no second torch import): the parsed config, then
    ``annotate``."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import prox_annotate
    finally:
        sys.path.pop(0)
    config = prox_annotate.main.parse(args)
    assert isinstance(config, AnnotateConfig)
    return annotate(config, log=lambda m: None)


def run_annotate(args, env_extra=None, check=True):
    env = {k: v for k, v in os.environ.items() if k != KILL_HOOK_ENV}
    env.update({"OPENAI_API_KEY": "test-key", **(env_extra or {})})
    proc = zygote.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, env=env, timeout=300
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


DOCS = [
    ("a", "EDU=4 photosynthesis turns light into sugar in green leaves"),
    ("b", "EDU=0 buy cheap watches now click here"),
    ("c", "EDU=2 FMT=5 a tidy note on fractions and decimals"),
    ("d", "EDU=2 FMT=1 fractions ### $$$ menu menu menu"),
    ("e", "BAD this one the teacher will not grade"),
    ("f", "EDU=1 celebrity gossip of the week"),
    ("g", "EDU=3 the water cycle moves water between sea and sky"),
]


def test_doc_stage_resume_restart_and_malformed(served, tmp_path):
    model, server, proxy = served
    inp = tmp_path / "docs.jsonl"
    write_jsonl(inp, [{"id": i, "text": t} for i, t in DOCS])
    out = str(tmp_path / "seeds.jsonl")
    args = [
        "--input", str(inp), "--stage", "doc", "--teacher", proxy.url, "--teacher-model", model,
        "--output", out, "--max-new-tokens", "4", "--concurrency", "2", "--backoff", "0.2",
        "--max-retries", "30", "--timeout", "60",
    ]  # fmt: skip
    # 1) the tool, killed right after the 3rd journaled answer
    killed = run_annotate(args, {KILL_HOOK_ENV: "answer:3"}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not os.path.exists(out)
    journaled = {json.loads(line)["key"] for line in open(out + ".journal").readlines()[1:]}
    assert len(journaled) == 3
    while proxy.active:  # requests in flight at the kill are still answered by the server
        time.sleep(0.1)
    sent_first = sum(proxy.counts.values())
    # 2) rerun; the server is restarted after the run's 2nd answer
    proxy.restart_after = proxy.forwarded + 2
    starts = len(server.start_seconds)
    os.environ["OPENAI_API_KEY"] = "test-key"
    stats = annotate_here(args)
    assert len(server.start_seconds) == starts + 1, "the server was not restarted mid-run"
    assert stats == json.load(open(out + ".stats.json"))
    # 7 edu requests + format requests for the two edu = 2 documents
    assert stats["requests"] == 9
    assert stats["requests_resumed"] == 3
    assert stats["retries"] >= 1
    # finished examples were never requested again: no prompt was answered twice (a request in
    # flight when the first run was killed may be sent again: it was never journaled)
    assert sum(proxy.counts.values()) <= 9 + (sent_first - 3)
    answered_twice = [c for c, n in proxy.counts.items() if n > 1]
    assert len(answered_twice) <= sent_first - 3
    # the real server's real answers flowed through
    assert proxy.real_answers and all(isinstance(a, str) for a in proxy.real_answers)
    seeds = read_jsonl(out)
    labels = {s["id"]: s["messages"][-1]["content"] for s in seeds}
    assert labels == {
        "a": "keep_doc()",
        "b": "drop_doc()",
        "c": "keep_doc()",
        "f": "drop_doc()",
        "g": "keep_doc()",
    }
    assert stats["labels"] == {"keep": 3, "drop": 2, "excluded": 1}
    assert stats["malformed"] == 1  # "e": counted, never a seed
    # the exact messages tools/prox_refine.py sends (no --tokenizer: the whole document)
    text = dict(DOCS)
    for s in seeds:
        assert s["messages"] == chat_messages(text[s["id"]], labels[s["id"]])
    # 3) a third run asks nothing and writes the same bytes
    before = sum(proxy.counts.values())
    first = open(out, "rb").read()
    assert annotate_here(args)["requests_sent"] == 0
    assert sum(proxy.counts.values()) == before
    assert open(out, "rb").read() == first


def test_chunk_stage_invalid_programs_are_counted(served, tmp_path):
    model, server, proxy = served
    clean = ["Plants make sugar from light.", "Roots take up water.", "Leaves breathe."]
    docs = [
        {"id": "x", "text": "\n".join(["NOISE Home | Login", *clean, "NOISE (c) 2024"])},
        {"id": "y", "text": "\n".join(clean)},
        {"id": "z", "text": "\n".join(["BAD line", *clean])},
    ]
    inp = tmp_path / "docs.jsonl"
    write_jsonl(inp, docs)
    out = str(tmp_path / "chunk_seeds.jsonl")
    annotate_here(
        [
            "--input",
            str(inp),
            "--stage",
            "chunk",
            "--teacher",
            proxy.url,
            "--teacher-model",
            model,
            "--tokenizer",
            model,
            "--output",
            out,
            "--max-new-tokens",
            "4",
            "--backoff",
            "0.2",
        ]  # fmt: skip
    )
    seeds = {s["id"]: s for s in read_jsonl(out)}
    stats = json.load(open(out + ".stats.json"))
    assert stats["chunks"] == 3 and stats["programs_invalid"] == 1 and set(seeds) == {"x", "y"}
    assert seeds["x"]["messages"][-1]["content"] == (
        "remove_lines(line_start=0, line_end=0)\nremove_lines(line_start=4, line_end=4)"
    )
    assert seeds["y"]["messages"][-1]["content"] == "keep_chunk()"
    # the user message is the chunk exactly as prox_refine wraps and numbers it
    numbered = "\n".join(f"[{i:03d}]{line}" for i, line in enumerate(docs[0]["text"].split("\n")))
    assert seeds["x"]["messages"][1]["content"] == f"[doc]\n{numbered}\n[/doc]"
