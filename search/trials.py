"""Reading stored trials: a trial's pool label, primary value and feasibility, which trials take
a slot of the study's total, and the one ranking of complete trials that every "best" uses
(the report, the progress line, checkpoints kept, confirmation, `best`).

The bottom of the package's study layer: it imports Optuna and the record only, so workers,
artifacts, the report and the study all read trials the same way.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.record import TrialAttrs, attrs, system_attrs

POOL_PARAM = "model"  # the categorical parameter of pool labels (search.space samples it)

STALE_REASON = "worker died (no heartbeat)"
NOT_COUNTED = ("interrupted", "study total reached", STALE_REASON)  # FAIL reasons that free their slot


def label(t: FrozenTrial) -> str | None:
    """The trial's pool entry: recorded when it started, else its sampled categorical."""
    return attrs(t).get("pool_label") or t.params.get(POOL_PARAM)


def spent_seconds(a: TrialAttrs) -> float:
    """Device-seconds a trial spent on its epochs (training and validation), from its record:
    `train_seconds`, or epochs x seconds per epoch where a trial recorded only those."""
    if a.get("train_seconds") is not None:
        return float(a["train_seconds"])
    return float(a.get("epochs") or 0) * float(a.get("sec_per_epoch") or 0.0)


def compute_by_entry(trials: list[FrozenTrial]) -> dict[str, float]:
    """Device-seconds spent per pool entry, most first (every trial that trained counts: pruned,
    failed and retried ones too, as their compute was spent)."""
    out: dict[str, float] = {}
    for t in trials:
        name, spent = label(t), spent_seconds(attrs(t))
        if name is not None and spent > 0:
            out[name] = out.get(name, 0.0) + spent
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def value(t: FrozenTrial) -> float | None:
    """The primary metric of a trial: its value, or its first objective in a multi-objective study."""
    return t.values[0] if t.values else None


def feasible(t: FrozenTrial) -> bool:
    """Whether every constraint stored on the trial is satisfied (a trial without any is).

    Reads what `sampling.record_constraints` stored, as Optuna's samplers and `best_trials` do."""
    return all(v <= 0 for v in t.constraints.values())


def maximizing(study: optuna.Study) -> bool:
    """Whether the study's primary objective is maximised."""
    return study.directions[0] == optuna.study.StudyDirection.MAXIMIZE


def best_first(study: optuna.Study, scored: list[tuple[int, float]]) -> list[int]:
    """Trial numbers by primary value, best first; ties: the earlier trial (the rule of `ranked`)."""
    sign = -1 if maximizing(study) else 1
    return [n for n, _ in sorted(scored, key=lambda nv: (sign * nv[1], nv[0]))]


def ranked(study: optuna.Study) -> list[FrozenTrial]:
    """The complete, feasible trials with a value, best primary value first (ties: the earlier trial).

    The one ranking of the package. An infeasible trial (a constraint violated) is never best,
    is never confirmed and keeps no checkpoint: it could never be chosen.
    """
    done = {
        t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values and feasible(t)
    }
    return [done[n] for n in best_first(study, [(n, t.values[0]) for n, t in done.items()])]


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that take one of the study's n_trials slots.

    Finished, pruned, running and queued trials count; so do failures of the trial itself
    (diverged, out of memory, invalid combination). A FAIL counts not when it says it frees its
    slot (interrupted, total reached, worker died), has no reason (its process died before
    writing one), or was retried: the retry holds the slot instead.
    """
    retried = {n for t in trials for n in system_attrs(t).get("retry_history", ())}
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    return [
        t
        for t in trials
        if t.state in live
        or (
            t.state == TrialState.FAIL
            and t.number not in retried
            and attrs(t).get("fail_reason") not in (*NOT_COUNTED, None)
        )
    ]


def finished(study: optuna.Study) -> int:
    """Trials that ended and count towards the total."""
    return sum(1 for t in counted(study.get_trials(deepcopy=False)) if t.state.is_finished())


def remaining(study: optuna.Study, n_trials: int) -> int:
    """Slots of the total not yet taken by a counted trial."""
    return max(0, n_trials - len(counted(study.get_trials(deepcopy=False))))
