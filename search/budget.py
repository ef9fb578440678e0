"""Budgets across all workers: `study.budget: {epochs: N, hours: H, device_hours: G}`.

Counted from what every trial of the study recorded, whichever worker ran it: epochs it trained
itself (`trained_epochs`: a retry's resumed epochs were counted on the trial that trained them),
its wall time (start to end, or to now while it runs), and that wall time again where it ran on
a GPU or MPS device (`device_hours`; one device a trial). A worker takes no trial once the budget
is spent; trials in flight finish. For epochs, a running trial counts as the epochs it will
train, so that workers starting together do not overshoot: the study ends within one trial's
epochs of the budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from search.recipe import BudgetCfg
from search.record import attrs

ACCELERATORS = ("cuda", "mps")


@dataclass(frozen=True)
class Used:
    epochs: int  # trained so far
    planned: int  # trained so far, running trials counted at the epochs they will train
    hours: float
    device_hours: float


def _hours(t: FrozenTrial, now: float) -> float:
    if t.datetime_start is None:
        return 0.0
    end = t.datetime_complete.timestamp() if t.datetime_complete else now
    return max(0.0, end - t.datetime_start.timestamp()) / 3600


def used(trials: list[FrozenTrial], epochs_per_trial: int, now: float | None = None) -> Used:
    """What the trials have spent (`epochs_per_trial`: what a trial trains, `train.epochs`)."""
    now = time.time() if now is None else now
    epochs = planned = 0
    hours = device = 0.0
    for t in trials:
        if t.state == TrialState.WAITING:
            continue
        a = attrs(t)
        trained = int(a.get("trained_epochs") or 0)
        epochs += trained
        running = t.state == TrialState.RUNNING
        planned += max(trained, epochs_per_trial - int(a.get("resumed_from_epoch") or 0)) if running else trained
        h = _hours(t, now)
        hours += h
        if str(a.get("device", "")).startswith(ACCELERATORS):
            device += h
    return Used(epochs, planned, hours, device)


def spent(cfg: BudgetCfg | None, u: Used) -> str | None:
    """Why no further trial may start ('budget spent: ...'), or None."""
    if cfg is None:
        return None
    if cfg.epochs is not None and u.planned >= cfg.epochs:
        return f"budget spent: {u.epochs} of {cfg.epochs} epochs trained"
    if cfg.hours is not None and u.hours >= cfg.hours:
        return f"budget spent: {u.hours:.3g} of {cfg.hours:g} trial-hours"
    if cfg.device_hours is not None and u.device_hours >= cfg.device_hours:
        return f"budget spent: {u.device_hours:.3g} of {cfg.device_hours:g} device-hours"
    return None


def text(cfg: BudgetCfg | None, u: Used) -> str:
    """'budget used: 12/20 epochs, 0.01/2 h' ('' without a budget)."""
    if cfg is None:
        return ""
    parts = []
    if cfg.epochs is not None:
        parts.append(f"{u.epochs}/{cfg.epochs} epochs")
    if cfg.hours is not None:
        parts.append(f"{u.hours:.2g}/{cfg.hours:g} h")
    if cfg.device_hours is not None:
        parts.append(f"{u.device_hours:.2g}/{cfg.device_hours:g} device-h")
    return "budget used: " + ", ".join(parts)
