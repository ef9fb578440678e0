"""Budgets across workers (search.budget): counted from what every trial recorded."""

from __future__ import annotations

import datetime

import optuna
import pytest
from optuna.trial import TrialState

from search.budget import Used, spent, text, used
from search.recipe import BudgetCfg
from tests.conftest import ROOT, run_inline, tiny_recipe, write_recipe


def _trial(state: TrialState, hours: float | None, **user_attrs) -> optuna.trial.FrozenTrial:
    t = optuna.create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None, user_attrs=user_attrs)
    start = datetime.datetime(2026, 1, 1, 12)
    t.datetime_start = start if hours is not None else None
    t.datetime_complete = start + datetime.timedelta(hours=hours or 0) if state.is_finished() else None
    return t


def test_used_counts_trained_epochs_wall_time_and_device_time():
    now = datetime.datetime(2026, 1, 1, 13).timestamp()  # the running trial started an hour ago
    trials = [
        _trial(TrialState.COMPLETE, 0.5, trained_epochs=4, device="cuda:0"),
        _trial(TrialState.PRUNED, 0.25, trained_epochs=1, device="cpu"),
        _trial(TrialState.RUNNING, None, trained_epochs=1, device="cuda:1", resumed_from_epoch=2),
        _trial(TrialState.WAITING, None, trained_epochs=3),  # a queued retry: its epochs were the dead trial's
    ]
    trials[2].datetime_start = datetime.datetime(2026, 1, 1, 12)
    u = used(trials, epochs_per_trial=4, now=now)
    assert u == Used(epochs=6, planned=4 + 1 + (4 - 2), hours=pytest.approx(1.75), device_hours=pytest.approx(1.5))


def test_spent_says_which_budget_and_text_shows_all():
    u = Used(epochs=18, planned=20, hours=0.5, device_hours=0.0)
    assert spent(BudgetCfg(epochs=20), u) == "budget spent: 18 of 20 epochs trained"
    assert spent(BudgetCfg(epochs=21, hours=0.5), u) == "budget spent: 0.5 of 0.5 trial-hours"
    assert spent(BudgetCfg(epochs=21, device_hours=1), u) is None
    assert spent(None, u) is None
    assert text(BudgetCfg(epochs=20, device_hours=2), u) == "budget used: 18/20 epochs, 0/2 device-h"


def test_a_budget_names_what_it_counts(tmp_path):
    write_recipe(tmp_path / "r.yaml", tiny_recipe(study={"budget": {}}))
    proc = run_inline("validate", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "study.budget: a budget needs epochs, hours or device_hours, e.g. {epochs: 200}" in proc.stderr


@pytest.mark.slow
def test_an_epoch_budget_with_two_workers_ends_within_one_trial(tmp_path):
    write_recipe(tmp_path / "b.yaml", tiny_recipe("b", study={"n_trials": 40, "budget": {"epochs": 20}}))
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = run_inline("run", "b.yaml", "--workers", "2", cwd=tmp_path, env=env)  # real worker processes
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name="b", storage=f"sqlite:///{tmp_path}/studies/b.db")
    trials = study.get_trials()
    trained = sum(t.user_attrs.get("trained_epochs", 0) for t in trials)
    assert 20 <= trained <= 20 + 2  # a trial trains 2 epochs
    assert all(t.state.is_finished() for t in trials) and len(trials) < 40
    assert study.user_attrs["ended"].startswith("budget spent: ")
    report = run_inline("report", "b", cwd=tmp_path)
    assert f"budget used: {trained}/20 epochs" in report.stdout
    assert "ended before 40 trials: budget spent: " in report.stdout
