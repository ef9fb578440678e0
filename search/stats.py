"""Statistics of repeated runs, as pure functions: the Student-t interval of a mean, how often a
winner stays first when one seed per configuration is drawn, and per-metric summaries.
"""

from __future__ import annotations

import math
import random
import statistics
from itertools import product
from typing import Any

EXACT_LIMIT = 200_000  # winner stability: enumerate every draw up to this many, else resample
RESAMPLES = 20_000


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, sample std, low, high): Student-t interval mean +- t_{(1+level)/2, n-1} * std / sqrt(n)."""
    from scipy import stats

    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan"), float("nan"), float("nan")
    std = statistics.stdev(values)
    half = stats.t.ppf((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric over the runs: mean, sample std and the 95% Student-t interval (low, high)."""
    out = {}
    for k in runs[0]:
        mean, std, lo, hi = t_interval([r[k] for r in runs])
        out[k] = {"mean": mean, "std": std, "low": lo, "high": hi}
    return out


def winner_stability(values: dict[Any, list[float]], maximize: bool = True, seed: int = 0) -> tuple[Any, float, str]:
    """How often the configuration with the best mean stays first when one seed per configuration
    is drawn: (that configuration, the fraction, 'exact' or 'resampled N').

    Every combination of one run per configuration is enumerated when there are at most
    EXACT_LIMIT; otherwise RESAMPLES draws with a seeded generator. A tie for first counts as a
    share (1/number tied).
    """
    sign = 1 if maximize else -1
    names = list(values)
    top = max(names, key=lambda n: sign * statistics.fmean(values[n]))
    i_top = names.index(top)

    def share(draw: tuple[float, ...]) -> float:
        best = max(sign * v for v in draw)
        if sign * draw[i_top] < best:
            return 0.0
        return 1 / sum(1 for v in draw if sign * v == best)

    combos = math.prod(len(values[n]) for n in names)
    if combos <= EXACT_LIMIT:
        return top, sum(share(d) for d in product(*(values[n] for n in names))) / combos, "exact"
    rng = random.Random(seed)
    total = sum(share(tuple(rng.choice(values[n]) for n in names)) for _ in range(RESAMPLES))
    return top, total / RESAMPLES, f"resampled {RESAMPLES}"
