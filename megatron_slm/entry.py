"""The one runner of every entry point (``python -m megatron_slm.pretrain``, every ``tools/*.py``).

Usage (a tool is its config classes plus a ``main`` over the parsed configs)::

    from megatron_slm.entry import entry_point

    PROG = "my_tool"

    @entry_point(PROG, doc=__doc__, groups={"my tool": MyConfig})  # log_level=logging.INFO
    def main(cfg: MyConfig) -> int:     # several groups: main({title: config})
        launch.initialize(...)          # no try/finally: the runner shuts the group down
        do_the_work(cfg)                # raises UserError subclasses on bad input
        return 0

    @entry_point(PROG, doc=__doc__, default_command=None,
                 commands={"count": Command(CountConfig, "Count ids."), ...})
    def main(command: str, cfg) -> int: ...     # `my_tool count --flags of count only`

    if __name__ == "__main__":
        sys.exit(main())                # the decorated main takes argv (None: sys.argv[1:])

The runner owns parsing (:class:`megatron_slm.cli.ToolCommandLine`): ``main.parse(argv)``
returns what ``main`` would receive, ``main.command_line`` builds the parsers (``--help``, the
list of flags). An entry point declaring no configs (the trainer) gets ``argv`` itself.

What the runner does:

- Any :class:`megatron_slm.errors.UserError` (config, input file, checkpoint, tokenizer, and every
  project error type derived from it: ScoringError, SidecarError, ConversionError, ...) and any
  ``OSError`` that names a file (missing, exists, permission) becomes one line on stderr,
  ``PROG: error: <message>``, and exit status 2 (``main`` returns 2). argparse errors of parsers
  from :mod:`megatron_slm.cli` are reported the same way, under the parser's prog
  (``compact_tokenizer prune: error: ...``). Errors raised by a subcommand's ``main`` name the
  tool, or, with ``command_in_errors``, the command as typed (``prox_refine apply``).
- Only rank 0 prints (ranks from torchrun/SLURM environment variables); other ranks return 2
  quietly, so ``torchrun --nproc-per-node N`` shows the line once, with no ``[rankN]:`` copies.
  Validation is deterministic, so every rank fails the same way.
- Anything else is a bug: the traceback is kept. ``--debug`` (removed from argv before parsing)
  or ``MEGATRON_SLM_DEBUG=1`` re-raises user errors too, with their traceback.
- The process group (``megatron_slm.launch``) is shut down whenever ``main`` initialised it,
  on success and on failure; a group a caller (a test) set up stays up.

Library code never prints errors or calls ``sys.exit``: it raises, the runner reports.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable

from megatron_slm.cli import Command, ToolCommandLine, usage_errors_raise
from megatron_slm.errors import UsageError, UserError

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"  # one format for every tool's log lines
DEBUG_FLAG = "--debug"
DEBUG_ENV = "MEGATRON_SLM_DEBUG"

# OSErrors caused by a path the user gave; others (e.g. ENOSPC without a file) keep a traceback.
_FILE_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


# Seconds a rank that does not print a user error waits before exiting: torchrun terminated
# rank 0 before its line when another rank failed the same check first (a CI run saw none).
_SILENT_RANK_EXIT_DELAY = 3.0


def env_rank() -> int:
    """This process's global rank from the launcher's environment (same variables as
    :func:`megatron_slm.launch.process_info`; read here without importing torch)."""
    env = os.environ
    for var in ("RANK", "SLURM_PROCID"):
        if env.get(var, "").isdigit():
            return int(env[var])
    return 0


def _group_initialized() -> bool:
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def format_error(prog: str, exc: BaseException) -> str:
    """``PROG: error: <message>`` on one line."""
    if isinstance(exc, UsageError) and exc.prog:
        prog = exc.prog
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.filename is not None:
        message = f"{exc.filename}: {exc.strerror or exc}"
    else:
        message = str(exc)
    return f"{prog}: error: {' '.join(message.split())}"


def entry_point(
    prog: str,
    log_level: int = logging.WARNING,
    *,
    doc: str | None = None,
    groups: dict[str, type] | None = None,
    commands: dict[str, Command] | None = None,
    default_command: str | None = None,
    command_name: str = "command",
    command_in_errors: bool = False,
) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Make ``main`` an entry point: ``main(argv=None) -> int`` with the error policy above, log
    records of ``log_level`` and above on stderr in :data:`LOG_FORMAT` (unless the process
    configured logging already), and the command line parsed from the declared configs.

    ``doc`` is the ``--help`` description. ``groups`` (``{title: config class}``): ``main(cfg)``
    gets the config, or ``{title: config}`` for several groups. ``commands`` (``{word:
    Command}``): ``main(word, cfg)``, the same rule per command; ``default_command`` runs when
    the word is left out; ``command_name`` names the word in messages (``give the direction``).
    Neither: ``main(argv)`` parses itself (the trainer)."""
    command_line = None
    if groups is not None or commands is not None:
        command_line = ToolCommandLine(
            prog, doc, groups=groups, commands=commands, default_command=default_command,
            command_name=command_name,
        )  # fmt: skip

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
            argv = [a for a in argv if a != DEBUG_FLAG]
            owns_group = not _group_initialized()  # a caller's group (tests) stays up
            logging.basicConfig(level=log_level, format=LOG_FORMAT, stream=sys.stderr)
            name = prog  # what the error line calls the program
            try:
                with usage_errors_raise():
                    if command_line is None:
                        return main(argv)
                    if commands is None:
                        return main(command_line.parse(argv))
                    command, cfg = command_line.parse(argv)
                    if command_in_errors and argv[:1] == [command]:
                        name = f"{prog} {command}"
                    return main(command, cfg)
            except (UserError, *_FILE_ERRORS) as exc:
                if debug:
                    raise
                if env_rank() == 0:
                    print(format_error(name, exc), file=sys.stderr, flush=True)
                else:  # the launcher stops every rank at the first exit: let rank 0 print first
                    time.sleep(_SILENT_RANK_EXIT_DELAY)
                return 2
            finally:
                if owns_group and _group_initialized():
                    from megatron_slm import launch

                    launch.shutdown()

        if command_line is not None:
            run.parse = command_line.parse
            run.command_line = command_line
        return run

    return decorate
