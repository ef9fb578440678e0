"""Warm start (search.warmstart): an earlier study's best configurations queued first, fitted to
the current space, once per study however many workers start."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest

from search.space import Param
from search.trials import counted, ranked
from search.warmstart import fit
from tests.conftest import ROOT, run_inline, tiny_recipe, write_recipe

SPACE = {
    "lr": Param("float", 0.003, 0.004, log=True),
    "batch_size": Param("cat", choices=(32, 64)),
    "lp_epochs": Param("int", 1, 5),
    "dropout": Param("float", 0.0, 0.5, step=0.1),
}


def test_values_out_of_the_space_are_clipped_or_dropped_and_listed():
    old = {"model": "mini_cnn", "lr": 0.0049, "batch_size": 16, "lp_epochs": 9, "dropout": 0.73, "momentum": 0.9}
    params, notes = fit(old, SPACE, ["mini_cnn", "resnet_18"])
    assert params == {"model": "mini_cnn", "lr": 0.004, "lp_epochs": 5, "dropout": 0.5}
    assert type(params["lp_epochs"]) is int
    assert notes == ["lr 0.0049->0.004", "batch_size 16 dropped", "lp_epochs 9->5", "dropout 0.73->0.5"]
    inside = {"model": "mini_cnn", "lr": 0.0035, "batch_size": 64, "dropout": 0.2}
    assert fit(inside, SPACE, ["mini_cnn"]) == (inside, [])
    assert fit({**inside, "model": "vit_tiny"}, SPACE, ["mini_cnn"]) == (
        None,
        ["entry vit_tiny not in the pool: skipped"],
    )


def narrower(name: str, source: str, **study) -> dict:
    """The demo recipe with a narrower learning-rate range, warm-started from `source`."""
    space = {
        "preset": "quick",
        "overrides": {"optimizer": "adamw", "lr": {"low": 0.003, "high": 0.004, "log": True}, "batch_size": [32]},
    }
    return tiny_recipe(
        name, study={"warm_start": {"from": source, "top_k": 2}, **study}, space=space, train={"epochs": 1}
    )


def test_the_top_k_of_the_demo_study_run_first_fitted_to_a_narrower_space(demo_study, tmp_path):
    url = f"sqlite:///{demo_study}/studies/tiny.db"
    top = ranked(optuna.load_study(study_name="tiny", storage=url))[:2]
    write_recipe(tmp_path / "warm.yaml", narrower("warm", f"tiny@{url}", n_trials=3))
    proc = run_inline("run", "warm.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    refs = [f"tiny#{t.number}" for t in top]
    out = " ".join(proc.stdout.split())  # the line as one, however wrapped
    line = out[out.index("warm start from") :]
    assert f"2 configuration(s) queued first ({', '.join(refs)})" in line
    for t in top:  # the demo's lr range is [0.002, 0.005]: outside [0.003, 0.004] each is listed, clipped
        lr = t.params["lr"]
        if not 0.003 <= lr <= 0.004:
            assert f"tiny#{t.number} lr {lr:g}->{min(max(lr, 0.003), 0.004):g}" in line
    study = optuna.load_study(study_name="warm", storage=f"sqlite:///{tmp_path}/studies/warm.db")
    trials = study.get_trials()
    assert [t.user_attrs.get("warm_start_of") for t in trials] == [*refs, None]
    for t, src in zip(trials, top, strict=False):
        assert t.params["lr"] == pytest.approx(min(max(src.params["lr"], 0.003), 0.004))
        assert t.state == optuna.trial.TrialState.COMPLETE
    assert study.user_attrs["warm_start"]["queued"] == refs
    again = run_inline("run", "warm.yaml", "--set", "study.n_trials=4", cwd=tmp_path)  # a second run: not again
    assert again.returncode == 0, again.stderr
    assert "warm start" not in again.stdout
    assert sum("warm_start_of" in t.user_attrs for t in study.get_trials()) == 2
    assert [s.study_name for s in optuna.get_all_study_summaries(study._storage)] == ["warm"]  # no lock left


def test_a_best_recipe_is_a_source(demo_study, tmp_path):
    from search.recipe import recipe_from_dict
    from search.warmstart import source_configurations

    out = tmp_path / "best.yaml"
    proc = run_inline("best", "tiny", "--out", str(out), cwd=demo_study)
    assert proc.returncode == 0, proc.stderr
    best = ranked(optuna.load_study(study_name="tiny", storage=f"sqlite:///{demo_study}/studies/tiny.db"))[0]
    recipe = recipe_from_dict(narrower("warm", str(out)))
    [(ref, params)] = source_configurations(recipe.study.warm_start, recipe)
    assert ref == "tiny:best"
    assert params["model"] == "mini_cnn" and params["lr"] == pytest.approx(best.params["lr"])


def test_a_missing_source_is_one_line(tmp_path):
    write_recipe(tmp_path / "warm.yaml", narrower("warm", "nothere"))
    proc = run_inline("run", "warm.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "study.warm_start.from: no study database at studies/nothere.db for study 'nothere'" in proc.stderr


@pytest.mark.slow
def test_two_workers_starting_together_queue_it_once(demo_study, tmp_path):
    url = f"sqlite:///{demo_study}/studies/tiny.db"
    write_recipe(tmp_path / "warm.yaml", narrower("warm", f"tiny@{url}", n_trials=4))
    made = run_inline("run", "warm.yaml", "--workers", "0", cwd=tmp_path)  # the study only: nothing queued yet
    assert made.returncode == 0, made.stderr
    own = f"sqlite:///{tmp_path}/studies/warm.db"
    cmd = [sys.executable, "-m", "search", "worker", "--storage", own, "--study", "warm"]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("warm start from" in o for o in outs) == 1  # one of them queued, the other waited
    trials = optuna.load_study(study_name="warm", storage=own).get_trials()
    top = ranked(optuna.load_study(study_name="tiny", storage=url))[:2]
    assert [t.user_attrs.get("warm_start_of") for t in trials[:2]] == [f"tiny#{t.number}" for t in top]
    assert sum("warm_start_of" in t.user_attrs for t in trials) == 2
    # Exactly the total counts; a worker that asked while the other took the last slot got a trial
    # that ended at once, uncounted (the study's rule for racing workers).
    ours = counted(trials)
    assert len(ours) == 4
    assert all(t.user_attrs.get("fail_reason") == "study total reached" for t in trials if t not in ours)
    assert run_inline("report", "warm", cwd=tmp_path).returncode == 0
