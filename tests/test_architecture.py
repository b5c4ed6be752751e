"""The package's shape: imports between its modules (module-level and deferred ones alike) form no cycle, and each
stage depends only on stages before it in the data flow (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import cdul_fast

PKG = Path(cdul_fast.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for py in PKG.rglob("*.py"):
        parts = list(py.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = py
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: modules of this package it imports}, every import statement counted (also inside functions)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # `from pkg import name`: an edge to pkg.name when that is a module, else to pkg
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
            for t in targets:
                while t and t not in mods:  # cdul_fast.x.y.attr -> the module that defines it
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith("cdul_fast"):
                    graph[mod].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30 and graph["cdul_fast.label.pipeline"]  # the walker saw the package
    assert not _cycles(graph)


# Stages in data-flow order: a stage may import itself, the shared top level, and stages before it; never later ones.
ORDER = ["datasets", "views", "clip", "ops", "store", "evaluate", "label", "train", "deploy", "report", "discover",
         "shapes", "cli", "__main__"]
SHARED = {"cdul_fast", "cdul_fast._backend", "cdul_fast.config", "cdul_fast.dist", "cdul_fast.errors",
          "cdul_fast.fsutil"}


def _stage(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ORDER else None


def test_stages_only_import_earlier_stages():
    late = []
    for mod, deps in import_graph().items():
        for d in deps - SHARED:
            if mod in SHARED:  # the shared top level imports no stage
                late.append((mod, d))
            elif _stage(d) is not None and ORDER.index(_stage(d)) > ORDER.index(_stage(mod)):
                late.append((mod, d))
    assert not late, f"imports against the data flow: {late}"
