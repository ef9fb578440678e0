"""Once per study: work that the first of several workers starting together does (queue the warm
start, open the tracking parent run) while the others wait for it, on every storage.

The lock is a study of its own, `NAME/lock:KEY`: creating a study of a name that exists fails
atomically on every Optuna storage (a unique name in RDB, the journal's lock, the gRPC proxy's
storage), and the study is deleted when the work is done. Under the lock the worker reads the
study attribute that records the work again (another may have done it meanwhile), does it, and
writes the attribute; the others find it there and do nothing.
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
from search.record import set_study_attr, study_attrs

log = logging.getLogger("search")

LOCK_WAIT = 60.0  # seconds a worker waits for another to finish; then it goes on (the holder died)


@contextlib.contextmanager
def locked(study: optuna.Study, key: str, wait: float = LOCK_WAIT) -> Iterator[None]:
    """Hold the study's lock `key` while the block runs (waiting for another holder up to `wait` s)."""
    storage = optuna_api.storage_of(study)
    name = f"{study.study_name}/lock:{key}"
    give_up = time.monotonic() + wait
    while True:
        try:
            storage.create_new_study([StudyDirection.MINIMIZE], name)
            break
        except optuna.exceptions.DuplicatedStudyError:
            if time.monotonic() > give_up:
                log.warning("lock %s held for over %g s (its holder died?); going on without it", name, wait)
                yield
                return
            time.sleep(0.2)
    try:
        yield
    finally:
        with contextlib.suppress(KeyError):
            storage.delete_study(storage.get_study_id_from_name(name))


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
