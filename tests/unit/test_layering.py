"""Dependencies point down (docs/design.md, "Package map"): no module imports a package of a
higher layer, packages of one layer import each other only along the listed edges, the trainer
never imports the Hugging Face converter, and nothing in the package, ``tools/`` or
``benchmarks/`` imports a script or a test. Read from the source with ``ast``: function-level
imports, relative imports and ``importlib.import_module``/``__import__`` with a literal name are
all seen, so neither a lazy nor a dynamic import can hide an upward arrow or a cycle."""

from __future__ import annotations

import ast
import pathlib
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PKG = ROOT / "megatron_slm"
LAYERS = {
    # entry point and the features built on the runtime
    "pretrain": 6, "evaluation": 6, "scoring": 6, "training": 6, "refine": 6, "tinylm": 6,
    "visualize": 6,  # selection pictures and token dynamics (the trainer draws its TB image)
    "serving": 6,  # the text generation server
    "convert": 5,  # export loads through the runtime; evaluation converts HF dirs in memory
    "runtime": 4,
    "checkpoint": 3,
    "models": 2, "data": 2, "ops": 2,
    "launch": 1, "platform": 1, "cli": 1, "progress": 1, "output_lock": 1, "atomic_io": 1,
    "ranged_output": 1, "optimizer_state": 1, "writer_queue": 1, "remote_code": 1,
    "_extension": 1, "__init__": 1, "crash_points": 1, "_lazy_jit": 1, "errors": 1, "entry": 1,
}  # fmt: skip
# The only imports between packages of one layer (above the one-file utilities of layer 1, which
# import each other freely: the graph test below keeps them acyclic).
SIDEWAYS = {
    ("pretrain", "training"),  # the entry point runs the trainer
    ("training", "visualize"),  # the trainer's TensorBoard selection image
    ("visualize", "evaluation"),  # the learning curve measures held-out perplexity
    ("models", "ops"),  # the torch spec's MLP runs the fused SwiGLU
}
FORBIDDEN = {("training", "convert")}
SCRIPT_DIRS = {"tools", "benchmarks", "tests", "examples", "scripts"}  # never imported
DESIGN = ROOT / "docs" / "design.md"
DIAGRAM_START = "<!-- layers: drawn by tests/unit/test_layering.py from its tables -->"
DIAGRAM_END = "<!-- /layers -->"


def diagram() -> str:
    """The package map of docs/design.md, drawn from LAYERS, SIDEWAYS and FORBIDDEN (so the
    picture and the rule the test enforces cannot drift; ``python tests/unit/test_layering.py``
    rewrites it)."""
    lines = [
        "tools/*.py  benchmarks/*.py  python -m megatron_slm.pretrain",
        "    entry points: import any layer; nothing imports them, nor tests/ and scripts/",
    ]
    for layer in sorted(set(LAYERS.values()), reverse=True):
        names = [n for n, v in LAYERS.items() if v == layer]
        body = textwrap.wrap("  ".join(names), 88, break_on_hyphens=False)
        lines += ["    │", f"layer {layer}  {body[0]}"] + [f"         {b}" for b in body[1:]]
        edges = [f"{a} → {b}" for a, b in sorted(SIDEWAYS) if LAYERS[a] == layer]
        if edges:
            lines.append("         sideways, the only ones: " + ", ".join(edges))
    if FORBIDDEN:
        lines += [
            "",
            "forbidden although downward: " + ", ".join(f"{a} ↛ {b}" for a, b in FORBIDDEN),
        ]
    return "\n".join(lines)


def _doc_block(text: str) -> tuple[int, int]:
    """Character span of the diagram's code block in docs/design.md."""
    start = text.index(DIAGRAM_START) + len(DIAGRAM_START)
    return start, text.index(DIAGRAM_END, start)


def _rendered() -> str:
    return f"\n```\n{diagram()}\n```\n"


def _package_of(rel: pathlib.PurePath) -> tuple[str, ...]:
    """``('megatron_slm', 'visualize')`` for ``report.py`` and ``__init__.py`` in ``visualize/``."""
    return rel.with_suffix("").parts[:-1]


def _resolve_relative(rel: pathlib.PurePath, level: int, module: str | None) -> str:
    base = _package_of(rel)
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ((module,) if module else ()))


