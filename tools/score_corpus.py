"""Score a token corpus with a reference model into reference-loss sidecars (Rho-1, offline).

    torchrun --nproc-per-node 8 tools/score_corpus.py --data-prefix out/corpus_text_document \\
        --load checkpoints/ref --tensor-model-parallel-size 2 --seq-length 2048 \\
        --micro-batch-size 8 --dtype float16

writes ``out/corpus_text_document_refloss.bin/.json`` (see ``megatron_slm.data.sidecar``). Runs
under torchrun, srun (``examples/score_corpus.sh``) or plain python (a world of one). Interrupted
runs resume where they stopped when rerun with the same flags. See
``megatron_slm.scoring.scorer``.
"""

import argparse
import logging
import os
import sys

try:
    import megatron_slm  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_slm.scoring.scorer import (  # noqa: E402
    ScoringError,
    add_arguments,
    config_from_args,
    score_corpus,
)


def get_args(argv=None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run scoring; exit status 2 on bad input (message on stderr)."""
    args = get_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        score_corpus(config_from_args(args))
    except (ScoringError, FileExistsError) as e:
        print(f"score_corpus: error: {e}", file=sys.stderr)
        return 2
    finally:
        from megatron_slm import launch

        launch.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
