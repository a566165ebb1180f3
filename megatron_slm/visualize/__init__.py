"""See what selective training does: token-selection pictures and token-loss dynamics.

- :mod:`.selection`: per-document losses, reference losses and the trainer's selection (the
  selective op on the model's logits, through the shared runtime).
- :mod:`.html` / :mod:`.png`: a self-contained HTML report and a matplotlib picture of it (the
  PNG is also what the trainer logs to TensorBoard).
- :mod:`.dynamics`: the Rho-1 token categories (H->H, L->H, H->L, L->L) across checkpoints.

Entry points: ``tools/visualize_selection.py``, ``tools/token_dynamics.py``.
"""
