"""Worker of tests/functional/test_load_plan.py (a spawned process): a tiny random Llama saved as a
Hugging Face directory, its conversion to a megatron_slm checkpoint (the converter, tested against
transformers in test_hf_interop.py), and every loading tool's ``main`` run in this process on both,
counting the reads of a model's description (``megatron_slm.json`` / HF ``config.json``)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from tests.functional import hf_worker
from tests.functional.visualize_worker import run_tool

VOCAB = 300  # hf_worker.make_tokenizer's byte-level BPE
SMALL = {"byte_fallback": False}  # a vocabulary below the 256 byte pieces
DOCS = ["the quick brown fox jumps over the lazy dog", "red green blue", "a tiny model learns"]


class ReadCounter:
    """Counts calls of the one metadata reader of each kind (patched module attributes: every
    reader looks them up at call time)."""

    def __init__(self):
        from megatron_slm import checkpoint
        from megatron_slm.runtime import hf_source

        self.counts = {"megatron": 0, "hf": 0}
        self._wrap(checkpoint, "read_metadata", "megatron")
        self._wrap(hf_source, "read_hf_config", "hf")

    def _wrap(self, module, name, key):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            self.counts[key] += 1
            return original(*args, **kwargs)

        setattr(module, name, wrapper)

    def run(self, tool: str, *argv) -> dict:
        """The tool's exit status, output and reads."""
        self.counts.update(megatron=0, hf=0)
        rc, out, err = run_tool(tool, *argv)
        return {"rc": rc, "out": out, "err": err, "reads": dict(self.counts)}


def _full_state(load: str) -> dict:
    from megatron_slm import launch
    from megatron_slm.models.sharding import full_state_dict
    from megatron_slm.runtime import LoadArgs, load_model, plan_load

    device = launch.initialize(device="cpu")
    lm = load_model(plan_load(LoadArgs(load=load), tokenizer="none"), device)
    return {k: v.clone() for k, v in full_state_dict(lm.chunks[0]).items()}


def _idmap(root: str, tok_dir: str) -> str:
    """An id map from the 300-id BPE to a small SentencePiece model (new id n = old id n)."""
    from megatron_slm.checkpoint import tokenizer_record
    from megatron_slm.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
    from megatron_slm.tinylm.idmap import IdMap, write_idmap

    sp = train_sentencepiece(hf_worker.CORPUS * 4, os.path.join(root, "small"), 64, **SMALL)
    tok = SentencePieceTokenizer(sp)
    old = {"type": "HuggingFaceTokenizer", "model": tok_dir, "vocab_size": VOCAB}
    new = tokenizer_record("SentencePieceTokenizer", sp, tok)
    path = os.path.join(root, "small.idmap.json")
    write_idmap(IdMap(list(range(tok.vocab_size)), old, new, path), path)
    return path


def sp_checkpoint(root: str) -> dict:
    """A random tiny model recording a SentencePiece tokenizer with its sha256 (the kind of
    checkpoint a training run writes), and a second SentencePiece model of other text."""
    from megatron_slm.checkpoint import save_checkpoint, tokenizer_record
    from megatron_slm.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
    from megatron_slm.models import ModelBuildOptions, build_model, get_preset

    sp = train_sentencepiece(hf_worker.CORPUS * 4, os.path.join(root, "sp"), 96, **SMALL)
    other = train_sentencepiece(DOCS * 20, os.path.join(root, "other"), 40, **SMALL)
    tok = SentencePieceTokenizer(sp)
    arch = get_preset("tiny").replace(vocab_size=tok.vocab_size)
    chunks = build_model(arch, ModelBuildOptions(transformer_impl="torch"))
    meta = {"tokenizer": tokenizer_record("SentencePieceTokenizer", sp, tok)}
    save_checkpoint(os.path.join(root, "sp_ckpt"), 1, chunks, model_config=arch, metadata=meta)
    return {"sp_ckpt": os.path.join(root, "sp_ckpt"), "sp": sp, "other": other}


def build_and_run(rank, world, root):
    from megatron_slm import launch
    from megatron_slm.convert import convert_hf_to_megatron
    from tests.unit.data import write_token_dataset

    launch.initialize(device="cpu", seed=3)
    tok_dir = hf_worker.make_tokenizer(os.path.join(root, "tokenizer"), VOCAB)
    hf = os.path.join(root, "hf")
    hf_worker.make_hf_model(hf, "llama", VOCAB, seed=1)
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), hf)
    ckpt = os.path.join(root, "ckpt")
    convert_hf_to_megatron(hf, ckpt)
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(0, VOCAB, size=n)) for n in (9, 40, 3, 70)]
    bare = write_token_dataset(os.path.join(root, "bare"), docs, vocab_size=VOCAB)  # no sidecar
    jsonl = os.path.join(root, "docs.jsonl")
    with open(jsonl, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in DOCS)

    counter = ReadCounter()
    out: dict = {"ckpt": ckpt, "hf": hf, "docs": jsonl, **sp_checkpoint(root)}
    for kind, load in (("ckpt", ckpt), ("hf", hf)):
        run = {}
        prefix = write_token_dataset(os.path.join(root, f"corpus_{kind}"), docs, vocab_size=VOCAB)
        run["score"] = counter.run(
            "score_corpus", "--data-prefix", prefix, "--load", load, "--device", "cpu",
            "--seq-length", 16, "--dtype", "float32", "--commit-interval", 2,
        )  # fmt: skip
        from megatron_slm.data import SidecarReader

        reader = SidecarReader(prefix)
        run["sidecar"] = [reader.get(d) for d in range(len(docs))]
        report = os.path.join(root, f"eval_{kind}.json")
        run["evaluate"] = counter.run(
            "evaluate", "--load", load, "--perplexity-data", jsonl, "--seq-length", 8,
            "--device", "cpu", "--output", report,
        )  # fmt: skip
        with open(report) as f:
            run["report"] = json.load(f)["perplexity"]
        html = os.path.join(root, f"selection_{kind}.html")
        run["visualize"] = counter.run(
            "visualize_selection", "--load", load, "--data-path", bare, "--docs", "1,3",
            "--select-mode", "loss", "--title", "t", "--output", html,
        )  # fmt: skip
        with open(html, encoding="utf-8") as f:
            run["html"] = f.read()
        small = os.path.join(root, f"inherited_{kind}")
        run["inherit"] = counter.run(
            "inherit_parameters", "--load", load, "--save", small, "--num-layers", 1,
            "--layers", "ends:1,0", "--width-importance", "magnitude", "--device", "cpu",
        )  # fmt: skip
        run["inherited"] = _full_state(small)
        out[kind] = run
    out["export"] = counter.run(
        "convert_checkpoint", "megatron-to-hf", "--load", ckpt, "--save", os.path.join(root, "x")
    )
    out["remap"] = counter.run(
        "compact_tokenizer", "remap-checkpoint", "--load", ckpt, "--id-map",
        _idmap(root, tok_dir), "--save", os.path.join(root, "remapped"), "--device", "cpu",
    )  # fmt: skip
    return out
