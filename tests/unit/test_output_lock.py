"""OutputLock between real processes: refusal naming the holder, takeover after SIGKILL, reuse."""

import json
import os
import signal
import subprocess
import sys

import pytest

from megatron_slm import output_lock
from megatron_slm.output_lock import OutputLock, OutputLockedError, read_holder

# The holder loads output_lock.py by path: importing the megatron_slm package imports torch, which
# would make each helper process take seconds to start.
_HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("output_lock", {module!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
lock = mod.OutputLock(sys.argv[1], "the test output").acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock on ``path``; returns ``(process, path)``."""
    procs = []

    def start(path):
        script = _HOLDER.format(module=output_lock.__file__)
        env = dict(os.environ, SLURM_JOB_ID="4242")
        p = subprocess.Popen(
            [sys.executable, "-c", script, path], stdout=subprocess.PIPE, text=True, env=env
        )
        procs.append(p)
        assert p.stdout.readline().strip() == "locked"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_second_process_refused_naming_holder(tmp_path, holder):
    path = str(tmp_path / "corpus_refloss.lock")
    p = holder(path)
    with pytest.raises(OutputLockedError) as e:
        OutputLock(path, "the reference-loss sidecar of corpus").acquire()
    msg = str(e.value)
    assert msg.startswith("the reference-loss sidecar of corpus is being written by another job: ")
    assert f"pid {p.pid} on " in msg
    assert "(SLURM job 4242)" in msg
    assert f"(lock file {path}); wait for it to finish or stop it" in msg
    assert isinstance(e.value, ValueError)
    info = read_holder(path)
    assert info["pid"] == p.pid and info["slurm_job_id"] == "4242"
    assert info["argv"][-1] == path  # the holder's command line
    assert p.poll() is None  # the refusal did not disturb the holder


def test_stale_lock_of_killed_holder_is_taken_over(tmp_path, holder):
    path = str(tmp_path / "out.lock")
    p = holder(path)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    assert read_holder(path)["pid"] == p.pid  # the killed job left its info behind
    # A fresh process takes over the stale lock and records itself.
    script = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('output_lock', {output_lock.__file__!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "with mod.OutputLock(sys.argv[1], 'x'):\n"
        "    print(open(sys.argv[1]).read(), end='')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    out = subprocess.run(
        [sys.executable, "-c", script, path], capture_output=True, text=True, env=env, check=True
    )
    info = json.loads(out.stdout)
    assert info["pid"] != p.pid and info["slurm_job_id"] is None
    assert info["argv"][-1] == path
    assert os.path.exists(path)  # release keeps the file (no inode race)


def test_release_then_reacquire_same_process(tmp_path):
    path = str(tmp_path / "o.lock")
    lock = OutputLock(path, "the output")
    with lock:
        assert lock.held and read_holder(path)["pid"] == os.getpid()
        # a second lock in the same process is refused too (flock is per open file)
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()} on "):
            OutputLock(path, "the output").acquire()
        with pytest.raises(RuntimeError, match="already held"):
            lock.acquire()
    assert not lock.held and read_holder(path) is None
    lock.acquire()
    assert lock.held and read_holder(path)["pid"] == os.getpid()
    lock.release()
    lock.release()  # idempotent
    with OutputLock(path, "the output") as other:
        assert other.held


def test_lock_file_recreated_after_removal_while_unheld(tmp_path):
    path = str(tmp_path / "o.lock")
    with OutputLock(path, "the output"):
        pass
    os.remove(path)
    with OutputLock(path, "the output"):
        assert read_holder(path)["pid"] == os.getpid()


def test_missing_directory_names_path(tmp_path):
    path = str(tmp_path / "no" / "such" / "dir" / "x.lock")
    with pytest.raises(FileNotFoundError) as e:
        OutputLock(path, "the scores").acquire()
    msg = str(e.value)
    assert "cannot create the lock file of the scores" in msg
    assert str(tmp_path / "no" / "such" / "dir") in msg and path in msg
    assert not os.path.exists(tmp_path / "no")


def test_symlink_at_the_lock_path_is_not_followed(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    os.chmod(target, 0o644)
    path = tmp_path / "out.lock"
    os.symlink(target, path)
    with pytest.raises(ValueError) as e:  # a UserError: one line naming the lock file
        OutputLock(str(path), "the test output").acquire()
    assert str(e.value).startswith(f"{path}: the lock file of the test output is a symbolic link")
    assert target.read_text() == "keep me"
    assert os.stat(target).st_mode & 0o777 == 0o644
    # a dangling link is not followed either: nothing is created at its target
    os.remove(path)
    os.symlink(tmp_path / "missing", path)
    with pytest.raises(ValueError):
        OutputLock(str(path), "the test output").acquire()
    assert not (tmp_path / "missing").exists()


def test_lock_file_is_private(tmp_path):
    """The holder record names the command line: owner-only, also for an older 0644 file."""
    fresh, old = tmp_path / "fresh.lock", tmp_path / "old.lock"
    old.write_text("")
    os.chmod(old, 0o644)
    for path in (fresh, old):
        with OutputLock(str(path), "the test output"):
            assert os.stat(path).st_mode & 0o777 == 0o600
            assert read_holder(str(path))["argv"] == sys.argv
