"""The one user-error type. The CLI prints it as one line and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SearchError(Exception):
    """A mistake the user can fix: the message says what, where, and how."""


def did_you_mean(value: object, allowed: Iterable[object], cutoff: float = 0.7) -> str:
    """' (did you mean 'x'?)' for the closest allowed value, or ''; `cutoff`: how alike (0..1)."""
    names = [str(a) for a in allowed]
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""


def one_of(allowed: Iterable[object]) -> str:
    return ", ".join(str(a) for a in allowed)