def _literal(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def imported_names(rel: pathlib.PurePath, source: str):
    """(line, dotted name) of every import in ``source``, the file at ``rel`` (from the root)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = (
                node.module if not node.level else _resolve_relative(rel, node.level, node.module)
            )
            if module:
                yield node.lineno, module
                for alias in node.names:
                    yield node.lineno, f"{module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            name = _literal(node.args[0])
            if called not in ("import_module", "__import__") or name is None:
                continue
            if name.startswith("."):  # import_module(".x", __package__): relative to the module
                level = len(name) - len(name.lstrip("."))
                name = _resolve_relative(rel, level, name.lstrip(".") or None)
            yield node.lineno, name


def violations(rel: pathlib.PurePath, source: str) -> list[str]:
    """The layering rules broken by one file (``rel`` from the repository root)."""
    top = rel.parts[0]
    owner = rel.parts[1].removesuffix(".py") if top == "megatron_slm" else None
    bad = []
    for line, name in imported_names(rel, source):
        parts = name.split(".")
        if parts[0] in SCRIPT_DIRS and top != "tests":
            bad.append(
                f"{rel}:{line} imports {parts[0]} (a script or test directory is never imported)"
            )
        if owner is None or parts[0] != "megatron_slm" or len(parts) < 2:
            continue
        target = parts[1]
        if target not in LAYERS or target == owner:
            continue
        where = f"{rel}:{line} imports megatron_slm.{target}"
        if LAYERS[target] > LAYERS[owner]:
            bad.append(f"{where} (upward: layer {LAYERS[owner]} -> {LAYERS[target]})")
        elif LAYERS[target] == LAYERS[owner] > 1 and (owner, target) not in SIDEWAYS:
            bad.append(f"{where} (sideways edge not in SIDEWAYS)")
        elif (owner, target) in FORBIDDEN:
            bad.append(f"{where} (forbidden)")
    return sorted(set(bad))


def test_design_doc_draws_the_table():
    """docs/design.md's package map is ``diagram()`` verbatim."""
    text = DESIGN.read_text()
    start, end = _doc_block(text)
    assert text[start:end] == _rendered(), "run: python tests/unit/test_layering.py"


def test_diagram_follows_the_table(monkeypatch):
    """A new edge or a moved package changes the drawing (so the doc test above would fail)."""
    here = sys.modules[__name__]
    before = diagram()
    monkeypatch.setattr(here, "SIDEWAYS", SIDEWAYS | {("scoring", "refine")})
    assert "scoring → refine" in diagram() and diagram() != before
    monkeypatch.setattr(here, "LAYERS", {**LAYERS, "convert": 4})
    assert "layer 4  convert  runtime" in diagram() and "layer 5" not in diagram()


def test_every_top_level_module_has_a_layer():
    found = {
        p.stem if p.is_file() else p.name
        for p in PKG.iterdir()
        if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert found <= set(LAYERS), sorted(found - set(LAYERS))


def test_sideways_edges_form_no_cycle():
    assert not {(b, a) for a, b in SIDEWAYS} & SIDEWAYS
    for a, b in SIDEWAYS:
        assert LAYERS[a] == LAYERS[b], (a, b)


def test_top_level_parts_import_no_cycle():
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT)
        owner = rel.parts[1].removesuffix(".py")
        for _, name in imported_names(rel, path.read_text()):
            parts = name.split(".")
            if parts[0] == "megatron_slm" and len(parts) > 1 and parts[1] in LAYERS:
                if parts[1] != owner:
                    graph.setdefault(owner, set()).add(parts[1])
    done, path_stack = set(), []

    def visit(node):
        assert node not in path_stack, " -> ".join(path_stack[path_stack.index(node) :] + [node])
        if node in done:
            return
        path_stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        path_stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


@pytest.mark.parametrize("top", ["megatron_slm", "tools", "benchmarks"])
def test_dependencies_point_down(top):
    bad = []
    for path in sorted((ROOT / top).rglob("*.py")):
        rel = path.relative_to(ROOT)
        bad += violations(rel, path.read_text())
    assert not bad, "\n".join(bad)


IMPORTLIB = "import importlib\nimportlib.import_module"
PLANTED = [
    # (file, source, what the checker must say)
    ("megatron_slm/runtime/x.py", "from ..training.loop import pretrain", "upward"),
    ("megatron_slm/runtime/__init__.py", "from ..scoring import score_corpus", "upward"),
    ("megatron_slm/models/x.py", f"{IMPORTLIB}('megatron_slm.training')", "upward"),
    (
        "megatron_slm/models/x.py",
        "def f():\n    __import__('megatron_slm.runtime.loader')",
        "upward",
    ),
    ("megatron_slm/data/x.py", f"{IMPORTLIB}('..runtime', __package__)", "upward"),
    ("megatron_slm/scoring/x.py", "from megatron_slm.refine.executor import run", "sideways"),
    ("megatron_slm/visualize/x.py", "from ..training import online_reference", "sideways"),
    ("megatron_slm/training/x.py", "from megatron_slm.convert.hf import load", "forbidden"),
    ("megatron_slm/refine/x.py", "from tools.prox_refine import main", "never imported"),
    ("megatron_slm/checkpoint.py", f"{IMPORTLIB}('tools.score_corpus')", "never imported"),
    ("tools/x.py", "from tests.conftest import tiny_model", "never imported"),
    ("benchmarks/x.py", "import tools.evaluate", "never imported"),
]


@pytest.mark.parametrize("rel,source,reason", PLANTED)
def test_planted_violation_is_caught(rel, source, reason):
    found = violations(pathlib.PurePath(rel), source)
    assert len(found) == 1 and reason in found[0], found


@pytest.mark.parametrize(
    "rel,source",
    [
        ("megatron_slm/training/x.py", "from ..runtime import load_model\nfrom . import config"),
        ("megatron_slm/visualize/x.py", "from megatron_slm.evaluation.perplexity import f"),
        ("megatron_slm/data/__init__.py", f"{IMPORTLIB}(f'{{__name__}}.x')"),
        ("tests/unit/x.py", "from tests.sync_counter import SyncCounter"),
    ],
)
def test_allowed_imports_pass(rel, source):
    assert violations(pathlib.PurePath(rel), source) == []


if __name__ == "__main__":  # rewrite docs/design.md's package map from the tables above
    text = DESIGN.read_text()
    start, end = _doc_block(text)
    DESIGN.write_text(text[:start] + _rendered() + text[end:])
    sys.exit(0)
