"""The one command-line generator: typed config dataclasses -> ``argparse`` flags.

Every entry point (the trainer and every tool) declares its settings as dataclasses whose fields are
made with :func:`arg`; each field becomes one ``--field-name`` flag whose help text is the field's
``help`` and whose shown default is the field's real default. Validation stays in the dataclasses'
``__post_init__`` (messages name the flag), so a config built in Python is checked exactly like one
parsed from the command line.

    @dataclass
    class MyConfig:
        input: str = arg(None, "JSONL file to read.", required=True)
        workers: int = arg(1, "Worker processes.")

    parser = build_parser("tools/my_tool.py", __doc__, {"my tool": MyConfig})
    cfg = parse_configs(parser, {"my tool": MyConfig}, argv)["my tool"]

A tool never builds a parser itself: it declares its configs to
:func:`megatron_slm.entry.entry_point`, which parses through :class:`ToolCommandLine` (config
groups on one parser, or subcommands built from :class:`Command`, each with only its own flags).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import types
from dataclasses import field
from typing import Any, Union, get_args, get_origin, get_type_hints

from megatron_slm.errors import ConfigError, UsageError


def arg(default: Any, help: str, **argparse_kwargs) -> Any:
    """A dataclass field that is also a CLI flag; extra keyword arguments go to ``add_argument``
    (``nargs``, ``choices``, ``required``, ``metavar``, ``type``), except ``aliases``: more
    option strings for the same flag (an older or shorter name that keeps working)."""
    meta = {"help": help, "argparse": argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(field_name: str) -> str:
    """``tensor_model_parallel_size`` -> ``--tensor-model-parallel-size``."""
    return "--" + field_name.replace("_", "-")


def check_at_least(cfg, *names: str, minimum: int = 1, error: type[Exception] = ConfigError,
                   optional: bool = False) -> None:  # fmt: skip
    """Each named field of dataclass ``cfg`` is >= ``minimum``, else ``error`` naming its flag;
    ``optional``: an unset (None) field passes."""
    for name in names:
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        if value is None or value < minimum:
            raise error(f"{flag_name(name)} must be >= {minimum}")


def check_choices(cfg, *names: str, error: type[Exception] = ConfigError) -> None:
    """Each named field of dataclass ``cfg`` holds one of the ``choices`` its ``arg`` declares,
    else ``error`` naming its flag: a config built in Python is checked like a parsed one."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for name in names:
        allowed = tuple(fields[name].metadata["argparse"]["choices"])
        value = getattr(cfg, name)
        if value not in allowed:
            raise error(f"{flag_name(name)} must be one of {allowed}, got {value!r}")


def _base_type(hint):
    """``int | None`` -> int, ``list[str]`` -> str, ``bool`` -> bool."""
    origin = get_origin(hint)
    if origin is list:
        return get_args(hint)[0]
    if origin is Union or origin is types.UnionType:
        return next(a for a in get_args(hint) if a is not type(None))
    return hint


def add_config_arguments(group, cls) -> None:
    """Add one flag per field of dataclass ``cls`` to a parser or argument group."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue  # not a flag (derived or internal field)
        kwargs = dict(f.metadata.get("argparse", {}))
        names = (flag_name(f.name), *kwargs.pop("aliases", ()))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        base = _base_type(hints[f.name])
        help_text = f.metadata["help"]
        if base is bool and "action" not in kwargs:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            kwargs.setdefault("type", base)
            if get_origin(hints[f.name]) is list:
                kwargs.setdefault("nargs", "+")
            if not kwargs.get("required") and default not in (None, []):
                help_text = f"{help_text} (default: {default})"
        group.add_argument(*names, dest=f.name, default=default, help=help_text, **kwargs)


# Entry points running now: their parsers' errors raise UsageError. A counter here, not a
# question to entry.py, because entry.py imports this module (the layering test wants no cycle).
_runners = 0


@contextlib.contextmanager
def usage_errors_raise():
    """While an entry point runs (:func:`megatron_slm.entry.entry_point`), parser errors raise
    :class:`UsageError` for the runner to print as one line."""
    global _runners
    _runners += 1
    try:
        yield
    finally:
        _runners -= 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors, under :func:`megatron_slm.entry.entry_point`, raise
    :class:`UsageError` (the runner prints one line on rank 0); elsewhere argparse's own
    usage + error + exit 2. Sub-parsers (``add_subparsers``) are of this class too."""

    def error(self, message: str):
        if _runners > 0:
            raise UsageError(message, prog=self.prog)
        super().error(message)


def build_parser(prog: str, description: str | None, groups: dict[str, type]):
    """A parser with one argument group per config class."""
    parser = ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for title, cls in groups.items():
        add_config_arguments(parser.add_argument_group(title), cls)
    return parser


