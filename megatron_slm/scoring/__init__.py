"""Reference-model scoring of token datasets into reference-loss sidecars (Rho-1's offline step).

See :mod:`megatron_slm.scoring.scorer` (the library behind ``tools/score_corpus.py``) and
:mod:`megatron_slm.scoring.packing` (document packing and sliding windows).
"""

from megatron_slm.scoring.scorer import (
    ScoreConfig,
    ScoreReport,
    ScoringError,
    progress_path,
    score_corpus,
)

__all__ = ["ScoreConfig", "ScoreReport", "ScoringError", "progress_path", "score_corpus"]
