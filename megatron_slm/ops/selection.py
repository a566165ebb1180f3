"""What a token selection setting means, in one place: the trainer (``--slm-*``), the op and the
selection pictures all ask here, so they cannot drift apart. The flags that set a selection are
defined here too (``*_arg``): the trainer's ``SLMArgs`` and the visualizer's configs declare them
by these definitions, under the trainer's names."""

from __future__ import annotations

from megatron_slm.cli import arg

SELECT_MODES = ("excess", "loss", "random")
"""excess: current - reference loss (Rho-1); loss: current loss; random: a seeded draw."""
SELECT_SCOPES = ("sequence", "microbatch", "data-parallel")
"""Where the top-k is taken: per sequence, per micro-batch, or across the data-parallel group."""
UNSCORED_POLICIES = ("keep", "drop")
"""Tokens without a reference loss (NaN in the sidecar): always trained on, or never."""


def ratio_error(ratio, flag: str = "--slm-ratio") -> str | None:
    """The message for a selection ratio outside (0, 1] (NaN included), else None."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        return f"{flag} must be a number in (0, 1], got {ratio!r}"
    if not 0.0 < float(ratio) <= 1.0:  # also rejects NaN
        return f"{flag} must be in (0, 1], got {ratio}"
    return None


def needs_reference(ratio: float, mode: str) -> bool:
    """Whether the selection ranks by excess loss, i.e. needs reference losses."""
    return ratio < 1.0 and mode == "excess"


def selects_everything(ratio: float, mode: str, has_reference: bool) -> bool:
    """Whether every token is kept: ratio 1, or excess mode with no reference losses at hand
    (the op's contract: nothing to rank by, so nothing is dropped)."""
    return ratio >= 1.0 or (needs_reference(ratio, mode) and not has_reference)


def ranks_by_excess(mode: str, has_reference: bool) -> bool:
    """Whether the ranking score is the excess loss (else the current loss, or a random draw)."""
    return mode == "excess" and has_reference


def select_mode_arg(**kwargs):
    """``--slm-select-mode`` (``kwargs``: e.g. the visualizer's short alias)."""
    return arg("excess", "Ranking: excess (current - reference loss, Rho-1), loss or random "
               "(ablations).", choices=SELECT_MODES, **kwargs)  # fmt: skip


def unscored_arg(**kwargs):
    """``--slm-unscored``."""
    return arg("keep", "Tokens without a reference loss: keep (always selected) or drop.",
               choices=UNSCORED_POLICIES, **kwargs)  # fmt: skip
