"""Teacher LLMs for seed annotation: an OpenAI-compatible chat-completions endpoint (vLLM, SGLang,
``transformers serve``, a hosted API) or a local Hugging Face model directory.

Both answer a list of requests ``(key, messages)`` and report each answer through a callback as it
arrives (the annotator journals it at once, so an interrupted run never asks again). The HTTP
client is the standard library's ``urllib``: no new dependency. Transient failures (connection
refused or reset, timeouts, HTTP 408/429/5xx) are retried with exponential backoff; any other HTTP
status is a :class:`TeacherError` (a wrong URL, model name or key does not get better by waiting).
A 200 response that is not a chat completion is an *answer error*: reported, never retried.

Trust: the API key goes to the endpoint's own origin only. It is an unredirected header and the
client follows no redirect (a 3xx is a :class:`TeacherError`), so an endpoint cannot forward the
key, or substitute another server's answer, by redirecting (urllib would otherwise follow, even
https -> http, re-sending ordinary headers). Plain ``http://`` is accepted for loopback hosts
only, unless ``allow_insecure_http`` says the network in between is trusted.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import random
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from urllib.parse import urlsplit

from megatron_slm.errors import ConfigError

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

OnAnswer = Callable[[str, "str | None", "str | None"], None]
"""``on_answer(key, answer, error)``: exactly one of answer / error is None."""


class TeacherError(RuntimeError):
    """The teacher cannot answer (bad URL, model, key; retries exhausted): the run stops, and a
    rerun resumes from the journal."""


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


INSECURE_HTTP_FLAG = "--teacher-allow-insecure-http"
"""The flag that lets plain http:// reach a non-loopback teacher (named in the error)."""


