"""DESIGN.md's layers: a module imports only lower layers; templates never import torch; nothing imports cli."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"templates": 1, "backbones": 2, "adapters": 3, "tools": 4, "cli": 5}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if parts[0] == "align" and len(parts) > 1 else None


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_no_layer_imports_a_higher_one():
    problems = []
    for folder, level in LAYERS.items():
        paths = [ROOT / "cli.py"] if folder == "cli" else (ROOT / folder).rglob("*.py")
        for path in paths:
            for name in imports_of(path):
                other = layer_of(name)
                if other is not None and (other > level or other == LAYERS["cli"]) and other != level:
                    problems.append(f"{path.relative_to(ROOT)} imports {name}")
    assert problems == []


@pytest.mark.slow
def test_templates_do_not_import_torch():
    code = "import sys, align.templates; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


PIPELINES = ("features", "training", "inference", "evaluate", "serving", "transfer")  # each stands alone
COMPOSITES = ("demo", "bench")  # run the pipelines above, as a user would


def tools_room(module: str) -> str | None:
    """`features` for align.tools.features.extract; `shared` for align.tools.rejects; None outside tools."""
    parts = module.split(".")
    if parts[:2] != ["align", "tools"] or len(parts) < 3:
        return None
    return parts[2] if parts[2] in PIPELINES + COMPOSITES else "shared"


def test_pipelines_do_not_import_each_other():
    problems = []
    for path in (ROOT / "tools").rglob("*.py"):
        room = tools_room("align." + ".".join(path.relative_to(ROOT).with_suffix("").parts))
        for name in imports_of(path):
            other = tools_room(name)
            if other is None or other == room or other == "shared":
                continue
            if room in PIPELINES or room == "shared" or other in COMPOSITES:
                problems.append(f"{path.relative_to(ROOT)} ({room}) imports {name} ({other})")
    assert problems == []


def test_every_tools_room_says_what_it_does():
    for room in PIPELINES + COMPOSITES:
        doc = ast.get_docstring(ast.parse((ROOT / "tools" / room / "__init__.py").read_text()))
        assert doc and "May import" in doc, room
