"""The text generation server: rank 0 answers HTTP, every rank of the model runs each job.

Rank 0 runs a threaded HTTP server (the standard library's; no web framework needed). A request
thread checks and tokenizes the body (:mod:`megatron_slm.serving.jobs`), hands the job to the
main thread and waits; the main thread broadcasts each job to every rank, all ranks run it
together (:func:`~megatron_slm.serving.engine.run_job`), and rank 0 answers. Jobs run one at a
time, in arrival order. While idle, rank 0 broadcasts a heartbeat every few seconds, so the other
ranks never reach the process group's timeout waiting. SIGTERM/SIGINT stop the server: rank 0
finishes the running job, tells the other ranks to stop (they ignore the signal themselves) and
every rank exits 0.

Endpoints: ``PUT``/``POST /api`` (Megatron-LM's ``tools/run_text_generation_server.py``
protocol: ``prompts``, ``tokens_to_generate``, ``temperature``, ``top_k``, ``top_p``,
``logprobs``, ``add_BOS``, ``stop_on_eol``, ``stop_on_double_eol``, ``random_seed``),
``POST /v1/completions`` (OpenAI's, so OpenAI clients, lm-evaluation-harness's
``local-completions`` model and ``tools/prox_refine.py --backend openai`` work against it),
``POST /v1/chat/completions`` (the tokenizer's chat template: the one SFT trained with),
vLLM's tokenizer endpoints (``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``:
lm-eval's remote tokenizer), ``GET /health`` and ``GET /v1/models``.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from concurrent.futures import Future
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from megatron_slm.errors import UserError
from megatron_slm.serving import tokenizer_api
from megatron_slm.serving.engine import run_job
from megatron_slm.serving.jobs import (
    RequestError,
    Tokenization,
    megatron_api_job,
    megatron_api_response,
    openai_chat_job,
    openai_chat_response,
    openai_completions_job,
    openai_completions_response,
)

logger = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
POLL_S = 0.5
MAX_BODY_BYTES = 64 << 20
_IDLE, _STOP = "idle", "stop"


class Dispatcher:
    """Rank 0's hand-off from request threads to the main thread, which owns the collectives."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.stopping = threading.Event()

    def submit(self, job) -> Future:
        future: Future = Future()
        self.jobs.put((job, future))
        return future

    def next(self, timeout: float):
        """The next ``(job, future)``, or None after ``timeout`` seconds without one."""
        try:
            return self.jobs.get(timeout=timeout)
        except queue.Empty:
            return None


