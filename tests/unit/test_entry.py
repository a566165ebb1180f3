"""The entry-point runner: user errors become one line and exit status 2 on rank 0 only, bugs keep
their traceback, ``--debug`` re-raises, argparse errors of ``cli`` parsers go the same way, and a
process group the entry point started is shut down on failure. The runner owns parsing: a tool
declares config groups or subcommands and its ``main`` gets the configs; every ``tools/*.py`` does
so (read with ``ast``) and builds its ``--help``."""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import sys
from dataclasses import dataclass

import pytest
import torch.distributed as dist

from megatron_slm.cli import Command, arg, check_at_least
from megatron_slm.entry import entry_point
from megatron_slm.errors import ConfigError, InputFileError, UserError
from megatron_slm.scoring import ScoringError


@dataclass
class _Cfg:
    steps: int = arg(1, "Steps.")

    def __post_init__(self):
        check_at_least(self, "steps")


def _tool(raise_what=None):
    @entry_point("my_tool", groups={"g": _Cfg})
    def main(cfg: _Cfg) -> int:
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
    assert _err_lines(capsys) == ["my_tool: error: --steps must be >= 1"]
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


@dataclass
class _Other:
    name: str = arg("x", "A name.")


@dataclass
class _Count:
    workers: int = arg(1, "Worker processes.")

    def __post_init__(self):
        check_at_least(self, "workers")


@dataclass
class _Prune:
    vocab_size: int = arg(None, "Pieces to keep.", required=True)


def _recording(received: list, **declared):
    """An entry point over ``main(*configs)`` that records what it received."""

    @entry_point("t", **declared)
    def main(*configs) -> int:
        received.append(configs)
        return 0

    return main


def test_groups_tool_gets_its_config_and_parse_returns_it():
    got = []
    one = _recording(got, groups={"g": _Cfg})
    assert one(["--steps", "3"]) == 0 and one([]) == 0
    assert got == [(_Cfg(steps=3),), (_Cfg(steps=1),)]
    assert one.parse(["--steps", "3"]) == _Cfg(steps=3)
    got.clear()
    two = _recording(got, groups={"g": _Cfg, "other": _Other})
    assert two(["--name", "y", "--steps", "2"]) == 0
    assert got == [({"g": _Cfg(steps=2), "other": _Other(name="y")},)]
    assert two.parse(["--name", "y", "--steps", "2"]) == got[0][0]


COMMANDS = {
    "count": Command(_Count, "Count."),
    "prune": Command({"pruning": _Prune, "other": _Other}, "Prune."),
}


def test_commands_dispatch_by_word_with_only_their_own_flags(capsys):
    got = []
    main = _recording(got, commands=COMMANDS)
    assert main(["count", "--workers", "2"]) == 0
    assert main(["prune", "--vocab-size", "7", "--name", "n"]) == 0
    assert got == [
        ("count", _Count(workers=2)),
        ("prune", {"pruning": _Prune(vocab_size=7), "other": _Other(name="n")}),
    ]
    assert main.parse(["count", "--workers", "2"]) == got[0]
    assert main.parse(["prune", "--vocab-size", "7", "--name", "n"]) == got[1]
    # The other command's flag, a bad value, no word, a wrong word: one line naming the parser.
    for argv, line in (
        (["prune", "--vocab-size", "7", "--workers", "2"],
         "t prune: error: unrecognized arguments: --workers 2"),
        (["count", "--vocab-size", "7"], "t count: error: unrecognized arguments: --vocab-size 7"),
        (["count", "--workers", "0"], "t count: error: --workers must be >= 1"),
        (["count", "--workers", "two"],
         "t count: error: argument --workers: invalid int value: 'two'"),
        (["prune"], "t prune: error: the following arguments are required: --vocab-size"),
        (["--workers", "2"], "t: error: give the command first: count or prune"),
        ([], "t: error: give the command first: count or prune"),
        (["cuont"], "t: error: unknown command 'cuont' (choose count or prune)"),
    ):  # fmt: skip
        assert main(argv) == 2, argv
        assert _err_lines(capsys) == [line]
    assert len(got) == 2  # main never ran on bad input


