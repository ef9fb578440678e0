"""The shape the code keeps: every function of the package at most 80 lines and 5 blocks deep,
the training loop and the objective short and shallow enough to read top to bottom (sizes
counted on the formatted source, decorators and docstring included)."""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import search
from search import cli, objective, pool, train

BLOCKS = (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.Match)
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
ROOT = Path(search.__file__).parent

MAX_LINES, MAX_DEPTH = 80, 5
LONGER = {
    "search/cli.py:parser": 130,  # the argument table of every command, one entry each
    "search/train.py:fit": 130,  # the epoch loop stays in view
}


def depth(node: ast.AST) -> int:
    """The deepest nesting of blocks (if, for, while, with, try, match) below `node`; an `elif`
    stands at its `if`'s depth, and a nested function is measured on its own."""
    children = [c for c in ast.iter_child_nodes(node) if not isinstance(c, FUNCTIONS)]
    if isinstance(node, ast.If) and len(node.orelse) == 1 and isinstance(node.orelse[0], ast.If):
        chained = node.orelse[0]
        inner = [depth(c) for c in children if c is not chained]
        return max(max(inner, default=0) + 1, depth(chained))
    return max((depth(c) for c in children), default=0) + isinstance(node, BLOCKS)


def every_function() -> dict[str, tuple[int, int]]:
    """'path:name' -> (lines, depth) of every function and method in the package, nested ones too."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, FUNCTIONS):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = (node.end_lineno or node.lineno) - first + 1
                where = f"{rel}:{node.name}"
                old = out.get(where, (0, 0))
                out[where] = (max(old[0], lines), max(old[1], max(depth(s) for s in node.body)))
    return out


def shape(fn) -> tuple[int, int]:
    """(lines, nesting depth) of a function, its docstring included."""
    source = textwrap.dedent(inspect.getsource(fn))
    tree = ast.parse(source).body[0]
    return len(source.rstrip().splitlines()), max(depth(s) for s in tree.body)


def test_depth_counts_nested_blocks():
    def sample(x):
        for i in x:
            if i:
                with open(i) as f:
                    return f
        return None

    assert shape(sample) == (6, 3)


def test_an_elif_chain_is_one_level_and_an_else_block_another():
    def chain(x):
        if x == 1:
            return 1
        elif x == 2:
            return 2
        elif x == 3:
            for _ in x:
                return 3
        return 0

    def nested(x):
        if x == 1:
            return 1
        else:
            for _ in x:
                if x:
                    return 2
        return 0

    assert shape(chain)[1] == 2 and shape(nested)[1] == 3


def test_every_function_is_short_and_shallow():
    found = every_function()
    assert set(LONGER) <= set(found)
    over = {
        where: (lines, deep)
        for where, (lines, deep) in found.items()
        if lines > LONGER.get(where, MAX_LINES) or deep > MAX_DEPTH
    }
    assert over == {}


def test_fit_reads_top_to_bottom():
    lines, deep = shape(train.fit)
    assert lines <= 130 and deep <= 5, (lines, deep)


def test_the_objective_reads_claim_to_outcome():
    lines, deep = shape(objective.objective)
    assert lines <= 60 and deep <= 5, (lines, deep)
    steps = [
        "claim(",
        "reseed_sampler(",
        "space.suggest(",
        "build(",
        "device_slot(",
        "record_measures(",
        "resume(",
        "fit_trial(",
        "outcome(",
    ]
    source = inspect.getsource(objective.objective)
    assert [source.index(s) for s in steps] == sorted(source.index(s) for s in steps)


def test_the_cli_parser_is_a_table_and_entries_parse_in_steps():
    """Each command owns its arguments (cli.SUBCOMMANDS); a pool entry's weights are resolved by one
    helper for built-ins and one for timm, so neither function grows with the other."""
    for fn, most in ((cli.parser, 20), (cli.cmd_models, 40), (pool.parse_entry, 40)):
        lines, deep = shape(fn)
        assert lines <= most and deep <= 3, (fn.__name__, lines, deep)
