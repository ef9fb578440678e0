"""The shape the code keeps: the training loop and the objective stay short and shallow enough to
read top to bottom (sizes counted on the formatted source)."""

from __future__ import annotations

import ast
import inspect
import textwrap

from search import objective, train

BLOCKS = (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.Match)


def depth(node: ast.AST) -> int:
    """The deepest nesting of blocks (if, for, while, with, try, match) below `node`."""
    inner = [depth(child) for child in ast.iter_child_nodes(node) if not isinstance(child, ast.FunctionDef)]
    return max(inner, default=0) + isinstance(node, BLOCKS)


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
