"""Trial accounting without training, over in-memory, SQLite and journal storage: what counts
towards n_trials, retries of dead and preempted trials, stale judgement, the retry limit.
"""

from __future__ import annotations

import time

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from search import optuna_api, workers
from search.storage import open_storage
from search.trials import NOT_COUNTED, STALE_REASON, counted, finished, remaining

DIST = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}


@pytest.fixture(params=["inmemory", "sqlite", "journal"])
def study(request, tmp_path):
    storage = {
        "inmemory": lambda: optuna.storages.InMemoryStorage(),
        "sqlite": lambda: open_storage(f"sqlite:///{tmp_path}/a.db", heartbeat=None),
        "journal": lambda: open_storage(f"journal:{tmp_path}/a.log", heartbeat=None),
    }[request.param]()
    return optuna.create_study(study_name="a", storage=storage)


def _running(study: optuna.Study, beat: float | None = None) -> optuna.Trial:
    t = study.ask(DIST)
    if beat is not None:
        t.set_user_attr(workers.HEARTBEAT_ATTR, beat)
    return t


def _ended(study: optuna.Study, reason: str | None, state: TrialState = TrialState.FAIL) -> optuna.trial.FrozenTrial:
    t = study.ask(DIST)
    if reason is not None:
        t.set_user_attr("fail_reason", reason)
    return study.tell(t, 0.5 if state == TrialState.COMPLETE else None, state=state)


def test_what_takes_a_slot_of_the_total(study):
    _ended(study, None, TrialState.COMPLETE)
    _ended(study, "pruned at epoch 2", TrialState.PRUNED)
    _ended(study, "diverged at epoch 3")  # the trial's own failure counts
    _ended(study, "out of memory at batch size 512 in micro-batches of 1", TrialState.PRUNED)
    for reason in NOT_COUNTED:
        _ended(study, reason)  # interrupted, past the total, dead worker: free their slot
    _ended(study, None)  # a process that died before writing a reason
    _running(study)
    study.enqueue_trial({"lr": 0.01})
    numbers = [t.number for t in counted(study.get_trials())]
    assert numbers == [0, 1, 2, 3, 8, 9]
    assert finished(study) == 4 and remaining(study, 10) == 4 and remaining(study, 3) == 0


def test_a_stale_trial_is_failed_with_its_reason_and_its_retry_holds_the_slot(study):
    now = time.time()
    dead = _running(study, beat=now - 100)
    dead.report(0.3, 1)
    live = _running(study, beat=now)
    assert workers.fail_stale(study, older_than=50) == [dead.number]
    trials = study.get_trials()
    assert trials[dead.number].state == TrialState.FAIL
    assert trials[dead.number].user_attrs["fail_reason"] == STALE_REASON
    assert trials[live.number].state == TrialState.RUNNING
    [retry] = [t for t in trials if t.state == TrialState.WAITING]
    assert retry.params == trials[dead.number].params and retry.intermediate_values == {1: 0.3}
    assert retry.user_attrs["retry_of"] == dead.number and workers.HEARTBEAT_ATTR not in retry.user_attrs
    assert retry.system_attrs["failed_trial"] == dead.number and retry.system_attrs["deaths"] == 1
    assert [t.number for t in counted(trials)] == [live.number, retry.number]  # the dead one frees its slot
    assert workers.fail_stale(study, older_than=50) == []  # judged once


def test_the_retry_limit_counts_dead_workers_not_preemptions(study):
    t = _ended(study, STALE_REASON)
    for _ in range(workers.MAX_RETRIES):
        workers.retry(study, t)
        t = study.tell(study.ask(), state=TrialState.FAIL)  # the queued retry's worker dies too
    for _ in range(5):  # preempted any number of times: always queued again
        workers.retry(study, t, died=False)
        t = study.tell(study.ask(), state=TrialState.FAIL)
    assert t.system_attrs["deaths"] == workers.MAX_RETRIES and t.system_attrs["failed_trial"] == 0
    workers.retry(study, t)  # its last retry died too: past the limit, not queued
    assert not [x for x in study.get_trials() if x.state == TrialState.WAITING]
    assert len(t.system_attrs["retry_history"]) == workers.MAX_RETRIES + 5


def test_without_a_beat_the_start_time_judges(study):
    t = _running(study)
    assert workers.fail_stale(study, older_than=3600) == []
    assert workers.fail_stale(study, older_than=0) == [t.number]


@pytest.mark.parametrize("beat", ["x", 1e12, float("nan"), True, [1.0], -5])
def test_a_heartbeat_that_is_not_a_time_is_ignored_not_trusted(study, beat, caplog):
    """Written by anyone with access to the storage: not a time (a sweep that crashed on it
    would stop every worker), or far in the future (a dead trial pinned as alive)."""
    t = _running(study, beat=beat)
    assert workers.fail_stale(study, older_than=3600) == []  # judged by its start, a moment ago
    assert workers.fail_stale(study, older_than=0) == [t.number]
    assert f"trial {t.number}: heartbeat_at is " in caplog.text and "judged by its start" in caplog.text


def test_sqlite_heartbeat_table_judges_with_its_grace_period(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/h.db", heartbeat=1)
    study = optuna.create_study(study_name="h", storage=storage)
    t = optuna_api.ask(study)
    optuna_api.record_heartbeat(storage, optuna_api.trial_id(t))
    assert workers.sweep(study, 1) == []  # within STALE_BEATS beats
    assert storage.grace_period == 10 * 1 == workers.STALE_BEATS


def test_a_trial_past_the_total_ends_at_once_as_not_counted(tmp_path):
    from search.data import load_data
    from search.objective import make_objective
    from search.pool import parse_pool
    from search.recipe import recipe_from_dict
    from search.study import open_study
    from tests.conftest import tiny_recipe

    recipe = recipe_from_dict(tiny_recipe(name="full", study={"n_trials": 1}, data={"max_samples": 100}))
    study = open_study(recipe, f"sqlite:///{tmp_path}/full.db")
    study.add_trial(optuna.create_trial(state=TrialState.COMPLETE, value=0.5, params={"lr": 0.01}, distributions=DIST))
    objective = make_objective(
        recipe, load_data(recipe.data, 0), parse_pool(recipe.pool), "cpu", on_line=lambda s: None
    )
    ended = workers.run_one(study, objective, heartbeat=5, say=lambda s: None)  # no Study.optimize around it
    assert ended.state == TrialState.FAIL and ended.user_attrs["fail_reason"] == "study total reached"
    assert [t.number for t in counted(study.get_trials())] == [0]
