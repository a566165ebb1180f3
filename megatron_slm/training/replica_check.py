"""``--check-weight-hash-across-dp-replicas-interval`` (Megatron-LM's flag): the data-parallel
replicas of every parameter compared by hash, before the first step and every N steps.

Replicas that drift apart (a faulty device, a collective that reduced the wrong bytes) train on,
each its own model, and nothing in the loss says so until the checkpoint, written by one rank per
shard, mixes them. Each rank hashes its parameters' bytes on the host (SHA-1, as Megatron-LM), the
hashes are all-gathered over the replicas of each parameter (the data-parallel group; an expert's
over the expert data-parallel group, where the other ranks hold other experts), and a mismatch
stops every rank with one line naming the parameters and the ranks. A host copy of the weights
and a collective: for occasional checks, not every step.
"""

from __future__ import annotations

import hashlib
import logging

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_slm.errors import DivergenceError
from megatron_slm.models.sharding import unwrap

logger = logging.getLogger("megatron_slm")
DIGEST_BYTES = 20  # SHA-1


def parameter_digest(param: torch.Tensor) -> bytes:
    """SHA-1 of the parameter's bytes as stored (any dtype, bf16 included)."""
    data = param.detach().reshape(-1).contiguous().cpu().view(torch.uint8)
    return hashlib.sha1(data.numpy().tobytes()).digest()


def _replica_groups(chunks) -> list[tuple[str, list[str], list[bytes], object]]:
    """(kind, parameter names, digests, the group holding their replicas): the dense parameters
    over the data-parallel group, the experts' over the expert data-parallel group."""
    dense, experts = ([], []), ([], [])
    for i, chunk in enumerate(chunks):
        prefix = f"chunk {i} " if len(chunks) > 1 else ""
        for name, param in unwrap(chunk).named_parameters():
            # (megatron-core marks expert parameters allreduce=False: reduced over their own group)
            names, digests = dense if getattr(param, "allreduce", True) else experts
            names.append(prefix + name)
            digests.append(parameter_digest(param))
    return [
        ("data-parallel", *dense, parallel_state.get_data_parallel_group()),
        ("expert data-parallel", *experts, parallel_state.get_expert_data_parallel_group()),
    ]


def check_replicas(chunks, iteration: int, device: torch.device) -> None:
    """Compare this rank's parameter hashes with its replicas'; raise ``DivergenceError`` on
    every rank of a group with a mismatch (each sees all the group's hashes)."""
    for kind, names, digests, group in _replica_groups(chunks):
        size = dist.get_world_size(group)
        if not names or size == 1:
            continue
        mine = torch.frombuffer(bytearray(b"".join(digests)), dtype=torch.uint8)
        mine = mine.view(len(names), DIGEST_BYTES).to(device)
        gathered = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(gathered, mine, group=group)
        first = gathered[0]
        differing = [r for r, other in enumerate(gathered) if not torch.equal(other, first)]
        if not differing:
            continue
        rows = torch.stack([(other != first).any(dim=1) for other in gathered]).any(dim=0)
        bad = [name for name, differs in zip(names, rows.tolist()) if differs]
        ranks = dist.get_process_group_ranks(group)
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DivergenceError(
            f"after step {iteration} the {kind} replicas' weights differ: "
            f"{', '.join(bad[:3])}{more} on global rank(s) "
            f"{', '.join(str(ranks[r]) for r in differing)} against rank {ranks[0]} "
            "(--check-weight-hash-across-dp-replicas-interval): a device or a collective "
            "corrupted one replica; resume from the last checkpoint on other nodes"
        )
    if dist.get_rank() == 0:
        logger.info("weights match across the data-parallel replicas after step %d", iteration)
