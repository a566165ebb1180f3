"""The one runner of every entry point (``python -m megatron_slm.pretrain``, every ``tools/*.py``).

Usage (the whole error policy of a tool)::

    from megatron_slm.entry import entry_point

    PROG = "my_tool"

    @entry_point(PROG)                  # log_level=logging.INFO for tools that report as they go
    def main(argv=None) -> int:
        cfg = parse_configs(build_parser(PROG, __doc__, GROUPS), GROUPS, argv)["my tool"]
        launch.initialize(...)          # no try/finally: the runner shuts the group down
        do_the_work(cfg)                # raises UserError subclasses on bad input
        return 0

    if __name__ == "__main__":
        sys.exit(main())

What the runner does:

- Any :class:`megatron_slm.errors.UserError` (config, input file, checkpoint, tokenizer, and every
  project error type derived from it: ScoringError, SidecarError, ConversionError, ...) and any
  ``OSError`` that names a file (missing, exists, permission) becomes one line on stderr,
  ``PROG: error: <message>``, and exit status 2 (``main`` returns 2). argparse errors of parsers
  from :func:`megatron_slm.cli.build_parser` are reported the same way.
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
from collections.abc import Callable

from megatron_slm.errors import UsageError, UserError

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"  # one format for every tool's log lines
DEBUG_FLAG = "--debug"
DEBUG_ENV = "MEGATRON_SLM_DEBUG"

# Set while a runner is active: cli's parsers then raise UsageError instead of printing.
_active = 0

# OSErrors caused by a path the user gave; others (e.g. ENOSPC without a file) keep a traceback.
_FILE_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def runner_active() -> bool:
    return _active > 0


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
    prog: str, log_level: int = logging.WARNING
) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate an entry point's ``main(argv=None) -> int`` with the error policy above, and
    send log records of ``log_level`` and above to stderr in :data:`LOG_FORMAT` (unless the
    process configured logging already)."""

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            global _active
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
            argv = [a for a in argv if a != DEBUG_FLAG]
            owns_group = not _group_initialized()  # a caller's group (tests) stays up
            logging.basicConfig(level=log_level, format=LOG_FORMAT, stream=sys.stderr)
            _active += 1
            try:
                return main(argv)
            except (UserError, *_FILE_ERRORS) as exc:
                if debug:
                    raise
                if env_rank() == 0:
                    print(format_error(prog, exc), file=sys.stderr, flush=True)
                return 2
            finally:
                _active -= 1
                if owns_group and _group_initialized():
                    from megatron_slm import launch

                    launch.shutdown()

        return run

    return decorate
