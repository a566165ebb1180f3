"""Token-loss dynamics (Rho-1, Fig. 2): follow the same tokens through training checkpoints and
split them into H->H, L->H, H->L, L->L by their loss at the first and the last checkpoint (high =
above a threshold, by default the first checkpoint's median loss); plot each category's mean loss
curve. With a reference-loss sidecar, the same split for the tokens an SLM run selects and the
ones it does not.

    python tools/token_dynamics.py --checkpoints out/slm/iter_* --data-path out/noisy_text \\
        --output out/dynamics   # writes out/dynamics.json and out/dynamics.png

See ``megatron_slm.visualize.dynamics``.
"""

import sys

from megatron_slm import launch
from megatron_slm.entry import entry_point
from megatron_slm.visualize.config import DynamicsConfig

PROG = "token_dynamics"
GROUPS = {"token dynamics": DynamicsConfig}


@entry_point(PROG, doc=__doc__, groups=GROUPS)
def main(config: DynamicsConfig) -> int:
    """Compute and plot; exit status 2 on bad input (one line on stderr)."""
    from megatron_slm.visualize.dynamics import checkpoint_step
    from megatron_slm.visualize.trajectories import token_dynamics

    # Shell globs sort iter_0000100 before iter_0000050 only with unpadded names: order by step.
    config.checkpoints = sorted(config.checkpoints, key=lambda p: checkpoint_step(p.rstrip("/"), 0))
    device = launch.initialize(device=config.device)
    token_dynamics(config, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
