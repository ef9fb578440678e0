"""Riding out a storage outage: a database restart, a proxy stopped, a network blip.

Every storage call of the work loop (ask, heartbeat, sweep, report, attributes, tell, reading
the trials) goes through one `Patience`: a call that fails because the storage is unreachable
is tried again with exponential backoff (0.5 s doubling to 15 s) for up to `study.storage_patience`
seconds, counted from the first failure of the outage. One line says when the storage went
away and one when it is back; past the patience the call raises StorageGone, and the worker
exits with EXIT_STORAGE_GONE, its trial's resume state kept for the next worker. A worker asked
to stop (SIGTERM, Ctrl-C: search.process) stops waiting at once the same way: a preempted node
has seconds, not the patience, before it is killed.

Only errors that mean "unreachable" are retried (see `unreachable`); a refused write (a
finished trial, a duplicate) raises at once as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import optuna
import sqlalchemy.exc

from search.process import STOP, STOPPED_BY

log = logging.getLogger("search")

T = TypeVar("T")

DEFAULT_PATIENCE = 300.0  # seconds (study.storage_patience): a database restart or failover fits in it
EXIT_STORAGE_GONE = 75  # sysexits' EX_TEMPFAIL: try again later, nothing is lost
FIRST_WAIT, LONGEST_WAIT = 0.5, 15.0  # seconds between tries: doubling from the first to the longest

_UNREACHABLE = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    ConnectionError,  # the gRPC client's connect timeout, sockets, Redis (its errors derive from it)
    TimeoutError,
)
_GRPC_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN")


class StorageGone(Exception):
    """The storage stayed unreachable for longer than `study.storage_patience`."""


def unreachable(e: BaseException) -> bool:
    """Whether `e` says the storage could not be reached (worth trying again), not that it refused."""
    if isinstance(e, optuna.exceptions.StorageInternalError):  # wraps every SQLAlchemy error: refusals too
        return e.__cause__ is None or unreachable(e.__cause__)
    if isinstance(e, _UNREACHABLE):
        return True
    code = getattr(e, "code", None)
    if type(e).__module__.startswith("grpc") and callable(code):  # grpc.RpcError of the proxy's client
        return getattr(code(), "name", "") in _GRPC_CODES
    return type(e).__module__.startswith("redis") and type(e).__name__ in ("ConnectionError", "TimeoutError")


class Patience:
    """One process's patience with its storage, shared by the work loop and the heartbeat thread.

    `call(fn, what)` runs `fn()` until it succeeds or the outage has lasted `seconds`; `back_at`
    is when the storage last came back (0.0: it never went away), so sweeps can give running
    trials time to beat again before judging them stale.
    """

    def __init__(self, seconds: float, say: Callable[[str], None] = log.warning) -> None:
        self.seconds, self.say = seconds, say
        self.down_since: float | None = None
        self.back_at = 0.0
        self._lock = threading.Lock()

    def call(self, fn: Callable[[], T], what: str) -> T:
        wait = FIRST_WAIT
        while True:
            try:
                out = fn()
            except Exception as e:
                if not unreachable(e):
                    raise
                left = self.down(e, what)
                error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if left <= 0:
                    raise StorageGone(
                        f"the storage has been unreachable for {self.seconds:g} s (study.storage_patience) "
                        f"at {what}: {error}"[:300]
                    ) from e
                if STOP.wait(min(wait, left)):  # asked to stop: no waiting out the outage
                    signal = STOPPED_BY[0] if STOPPED_BY else "a signal"
                    raise StorageGone(f"{signal} while the storage was unreachable at {what}: {error}"[:300]) from e
                wait = min(wait * 2, LONGEST_WAIT)
                continue
            self.up()
            return out

    def down(self, e: BaseException, what: str) -> float:
        """Note a failed call; returns the seconds of patience left."""
        with self._lock:
            now = time.time()
            if self.down_since is None:
                self.down_since = now
                first = str(e).splitlines()[0] if str(e) else ""
                self.say(
                    f"storage unreachable ({what}: {type(e).__name__}: {first[:120]}); "
                    f"retrying for up to {self.seconds:g} s (study.storage_patience)"
                )
            return self.down_since + self.seconds - now

    def up(self) -> None:
        """Note a call that went through: the outage, if any, is over."""
        if self.down_since is None:
            return
        with self._lock:
            if self.down_since is None:
                return
            self.back_at = time.time()
            self.say(f"storage back after {self.back_at - self.down_since:.0f} s; the work goes on")
            self.down_since = None
