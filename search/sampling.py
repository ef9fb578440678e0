"""What Optuna's samplers and pruners read: the recipe's sampler and pruner, seeded per trial,
and the constraints (the recipe's bounds, out of memory) every trial stores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import optuna
from optuna.trial import TrialState

from search.optuna_api import NumberedQMC
from search.recipe import BoundCfg, Recipe
from search.record import TrialAttrs, attrs, number


def trial_seed(study_seed: int, number: int) -> int:
    """Trial `number`'s training seed: initial weights, data order, augmentation, mixing, dropout."""
    return (study_seed * 1_000_003 + number) % 2**31


def sampler_seed(study_seed: int, number: int) -> int:
    """The sampler's seed for trial `number`: its own stream, apart from the training seed."""
    return int(np.random.SeedSequence([study_seed, number, 1]).generate_state(1)[0])


def constraint_values(bounds: dict[str, BoundCfg], measures: dict[str, Any]) -> dict[str, float]:
    """Per recipe constraint (study.constraints): how far the measure is beyond its bound (<= 0: within).

    Relative to the bound (value/max - 1, 1 - value/min), so constraints of different units weigh
    alike in the samplers' summed violation.
    """
    out = {}
    for name, b in bounds.items():
        v = measures[name]
        over = [v / b.max - 1 if b.max else v - b.max] if b.max is not None else []
        under = [1 - v / b.min if b.min else b.min - v] if b.min is not None else []
        out[name] = max(over + under)
    return out


def make_sampler(recipe: Recipe) -> optuna.samplers.BaseSampler:
    """The recipe's sampler; `reseed_sampler` gives it each trial's own seed before it samples."""
    s, seed = recipe.study.sampler, recipe.study.seed
    builders: dict[str, Callable[[], optuna.samplers.BaseSampler]] = {
        "tpe": lambda: optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=s.n_startup_trials,
            multivariate=s.multivariate,
            group=s.group and s.multivariate,
            constant_liar=s.constant_liar,
        ),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, population_size=s.population_size),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=s.n_startup_trials),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=s.n_startup_trials, warn_independent_sampling=False
        ),
        "qmc": lambda: NumberedQMC(seed=seed, qmc_type=s.qmc_type, warn_independent_sampling=False),
    }
    return builders[s.name]()


P = TypeVar("P", bound=optuna.pruners.BasePruner)


