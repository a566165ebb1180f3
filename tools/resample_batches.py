"""Draw the next round's batches with probability softmax(batch loss / T), without replacement.

    python tools/resample_batches.py --losses round1_losses --keep 0.5 --temperature 1.0 \\
        --seed 1234 --output round2.idx
    python -m megatron_slm.pretrain ... --train-samples-from round2.idx --train-iters N0

The draw is ``torch.multinomial(softmax(l / T), N0, replacement=False)`` with a torch.Generator
seeded by --seed (deterministic); batches stay whole. Prints the kept share and the batch-loss
distribution of the kept batches against all; the list records the source's fingerprint, which the
trainer checks against its data. See ``megatron_slm.tinylm.resample``.
"""

import sys

from megatron_slm.entry import entry_point
from megatron_slm.tinylm.rounds_config import ResampleConfig

PROG = "resample_batches"
GROUPS = {"resampling": ResampleConfig}


@entry_point(PROG, doc=__doc__, groups=GROUPS)
def main(config: ResampleConfig) -> int:
    """Draw and write the list; exit status 2 on bad input (one line on stderr)."""
    from megatron_slm.tinylm.resample import resample

    print(resample(config).format(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
