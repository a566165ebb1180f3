"""Settings of ``tools/visualize_selection.py`` and ``tools/token_dynamics.py`` (typed configs,
the CLI generated from them)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_slm.cli import arg, check_choices
from megatron_slm.ops.selection import ratio_error, select_mode_arg, unscored_arg
from megatron_slm.runtime.plan import DeviceArgs, LoadArgs
from megatron_slm.visualize.selection import VisualizeError

FORMATS = ("html", "png")


def parse_doc_list(text: str | None) -> list[int]:
    """``"0,17,42"`` -> [0, 17, 42]; raises naming ``--docs``."""
    if not text:
        return []
    try:
        docs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise VisualizeError(
            f"--docs must be comma-separated document indices, got {text!r}"
        ) from None
    if any(d < 0 for d in docs):
        raise VisualizeError(f"--docs indices must be >= 0, got {text!r}")
    return docs


@dataclass
class VisualizeConfig(LoadArgs):
    """``--load`` (the model being trained: a checkpoint or a HF directory), ``--device``,
    ``--tensor-model-parallel-size`` (run under torchrun): ``LoadArgs``."""

    data_path: str | None = arg(
        None, "Token dataset prefix (<P>.bin/.idx, with its <P>_refloss sidecar).", required=True
    )
    docs: str | None = arg(None, "Comma-separated document indices, e.g. 0,17,42.")
    sample: int | None = arg(None, "Instead of --docs: this many random documents (--seed).")
    # The trainer's selection flags, by the trainer's names (the short names still work).
    slm_ratio: float = arg(0.6, "Selection ratio, as the trainer's.", aliases=("--ratio",))
    slm_select_mode: str = select_mode_arg(aliases=("--select-mode",))
    slm_unscored: str = unscored_arg(aliases=("--unscored",))
    slm_ref_load: str | None = arg(
        None, "Online reference model checkpoint (instead of the dataset's sidecar)."
    )
    max_tokens: int = arg(256, "Show at most this many tokens of a document (its first ones).")
    output: str | None = arg(None, "Output file (.html or .png).", required=True)
    format: str = arg("html", "html (self-contained page) or png (matplotlib).", choices=FORMATS)
    title: str | None = arg(None, "Page title (default: checkpoint and data).")
    seed: int = arg(0, "Seed of --sample and of the random selection mode.")

    def __post_init__(self):
        LoadArgs.__post_init__(self)
        self.doc_list = parse_doc_list(self.docs)
        if bool(self.doc_list) == (self.sample is not None):
            raise VisualizeError("give exactly one of --docs and --sample")
        if self.sample is not None and self.sample < 1:
            raise VisualizeError(f"--sample must be >= 1, got {self.sample}")
        if ratio_error(self.slm_ratio):
            raise VisualizeError(ratio_error(self.slm_ratio))
        check_choices(self, "slm_select_mode", "slm_unscored", error=VisualizeError)
        if self.max_tokens < 1:
            raise VisualizeError(f"--max-tokens must be >= 1, got {self.max_tokens}")


@dataclass
class DynamicsConfig(DeviceArgs):
    checkpoints: list[str] = arg([], "Checkpoints in training order (e.g. DIR/iter_*).",
                                 required=True)  # fmt: skip
    data_path: str | None = arg(None, "Token dataset prefix (<P>.bin/.idx).", required=True)
    num_docs: int = arg(64, "Documents to follow (the first ones of the dataset).")
    max_tokens: int = arg(128, "Tokens per document (its first ones).")
    threshold: float | None = arg(
        None,
        "Loss threshold between low and high (nats). Default: the median loss of the first "
        "checkpoint over the followed tokens.",
    )
    slm_ratio: float = arg(0.6, "Selection ratio of the selected/unselected split, as the "
                           "trainer's.", aliases=("--ratio",))  # fmt: skip
    select_checkpoint: str | None = arg(
        None,
        "Split tokens by the selection this checkpoint makes with the dataset's sidecar (an SLM "
        "run's checkpoint; default: the first of --checkpoints when a sidecar exists).",
    )
    output: str | None = arg(None, "Output prefix: <P>.json (categories) and <P>.png (curves).",
                             required=True)  # fmt: skip
    width: int = arg(960, "Plot width in pixels.")
    height: int = arg(540, "Plot height in pixels.")

    def __post_init__(self):
        if not self.checkpoints:
            raise VisualizeError("--checkpoints needs at least one checkpoint")
        if self.num_docs < 1 or self.max_tokens < 1:
            raise VisualizeError("--num-docs and --max-tokens must be >= 1")
        if ratio_error(self.slm_ratio):
            raise VisualizeError(ratio_error(self.slm_ratio))
        if self.width < 64 or self.height < 64:
            raise VisualizeError("--width and --height must be >= 64 pixels")