def _handler(server_state):
    """The request handler class, bound to this server's state."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - the base class's signature
            logger.debug("%s %s", self.address_string(), format % args)

        def _reply(self, status: int, payload) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            kind = "invalid_request_error" if status < 500 else "server_error"
            self._reply(status, {"message": message, "error": {"message": message, "type": kind}})

        def _body(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                raise RequestError(f"the request body is over {MAX_BODY_BYTES} bytes")
            try:
                return json.loads(self.rfile.read(length) or b"null")
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise RequestError(f"the body is not JSON ({e})") from None

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path == "/health":
                self._reply(HTTPStatus.OK, {"status": "ok"})
            elif self.path == "/tokenizer_info":
                self._reply(HTTPStatus.OK, tokenizer_api.tokenizer_info(server_state.tokenization))
            elif self.path == "/v1/models":
                model = {
                    "id": server_state.model_name,
                    "object": "model",
                    "owned_by": "megatron-slm",
                }
                self._reply(HTTPStatus.OK, {"object": "list", "data": [model]})
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {self.path}")

        def do_PUT(self):  # noqa: N802
            if self.path == "/api":
                self._generate("api")
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: PUT {self.path}")

        def do_POST(self):  # noqa: N802
            if self.path == "/api":
                self._generate("api")
            elif self.path in ("/v1/completions", "/completions"):
                self._generate("openai")
            elif self.path in ("/v1/chat/completions", "/chat/completions"):
                self._generate("chat")
            elif self.path in ("/tokenize", "/detokenize"):
                self._tokenizer(self.path)
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {self.path}")

        def _tokenizer(self, path: str) -> None:
            """Tokenizer requests need no model: answered here, beside any running job."""
            run = tokenizer_api.tokenize if path == "/tokenize" else tokenizer_api.detokenize
            try:
                payload = run(self._body(), server_state.tokenization)
            except UserError as e:
                self._error(HTTPStatus.BAD_REQUEST, str(e))
                return
            self._reply(HTTPStatus.OK, payload)

        def _generate(self, api: str) -> None:
            state = server_state
            try:
                body = self._body()
                if api == "api":
                    job = megatron_api_job(body, state.tokenization, state.default_seed)
                elif api == "chat":
                    job = openai_chat_job(body, state.tokenization, state.default_seed)
                else:
                    job, echo, texts = openai_completions_job(
                        body, state.tokenization, state.default_seed
                    )
            except UserError as e:  # RequestError, or a prompt the tokenizer refuses
                self._error(HTTPStatus.BAD_REQUEST, str(e))
                return
            if state.dispatcher.stopping.is_set():
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down")
                return
            try:
                done = state.dispatcher.submit(job).result()
            except Exception as e:  # noqa: BLE001 - the client gets the reason, the server goes on
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")
                return
            tokenizer = state.tokenization.tokenizer
            if api == "api":
                payload = megatron_api_response(job, done, body["prompts"], tokenizer)
            elif api == "chat":
                payload = openai_chat_response(done, state.model_name)
            else:
                payload = openai_completions_response(
                    job, done, echo, texts, tokenizer, state.model_name
                )
            self._reply(HTTPStatus.OK, payload)

    return Handler


class ServerState:
    """What request threads read: fixed once the server starts."""

    def __init__(self, tokenization: Tokenization, default_seed: int | None, model_name: str):
        self.tokenization = tokenization
        self.default_seed = default_seed
        self.model_name = model_name
        self.dispatcher = Dispatcher()


def _broadcast(obj):
    from megatron_slm.launch import broadcast_from_rank0

    return broadcast_from_rank0(obj)


def _run_and_log(lm, job, micro_batch_size: int):
    start = time.perf_counter()
    done = run_job(lm, job, micro_batch_size)
    seconds = time.perf_counter() - start
    new = sum(len(c.new) for c in done)
    logger.info(
        "%d prompt(s), %d token(s) generated in %.2f s (%.1f tokens/s)",
        len(done), new, seconds, new / max(seconds, 1e-9),
    )  # fmt: skip
    return done


def serve(
    lm,
    *,
    host: str,
    port: int,
    micro_batch_size: int,
    default_seed: int | None,
    model_name: str,
    world_size: int,
    rank: int,
) -> int:
    """Run the server until SIGTERM/SIGINT reaches rank 0 (collective: every rank calls it)."""
    if rank != 0:
        return _follow(lm, micro_batch_size)
    state = ServerState(
        Tokenization(lm.tokenizer, lm.arch.max_position_embeddings), default_seed, model_name
    )
    httpd = ThreadingHTTPServer((host, port), _handler(state))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    previous = {s: signal.signal(s, lambda *_: state.dispatcher.stopping.set())
                for s in (signal.SIGTERM, signal.SIGINT)}  # fmt: skip
    bound_host, bound_port = httpd.server_address[:2]
    # (the one line a launcher or test waits for; flush: stdout may be a pipe)
    print(f"serving on http://{bound_host}:{bound_port}", flush=True)
    try:
        last_broadcast = time.monotonic()
        while not state.dispatcher.stopping.is_set():
            item = state.dispatcher.next(POLL_S)  # (short: a stop request is seen soon)
            if item is None:
                if world_size > 1 and time.monotonic() - last_broadcast >= HEARTBEAT_S:
                    _broadcast(_IDLE)
                    last_broadcast = time.monotonic()
                continue
            job, future = item
            if world_size > 1:
                _broadcast(job)
                last_broadcast = time.monotonic()
            try:
                future.set_result(_run_and_log(lm, job, micro_batch_size))
            except Exception as e:  # noqa: BLE001 - every rank hit the same error: go on
                logger.exception("generation failed")
                future.set_exception(e)
    finally:
        httpd.shutdown()
        for s, handler in previous.items():
            signal.signal(s, handler)
        while (item := state.dispatcher.next(0)) is not None:
            item[1].set_exception(RuntimeError("the server is shutting down"))
        if world_size > 1:
            _broadcast(_STOP)
    logger.info("server stopped")
    return 0


def _follow(lm, micro_batch_size: int) -> int:
    """Ranks other than 0: run every job rank 0 broadcasts, until it says stop. SIGTERM/SIGINT
    are left to rank 0 (torchrun and Ctrl-C signal every rank): a rank that died here would leave
    rank 0 broadcasting its stop to a closed connection."""
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    while True:
        job = _broadcast(None)
        if job == _STOP:
            return 0
        if job == _IDLE:
            continue
        try:
            run_job(lm, job, micro_batch_size)
        except Exception:  # noqa: BLE001 - rank 0 reports it; stay in step for the next job
            logger.exception("generation failed")
