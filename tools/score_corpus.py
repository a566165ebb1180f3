"""Score a token corpus with a reference model into reference-loss sidecars (Rho-1, offline).

    torchrun --nproc-per-node 8 tools/score_corpus.py --data-prefix out/corpus_text_document \\
        --load checkpoints/ref --tensor-model-parallel-size 2 --micro-batch-size 8

writes ``out/corpus_text_document_refloss.bin/.json`` (see ``megatron_slm.data.sidecar``). The
architecture and tokenizer come from the checkpoint (``--load`` alone is enough). Runs under
torchrun, srun (``examples/score_corpus.sh``) or plain python (a world of one). Interrupted runs
resume where they stopped when rerun with the same flags. See ``megatron_slm.scoring``.
"""

import sys

from megatron_slm import launch
from megatron_slm.entry import entry_point
from megatron_slm.scoring import ScoreConfig, score_corpus

PROG = "score_corpus"
GROUPS = {"scoring": ScoreConfig}


@entry_point(PROG, doc=__doc__, groups=GROUPS)
def main(config: ScoreConfig) -> int:
    """Run scoring; exit status 2 on bad input (one line on stderr, see megatron_slm.entry)."""
    launch.initialize_for(config)
    score_corpus(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
