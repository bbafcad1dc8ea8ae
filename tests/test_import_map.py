"""The import map: parts depend downwards only, so the composition has no circle (a bridge, the inference
code and the objectives never reach the model class; the model never reaches the interop that builds it)."""

from __future__ import annotations

import ast
from pathlib import Path

import vlbridge

SRC = Path(vlbridge.__file__).parent

# What each package may never import (directly or inside a function): the layers above it.
FORBIDDEN = {
    "bridges": {"models", "interop", "inference", "objectives", "training", "serving", "recipes", "cli"},
    "encoders": {"models", "interop", "inference", "objectives", "training", "serving", "recipes", "cli"},
    "inference": {"models", "interop", "objectives", "training", "serving", "recipes", "cli"},
    "objectives": {"models", "interop", "training", "serving", "recipes", "cli"},
    "models": {"interop", "training", "serving", "recipes", "cli"},
    "utils": {"models", "interop", "inference", "objectives", "bridges", "training", "serving", "recipes", "cli"},
}


def imports_of(path: Path) -> set[str]:
    """Top-level vlbridge subpackages (or modules) that a file imports anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "vlbridge" and len(parts) > 1:
                # The collective-communication helpers are a utility the objectives share with the loop.
                found.add("training.distributed" if parts[1:3] == ["training", "distributed"] else parts[1])
    return found


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).parts
        package = rel[0].removesuffix(".py")
        graph.setdefault(package, set()).update(imports_of(path) - {package})
    return graph


def test_layers_import_downwards_only():
    graph = package_graph()
    bad = {pkg: sorted(graph.get(pkg, set()) & above) for pkg, above in FORBIDDEN.items()}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_the_model_core_has_no_circle():
    core = {"bridges", "encoders", "inference", "objectives", "models", "interop", "utils", "errors"}
    graph = {k: v & core for k, v in package_graph().items() if k in core}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert [pkg for pkg in core if pkg in reach(pkg)] == []
