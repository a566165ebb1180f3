"""Newton-Schulz orthogonalisation, Muon's update direction (torch only).

Given a matrix ``G`` with singular value decomposition ``U S V^T``, the iteration
``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` (``X`` starting as ``G / ||G||_F``, so every
singular value is at most 1) drives each singular value towards 1: the result is close to
``U V^T``, the orthogonal matrix nearest ``G``. The coefficient sets are the published ones
Megatron-LM's ``--muon-coefficient-type`` names (the NVIDIA Emerging-Optimizers package's table):
``simple`` (Keller Jordan's Muon, one set repeated), ``quintic`` (five tuned sets, cycled),
``polar_express`` (arXiv:2505.16932: eight sets, the last repeated; it converges to ``U V^T``)
and ``aol``. The others stop short of ``U V^T``: on random matrices five quintic steps leave
the singular values within a few percent of 1 (a square matrix's smallest ones, near 0, lower),
``simple``'s between about 0.7 and 1.1, which training does not mind and which costs far fewer
steps than convergence (``tests/unit/training/test_muon.py`` measures them).

Tensor parallelism (a weight split over TP ranks along ``partition_dim``):

* ``duplicated``: the shards are all-gathered, every rank orthogonalises the whole matrix and
  keeps its own shard: the result is the one TP 1 gives;
* ``distributed``: each rank iterates on its shard, the ``X X^T`` products (and the norm) summed
  over the group: the same mathematics as the whole matrix (``X`` is transposed so the shards
  are column blocks, whose Gram matrices add up), the Gram matrix's size, not the weight's,
  communicated each step;
* ``blockwise``: each shard orthogonalised on its own (no communication; the update then depends
  on the TP size).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

COEFFICIENT_SETS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "simple": ((3.4445, -4.7750, 2.0315),),
    "quintic": (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ),
    "polar_express": (
        (8.2051, -22.9019, 16.4607),
        (4.0664, -2.8612, 0.5184),
        (3.9096, -2.8234, 0.5250),
        (3.2856, -2.4153, 0.4853),
        (2.2779, -1.6198, 0.3985),
        (1.8726, -1.2307, 0.3585),
        (1.8564, -1.2132, 0.3568),
        (1.8750, -1.2500, 0.3750),
    ),
    "aol": (
        (4.0098, -7.0585, 2.4635),
        (3.4585, -5.5479, 2.5959),
        (2.7573, -3.2939, 1.4254),
        (2.7215, -3.0494, 1.3169),
    ),
}
SCALE_MODES = ("spectral", "unit_rms_norm", "shape_scaling")
TP_MODES = ("duplicated", "distributed", "blockwise")
MATMUL_PRECISIONS = ("medium", "high", "highest")
_EPS = 1e-7


def coefficient_schedule(kind: str, steps: int) -> list[tuple[float, float, float]]:
    """The ``(a, b, c)`` of each of ``steps`` iterations; ValueError when ``steps`` does not suit
    ``kind`` (``polar_express``: at least its 8 sets; ``quintic``/``aol``: whole cycles)."""
    sets = list(COEFFICIENT_SETS[kind])
    if steps < 1:
        raise ValueError("at least one Newton-Schulz step")
    if kind == "simple":
        return sets * steps
    if kind == "polar_express":
        if steps < len(sets):
            raise ValueError(f"polar_express takes at least {len(sets)} steps")
        return sets + sets[-1:] * (steps - len(sets))
    if steps % len(sets):
        raise ValueError(f"{kind} cycles {len(sets)} coefficient sets: steps must be a multiple")
    return sets * (steps // len(sets))


def scale_factor(rows: int, cols: int, mode: str) -> float:
    """The factor on the orthogonalised update of a ``rows x cols`` weight: ``spectral``
    (sqrt(max(rows, cols)): Kimi's Moonlight and Megatron-LM's default; with
    --muon-extra-scale-factor 0.2 the update's RMS matches AdamW's), ``unit_rms_norm``
    (sqrt(rows / cols), Scion's) or ``shape_scaling`` (sqrt(max(1, rows / cols)), Keller
    Jordan's)."""
    if mode == "spectral":
        return max(rows, cols) ** 0.5
    if mode == "unit_rms_norm":
        return (rows / cols) ** 0.5
    if mode == "shape_scaling":
        return max(1.0, rows / cols) ** 0.5
    raise ValueError(f"unknown scale mode {mode!r}")


@contextlib.contextmanager
def matmul_precision(precision: str):
    """torch's float32 matmul precision for the iteration (``high``: TF32 on GPU), restored
    after. ``medium`` is handled by :func:`newton_schulz` (it iterates in bf16)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest" if precision == "medium" else precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def newton_schulz(
    x: torch.Tensor,
    coefficients: list[tuple[float, float, float]],
    bf16: bool = False,
    transpose: bool | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The orthogonalisation of the fp32 matrix ``x`` (fp32). ``transpose`` (default: when
    ``x`` has more rows than columns) iterates on ``x^T``, the smaller Gram matrix; ``group``:
    ``x`` is this rank's block of columns (after the transpose) of a matrix split over the
    group, whose norm and Gram matrices are summed over it. ``bf16``: iterate in bf16 (fp32
    accumulation), Megatron-LM's default ``--muon-fp32-matmul-prec medium``."""
    if transpose is None:
        transpose = x.size(-2) > x.size(-1)
    X = x.mT if transpose else x
    squares = X.square().sum()
    if group is not None:
        dist.all_reduce(squares, group=group)
    X = X / squares.sqrt().clamp_min(_EPS)
    if bf16:
        X = X.to(torch.bfloat16)
    for a, b, c in coefficients:
        A = X @ X.mT
        if group is not None:
            dist.all_reduce(A, group=group)
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a, alpha=1.0)
    X = X.to(torch.float32)
    return X.mT if transpose else X


def newton_schulz_tp(
    x: torch.Tensor,
    coefficients: list[tuple[float, float, float]],
    bf16: bool,
    mode: str,
    group: dist.ProcessGroup | None,
    partition_dim: int | None,
) -> torch.Tensor:
    """:func:`newton_schulz` of this rank's shard ``x`` of a weight split along
    ``partition_dim`` over ``group`` (None, or a group of one: not split), by ``mode`` (see the
    module docstring)."""
    size = 1 if group is None else group.size()
    if partition_dim is None or size == 1 or mode == "blockwise":
        return newton_schulz(x, coefficients, bf16)
    if mode == "duplicated":
        shards = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(shards, x.contiguous(), group=group)
        whole = newton_schulz(torch.cat(shards, dim=partition_dim), coefficients, bf16)
        return whole.chunk(size, dim=partition_dim)[group.rank()]
    # distributed: the split dimension becomes the columns of the iterated matrix
    return newton_schulz(x, coefficients, bf16, transpose=partition_dim == 0, group=group)
