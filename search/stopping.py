"""A study that stops itself: `study.stop` (patience, Optuna's Terminator) and `study.budget`.

`closing(recipe, study)` gives the work loop's `closed(trials)`: the reason no further trial may
start, or None. Patience: the last `patience` finished trials (counted ones, in the order they
ended) did not improve on the best value before them by more than `min_delta`. Terminator: once
`min_trials` trials are complete, the regret bound of a Gaussian process over the results
(Optuna's RegretBoundEvaluator) has fallen below the error of a result: where the study has
confirmation seeds (search.confirm), their measured spread (pooled standard deviation), else
Optuna's median error estimate. The budget: search.budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import optuna
from optuna.terminator import MedianErrorEvaluator, RegretBoundEvaluator, StaticErrorEvaluator
from optuna.trial import FrozenTrial, TrialState

from search import budget, confirm
from search.recipe import Recipe, StopCfg
from search.trials import counted, feasible, maximizing


def patience(values: list[float | None], n: int, delta: float, maximize: bool) -> str | None:
    """Why `values` (primary values of finished trials in the order they ended; None: no value)
    should stop: the last `n` did not beat the best before them by more than `delta`."""
    best: float | None = None
    since = 0
    for v in values:
        if v is not None and (best is None or (v - best if maximize else best - v) > delta):
            best, since = v, 0
        else:
            since += 1
    if best is None or since < n:
        return None
    return f"patience: no improvement beyond {delta:g} in the last {since} finished trials (best {best:.4g})"


def seed_spread(study: optuna.Study, recipe: Recipe) -> float | None:
    """The pooled standard deviation of the configurations trained over several seeds, or None."""
    rows = [r for r in confirm.confirmed(study, recipe) if r["seeds"] >= 2]
    if not rows:
        return None
    return math.sqrt(sum(r["std"] ** 2 for r in rows) / len(rows))


def terminator(study: optuna.Study, recipe: Recipe, cfg: StopCfg, trials: list[FrozenTrial]) -> str | None:
    """Optuna's Terminator rule: why the regret bound says more trials will not help, or None."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values and feasible(t)]
    if len(complete) < cfg.min_trials:
        return None
    improvement = RegretBoundEvaluator(min_n_trials=cfg.min_trials, seed=recipe.study.seed)
    spread = seed_spread(study, recipe)
    error: StaticErrorEvaluator | MedianErrorEvaluator
    if spread is not None:
        error, source = StaticErrorEvaluator(spread), "the spread of the confirmation seeds"
    else:
        warm = max(1, cfg.min_trials // 2)
        error = MedianErrorEvaluator(improvement, warm_up_trials=warm, n_initial_trials=cfg.min_trials)
        source = "Optuna's median error estimate"
    direction = study.directions[0]
    regret = improvement.evaluate(complete, direction)
    err = error.evaluate(complete, direction)
    if not regret < err:
        return None
    return f"terminator: regret bound {regret:.3g} below the error {err:.3g} ({source})"


def closing(recipe: Recipe, study: optuna.Study) -> Callable[[list[FrozenTrial]], str | None]:
    """`closed(trials)` for the work loop: the budget, then the stop rules (judged again only when
    a trial has ended since)."""
    cfg = recipe.study.stop
    seen: dict[int, str | None] = {}

    def closed(trials: list[FrozenTrial]) -> str | None:
        spent = budget.spent(recipe.study.budget, budget.used(trials, recipe.train.epochs))
        if spent or cfg is None:
            return spent
        ended = sorted(
            (t for t in counted(trials) if t.state.is_finished()),
            key=lambda t: (t.datetime_complete is None, t.datetime_complete, t.number),
        )
        if len(ended) not in seen:
            seen.clear()
            seen[len(ended)] = _rules(recipe, study, cfg, trials, ended)
        return seen[len(ended)]

    return closed


def _rules(
    recipe: Recipe, study: optuna.Study, cfg: StopCfg, trials: list[FrozenTrial], ended: list[FrozenTrial]
) -> str | None:
    if cfg.patience is not None:
        values = [t.values[0] if t.state == TrialState.COMPLETE and t.values and feasible(t) else None for t in ended]
        why = patience(values, cfg.patience, cfg.min_delta, maximizing(study))
        if why:
            return why
    return terminator(study, recipe, cfg, trials) if cfg.terminator else None
