"""This process: the name it records on the trials it runs, and stopping on a signal.

The first SIGTERM or SIGINT (Ctrl-C) sets STOP: the running trial stops at its next step, keeps
its last finished epoch and is queued again; the second one raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

WORKER = f"{socket.gethostname()}:{os.getpid()}"  # recorded on each trial: which process ran it

STOP = threading.Event()  # set by the first SIGTERM / SIGINT: the running trial stops at its next step


STOPPED_BY: list[str] = []


def _on_signal(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if STOP.is_set():  # the second one: now
        raise KeyboardInterrupt(name)
    STOPPED_BY[:] = [name]
    STOP.set()
    again = "Ctrl-C again" if signum == signal.SIGINT else "a second signal"
    print(
        f"\n{name}: stopping at the next step; the running trial keeps its last finished epoch and is "
        f"queued again ({again} quits at once)",
        file=sys.stderr,
        flush=True,
    )


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT set STOP (the second raises KeyboardInterrupt) while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STOP.clear()
    old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def raise_if_stopped() -> None:
    """Raise KeyboardInterrupt (named after the signal) once a signal asked to stop."""
    if STOP.is_set():
        raise KeyboardInterrupt(STOPPED_BY[0] if STOPPED_BY else "SIGINT")