def is_loopback_host(host: str | None) -> bool:
    """``localhost`` or a loopback IP literal (127.0.0.0/8, ::1): traffic that never leaves the
    machine. Other names are not resolved: what they resolve to can change."""
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _RefuseRedirect(urllib.request.HTTPRedirectHandler):
    """No redirect is followed: the 3xx reaches the caller as an HTTPError."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_RefuseRedirect)


class OpenAITeacher:
    """``POST {base_url}/chat/completions`` with greedy decoding, ``concurrency`` requests in
    flight."""

    PATH = "/chat/completions"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 8,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        concurrency: int = 8,
        log: Callable[[str], None] = print,
        allow_insecure_http: bool = False,
        flag: str = "--teacher",
        insecure_flag: str = INSECURE_HTTP_FLAG,
    ):
        parts = urlsplit(base_url)
        if (
            parts.scheme == "http"
            and not allow_insecure_http
            and not is_loopback_host(parts.hostname)
        ):
            raise ConfigError(
                f"{flag} {base_url}: plain http:// to a non-loopback host sends the API key "
                f"and the answers unencrypted; use https://, or {insecure_flag} if the "
                "network in between is trusted"
            )
        base = base_url.rstrip("/")
        path = self.PATH
        self.url = base if base.endswith(path) else base + path
        self.flag = flag
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.concurrency, self.log = concurrency, log
        self.retries = 0  # total retried requests (statistics)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _post(self, body: bytes) -> dict:
        request = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        if self.api_key:  # never copied onto a redirect (and _OPENER follows none anyway)
            request.add_unredirected_header("Authorization", f"Bearer {self.api_key}")
        with _OPENER.open(request, timeout=self.timeout) as response:
            return json.loads(response.read().decode("utf-8"))

    def complete(self, messages: list[dict], max_tokens: int) -> tuple[str | None, str | None]:
        """``(answer, None)`` or ``(None, answer error)``; raises TeacherError when it gives up."""
        return self._request({"messages": messages}, max_tokens)

    @staticmethod
    def _answer(reply) -> tuple[str | None, str | None]:
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None, f"not a chat completion: {_one_line(json.dumps(reply))}"
        if not isinstance(content, str):
            return None, "the answer has no text content"
        return content, None

    def _request(self, fields: dict, max_tokens: int) -> tuple[str | None, str | None]:
        """POST ``fields`` plus the model and greedy settings, with retries."""
        body = json.dumps(
            {
                "model": self.model,
                **fields,
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "stream": False,
            }
        ).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            if self._stop.is_set():
                raise TeacherError("stopped")
            try:
                reply = self._post(body)
            except urllib.error.HTTPError as e:
                detail = _one_line(e.read().decode("utf-8", "replace"))
                if 300 <= e.code < 400:
                    raise TeacherError(
                        f"{self.flag} {self.url}: HTTP {e.code} redirect to "
                        f"{e.headers.get('Location')!r} refused (the API key and the answers "
                        "stay with the endpoint given; give the final URL)"
                    ) from None
                if e.code not in RETRY_STATUS:
                    raise TeacherError(
                        f"{self.flag} {self.url}: HTTP {e.code} ({detail or e.reason})"
                    ) from None
                reason = f"HTTP {e.code}"
            except json.JSONDecodeError as e:
                return None, f"response is not JSON ({e})"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                # URLError wraps refused/reset connections; a read timeout is a bare OSError
                # (TimeoutError); a truncated response is an HTTPException
                reason = _one_line(getattr(e, "reason", None) or e)
            else:
                return self._answer(reply)
            if attempt == self.max_retries:
                raise TeacherError(
                    f"{self.flag} {self.url}: giving up after {self.max_retries} retries ({reason})"
                )
            delay = min(self.max_backoff, self.backoff * 2**attempt)
            delay *= 0.5 + random.random()  # jitter: concurrent workers do not retry in lockstep
            with self._lock:
                self.retries += 1
            self.log(f"{self.flag} {self.url}: {reason}; retry {attempt + 1} in {delay:.1f}s")
            self._stop.wait(delay)
        raise AssertionError("unreachable")

    def answer_all(self, requests, max_tokens: int, on_answer: OnAnswer) -> None:
        if not requests:
            return
        self._stop.clear()
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {}
            for key, messages in requests:
                futures[pool.submit(self.complete, messages, max_tokens)] = key
            try:
                for future in as_completed(futures):  # journaled as each answer arrives
                    answer, error = future.result()  # a TeacherError stops the run
                    on_answer(futures[future], answer, error)
            except BaseException:
                self._stop.set()  # running requests give up at their next retry
                for future in futures:
                    future.cancel()
                raise


class OpenAICompletions(OpenAITeacher):
    """``POST {base_url}/completions`` (the legacy text-completion endpoint): the prompt is sent
    as rendered here, text or token ids, so the server applies no chat template of its own."""

    PATH = "/completions"

    def complete(self, prompt: str | list[int], max_tokens: int) -> tuple[str | None, str | None]:
        return self._request({"prompt": prompt}, max_tokens)

    @staticmethod
    def _answer(reply) -> tuple[str | None, str | None]:
        try:
            text = reply["choices"][0]["text"]
        except (KeyError, IndexError, TypeError):
            return None, f"not a completion: {_one_line(json.dumps(reply))}"
        if not isinstance(text, str):
            return None, "the answer has no text"
        return text, None


class LocalTeacher:
    """A local Hugging Face model directory: batched greedy ``generate`` (refine.backends)."""

    def __init__(
        self,
        model_dir: str,
        device: str,
        dtype: str,
        batch_size: int,
        trust_remote_code: bool = False,
    ):
        from megatron_slm.refine.backends import TransformersGenerator

        self.generator = TransformersGenerator(
            model_dir, "--teacher", device, dtype, batch_size, trust_remote_code
        )
        self.tokenizer = self.generator.tokenizer
        self.batch_size = batch_size
        self.retries = 0

    def answer_all(self, requests, max_tokens: int, on_answer: OnAnswer) -> None:
        # one generate call per batch so finished batches are journaled before the next starts
        step = self.batch_size
        for i in range(0, len(requests), step):
            batch = requests[i : i + step]
            prompts = [
                self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                for _, m in batch
            ]
            for (key, _), answer in zip(batch, self.generator.generate(prompts, max_tokens)):
                on_answer(key, answer, None)


def is_url(teacher: str) -> bool:
    return teacher.startswith(("http://", "https://"))
