"""Held-out loss against tokens trained for several runs, from their saved checkpoints, and the
tokens each needs to reach the baseline's final loss (Rho-1's "x times faster").

    python tools/learning_curve.py --runs plain=out/plain rho1=out/slm \\
        --data out/clean_heldout.jsonl --append-eod --output out/curve   # curve.json, curve.png

See ``megatron_slm.visualize.curve``.
"""

import sys

from megatron_slm import launch
from megatron_slm.entry import entry_point
from megatron_slm.visualize.curve import CurveConfig, learning_curves

PROG = "learning_curve"
GROUPS = {"learning curve": CurveConfig}


@entry_point(PROG, doc=__doc__, groups=GROUPS)
def main(config: CurveConfig) -> int:
    """Evaluate and plot; exit status 2 on bad input (one line on stderr)."""
    device = launch.initialize(device=config.device)
    learning_curves(config, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
