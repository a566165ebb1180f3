"""Worker of tests/functional/test_visualize.py (runs in a spawned process): tiny checkpoints, a
token dataset with a hand-made sidecar, the selection the selective op makes on the model's own
logits (computed here without the tool), and the tools' ``main`` run in this process."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import warnings

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB, RATIO = 512, 0.6


def docs() -> list[list[int]]:
    rng = np.random.default_rng(11)
    return [list(rng.integers(0, VOCAB - 1, size=int(n))) for n in (12, 30, 7, 41, 25, 18)]


def ref_values(doc: int, pos: np.ndarray) -> np.ndarray:
    """The hand-made sidecar: a fixed pseudo-random reference loss in [3, 9], NaN at 0."""
    v = 3.0 + 6.0 * np.random.default_rng(100 + doc).random(pos.size)
    v[pos == 0] = np.nan
    return v.astype(np.float32)


def run_tool(name: str, *argv) -> tuple[int, str, str]:
    """``tools/<name>.py`` main in this process: (exit status, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out, err = io.StringIO(), io.StringIO()
    # megatron-core's library warnings are not the tool's output (the quickstart hides them too).
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        warnings.simplefilter("ignore")
        try:
            rc = tool.main([str(a) for a in argv])
        except SystemExit as e:  # argparse errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def _save_models(root: str) -> None:
    import torch

    from megatron_slm.checkpoint import save_checkpoint
    from megatron_slm.models import ModelBuildOptions, build_model, get_preset

    cfg = get_preset("tiny")
    chunks = build_model(cfg, ModelBuildOptions(transformer_impl="torch"))
    meta = {
        "tokenizer": {"type": "NullTokenizer", "model": None, "vocab_size": VOCAB},
        "make_vocab_size_divisible_by": 128,
        "config": {"training": {"seq_length": 64}},
    }
    for it in (1, 2, 3):  # three "training" checkpoints: the weights shrink step by step
        save_checkpoint(root, it, chunks, model_config=cfg, metadata=meta, consumed_samples=8 * it)
        with torch.no_grad():
            for p in chunks[0].parameters():
                p.mul_(0.7)


def _expected_selection(ckpt: str, all_docs, shown: list[int]) -> dict:
    """Per shown document: (loss, selected) of the selective op (pure-torch kernels) on the
    logits of a plain forward of the model, with the sidecar's reference losses."""
    import torch

    from megatron_slm.checkpoint import load_checkpoint
    from megatron_slm.models import ModelBuildOptions, build_model, get_preset
    from megatron_slm.ops import selective_cross_entropy

    (model,) = build_model(get_preset("tiny"), ModelBuildOptions(transformer_impl="torch"))
    load_checkpoint(ckpt, [model], weights_only=True)
    model.eval()
    out = {}
    for d in shown:
        ids = torch.tensor(all_docs[d])
        x, y = ids[None, :-1], ids[None, 1:]
        ref = torch.from_numpy(ref_values(d, np.arange(ids.numel()))[1:])[None]
        with torch.no_grad():
            logits = model(x, torch.arange(x.shape[1])[None], None)  # [1, n, v]
            o = selective_cross_entropy(
                logits.transpose(0, 1).contiguous(), y.t(), ref_loss=ref.t(), ratio=RATIO,
                scope="sequence", mode="excess", unscored="keep", impl="torch",
            )  # fmt: skip
        out[d] = (o.loss[:, 0].numpy(), o.selected[:, 0].numpy())
    return out


def build_and_run(rank, world, root, shown):
    from megatron_slm import launch
    from tests.unit.data import write_sidecar, write_token_dataset

    launch.initialize(device="cpu", seed=5)
    all_docs = docs()
    prefix = write_token_dataset(os.path.join(root, "corpus"), all_docs, vocab_size=VOCAB)
    write_sidecar(prefix, ref_values)
    bare = write_token_dataset(os.path.join(root, "bare"), all_docs, vocab_size=VOCAB)
    models = os.path.join(root, "models")
    _save_models(models)
    ckpt1 = os.path.join(models, "iter_0000001")
    expected = _expected_selection(ckpt1, all_docs, shown)
    common = ("--load", ckpt1, "--ratio", RATIO)
    html, png = os.path.join(root, "report.html"), os.path.join(root, "report.png")
    runs = {
        "html": run_tool("visualize_selection", *common, "--data-path", prefix, "--docs",
                         ",".join(map(str, shown)), "--output", html),
        "png": run_tool("visualize_selection", *common, "--data-path", prefix, "--docs", "1",
                        "--format", "png", "--output", png),
        "bad_doc": run_tool("visualize_selection", *common, "--data-path", prefix, "--docs",
                            "0,99", "--output", os.path.join(root, "x.html")),
        "no_ref": run_tool("visualize_selection", *common, "--data-path", bare, "--sample", 2,
                           "--output", os.path.join(root, "y.html")),
        "dynamics": run_tool("token_dynamics", "--checkpoints",
                             *[os.path.join(models, f"iter_000000{i}") for i in (3, 1, 2)],
                             "--data-path", prefix, "--output", os.path.join(root, "dyn"),
                             "--width", 700, "--height", 300),
        "curve": run_tool("learning_curve", "--runs", f"a={models}", "--data", prefix,
                          "--seq-length", 32, "--output", os.path.join(root, "curve")),
    }  # fmt: skip
    return {"expected": expected, "runs": runs, "html": html, "png": png, "prefix": prefix,
            "models": models}  # fmt: skip
