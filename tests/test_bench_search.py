"""scripts/bench_search.py: its figures from the trials (pure functions), and --quick end to end."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("bench_search", ROOT / "scripts" / "bench_search.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()


def _trials(*rows: tuple[float, float | None], entry: str = "cheap") -> list[dict]:
    return [
        {"seconds": s, "value": v, "state": "COMPLETE" if v is not None else "PRUNED", "entry": entry} for s, v in rows
    ]


def test_curve_holds_the_best_so_far_against_compute_spent():
    points = bench.curve(_trials((10, 0.5), (5, None), (20, 0.8), (10, 0.7)))
    assert points == [(10, 0.5), (15, 0.5), (35, 0.8), (45, 0.8)]
    assert bench.best_at(points, 9.9) is None  # nothing completed yet
    assert bench.best_at(points, 34.9) == 0.5 and bench.best_at(points, 35) == 0.8
    assert bench.compute_to(points, 0.8) == 35 and bench.compute_to(points, 0.81) is None
    assert bench.curve(_trials((5, None)))[0][1] == float("-inf")


def test_spread_says_how_many_reached():
    assert bench.spread([0.5, 0.7, 0.6]) == "0.6000 (0.5000-0.7000)"
    assert bench.spread([10.0, None], "{:.0f}") == "10 (10-10) 1/2"
    assert bench.spread([None, None]) == "never"


def test_summary_row_per_strategy_with_share_of_random():
    """Random reaches 0.9 only at the end of its 100 s; 'fast' holds 0.9 after 20 s: a share of 0.2."""
    results = {}
    for seed in (0, 1):
        results["d", "random", seed] = {"trials": _trials((50, 0.8), (50, 0.9), entry="costly"), "test": 0.88}
        fast = _trials((20, 0.9), (30, 0.85)) + _trials((50, 0.91), entry="costly")
        results["d", "fast", seed] = {"trials": fast, "test": 0.9}
    lines = bench.summarize(results, {"d": 100.0})
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines if "| " in line}
    assert rows["random"][1:4] == ["never", "0.8000 (0.8000-0.8000)", "0.9000 (0.9000-0.9000)"]
    assert rows["fast"][1:4] == ["0.9000 (0.9000-0.9000)", "0.9000 (0.9000-0.9000)", "0.9100 (0.9100-0.9100)"]
    assert rows["fast"][4] == "0.9000 (0.9000-0.9000)" and rows["random"][4] == "0.8800 (0.8800-0.8800)"
    assert rows["fast"][5] == "100 (100-100)" and rows["random"][5] == "never"  # best-0.5pt of 0.91: 0.905
    assert rows["fast"][6] == "0.20 (0.20-0.20)" and rows["random"][6] == "1.00 (1.00-1.00)"
    assert rows["fast"][7] == "0.50 (0.50-0.50)" and rows["random"][7] == "1.00 (1.00-1.00)"  # on 'costly'
    assert "the costliest pool entry: costly" in "\n".join(lines)
    assert bench.costliest([_trials((5, 0.5))]) is None  # one entry: nothing to compare


@pytest.mark.slow
def test_quick_mode_runs_whole_studies(tmp_path):
    """--quick: real studies through the product, a table per strategy and the any-time plot (one seed
    of its two here: the suite's time)."""
    plot, dump = tmp_path / "anytime.png", tmp_path / "trials.json"
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_search.py"),
            "--quick",
            "--seeds",
            "1",
            "--plot",
            str(plot),
            "--json",
            str(dump),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and "strategy" not in line]
    assert [r.split("|")[1].strip() for r in rows] == bench.QUICK
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    import json

    studies = json.loads(dump.read_text())
    assert sorted(studies) == sorted(f"digits/{s}/0" for s in bench.QUICK)
    assert max(study["test"] for study in studies.values()) > 0.5  # a winner learned the digits (chance: 0.1)
    for key, study in studies.items():
        assert 0.0 <= study["test"] <= 1.0, key  # the retrained winner on the test split
        assert study["trials"] and all(t["seconds"] > 0 for t in study["trials"])
        spent = sum(t["seconds"] for t in study["trials"][:-1])
        assert spent < bench.QUICK_BUDGET, key  # the budget stopped the study: no trial began after it
