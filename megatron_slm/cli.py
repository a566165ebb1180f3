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
"""

from __future__ import annotations

import argparse
import dataclasses
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors, under :func:`megatron_slm.entry.entry_point`, raise
    :class:`UsageError` (the runner prints one line on rank 0); elsewhere argparse's own
    usage + error + exit 2. Sub-parsers (``add_subparsers``) are of this class too."""

    def error(self, message: str):
        from megatron_slm.entry import runner_active

        if runner_active():
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
