"""Hugging Face directories that are Python code of their own (``auto_map`` entries), as some
models' are, for the tests of ``--trust-remote-code``: a tokenizer of one id per letter (its
alphabet in a second module imported relatively, as transformers lets such code do), and a tiny
Llama and its tokenizer under classes of their own."""

from __future__ import annotations

import json
import os

# What a job says, after the flag and directory, when such a tokenizer comes without the flag.
REFUSED = (
    "its tokenizer is Python code the directory ships (its auto_map): give --trust-remote-code "
    "to run it"
)
ALPHABET = "abcdefghijklmnopqrstuvwxyz "
CODE = {
    "letters_alphabet.py": f"LETTERS = {ALPHABET!r}\n",
    "tokenization_letters.py": """
from transformers import PreTrainedTokenizer

from .letters_alphabet import LETTERS


class LettersTokenizer(PreTrainedTokenizer):
    model_input_names = ["input_ids"]

    def __init__(self, **kwargs):
        self._vocab = {"<unk>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(LETTERS)}}
        self._ids = {i: t for t, i in self._vocab.items()}
        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("eos_token", "</s>")
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return len(self._vocab)

    def get_vocab(self):
        return dict(self._vocab)

    def _tokenize(self, text):
        return list(text)

    def _convert_token_to_id(self, token):
        return self._vocab.get(token, 0)

    def _convert_id_to_token(self, index):
        return self._ids.get(index, "<unk>")

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        return ()
""",
}
EOS_ID = 1
VOCAB_SIZE = len(ALPHABET) + 2


def letters_ids(text: str) -> list[int]:
    """The ids the tokenizer's code gives ``text`` (no special tokens)."""
    return [ALPHABET.index(c) + 2 for c in text]


def write_letters_tokenizer(path) -> None:
    """The tokenizer's files in directory ``path`` (made if missing; other files stay)."""
    os.makedirs(path, exist_ok=True)
    for name, code in CODE.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(code)
    auto_map = {"AutoTokenizer": ["tokenization_letters.LettersTokenizer", None]}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"auto_map": auto_map, "tokenizer_class": "LettersTokenizer",
                   "eos_token": "</s>"}, f)  # fmt: skip


# A model whose architecture and tokenizer are code its directory ships: Llama's, under a model
# type transformers does not know (so it cannot fall back to its own classes).
MODEL_CODE = {
    "configuration_remote.py": """
from transformers import LlamaConfig


class RemoteLlamaConfig(LlamaConfig):
    model_type = "remote_llama"
""",
    "modeling_remote.py": """
from transformers import LlamaForCausalLM

from .configuration_remote import RemoteLlamaConfig


class RemoteLlamaForCausalLM(LlamaForCausalLM):
    config_class = RemoteLlamaConfig
""",
    "tokenization_remote.py": """
from transformers import PreTrainedTokenizerFast


class RemoteTokenizerFast(PreTrainedTokenizerFast):
    pass
""",
}


def as_remote_code(model_dir, out_dir) -> None:
    """Copy the Llama directory ``model_dir`` (weights, a fast tokenizer) to ``out_dir`` as the
    same model and tokenizer in code of its own (``auto_map``)."""
    import shutil

    shutil.copytree(model_dir, out_dir)
    for name, code in MODEL_CODE.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(code)
    model_map = {"AutoConfig": "configuration_remote.RemoteLlamaConfig",
                 "AutoModelForCausalLM": "modeling_remote.RemoteLlamaForCausalLM"}  # fmt: skip
    tokenizer_map = {"AutoTokenizer": [None, "tokenization_remote.RemoteTokenizerFast"]}
    edits = {
        "config.json": {"model_type": "remote_llama", "architectures": ["RemoteLlamaForCausalLM"],
                        "auto_map": model_map},
        "tokenizer_config.json": {"tokenizer_class": "RemoteTokenizerFast",
                                  "auto_map": tokenizer_map},
    }  # fmt: skip
    for name, changes in edits.items():
        path = os.path.join(out_dir, name)
        with open(path) as f:
            config = json.load(f)
        config.update(changes)
        with open(path, "w") as f:
            json.dump(config, f)
