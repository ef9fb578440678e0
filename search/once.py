"""Once per study: work that the first of several workers starting together does (queue the warm
start, open the tracking parent run) while the others wait for it, on every storage.

The lock is a study of its own, `NAME/lock:KEY`: creating a study of a name that exists fails
atomically on every Optuna storage (a unique name in RDB, the journal's lock, the gRPC proxy's
storage), and the study is deleted when the work is done. Under the lock the worker reads the
study attribute that records the work again (another may have done it meanwhile), does it, and
writes the attribute; the others find it there and do nothing.

A holder that died (killed between taking and deleting the lock) leaves the lock behind: the lock
records when it was taken, and a lock older than LOCK_WAIT is taken over (deleted and taken
afresh) by the next worker that needs it, once, rather than every later worker waiting it out.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import optuna
from optuna.study import StudyDirection

from search import optuna_api
from search.record import set_stored_study_attrs, set_study_attr, stored_study_attrs, study_attrs

log = logging.getLogger("search")

LOCK_WAIT = 60.0  # seconds a lock may be held; an older one is taken over (its holder died)


@contextlib.contextmanager
def locked(study: optuna.Study, key: str, wait: float = LOCK_WAIT) -> Iterator[None]:
    """Hold the study's lock `key` while the block runs, waiting for another holder; a lock held
    for over `wait` s (by its record, else since this worker first met it) is taken over."""
    storage = optuna_api.storage_of(study)
    name = f"{study.study_name}/lock:{key}"
    met: dict[int, float] = {}  # lock study id -> when this worker first found it held
    while True:
        try:
            lock_id, mine = storage.create_new_study([StudyDirection.MINIMIZE], name), time.time()
            set_stored_study_attrs(storage, lock_id, taken_at=mine)
            break
        except optuna.exceptions.DuplicatedStudyError:
            with contextlib.suppress(KeyError):  # released meanwhile: try again at once
                held = storage.get_study_id_from_name(name)
                taken = stored_study_attrs(storage, held).get("taken_at", met.setdefault(held, time.time()))
                if time.time() - taken > wait:
                    # Read again just before: a lock another worker took over meanwhile has a new time.
                    if stored_study_attrs(storage, held).get("taken_at", taken) == taken:
                        log.warning("lock %s held for over %g s (its holder died?); taking it over", name, wait)
                        storage.delete_study(held)
                    continue
                time.sleep(0.2)
    try:
        yield
    finally:
        with contextlib.suppress(KeyError):
            held = storage.get_study_id_from_name(name)
            if stored_study_attrs(storage, held).get("taken_at") == mine:  # not one taken over from this worker
                storage.delete_study(held)


def once(study: optuna.Study, key: str, work: Callable[[], Any]) -> tuple[Any, bool]:
    """`work()` stored as the study attribute `key`, run by one worker of all that call this:
    (the stored value, whether this call ran it)."""
    stored: Mapping[str, Any] = study_attrs(study)
    if key in stored:
        return stored[key], False
    with locked(study, key):
        again: Mapping[str, Any] = study_attrs(study)
        if key in again:  # another worker did it while this one waited
            return again[key], False
        value = work()
        set_study_attr(study, key, value)
        return value, True
