"""Hugging Face directories whose tokenizer or model is Python code of their own (an
``auto_map``): run only with ``--trust-remote-code`` (Megatron-LM's flag, transformers'
``trust_remote_code``), which every job reading such a directory takes; without it one line names
the flag and directory, and the code is never imported. Standard library and transformers only:
the ProX tools import it without megatron-core."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_slm.cli import arg
from megatron_slm.errors import TokenizerError


@dataclass
class RemoteCodeArgs:
    """``--trust-remote-code``, of every job that reads a Hugging Face tokenizer or model."""

    trust_remote_code: bool = arg(
        False,
        "Run the Python code a Hugging Face tokenizer or model directory ships "
        "(tokenization_*.py, modeling_*.py named by its auto_map; Megatron-LM's flag, "
        "transformers' trust_remote_code). Without it such a directory is refused in one line.",
    )


def needs_trust(error: Exception, trust_remote_code: bool) -> bool:
    """Whether transformers refused ``error`` for code it was not allowed to run."""
    return not trust_remote_code and "trust_remote_code" in str(error)


def refusal(what: str) -> str:
    """The line's text after the flag and directory: ``what`` is ``tokenizer`` or ``model``."""
    return (
        f"its {what} is Python code the directory ships (its auto_map): give "
        "--trust-remote-code to run it"
    )


def load_auto_tokenizer(path: str, trust_remote_code: bool, subject: str):
    """transformers' ``AutoTokenizer`` of the local directory ``path`` (no network); a tokenizer
    of code refused without ``trust_remote_code``, and files transformers cannot load, are one
    :class:`TokenizerError` about ``subject`` (the flag and path)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as e:  # noqa: BLE001 - no/garbled files, or a tokenizer's code failing
        if needs_trust(e, trust_remote_code):
            raise TokenizerError(refusal("tokenizer"), subject=subject) from None
        reason = " ".join(str(e).split())[:300]
        raise TokenizerError(
            f"cannot load a Hugging Face tokenizer ({type(e).__name__}: {reason})",
            subject=subject,
        ) from None