def test_command_help_lists_commands_then_their_flags(capsys):
    main = _recording([], commands=COMMANDS, doc="The tool.", command_name="direction")
    for argv in (["--help"], ["count", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    tool_help, count_help = capsys.readouterr().out.split("usage: ")[1:]
    assert "The tool." in tool_help and "DIRECTION" in tool_help
    assert "Count." in tool_help and "Prune." in tool_help and "--workers" not in tool_help
    assert count_help.startswith("t count ") and "--workers" in count_help
    assert "--vocab-size" not in count_help
    assert main([]) == 2
    assert _err_lines(capsys) == ["t: error: give the direction first: count or prune"]


def test_default_command_needs_no_word_and_errors_name_what_was_typed(capsys):
    got = []

    @entry_point("t", commands=COMMANDS, default_command="count", command_in_errors=True)
    def main(command, cfg) -> int:
        got.append((command, cfg))
        if command == "prune":
            raise InputFileError("bad", subject="p.json")
        if cfg.workers == 9:
            raise ConfigError("--workers 9: too many")
        return 0

    assert main(["--workers", "3"]) == 0 and main([]) == 0 and main(["count"]) == 0
    assert got == [("count", _Count(3)), ("count", _Count(1)), ("count", _Count(1))]
    assert main.parse(["--workers", "3"]) == got[0]
    assert main(["prune", "--vocab-size", "5"]) == 2
    assert _err_lines(capsys) == ["t prune: error: p.json: bad"]
    assert main(["--workers", "9"]) == 2  # the word left out: the error names the tool
    assert _err_lines(capsys) == ["t: error: --workers 9: too many"]
    assert main(["count", "--workers", "9"]) == 2
    assert _err_lines(capsys) == ["t count: error: --workers 9: too many"]
    assert main(["--vocab-size", "5"]) == 2  # prune's flag without its word
    assert _err_lines(capsys) == ["t count: error: unrecognized arguments: --vocab-size 5"]
    with pytest.raises(TypeError, match="default command 'nope'"):
        entry_point("t", commands=COMMANDS, default_command="nope")
    with pytest.raises(TypeError, match="not both"):
        entry_point("t", commands=COMMANDS, groups={"g": _Cfg})


# ---------------------------------------------------------------------------------------------
# every tool: configs declared, parsing left to the runner
# ---------------------------------------------------------------------------------------------
ROOT = pathlib.Path(__file__).resolve().parents[2]
TOOLS = sorted(ROOT.glob("tools/*.py"))
PARSING = {"build_parser", "parse_configs", "ArgumentParser", "add_subparsers", "parse_args"}


def tool_violations(source: str) -> list[str]:
    """What makes a tool parse by itself: a call of a parser builder, a ``main`` taking ``argv``,
    an ``entry_point`` declaring no configs."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in PARSING:
                bad.append(f"line {node.lineno}: calls {name}")
            keywords = {k.arg for k in node.keywords}
            if name == "entry_point" and not keywords & {"groups", "commands"}:
                bad.append(f"line {node.lineno}: entry_point without groups= or commands=")
        elif isinstance(node, ast.FunctionDef) and node.name == "main":
            if "argv" in [a.arg for a in node.args.args + node.args.kwonlyargs]:
                bad.append(f"line {node.lineno}: main takes argv")
    return sorted(bad)


BAD_TOOL = """
from megatron_slm.cli import build_parser, parse_configs
from megatron_slm.entry import entry_point

@entry_point("bad")
def main(argv=None) -> int:
    parser = build_parser("bad", None, GROUPS)
    return run(parse_configs(parser, GROUPS, argv)["g"], parser.add_subparsers())
"""


def test_no_tool_parses_by_itself():
    assert tool_violations(BAD_TOOL) == [
        "line 5: entry_point without groups= or commands=",
        "line 6: main takes argv",
        "line 7: calls build_parser",
        "line 8: calls add_subparsers",
        "line 8: calls parse_configs",
    ]
    assert {"score_corpus.py", "prox_refine.py"} <= {p.name for p in TOOLS}  # the glob sees them
    found = {p.name: tool_violations(p.read_text()) for p in TOOLS}
    assert {name: bad for name, bad in found.items() if bad} == {}


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: p.stem)
def test_every_tool_builds_its_help(path, monkeypatch):
    """Each tool's --help (and each subcommand's) builds from its configs, described by the
    module docstring."""
    spec = importlib.util.spec_from_file_location(f"_tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    command_line = module.main.command_line
    assert command_line.prog == module.PROG == path.stem
    top = command_line.parser().format_help()
    assert module.__doc__.splitlines()[0] in top
    for word in command_line.commands or ():
        assert word in top
        flags = command_line.command_parser(word).format_help()
        assert flags.startswith(f"usage: {path.stem} {word} ") and "--" in flags
