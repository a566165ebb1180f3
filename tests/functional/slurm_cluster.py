"""A one-node SLURM cluster on localhost for tests (needs root and Debian's slurmctld, slurmd,
slurm-client and munge packages). Everything lives in a temporary directory with its own ports;
``SLURM_CONF`` points the client commands at it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from tests.dist_helpers import free_port

REQUIRED = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "munged")


def available() -> str | None:
    """None when a cluster can be started here, else the reason it cannot."""
    missing = [
        c for c in REQUIRED if shutil.which(c) is None and not os.path.exists(f"/usr/sbin/{c}")
    ]
    if missing:
        return f"SLURM not installed (missing {', '.join(missing)})"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root"
    return None


def _which(cmd: str) -> str:
    return shutil.which(cmd) or f"/usr/sbin/{cmd}"


class LocalSlurm:
    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.procs: list[subprocess.Popen] = []

    def start(self) -> LocalSlurm:
        for d in ("state", "spool"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 2
        r = self.root
        with open(self.conf, "w") as f:
            f.write(
                f"""ClusterName=slmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
KillWait=60
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
"""
            )
        os.makedirs("/run/munge", exist_ok=True)
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            subprocess.run([_which("munged"), "--force"], check=True)
        self.procs.append(
            subprocess.Popen([_which("slurmctld"), "-D", "-f", self.conf], env=self.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        )  # fmt: skip
        time.sleep(1.0)
        self.procs.append(
            subprocess.Popen([_which("slurmd"), "-D", "-f", self.conf], env=self.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        )  # fmt: skip
        try:
            self._wait_idle()
        except RuntimeError:
            self.stop()
            raise
        return self

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True
            )
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"local SLURM did not come up; see {self.root}/*.log")

    def sbatch(self, script: str, *args: str, env: dict | None = None, cwd: str) -> int:
        out = subprocess.run(
            ["sbatch", "--parsable", *args, script],
            env={**self.env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr}")
        return int(out.stdout.strip().split(";")[0])

    def state(self, job: int) -> str | None:
        out = subprocess.run(
            ["scontrol", "show", "job", str(job)], env=self.env, capture_output=True, text=True
        )
        for token in out.stdout.split():
            if token.startswith("JobState="):
                return token.split("=", 1)[1]
        return None

    def wait(self, job: int, timeout: float = 600, until=("COMPLETED", "FAILED", "CANCELLED",
             "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")) -> str:  # fmt: skip
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.state(job)
            if state in until:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {self.state(job)} after {timeout}s")

    def signal(self, job: int, sig: str = "TERM") -> None:
        subprocess.run(["scancel", "--signal", sig, str(job)], env=self.env, check=True)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()
