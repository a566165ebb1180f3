"""Draw the next round's batches with probability softmax(batch loss / T), without replacement.

    python tools/resample_batches.py --losses round1_losses --keep 0.5 --temperature 1.0 \\
        --seed 1234 --output round2.idx
    python -m megatron_slm.pretrain ... --train-samples-from round2.idx --train-iters N0

The draw is ``torch.multinomial(softmax(l / T), N0, replacement=False)`` with a torch.Generator
seeded by --seed (deterministic); batches stay whole. Prints the kept share and the batch-loss
distribution of the kept batches against all; the list records the source's fingerprint, which the
trainer checks against its data. See ``megatron_slm.tinylm.resample``.
"""

import os
import sys

try:
    import megatron_slm  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_slm.cli import build_parser, parse_configs  # noqa: E402
from megatron_slm.entry import entry_point  # noqa: E402
from megatron_slm.tinylm.rounds_config import ResampleConfig  # noqa: E402

PROG = "resample_batches"
GROUPS = {"resampling": ResampleConfig}


@entry_point(PROG)
def main(argv=None) -> int:
    """Draw and write the list; exit status 2 on bad input (one line on stderr)."""
    config = parse_configs(build_parser(PROG, __doc__, GROUPS), GROUPS, argv)["resampling"]
    from megatron_slm.tinylm.resample import resample

    print(resample(config).format(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
