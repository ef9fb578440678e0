"""The one user-error type (the CLI prints it as one line and exits 2), and the ways a trial
ends early, which the trial raises and the work loop handles (search.objective, search.workers)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SearchError(Exception):
    """A mistake the user can fix: the message says what, where, and how."""


class TrialFailed(Exception):
    """A trial that ended without a result (diverged, out of memory, invalid combination)."""


class TrialLost(Exception):
    """Another worker failed this trial (as stale) while it ran here: its retry runs elsewhere."""


class TrialInterrupted(Exception):
    """SIGTERM or Ctrl-C stopped the trial: its last epoch is saved and it is queued again."""


class TotalReached(Exception):
    """The study's total is taken; this trial does not count."""


def did_you_mean(value: object, allowed: Iterable[object], cutoff: float = 0.7) -> str:
    """' (did you mean 'x'?)' for the closest allowed value, or ''; `cutoff`: how alike (0..1)."""
    names = [str(a) for a in allowed]
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""


def one_of(allowed: Iterable[object]) -> str:
    return ", ".join(str(a) for a in allowed)
