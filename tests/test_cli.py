from __future__ import annotations

import socket

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


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://u:${SEARCH_PW}@db.example.org/x", "postgresql+psycopg://u:***@db.example.org/x"),
        ("redis://cache.example.org:6379/0", "redis://cache.example.org:6379/0"),
    ],
)
def test_validate_offline_contacts_nothing_and_says_so(tmp_path, monkeypatch, url, shown):
    """A shared recipe's storage host is shown but never contacted: no connection is even tried."""
    tried = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: tried.append(addr))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: tried.append(a) or [])
    f = write_recipe(tmp_path / "ok.yaml", tiny_recipe(study={"storage": url}))
    proc = run_inline("validate", str(f), "--offline", cwd=tmp_path, env={"SEARCH_PW": "pw"})
    assert proc.returncode == 0, proc.stderr
    assert (
        f"not checked (--offline): that the storage at {shown} answers; nothing was contacted"
    ) in proc.stdout.replace("\n  ", " ")
    assert tried == [] and not (tmp_path / "studies").exists()


def test_validate_offline_still_checks_a_local_file_storage(tmp_path):
    f = write_recipe(tmp_path / "ok.yaml", tiny_recipe(study={"storage": "sqlite:///no/such/dir/x.db"}))
    (tmp_path / "no").write_text("a file, not a directory")
    proc = run_inline("validate", str(f), "--offline", cwd=tmp_path)
    assert proc.returncode == 2 and "study.storage: cannot create" in proc.stderr
    assert "not checked" not in proc.stdout


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
