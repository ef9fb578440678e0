"""Reading confirmation runs: the companion study `NAME/confirm` that holds them, which trial and
seed each run confirms, and one row per confirmed configuration with its spread over seeds.

`search.confirm` queues and trains the runs; this module only reads what they stored, so the
report and `best` read confirmations without importing anything that trains.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import optuna_api
from search.record import attrs
from search.stats import t_interval
from search.trials import POOL_PARAM, feasible, label, maximizing, value

SUFFIX = "/confirm"


def companion_name(name: str) -> str:
    return name + SUFFIX


def companion(study: optuna.Study) -> optuna.Study | None:
    """The study holding `study`'s confirmation runs, None if it has none."""
    name = companion_name(study.study_name)
    storage = optuna_api.storage_of(study)
    if name not in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}:
        return None
    # every parameter is fixed by the queue: nothing is drawn
    return optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))


def key(t: FrozenTrial) -> tuple[int, int] | None:
    """(source trial number, seed index) of a confirmation trial."""
    a = attrs(t)
    if "confirms" not in a:
        return None
    return int(a.get("confirms", 0)), int(a.get("seed_index", 0))


def confirmed(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per confirmed configuration (source trial + its complete runs), best mean first.

    Row: trial, entry, seeds (n), values (seed index order), mean, std, low, high (95% t-interval),
    feasible, hyperparameters.
    """
    c = companion(study)
    if c is None:
        return []
    runs: dict[int, dict[int, float]] = {}
    for t in c.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        k, v = key(t), value(t)
        if k and v is not None:
            runs.setdefault(k[0], {}).setdefault(k[1], v)
    rows: list[dict[str, Any]] = []
    for n, more in runs.items():
        src = optuna_api.trial_by_number(study, n)
        first = value(src)
        if src.state != TrialState.COMPLETE or first is None:
            continue
        vals = [first] + [more[i] for i in sorted(more)]
        mean, std, lo, hi = t_interval(vals)
        rows.append(
            {
                "trial": n,
                "entry": label(src),
                "seeds": len(vals),
                "values": vals,
                "mean": mean,
                "std": std,
                "low": lo,
                "high": hi,
                "feasible": feasible(src),
                "hyperparameters": {k: v for k, v in src.params.items() if k != POOL_PARAM},
            }
        )
    sign = -1 if maximizing(study) else 1
    rows.sort(key=lambda r: (sign * r["mean"], r["trial"]))
    return rows
