"""Once per study (search.once) on a real SQLite file: one worker of several does the work, and a
lock whose holder died is taken over instead of waited out by every later worker."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
from optuna.study import StudyDirection

from search import once as once_mod
from search.once import locked, once

TAKEN_AT = "taken_at"  # the lock study's record of when it was taken (search.record.StudyAttrs)
KEY = "mlflow_run_id"  # a declared study attribute (search.record.StudyAttrs)
LOCK = f"s/lock:{KEY}"


def _study(tmp_path) -> optuna.Study:
    return optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/s.db")


def _names(study: optuna.Study) -> list[str]:
    return sorted(s.study_name for s in optuna.get_all_study_summaries(study._storage))


def _dead_lock(study: optuna.Study, key: str, age: float) -> None:
    """The lock a holder killed `age` s ago left behind."""
    storage = study._storage
    lock = storage.create_new_study([StudyDirection.MINIMIZE], f"s/lock:{key}")
    storage.set_study_user_attr(lock, TAKEN_AT, time.time() - age)


def test_four_threads_run_the_work_once_and_leave_no_lock(tmp_path):
    study, runs = _study(tmp_path), []

    def work() -> int:
        runs.append(1)
        time.sleep(0.5)  # the others meet the lock held
        return "run-7"

    results: list[tuple[int, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(once(study, KEY, work))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs) == 1 and sorted(results) == [("run-7", False)] * 3 + [("run-7", True)]
    assert study.user_attrs[KEY] == "run-7" and _names(study) == ["s"]


def test_a_dead_holders_lock_is_taken_over_at_once(tmp_path, caplog):
    study = _study(tmp_path)
    _dead_lock(study, KEY, age=2 * once_mod.LOCK_WAIT)
    start = time.time()
    assert once(study, KEY, lambda: "run-3") == ("run-3", True)
    assert time.time() - start < 5  # not LOCK_WAIT
    assert "held for over 60 s (its holder died?); taking it over" in caplog.text
    assert _names(study) == ["s"]  # the lock is gone with the work done


def test_a_live_holder_is_waited_for_and_its_lock_left_alone(tmp_path):
    study = _study(tmp_path)
    _dead_lock(study, KEY, age=0)  # just taken: a live holder
    start = time.time()
    with locked(study, KEY, wait=1.0):  # it outlives the wait: taken over after 1 s
        assert time.time() - start >= 1.0
        taken = study._storage.get_study_user_attrs(study._storage.get_study_id_from_name(LOCK))
        assert taken[TAKEN_AT] >= start
    assert _names(study) == ["s"]
    _dead_lock(study, KEY, age=0)
    released = threading.Timer(0.5, lambda: study._storage.delete_study(study._storage.get_study_id_from_name(LOCK)))
    released.start()
    start = time.time()
    with locked(study, KEY):
        assert 0.4 <= time.time() - start < 5  # it waited for the holder's release
    assert _names(study) == ["s"]


@pytest.mark.parametrize("age", [0, 120])
def test_a_lock_taken_over_from_a_slow_holder_is_not_deleted_by_it(tmp_path, age):
    study = _study(tmp_path)
    storage = study._storage
    with locked(study, KEY):
        lock = storage.get_study_id_from_name(LOCK)
        storage.delete_study(lock)  # another worker took it over ...
        _dead_lock(study, KEY, age=age)  # ... and holds it now
    assert _names(study) == ["s", LOCK]  # the slow holder left the other's lock alone
