"""Dependencies point down only (docs/design.md, "Package map"): no module imports a package of a
higher layer, and the trainer never imports the Hugging Face converter. Read from the source with
``ast`` (function-level imports included), so a lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[2] / "megatron_slm"
LAYERS = {
    # entry point and the features built on the runtime
    "pretrain": 6, "evaluation": 6, "scoring": 6, "training": 6, "refine": 6, "tinylm": 6,
    "visualize": 6,  # selection pictures and token dynamics (the trainer draws its TB image)
    "convert": 5,  # export loads through the runtime; evaluation converts HF dirs in memory
    "runtime": 4,
    "checkpoint": 3,
    "models": 2, "data": 2, "ops": 2,
    "launch": 1, "platform": 1, "cli": 1, "progress": 1, "output_lock": 1, "atomic_io": 1,
    "_extension": 1, "__init__": 1, "crash_points": 1, "_lazy_jit": 1, "errors": 1, "entry": 1,
}  # fmt: skip
FORBIDDEN = {("training", "convert")}


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "megatron_slm" and len(parts) > 1 and parts[1] in LAYERS:
                yield node.lineno, parts[1]


def test_every_top_level_module_has_a_layer():
    found = {
        p.stem if p.is_file() else p.name
        for p in PKG.iterdir()
        if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert found <= set(LAYERS), sorted(found - set(LAYERS))


def test_dependencies_point_down():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        owner = rel.parts[0].removesuffix(".py")
        for line, target in _imports(path):
            if target == owner:
                continue
            if LAYERS[target] > LAYERS[owner] or (owner, target) in FORBIDDEN:
                bad.append(f"{rel}:{line} imports megatron_slm.{target}")
    assert not bad, "\n".join(bad)
