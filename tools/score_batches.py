"""Loss of every training sample and batch under a frozen model, in the trainer's order.

    torchrun --nproc-per-node 8 tools/score_batches.py --load checkpoints/round1 \\
        --data-path 0.7 data/web_text_document 0.3 data/code_text_document \\
        --split 969,30,1 --seq-length 2048 --seed 1234 --global-batch-size 1024 \\
        --train-iters 75000 --output round1_losses --tensor-model-parallel-size 2

writes ``round1_losses.bin`` (per-sample mean loss and token count) and ``round1_losses.json``
(the sample order's record: dataset fingerprints, blend, split, seed, sequence length, global batch
size). Give the sampling flags of the training run whose order you score. An interrupted run
resumes when rerun with the same flags. Next: tools/resample_batches.py. See
``megatron_slm.tinylm.batch_scores``.
"""

import sys

from megatron_slm import launch
from megatron_slm.entry import entry_point
from megatron_slm.tinylm.rounds_config import ScoreBatchesConfig

PROG = "score_batches"
GROUPS = {"batch scoring": ScoreBatchesConfig}


@entry_point(PROG, doc=__doc__, groups=GROUPS)
def main(config: ScoreBatchesConfig) -> int:
    """Score the batches; exit status 2 on bad input (one line on stderr)."""
    import torch.distributed as dist

    from megatron_slm.tinylm.batch_scores import score_batches

    launch.initialize_for(config)
    report = score_batches(config)
    if dist.get_rank() == 0:
        print(report.format(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
