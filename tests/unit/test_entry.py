"""The entry-point runner: user errors become one line and exit status 2 on rank 0 only, bugs keep
their traceback, ``--debug`` re-raises, argparse errors of ``cli`` parsers go the same way, and a
process group the entry point started is shut down on failure."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch.distributed as dist

from megatron_slm.cli import arg, build_parser, parse_configs
from megatron_slm.entry import entry_point
from megatron_slm.errors import ConfigError, InputFileError, UserError
from megatron_slm.scoring import ScoringError


@dataclass
class _Cfg:
    steps: int = arg(1, "Steps.")

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")


def _tool(raise_what=None):
    @entry_point("my_tool")
    def main(argv=None) -> int:
        parse_configs(build_parser("my_tool", None, {"g": _Cfg}), {"g": _Cfg}, argv)
        if raise_what is not None:
            raise raise_what
        return 0

    return main


def _err_lines(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def test_user_error_is_one_line_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    exc = InputFileError("is truncated at byte 10, expected 20", subject="a.bin", hint="copy again")
    assert _tool(exc)([]) == 2
    assert _err_lines(capsys) == [
        "my_tool: error: a.bin: is truncated at byte 10, expected 20 (copy again)"
    ]
    # A project error type of its own derives from UserError: no new except list needed.
    assert issubclass(ScoringError, UserError) and issubclass(UserError, ValueError)
    assert _tool(ScoringError("--load x: no such checkpoint directory"))([]) == 2
    assert _err_lines(capsys) == ["my_tool: error: --load x: no such checkpoint directory"]
    assert _tool(FileNotFoundError(2, "No such file or directory", "x.json"))([]) == 2
    assert _err_lines(capsys) == ["my_tool: error: x.json: No such file or directory"]


def test_argparse_and_config_errors_go_through_the_runner(capsys):
    assert _tool()(["--steps", "two"]) == 2
    (line,) = _err_lines(capsys)
    assert line.startswith("my_tool: error: argument --steps: invalid int value")
    assert _tool()(["--steps", "0"]) == 2
    assert _err_lines(capsys) == ["my_tool: error: --steps must be >= 1, got 0"]
    assert _tool()(["--nope"]) == 2
    assert _err_lines(capsys) == ["my_tool: error: unrecognized arguments: --nope"]
    with pytest.raises(SystemExit) as e:  # --help still exits 0
        _tool()(["--help"])
    assert e.value.code == 0


def test_other_ranks_are_quiet(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert _tool(ConfigError("--x: bad"))([]) == 2
    assert _tool()(["--nope"]) == 2
    assert _err_lines(capsys) == []


def test_bugs_and_debug_keep_the_traceback(monkeypatch):
    with pytest.raises(KeyError):
        _tool(KeyError("bug"))([])
    with pytest.raises(ConfigError):
        _tool(ConfigError("--x: bad"))(["--debug"])
    monkeypatch.setenv("MEGATRON_SLM_DEBUG", "1")
    with pytest.raises(ConfigError):
        _tool(ConfigError("--x: bad"))([])


def test_process_group_is_shut_down_on_failure(capsys):
    assert not dist.is_initialized()

    @entry_point("grouped")
    def main(argv=None) -> int:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        raise ConfigError("--x: bad")

    assert main([]) == 2
    assert not dist.is_initialized()
    assert _err_lines(capsys) == ["grouped: error: --x: bad"]


def test_every_entry_point_uses_the_runner():
    """A tool without the runner would print tracebacks for bad input: every tools/*.py and
    megatron_slm/pretrain.py wrap their main with entry_point(...)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    scripts = sorted(root.glob("tools/*.py")) + [root / "megatron_slm" / "pretrain.py"]
    assert len(scripts) > 5
    missing = []
    for path in scripts:
        tree = ast.parse(path.read_text())
        calls = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "entry_point"
        ]
        if not calls:
            missing.append(path.name)
    assert missing == []
