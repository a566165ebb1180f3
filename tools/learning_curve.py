"""Held-out loss against tokens trained for several runs, from their saved checkpoints, and the
tokens each needs to reach the baseline's final loss (Rho-1's "x times faster").

    python tools/learning_curve.py --runs plain=out/plain rho1=out/slm \\
        --data out/clean_heldout.jsonl --append-eod --output out/curve   # curve.json, curve.png

See ``megatron_slm.visualize.curve``.
"""

import logging
import os
import sys

try:
    import megatron_slm  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_slm import launch  # noqa: E402
from megatron_slm.cli import build_parser, parse_configs  # noqa: E402
from megatron_slm.entry import entry_point  # noqa: E402
from megatron_slm.visualize.curve import CurveConfig, learning_curves  # noqa: E402

PROG = "learning_curve"


@entry_point(PROG)
def main(argv=None) -> int:
    """Evaluate and plot; exit status 2 on bad input (one line on stderr)."""
    groups = {"learning curve": CurveConfig}
    config = parse_configs(build_parser(PROG, __doc__, groups), groups, argv)["learning curve"]
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    device = launch.initialize(device=config.device)
    learning_curves(config, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
