"""The package's import graph: no module of `search` imports itself back through others at import time."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import search

ROOT = Path(search.__file__).parent


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name, sub-packages included."""
    out = {"search": ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], prefix="search."):
        rel = Path(*info.name.split(".")[1:])
        out[info.name] = ROOT / rel / "__init__.py" if info.ispkg else ROOT / rel.with_suffix(".py")
    return out


def _top_level(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: top-level ones and those under module-level
    `if`/`try`, but not under `if TYPE_CHECKING:` (never run) nor inside functions and classes."""
    out: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                out += _top_level(node.body)
            out += _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            for part in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                out += _top_level(part)
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports at import time (`from search.data import cifar`
    counts as search.data.cifar, `from search.data import Data` as search.data)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _top_level(ast.parse(path.read_text()).body):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
            continue
        base = node.module or ""
        if node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in known:
                found.add(sub)
            elif base in known:
                found.add(base)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_package():
    g = graph()
    assert {"search.data", "search.data.cache", "search.data.cifar", "search.recipe", "search.space"} <= set(g)
    assert "search.data.cifar" in g["search.data"] and "search.data.cache" in g["search.data.cifar"]
    assert g["search.recipe"] >= {"search.data", "search.space", "search.pool", "search.hparams"}


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_package_modules():
    assert cycles(graph()) == []


def test_the_data_package_imports_no_recipe_and_the_space_no_recipe():
    g = graph()
    reach = {m: set() for m in g}
    for m in g:
        todo = list(g[m])
        while todo:
            n = todo.pop()
            if n not in reach[m]:
                reach[m].add(n)
                todo += g.get(n, ())
    for m in ("search.data", "search.space", "search.pool", "search.hparams", "search.metrics"):
        assert "search.recipe" not in reach[m], m
