"""Reference-model scoring of token datasets into reference-loss sidecars (Rho-1's offline step).

One module per job: :mod:`.config` (the typed settings and CLI), :mod:`.inputs` (checkpoint, data
and window checks before any work), :mod:`.packing` (document packing and sliding windows),
:mod:`.chunks` (a chunk made ready for the device), :mod:`.pipeline` (the sync-free loop: prefetch
thread, main thread, host-worker thread), :mod:`.scorer` (orchestration: chunks, ranks, resume,
publication). The model runs on ``megatron_slm.runtime``.
"""

from megatron_slm.scoring.config import ScoreConfig, ScoringError
from megatron_slm.scoring.scorer import ScoreReport, score_corpus

__all__ = ["ScoreConfig", "ScoreReport", "ScoringError", "score_corpus"]
