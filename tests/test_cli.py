from __future__ import annotations

import pytest

from tests.conftest import run_cli, run_inline, tiny_recipe, write_recipe


@pytest.mark.parametrize(
    "over, key",
    [
        ({"train": {"epochz": 3}}, "train: unknown key 'epochz'"),
        ({"train": {"epochs": "three"}}, "train.epochs:"),
        ({"study": {"name": "x", "sampler": "bayes"}}, "study.sampler.name: 'bayes' is not allowed"),
    ],
)
def test_validate_bad_recipe_exits_2_with_one_line(tmp_path, over, key):
    f = write_recipe(tmp_path / "bad.yaml", tiny_recipe(**over))
    proc = run_inline("validate", str(f), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and lines[0].startswith("error: ")
    assert not (tmp_path / "studies").exists()


def test_validate_prints_space(tmp_path):
    f = write_recipe(tmp_path / "ok.yaml", tiny_recipe())
    proc = run_inline("validate", str(f), "--set", "train.epochs=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "lr                 float [0.002, 0.005] log" in proc.stdout
    assert "optimizer          = 'adamw' (fixed)" in proc.stdout
    assert not (tmp_path / "studies").exists()


def test_missing_recipe_file(tmp_path):
    proc = run_inline("run", "nope.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: recipe file not found: nope.yaml"


@pytest.mark.slow  # the real entry point, `python -m search`, in a subprocess
def test_usage_mistakes_are_one_line_with_the_closest_match(tmp_path):
    """argparse's own errors (a misspelt command, a value of the wrong type) as a recipe's are: one
    line, exit 2, no usage block."""
    write_recipe(tmp_path / "r.yaml", tiny_recipe())
    proc = run_cli("rnu", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: python -m search: unknown command 'rnu' (did you mean 'run'?); allowed: run, validate, "
        "prefetch, rank, worker, fail-stale, models, report, best, dashboard, confirm, proxy, retrain, export, "
        "predict"
    ]
    proc = run_cli("run", "r.yaml", "--workers", "abc", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: python -m search run --workers: 'abc' is not a whole number; e.g. --workers 4"
    ]
    assert not (tmp_path / "studies").exists()
