"""Train a tokenizer on JSONL text (a compact vocabulary for small models).

    python tools/train_tokenizer.py --input data/*.jsonl --model-prefix out/tok --vocab-size 512

writes the sentencepiece model ``out/tok.model`` (and ``out/tok.vocab``);
``--tokenizer-type GPT2BPETokenizer`` writes a GPT-2 byte-level BPE instead:
``out/tok-vocab.json`` and ``out/tok-merges.txt``, the ``--vocab-file`` and ``--merge-file``;
``--tokenizer-type TikTokenizer`` writes Megatron-LM's tiktoken JSON vocabulary ``out/tok.json``
(``--vocab-size`` BPE tokens; the special ids come on top when it is loaded).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from megatron_slm.cli import arg
from megatron_slm.data.jsonl import iter_jsonl
from megatron_slm.data.preprocess import expand_inputs
from megatron_slm.data.tiktoken_tokenizer import train_tiktoken
from megatron_slm.data.tokenizer import train_gpt2_bpe, train_sentencepiece
from megatron_slm.entry import entry_point
from megatron_slm.errors import InputFileError

TRAINABLE = ("SentencePieceTokenizer", "GPT2BPETokenizer", "TikTokenizer")


@dataclass
class TrainTokenizerConfig:
    input: list[str] = arg([], "JSONL files or globs.", required=True)
    json_key: str = arg("text", "JSON key of the text.")
    tokenizer_type: str = arg(
        "SentencePieceTokenizer",
        "What to train: a sentencepiece model (also a Llama2Tokenizer's), GPT2BPETokenizer's "
        "two files or a TikTokenizer's JSON vocabulary.",
        choices=TRAINABLE,
    )
    model_prefix: str = arg(
        None,
        "Writes PREFIX.model and PREFIX.vocab (GPT2BPETokenizer: PREFIX-vocab.json and "
        "PREFIX-merges.txt; TikTokenizer: PREFIX.json).",
        required=True,
    )
    vocab_size: int = arg(None, "Number of pieces.", required=True)
    model_type: str = arg(
        "bpe", "Sentencepiece model type (SentencePieceTokenizer).", choices=["bpe", "unigram"]
    )
    max_docs: int | None = arg(None, "Train on the first N documents (default: all).")

    def __post_init__(self):
        if not self.input:
            raise ValueError("--input is required")
        if not self.model_prefix:
            raise ValueError("--model-prefix is required")
        if self.vocab_size is None or self.vocab_size < 1:
            raise ValueError(f"--vocab-size must be >= 1, got {self.vocab_size!r}")
        if self.tokenizer_type not in TRAINABLE:
            raise ValueError(
                f"--tokenizer-type must be one of {', '.join(TRAINABLE)}, "
                f"got {self.tokenizer_type!r}"
            )
        if self.model_type not in ("bpe", "unigram"):
            raise ValueError(f"--model-type must be bpe or unigram, got {self.model_type!r}")
        if self.max_docs is not None and self.max_docs < 0:
            raise ValueError(f"--max-docs must be >= 0, got {self.max_docs}")


PROG = "train_tokenizer"
GROUPS = {"tokenizer training": TrainTokenizerConfig}


def iter_texts(patterns, key, max_docs):
    n = 0
    for path in expand_inputs(patterns):
        for line_no, record in iter_jsonl(path):
            if key not in record:
                raise InputFileError(
                    f"line {line_no}: no {key!r} field", subject=path, hint="pass --json-key"
                )
            yield record[key]
            n += 1
            if max_docs and n >= max_docs:
                return


@entry_point(PROG, doc=__doc__, groups=GROUPS)
def main(cfg: TrainTokenizerConfig) -> int:
    texts = list(iter_texts(cfg.input, cfg.json_key, cfg.max_docs))  # bad input: nothing written
    if cfg.tokenizer_type == "GPT2BPETokenizer":
        paths = train_gpt2_bpe(texts, cfg.model_prefix, cfg.vocab_size)
    elif cfg.tokenizer_type == "TikTokenizer":
        paths = [train_tiktoken(texts, cfg.model_prefix + ".json", cfg.vocab_size)]
    else:
        paths = [train_sentencepiece(texts, cfg.model_prefix, cfg.vocab_size, cfg.model_type)]
    print(f"wrote {' and '.join(paths)} ({len(texts)} documents)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