def _held(cls: type[P]) -> Callable[..., P]:
    """`cls` that prunes nothing until `min_trials` trials completed (what the median pruner's
    n_startup_trials does), as the recipe's study.pruner.min_trials promises for every pruner.

    The inner pruner is still asked at every step, so each trial records the rungs it reached
    and later trials are compared against the early ones too. A subclass, not a wrapper:
    TPE treats a HyperbandPruner's brackets specially and finds them by isinstance.
    """

    class Held(cls):  # type: ignore[misc, valid-type]
        def __init__(self, min_trials: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.min_trials = min_trials

        def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
            pruned = super().prune(study, trial)
            if not pruned or self.min_trials == 0:
                return pruned
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            return len(done) >= self.min_trials

    Held.__name__ = Held.__qualname__ = f"Held{cls.__name__}"
    return Held


HeldSuccessiveHalving = _held(optuna.pruners.SuccessiveHalvingPruner)


HeldHyperband = _held(optuna.pruners.HyperbandPruner)


def value_at(values: dict[int, float], sec_per_epoch: float, compute: float) -> float | None:
    """A trial's intermediate value once it had spent `compute` device-seconds: the value of its
    last epoch k with k * sec_per_epoch <= compute (its final one when it ended sooner); None
    when even its first epoch cost more."""
    steps = [k for k in values if k * sec_per_epoch <= compute * (1 + 1e-9)]
    return values[max(steps)] if steps else None


class EqualComputePruner(optuna.pruners.BasePruner):
    """Percentile pruning (the median at 50) where trials are compared at equal compute: a trial at
    epoch k, having spent c = k x its seconds per epoch, is stopped when the best value it reached
    is worse than the `percentile` of the other trials' values at c (`value_at`). A slow pool
    entry thus meets what a fast one reached with as much compute, and is stopped early unless it
    is better at equal cost; among entries of one speed it prunes as the epoch-wise pruner does.

    Seconds per epoch come from the trials' records (`sec_per_epoch`); trials without one are left
    out. Nothing is pruned before `warmup_epochs` nor until `min_trials` trials completed.
    """

    def __init__(self, percentile: float, min_trials: int, warmup_epochs: int) -> None:
        self.percentile, self.min_trials, self.warmup_epochs = percentile, min_trials, warmup_epochs

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step, sec = trial.last_step, number(attrs(trial), "sec_per_epoch")
        if step is None or step < max(1, self.warmup_epochs) or not sec:
            return False
        ended = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if sum(t.state == TrialState.COMPLETE for t in ended) < max(1, self.min_trials):
            return False
        compute = step * sec
        others = []
        for t in ended:
            s = number(attrs(t), "sec_per_epoch")
            v = value_at(t.intermediate_values, s, compute) if s else None
            if v is not None and t.number != trial.number:
                others.append(v)
        mine = [v for k, v in trial.intermediate_values.items() if k <= step]
        if not others or not mine:
            return False
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        q = 100 - self.percentile if maximize else self.percentile  # the cut, measured from the worst
        cut = float(np.percentile(others, q))
        return max(mine) < cut if maximize else min(mine) > cut


def make_pruner(recipe: Recipe) -> optuna.pruners.BasePruner:
    p = recipe.study.pruner
    if p.compare == "compute":
        return EqualComputePruner(50.0 if p.name == "median" else p.percentile, p.min_trials, p.warmup_epochs)
    builders: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=p.min_trials, n_warmup_steps=p.warmup_epochs),
        "percentile": lambda: optuna.pruners.PercentilePruner(
            p.percentile, n_startup_trials=p.min_trials, n_warmup_steps=p.warmup_epochs
        ),
        "successive_halving": lambda: HeldSuccessiveHalving(
            p.min_trials, min_resource=max(1, p.warmup_epochs), reduction_factor=p.reduction_factor
        ),
        "hyperband": lambda: HeldHyperband(
            p.min_trials,
            min_resource=max(1, p.warmup_epochs),
            max_resource=recipe.train.epochs,
            reduction_factor=p.reduction_factor,
        ),
        "none": optuna.pruners.NopPruner,
    }
    return builders[p.name]()


OUT_OF_MEMORY = "out_of_memory"  # the constraint an OOM result violates


def constraints(a: TrialAttrs, bounds: dict[str, BoundCfg] | None = None) -> dict[str, float]:
    """The constraint values of a trial that reaches the sampler, by name (<= 0: feasible).

    Read from what the trial recorded (its user attrs); `record_constraints` stores them as
    Optuna constraints, which every constrained sampler (TPE, GP, NSGA-II) reads from COMPLETE
    and PRUNED trials. Every such trial carries every name (GP needs as many values on each).
    out_of_memory: 1 when the configuration did not fit even at the smallest micro-batch.
    The recipe's study.constraints (`bounds`) on measures recorded before training (params,
    flops, latency_ms, throughput): see `constraint_values`.
    """
    out = {OUT_OF_MEMORY: 1.0 if a.get("status") == "oom" else 0.0}
    measured = {n: number(a, n) for n in bounds or {}}
    if bounds and all(v is not None for v in measured.values()):
        out.update(constraint_values(bounds, measured))
    return out


def record_constraints(trial: optuna.Trial, bounds: dict[str, BoundCfg] | None = None) -> None:
    """Store `constraints` on a trial about to end COMPLETE or PRUNED (once: Optuna keeps the first)."""
    for name, value in constraints(attrs(trial), bounds).items():
        trial.set_constraint(name, value)