def config_from_namespace(cls, ns):
    """Build (and so validate) dataclass ``cls`` from a parsed namespace or dict."""
    values = ns if isinstance(ns, dict) else vars(ns)
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def parse_configs(parser, groups: dict[str, type], argv=None) -> dict[str, Any]:
    """Parse ``argv`` and build every group's config; a config error exits like a flag error
    (``prog: error: message``, exit status 2)."""
    ns = parser.parse_args(argv)
    try:
        return {name: config_from_namespace(cls, ns) for name, cls in groups.items()}
    except ValueError as e:
        parser.error(str(e))


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand of a tool (``compact_tokenizer prune``): its config class (or several,
    ``{group title: class}``) and the line the tool's ``--help`` shows for it."""

    config: type | dict[str, type]
    help: str

    def groups(self, name: str) -> dict[str, type]:
        return self.config if isinstance(self.config, dict) else {name: self.config}


def _one_or_all(configs: dict[str, Any]) -> Any:
    """What a tool's ``main`` receives: the one group's config, else ``{title: config}``."""
    return next(iter(configs.values())) if len(configs) == 1 else configs


def _either(words) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    words = list(words)
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


class ToolCommandLine:
    """The command line of one tool, made from its config classes only.

    ``groups`` (``{title: class}``): every group's flags on one parser; :meth:`parse` returns the
    config (one group) or ``{title: config}``. ``commands`` (``{word: Command}``): the first word
    picks a subcommand (argparse subparsers, each with only its own flags, errors under its own
    prog ``PROG WORD``); :meth:`parse` returns ``(word, config or {title: config})``. With a
    ``default_command`` the word may be left out (the arguments start with a flag or are empty).
    ``command_name`` is what the tool calls its subcommands in messages (``direction``).
    """

    def __init__(self, prog: str, description: str | None, *,
                 groups: dict[str, type] | None = None,
                 commands: dict[str, Command] | None = None,
                 default_command: str | None = None, command_name: str = "command"):  # fmt: skip
        if (groups is None) == (commands is None):
            raise TypeError(f"{prog}: give config groups or commands, not both or neither")
        if default_command is not None and default_command not in (commands or {}):
            raise TypeError(f"{prog}: default command {default_command!r} is not a command")
        self.prog, self.description = prog, description
        self.groups, self.commands = groups, commands
        self.default_command, self.command_name = default_command, command_name

    def parser(self) -> ArgumentParser:
        """The tool's top parser (its ``--help``; with commands, the list of them)."""
        return self._build()[0]

    def command_parser(self, word: str) -> ArgumentParser:
        """The parser of one subcommand (its flags, its ``--help``)."""
        return self._build()[1][word]

    def _build(self) -> tuple[ArgumentParser, dict[str, ArgumentParser]]:
        raw = argparse.RawDescriptionHelpFormatter
        top = ArgumentParser(prog=self.prog, description=self.description, formatter_class=raw)
        if self.commands is None:
            for title, cls in self.groups.items():
                add_config_arguments(top.add_argument_group(title), cls)
            return top, {}
        # Only for --help: parse() hands the words after the first to the subparser itself, so
        # that its unknown flags are its errors (argparse would report them under the top prog).
        sub = top.add_subparsers(
            dest="command", title=f"{self.command_name}s", metavar=self.command_name.upper()
        )
        parsers = {}
        for word, command in self.commands.items():
            shown = command.help
            if word == self.default_command:
                shown += " (the default: the word may be left out)"
            p = sub.add_parser(word, prog=f"{self.prog} {word}", help=shown,
                               description=command.help, formatter_class=raw)  # fmt: skip
            for title, cls in command.groups(word).items():
                add_config_arguments(p.add_argument_group(title), cls)
            parsers[word] = p
        return top, parsers

    def parse(self, argv: list[str] | None = None) -> Any:
        """What the tool's ``main`` receives for ``argv`` (built, so validated, configs)."""
        argv = list(sys.argv[1:] if argv is None else argv)
        top, parsers = self._build()
        if self.commands is None:
            return _one_or_all(parse_configs(top, self.groups, argv))
        word, rest = self.split(argv, top)
        groups = self.commands[word].groups(word)
        return word, _one_or_all(parse_configs(parsers[word], groups, rest))

    def split(self, argv: list[str], top: ArgumentParser | None = None) -> tuple[str, list[str]]:
        """``(command word, its arguments)``; the default command when no word is given."""
        first = argv[0] if argv else None
        if first in self.commands:
            return first, argv[1:]
        top = top or self.parser()
        if first in ("-h", "--help"):
            top.parse_args(argv)  # prints the tool's help, which lists the commands, and exits
        if first is not None and not first.startswith("-"):
            top.error(f"unknown {self.command_name} {first!r} (choose {_either(self.commands)})")
        if self.default_command is None:
            top.error(f"give the {self.command_name} first: {_either(self.commands)}")
        return self.default_command, argv
