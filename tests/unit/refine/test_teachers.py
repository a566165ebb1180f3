"""The teacher client's trust boundary: the API key and the answer stay with the endpoint given.

Two real HTTP servers on threads: the endpoint (127.0.0.1) redirects to a second server
("localhost", another port) that records what reaches it and answers like a teacher.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_slm.errors import ConfigError
from megatron_slm.refine.teachers import INSECURE_HTTP_FLAG, OpenAITeacher, TeacherError

KEY = "sk-test-secret-7f3a"
MESSAGES = [{"role": "user", "content": "label this"}]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host, handler):
        super().__init__((host, 0), handler)
        self.seen = []  # (method, path, headers) of every request
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True  # never outlives the test process even if shutdown is skipped


def _handler(reply):
    class Handler(BaseHTTPRequestHandler):
        timeout = 5  # a stuck connection ends by itself

        def _any(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            self.server.seen.append((self.command, self.path, dict(self.headers)))
            reply(self)

        do_GET = do_POST = _any

        def log_message(self, *args):
            pass

    return Handler


def _answer(handler):
    body = json.dumps({"choices": [{"message": {"content": "FROM THE SECOND SERVER"}}]}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def servers():
    second = _Server("localhost", _handler(_answer))
    target = f"http://localhost:{second.server_address[1]}/v1/chat/completions"

    def redirect(handler):
        handler.send_response(302)
        handler.send_header("Location", target)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    endpoint = _Server("127.0.0.1", _handler(redirect))
    for s in (endpoint, second):
        s.thread.start()
    try:
        yield endpoint, second
    finally:
        for s in (endpoint, second):
            s.shutdown()
            s.server_close()
            s.thread.join(timeout=5)


def test_redirect_neither_carries_the_key_nor_supplies_the_answer(servers):
    endpoint, second = servers
    base = f"http://127.0.0.1:{endpoint.server_address[1]}/v1"
    teacher = OpenAITeacher(base, "m", api_key=KEY, timeout=5, max_retries=0, log=lambda _: None)
    answers = []
    with pytest.raises(TeacherError, match="HTTP 302 redirect to .*localhost.* refused"):
        teacher.answer_all([("doc0", MESSAGES)], 16, lambda *a: answers.append(a))
    assert answers == []  # nothing accepted as the teacher's answer
    # the endpoint itself got the key (its own origin) ...
    [(method, path, headers)] = endpoint.seen
    assert (method, path) == ("POST", "/v1/chat/completions")
    assert headers["Authorization"] == f"Bearer {KEY}"
    # ... and the other origin never saw the key, nor any request at all
    assert all(KEY not in json.dumps(h) for _, _, h in second.seen)
    assert second.seen == []


def test_the_second_server_answers_when_asked_directly(servers):
    """The harness's own check: the second server is reachable and its answer is accepted, so the
    test above fails for the right reason."""
    _, second = servers
    base = f"http://localhost:{second.server_address[1]}/v1"
    teacher = OpenAITeacher(base, "m", api_key=KEY, timeout=5, max_retries=0, log=lambda _: None)
    assert teacher.complete(MESSAGES, 16) == ("FROM THE SECOND SERVER", None)
    assert second.seen[0][2]["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000/v1", "http://127.3.4.5/v1", "http://localhost:8000", "http://[::1]:80"],
)
def test_plain_http_to_loopback_is_accepted(url):
    assert OpenAITeacher(url, "m").url.endswith("/chat/completions")


@pytest.mark.parametrize("url", ["http://gpu-node-3:8000/v1", "http://10.0.0.7/v1"])
def test_plain_http_to_another_host_needs_the_flag(url):
    with pytest.raises(ConfigError) as e:
        OpenAITeacher(url, "m")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--teacher {url}: plain http://")
    assert INSECURE_HTTP_FLAG in msg
    assert OpenAITeacher(url, "m", allow_insecure_http=True).url == url + "/chat/completions"
    assert OpenAITeacher(url.replace("http:", "https:"), "m").url.startswith("https://")


def test_annotate_flag_reaches_the_client(tmp_path):
    """prox_annotate's --teacher-allow-insecure-http is the flag the refusal names."""
    from megatron_slm.refine.annotate import make_teacher
    from megatron_slm.refine.annotate_config import AnnotateConfig

    def config(**kw):
        return AnnotateConfig(
            input=[str(tmp_path / "in.jsonl")], stage="doc", teacher="http://gpu-node-3:8000/v1",
            teacher_model="m", output=str(tmp_path / "out.jsonl"), **kw,
        )  # fmt: skip

    with pytest.raises(ConfigError):
        make_teacher(config(), print)
    teacher = make_teacher(config(teacher_allow_insecure_http=True), print)
    assert teacher.url == "http://gpu-node-3:8000/v1/chat/completions"
    assert INSECURE_HTTP_FLAG == "--teacher-allow-insecure-http"
