"""A world of one opens no listening socket outside loopback.

Before: the env:// rendezvous started a TCPStore server on ``[::]:MASTER_PORT`` (every interface,
unauthenticated) although MASTER_ADDR was 127.0.0.1. The check runs in a child process (its own
process group and environment) and looks only at that process's sockets: other jobs on the
machine may listen wherever they like.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))

_CHILD = r"""
import json, os, socket, struct
import torch, torch.distributed as dist
from megatron_slm import launch

def own_listeners():
    # /proc/net/tcp{,6} list every socket of the network namespace; keep this process's (by inode)
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                    continue
                hexaddr, port = cols[1].split(":")
                raw = bytes.fromhex(hexaddr)
                # the kernel prints each 32-bit word in host (little-endian) order
                raw = b"".join(struct.pack("<I", w) for w in struct.unpack(f">{len(raw)//4}I", raw))
                found.append([socket.inet_ntop(family, raw), int(port, 16)])
    return found

launch.initialize(device="cpu")
t = torch.ones(3)
dist.all_reduce(t)  # the group works (gloo transport up)
print(json.dumps({"listeners": own_listeners(), "sum": t.tolist(), "world": dist.get_world_size()}))
launch.shutdown()
"""


def test_world_of_one_listens_on_loopback_only():
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_", "GLOO_", "NCCL_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    }
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["world"] == 1 and result["sum"] == [1.0, 1.0, 1.0]
    for addr, port in result["listeners"]:
        assert addr.startswith("127.") or addr == "::1", (addr, port, result["listeners"])
