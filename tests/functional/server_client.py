"""Start ``tools/run_text_generation_server.py`` as a real process tree (torchrun) and talk to it
over HTTP with the standard library."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from tests.dist_helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER = os.path.join(ROOT, "tools", "run_text_generation_server.py")


class Server:
    """``with Server(load, tp, log_dir) as s: s.put("/api", body)``; SIGTERM on exit."""

    def __init__(self, load: str, tp: int, log_dir, *extra: str, start_timeout: float = 240):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp),
            "--master_port", str(free_port()), SERVER, "--load", load, "--device", "cpu",
            "--tensor-model-parallel-size", str(tp), "--port", "0", *extra,
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.stderr_path = os.path.join(str(log_dir), "server.stderr")
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env, cwd=str(log_dir)
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(
            target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True
        ).start()
        deadline = time.monotonic() + start_timeout
        self.url = None
        while self.url is None and self.proc.poll() is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line.startswith("serving on "):
                self.url = line.split()[-1].strip()
        if self.url is None:
            self.stop()
            raise AssertionError(f"the server did not start:\n{self.log()[-4000:]}")

    def log(self) -> str:
        """What the server wrote on stderr so far."""
        with open(self.stderr_path) as f:
            return f.read()

    def request(self, method: str, path: str, body=None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def put(self, path: str, body) -> dict:
        status, out = self.request("PUT", path, body)
        assert status == 200, out
        return out

    def post(self, path: str, body) -> dict:
        status, out = self.request("POST", path, body)
        assert status == 200, out
        return out

    def stop(self, timeout: float = 60) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.stop()
