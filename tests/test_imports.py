"""The package's import graph: no module of `search` imports itself back through others, and none
imports from a layer above its own (LAYERS, bottom to top), counting every import: at the top,
under `if TYPE_CHECKING:` and inside functions. Imports inside functions are allowed only where
they buy start-up time: in `cli.py` (each command imports what it runs) and of heavy or optional
third-party libraries, or of torch's own modules that `import torch` does not load; any other one
would hide a cycle, and fails here (torch itself is loaded by every module that uses it, so
importing it in a function buys nothing). Loading a recipe imports no torch, and reading a
study's results imports nothing that trains."""

from __future__ import annotations

import ast
import functools
import pkgutil
import subprocess
import sys
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


# Where a function may import: the CLI (start-up speed) ...
LOCAL_IMPORTERS = {"search.cli"}
# ... and, anywhere, libraries that are heavy to import (workers, `validate` and `--help` never pay
# for plots, scipy, timm or the dashboard) or optional (an extra, or not on every platform).
LOCAL_LIBRARIES = {
    "torchvision",
    "timm",
    "huggingface_hub",
    "safetensors",
    "matplotlib",
    "scipy",
    "sklearn",
    "h5py",
    "PIL",
    "optuna_dashboard",
    "grpc",
    "redis",
    "onnx",
    "onnxruntime",
    "fcntl",
    "mlflow",
    "tensorboard",
}
# ... and torch's modules that `import torch` leaves unloaded: the compiler and its cache directory (a
# second of imports, only under hardware.compile), the FLOP counter (only where trials count their
# flops: an objective or constraint on them, pruning at equal compute, a start-up shared by compute)
# and TensorBoard's writer (the optional tensorboard package, only under tracking.tensorboard).
LOCAL_TORCH_MODULES = {
    "torch._dynamo",
    "torch._inductor.runtime.cache_dir_utils",
    "torch.utils.flop_counter",
    "torch.utils.tensorboard",
    "torch.utils.tensorboard.summary",
}


def _all_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]


def _local_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports inside functions (at any depth)."""
    out: list[ast.Import | ast.ImportFrom] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out += [n for n in _all_imports(node) if n not in out]
    return out


def _not_allowed_here(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules a function-local import names that it may not import there."""
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else ["." * node.level + (node.module or "")]
    return [n for n in names if n.split(".")[0] not in LOCAL_LIBRARIES and n not in LOCAL_TORCH_MODULES]


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (`from search.data import
    cifar` counts as search.data.cifar, `from search.data import Data` as search.data)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _all_imports(ast.parse(path.read_text())):
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


@functools.cache
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
    assert g["search.recipe"] >= {"search.datasets", "search.space", "search.pool", "search.hparams"}
    assert "search.study" in g["search.cli"]  # imported inside the command functions: counted too


def test_a_hidden_cycle_is_seen(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n")
    known = {"a", "b", "c"}
    g = {m: imports_of(m, tmp_path / f"{m}.py", known) for m in known}
    assert g == {"a": {"b"}, "b": {"a"}, "c": {"a"}} and cycles(g) == [["a", "b"]]


def test_functions_import_only_heavy_libraries_outside_the_cli():
    """A function-local import of a package module (or of a light library) is a hidden dependency:
    move it to the top, or break the cycle that made it local."""
    bad = []
    for name, path in modules().items():
        if name in LOCAL_IMPORTERS:
            continue
        for node in _local_imports(ast.parse(path.read_text())):
            names = _not_allowed_here(node)
            if names:
                bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} imports {', '.join(names)} in a function")
    assert bad == []


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_package_modules_counting_every_import():
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
    for m in (
        "search.data",
        "search.datasets",
        "search.archs",
        "search.space",
        "search.pool",
        "search.hparams",
        "search.metrics",
    ):
        assert "search.recipe" not in reach[m], m


# ---------------------------------------------------------------------------
# layers: a module imports only from its own layer or below (a package's sub-modules share its layer)

