"""Held-out loss against tokens trained for several runs, from their saved checkpoints, and the
tokens each needs to reach the baseline's final loss (Rho-1's "x times faster").

    python tools/learning_curve.py --runs plain=out/plain rho1=out/slm \\
        --data out/clean_heldout.jsonl --append-eod --output out/curve   # curve.json, curve.png

See ``megatron_slm.visualize.curve``.
"""

import sys

from megatron_slm import launch
from megatron_slm.cli import build_parser, parse_configs
from megatron_slm.entry import entry_point
from megatron_slm.visualize.curve import CurveConfig, learning_curves

PROG = "learning_curve"


@entry_point(PROG)
def main(argv=None) -> int:
    """Evaluate and plot; exit status 2 on bad input (one line on stderr)."""
    groups = {"learning curve": CurveConfig}
    config = parse_configs(build_parser(PROG, __doc__, groups), groups, argv)["learning curve"]
    device = launch.initialize(device=config.device)
    learning_curves(config, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
