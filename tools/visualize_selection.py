"""Picture which tokens selective training keeps: every token of a few documents coloured by its
excess loss (model loss - reference loss), the selected ones marked, as a self-contained HTML page
(hover a token for its loss, reference loss and excess) or a PNG.

    python tools/visualize_selection.py --load checkpoints/slm --data-path out/noisy_text \\
        --docs 0,17,42 --ratio 0.6 --output report.html
    python tools/visualize_selection.py ... --sample 20 --format png --output report.png

Reference losses come from the dataset's sidecar (tools/score_corpus.py), or from a reference
model with --slm-ref-load; the selection is the trainer's selective op on the model's logits. See
``megatron_slm.visualize``.
"""

import sys

from megatron_slm import launch
from megatron_slm.entry import entry_point
from megatron_slm.visualize.config import VisualizeConfig

PROG = "visualize_selection"
GROUPS = {"selection picture": VisualizeConfig}


@entry_point(PROG, doc=__doc__, groups=GROUPS)
def main(config: VisualizeConfig) -> int:
    """Render the report; exit status 2 on bad input (one line on stderr)."""
    from megatron_slm.runtime import plan_load
    from megatron_slm.visualize.report import visualize_selection

    plan = plan_load(config)  # the model's description, read once, before any process group
    device = launch.initialize_for(config)
    summary = visualize_selection(config, plan, device)
    shares = ", ".join(
        f"{d}: {s['selected_share'] * 100:.0f}%" for d, s in zip(summary["documents"],
                                                              summary["stats"])
    )  # fmt: skip
    print(f"wrote {summary['output']} (documents selected share: {shares})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