LAYERS: list[tuple[str, set[str]]] = [
    (
        "base",
        {
            "search",
            "search.errors",
            "search.text",
            "search.files",
            "search.stats",
            "search.metrics",
            "search.morph",
            "search.section",
            "search.record",
            "search.optuna_api",
            "search.trials",
            "search.confirmed",
            "search.reach",
            "search.once",
            "search.outage",
            "search.process",
        },
    ),
    ("config", {"search.recipe", "search.hparams", "search.space", "search.pool", "search.datasets", "search.archs"}),
    (
        "data, models",
        {
            "search.data",
            "search.builtins",
            "search.models",
            "search.weights",
            "search.augment",
            "search.storage",
            "search.device",
        },
    ),
    ("train", {"search.infer", "search.train", "search.measure", "search.rank", "search.cpu_format"}),
    # progress: the live trial lines, which the objective feeds and the workers print
    (
        "trial",
        {
            "search.objective",
            "search.resume",
            "search.sampling",
            "search.pack",
            "search.artifacts",
            "search.progress",
            "search.tracking",
        },
    ),
    ("workers", {"search.workers"}),
    (
        "study",
        {"search.study", "search.confirm", "search.proxy", "search.budget", "search.stopping", "search.warmstart"},
    ),
    (
        "results",
        {
            "search.selection",
            "search.report",
            "search.plots",
            "search.retrain",
            "search.dashboard",
            "search.export",
            "search.predict",
        },
    ),
    ("cli", {"search.cli", "search.__main__"}),
]


def layer_of(module: str) -> int | None:
    """The index in LAYERS of a module (or of the package that holds it); None if unassigned."""
    for i, (_, names) in enumerate(LAYERS):
        if any(module == n or (n != "search" and module.startswith(n + ".")) for n in names):
            return i
    return None


def upward(g: dict[str, set[str]]) -> list[str]:
    """Every import from a lower layer to a higher one, as 'a (layer) imports b (layer)'."""
    out = []
    for m in sorted(g):
        for n in sorted(g[m]):
            lm, ln = layer_of(m), layer_of(n)
            if lm is not None and ln is not None and ln > lm:
                out.append(f"{m} ({LAYERS[lm][0]}) imports {n} ({LAYERS[ln][0]})")
    return out


def test_every_module_has_a_layer():
    missing = [m for m in sorted(modules()) if layer_of(m) is None]
    assert missing == [], f"{', '.join(missing)}: no layer; add each to LAYERS in tests/test_imports.py"
    named = [n for _, names in LAYERS for n in names]
    assert sorted(set(named) - set(modules())) == [], "LAYERS names a module the package no longer has"
    assert len(named) == len(set(named)), "a module is in two layers"


def test_an_upward_import_is_seen():
    g = {"search.recipe": {"search.train"}, "search.train": {"search.recipe"}, "search.data.cifar": {"search.errors"}}
    assert upward(g) == ["search.recipe (config) imports search.train (train)"]


# Imports against the order that are on their way out, each with why it is still there. A pair
# that is gone must leave this set too (the test below says so).
PENDING: set[str] = set()


def test_no_module_imports_from_a_layer_above_its_own():
    found = upward(graph())
    assert [u for u in found if u not in PENDING] == []
    gone = sorted(PENDING - set(found))
    assert gone == [], f"{gone}: no longer imported; remove from PENDING in tests/test_imports.py"


def _imported_by(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code` (this process's imports do not count)."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT.parent,
    )
    return set(out.stdout.split())


def test_loading_a_recipe_imports_no_torch():
    held = _imported_by("import search.recipe\nsearch.recipe.load_recipe('recipes/digits.yaml')")
    assert "search.recipe" in held and "torch" not in held
    assert not {"search.data", "search.models", "search.train"} & held


def test_reading_results_imports_nothing_that_trains():
    held = _imported_by("import search.report, search.selection")
    assert {"search.report", "search.selection", "search.confirmed"} <= held
    assert not {"search.train", "search.objective", "search.workers", "search.confirm"} & held


def test_one_trial_runs_without_the_worker_loop():
    """The objective takes its resume state and trial exceptions from search.resume and
    search.errors, and the worker loop finds the resume directory without the artifacts."""
    g = graph()
    assert "search.workers" not in g["search.objective"]
    assert not g["search.workers"] & {"search.artifacts", "search.models", "search.objective"}
    assert not g["search.resume"] & {"search.workers", "search.artifacts", "search.models"}
