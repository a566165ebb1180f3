"""Fused RoPE (ops.rope) against megatron-core's unfused RoPE, forward + backward.

    python benchmarks/bench_rope.py                                # cpu, fp32
    python benchmarks/bench_rope.py --device cuda --dtype bf16     # one tinyllama layer

One layer's RoPE as the torch spec runs it: the query ``[s, b, heads, d]`` and the key, a strided
view ``[s, b, groups, d]`` of the QKV projection's output ``[s, b, groups, (heads / groups + 2) *
d]``, rotated by megatron-core's ``rotary_pos_emb`` and then the backward of given gradients.
Median of ``--iters`` timed calls after warm-up (CUDA events on a GPU), for the unfused anchor
(megatron-core's own ``_apply_rotary_pos_emb_bshd``, what ``apply_rotary_pos_emb`` runs without
Transformer Engine) and the fused op in the same run, then their ratio. On CUDA also the time to
move the fused op's bytes (read and write the query and key forward, their gradients backward: 4 x
their elements) at the device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_swiglu import copy_bandwidth, time_ms  # this folder (the script's sys.path[0])
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from megatron_slm.ops.rope import apply_rope, has_rope_kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="fp32 cpu, bf16 cuda")
    p.add_argument("--seq-length", type=int, default=None, help="default 512 cpu, 2048 cuda")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default 2 cpu, 4 cuda")
    p.add_argument("--heads", type=int, default=32, help="query heads (tinyllama: 32)")
    p.add_argument("--groups", type=int, default=4, help="key/value heads (tinyllama: 4)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench_rope: no CUDA device", file=sys.stderr)
        return 2
    if not has_rope_kernels(device):
        print(f"bench_rope: megatron_slm._C has no RoPE kernel for {device}", file=sys.stderr)
        return 2
    if args.heads % args.groups:
        print("bench_rope: --heads must be a multiple of --groups", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    s = args.seq_length or (2048 if cuda else 512)
    b = args.micro_batch_size or (4 if cuda else 2)
    r, d, groups = args.heads // args.groups, args.head_dim, args.groups
    g = torch.Generator().manual_seed(0)
    mixed = torch.randn(s, b, groups, (r + 2) * d, generator=g).to(dtype).to(device)
    mixed.requires_grad_()
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    f = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    freqs = torch.cat([f, f], dim=-1)[:, None, None, :].to(device)
    grads = [
        torch.randn(s, b, n, d, generator=g).to(dtype).to(device) for n in (args.heads, groups)
    ]

    def query_and_key(m):
        q, k, _ = torch.split(m, [r * d, d, d], dim=3)
        return q.reshape(s, b, args.heads, d), k  # megatron-core's layout (the query copied)

    def unfused(m):
        return [_apply_rotary_pos_emb_bshd(t, freqs) for t in query_and_key(m)]

    def fused(m):
        return [apply_rope(t, freqs, impl="fused") for t in query_and_key(m)]

    def split_only(m):  # what both share: the split and the query's copy, and their backward
        return list(query_and_key(m))

    def fwd_bwd(fn):
        def run():
            mixed.grad = None
            torch.autograd.backward(fn(mixed), grads)

        return run

    shared = time_ms(fwd_bwd(split_only), args.iters, cuda)
    anchor = time_ms(fwd_bwd(unfused), args.iters, cuda)
    ours = time_ms(fwd_bwd(fused), args.iters, cuda)
    name = str(dtype).replace("torch.", "")
    print(f"query [{s}, {b}, {args.heads}, {d}] and key [{s}, {b}, {groups}, {d}] {name} on "
          f"{device}, fwd+bwd, median of {args.iters}\n")  # fmt: skip
    print("| | ms | vs unfused |")
    print("|---|---:|---:|")
    print(f"| megatron-core's unfused RoPE (anchor) | {anchor:.3f} | 1.00x |")
    print(f"| fused (ops.rope) | {ours:.3f} | {ours / anchor:.2f}x |")
    print(f"| the split and query copy both include | {shared:.3f} | {shared / anchor:.2f}x |")
    if cuda:
        elements = s * b * (args.heads + groups) * d
        bound = 4 * elements * mixed.element_size() / copy_bandwidth(device) * 1e3
        print(f"| bytes of the fused op at the copy bandwidth | {bound:.3f} | "
              f"{bound / anchor:.2f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
