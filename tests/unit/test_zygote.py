"""tests/zygote.py: a launch forked from the preloaded server behaves as ``subprocess`` launching
a fresh interpreter does (the reference here), where the tests can observe it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests import zygote
from tests.functional.pretrain_helpers import REPO

pytestmark = pytest.mark.skipif(
    not zygote.forking_is_safe(), reason="launches are not forked here (a GPU, or turned off)"
)
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
# What a child reports: argv, cwd, a variable of the caller's, its session, whether torch was
# imported before its code ran (the sign that it was forked), and its exit status.
REPORT = (
    "import os, sys; forked = 'torch' in sys.modules; "
    "print(sys.argv, os.getcwd(), os.environ.get('PROBE'), os.getsid(0) == os.getpid()); "
    "print(forked, file=sys.stderr); "
)


def _both(args, **kwargs):
    """(forked, fresh) results of the same launch."""
    forked = zygote.run([sys.executable, *args], capture_output=True, text=True, **kwargs)
    fresh = subprocess.run([sys.executable, *args], capture_output=True, text=True, **kwargs)
    return forked, fresh


@pytest.mark.parametrize(
    ("code", "status", "last_line"),
    [
        ("pass", 0, "False"),
        ("sys.exit(3)", 3, "False"),
        ("sys.exit('refused: --flag')", 1, "refused: --flag"),
        ("raise ValueError('boom')", 1, "ValueError: boom"),
    ],
)
def test_exit_status_output_and_environment_as_a_fresh_interpreter(
    tmp_path, code, status, last_line
):
    forked, fresh = _both(
        ["-c", REPORT + code, "a", "b c"], env=dict(ENV, PROBE="x"), cwd=tmp_path,
        start_new_session=True,
    )  # fmt: skip
    assert forked.stderr.splitlines()[0] == "True" and fresh.stderr.splitlines()[0] == "False"
    assert forked.returncode == fresh.returncode == status
    assert forked.stdout == fresh.stdout == f"['-c', 'a', 'b c'] {tmp_path} x True\n"
    assert forked.stderr.splitlines()[1:] == fresh.stderr.splitlines()[1:]
    assert fresh.stderr.splitlines()[-1] == last_line


def test_a_module_a_script_stdin_and_merged_streams(tmp_path):
    script = tmp_path / "echo.py"
    script.write_text(
        "import sys\nprint(sys.argv[1:], sys.stdin.read())\nprint('err', file=sys.stderr)\n"
    )
    for args in (["-u", str(script), "1"], ["-m", "echo", "1"]):
        streams = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        forked = zygote.run([sys.executable, *args], input="in", env=ENV, cwd=tmp_path, **streams)
        fresh = subprocess.run(
            [sys.executable, *args], input="in", env=ENV, cwd=tmp_path, **streams
        )
        assert forked.returncode == fresh.returncode == 0
        assert forked.stdout == fresh.stdout == "['1'] in\nerr\n"


def test_signals_and_fresh_random_states():
    proc = zygote.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=ENV)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == -signal.SIGTERM
    with pytest.raises(subprocess.TimeoutExpired):
        zygote.run([sys.executable, "-c", "import time; time.sleep(60)"], env=ENV, timeout=0.5)
    # Each child draws its own numbers, as fresh interpreters do, and consecutive launches have
    # different hash seeds (the two servers).
    draw = "import random, numpy, torch; print(random.random(), numpy.random.rand(), " \
           "torch.rand(1).item(), hash('megatron'))"  # fmt: skip
    runs = [zygote.run([sys.executable, "-c", draw], env=ENV, capture_output=True, text=True)
            for _ in range(3)]  # fmt: skip
    values = [r.stdout.split() for r in runs]
    for column in zip(*values[:2], strict=True):
        assert column[0] != column[1]
    assert values[0][3] == values[2][3]  # the same server


def test_an_environment_imports_read_differently_is_not_forked_from_a_server_that_read_it():
    """libgomp reads OMP_NUM_THREADS once, when torch loads it."""
    probe = ["-c", "import torch; print(torch.get_num_threads())"]
    for threads in ("1", "2"):
        forked, fresh = _both(probe, env=dict(ENV, OMP_NUM_THREADS=threads))
        assert forked.stdout == fresh.stdout == f"{threads}\n"
    assert not zygote.ServerInfo("", ENV).accepts(dict(ENV, OMP_NUM_THREADS="2"))
    assert zygote.ServerInfo("", ENV).accepts(dict(ENV, MASTER_PORT="1"))
