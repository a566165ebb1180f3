"""The project's user-facing error types: bad input the user can fix.

Every error a user can cause (a flag, a configuration, an input file, a checkpoint, a tokenizer,
a learning rate the run diverges with) is a :class:`UserError`. Entry points run under
:func:`megatron_slm.entry.entry_point`, which turns any ``UserError`` into one line
``PROG: error: <flag or file>: <what is wrong> (<what to do>)`` and exit status 2; anything else
is a bug and keeps its traceback. A module that adds its own error type derives it from one of
these classes, so no entry point needs a new ``except`` list.

``UserError`` derives from ``ValueError``: callers (and tests) that catch ``ValueError`` keep
working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DivergenceError",
    "InputFileError",
    "TokenizerError",
    "UsageError",
    "UserError",
]


class UserError(ValueError):
    """Bad input the user can fix. ``subject`` (the flag or file) and ``hint`` (what to do) are
    optional: ``UserError("truncated", subject="a.bin", hint="copy it again")`` reads
    ``a.bin: truncated (copy it again)``."""

    def __init__(self, message: str, *, subject: str | None = None, hint: str | None = None):
        text = f"{subject}: {message}" if subject else str(message)
        if hint:
            text = f"{text} ({hint})"
        super().__init__(text)
        self.subject, self.hint = subject, hint


class UsageError(UserError):
    """A command-line error found by argparse (unknown flag, missing value, bad choice);
    ``prog`` is the parser's program name (``compact_tokenizer count``)."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


class ConfigError(UserError):
    """A flag or configuration value that is invalid or contradicts another."""


class DivergenceError(UserError):
    """Training cannot go on as configured: a step's gradient norm was not finite (a learning
    rate too high, bad data), or the data-parallel replicas' weights differ. The message says
    what to change and which checkpoint to resume."""


class InputFileError(UserError):
    """An input file that is missing, unreadable, truncated or does not match its companions."""


class CheckpointError(UserError):
    """A checkpoint directory that is missing, incomplete or contradicts the flags."""


class TokenizerError(UserError):
    """A tokenizer model that cannot be loaded or does not match the data/checkpoint."""
