"""Count what one call would launch on a GPU, measured on CPU with ``torch.profiler``.

Each top-level ``aten::`` operator that does work (not a view, an allocation or a no-op
conversion) is one kernel launch on a GPU, plus whatever the host pays to dispatch it; so their
count is the fixed cost of a call, and a regression shows without a GPU.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

# Operators that launch nothing: views, allocations, metadata, and conversions that are no-ops
# on tensors already of the right dtype/layout.
NO_LAUNCH = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view", "aten::t",
    "aten::transpose", "aten::permute", "aten::as_strided", "aten::select", "aten::slice",
    "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::expand_as", "aten::view_as",
    "aten::alias", "aten::detach", "aten::empty", "aten::empty_like", "aten::empty_strided",
    "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::contiguous",
    "aten::to", "aten::result_type",
}  # fmt: skip


def aten_launches(fn) -> list[str]:
    """Names of the launching top-level aten operators of one ``fn()`` call."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = []
    for event in prof.events():
        if not event.name.startswith("aten::") or event.name in NO_LAUNCH:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:  # top level: not a step inside another operator
            names.append(event.name)
    return names


def warm(fn, times: int = 2) -> None:
    """Run ``fn`` first: first calls allocate, load code paths and may log."""
    for _ in range(times):
        fn()
    torch.manual_seed(0)
