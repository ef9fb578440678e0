"""What Optuna's samplers and pruners read: the recipe's sampler and pruner, seeded per trial,
and the constraints (the recipe's bounds, out of memory) every trial stores.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import optuna
from optuna.trial import TrialState

from search.optuna_api import NumberedQMC
from search.recipe import BoundCfg, Recipe
from search.record import TrialAttrs, attrs, number
from search.trials import POOL_PARAM, label


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


SHARING = ("tpe", "gp", "cmaes")  # the samplers whose start-up shares the pool by compute (`_sharing`)


def make_sampler(recipe: Recipe) -> optuna.samplers.BaseSampler:
    """The recipe's sampler; `reseed_sampler` gives it each trial's own seed before it samples.
    TPE, GP and CMA-ES share their start-up trials out over the pool by compute (`_sharing`)
    unless study.sampler.startup_pool is random."""
    s, seed = recipe.study.sampler, recipe.study.seed
    share: dict[str, Any] = {
        "share": s.startup_pool == "compute",
        "epochs": recipe.train.epochs,
        "n_startup": s.n_startup_trials,
    }
    builders: dict[str, Callable[[], optuna.samplers.BaseSampler]] = {
        "tpe": lambda: SharingTPE(
            **share,
            seed=seed,
            n_startup_trials=s.n_startup_trials,
            multivariate=s.multivariate,
            group=s.group and s.multivariate,
            constant_liar=s.constant_liar,
        ),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, population_size=s.population_size),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "gp": lambda: SharingGP(**share, seed=seed, n_startup_trials=s.n_startup_trials),
        "cmaes": lambda: SharingCmaEs(
            **share, seed=seed, n_startup_trials=s.n_startup_trials, warn_independent_sampling=False
        ),
        "qmc": lambda: NumberedQMC(seed=seed, qmc_type=s.qmc_type, warn_independent_sampling=False),
    }
    return builders[s.name]()


def counts_flops(recipe: Recipe, n_entries: int) -> bool:
    """Whether every trial records its `flops`: the cost the equal-compute pruner and the
    compute-shared start-up (on a pool of several entries) weigh epochs by."""
    s = recipe.study.sampler
    sharing = s.startup_pool == "compute" and s.name in SHARING and n_entries > 1
    return recipe.study.pruner.compare == "compute" or sharing


def least_spent(entries: Sequence[str], spent: Sequence[tuple[str, float | None, float]]) -> list[str]:
    """The pool entries that have had the least compute, in `entries`' order: those no trial has
    tried yet; else those whose trials' epochs x cost per epoch add up least.

    `spent`: (entry, flops or None, epochs) per trial. An entry's cost per epoch is the median of
    its trials' recorded flops (one image's forward pass: every trial of a study sees the same
    images, so epochs cost in proportion); where an entry has trials but none recorded flops (not
    counted, or not yet), every epoch counts alike, for every entry.
    """
    mine = [(e, f, k) for e, f, k in spent if e in entries]
    fresh = [e for e in entries if all(e != x for x, _, _ in mine)]
    if fresh:
        return fresh
    known = {e: [f for x, f, _ in mine if x == e and f] for e in entries}
    cost = {e: statistics.median(v) for e, v in known.items() if v}
    if len(cost) < len(entries):
        cost = dict.fromkeys(entries, 1.0)
    total = {e: cost[e] * sum(k for x, _, k in mine if x == e) for e in entries}
    low = min(total.values())
    return [e for e in entries if total[e] <= low * (1 + 1e-9)]


def spent_by_trial(trials: Sequence[optuna.trial.FrozenTrial], epochs: int) -> list[tuple[str, float | None, float]]:
    """(entry, flops, epochs) of every started trial: the epochs it trained itself (`trained_epochs`,
    recorded every epoch, also where several objectives leave no intermediate values; a retry's
    resumed epochs count on the trial that trained them), or all it plans (`epochs`, or its own
    searched value) while it runs."""
    out = []
    for t in trials:
        entry, a = label(t), attrs(t)
        if entry is None or t.state == TrialState.WAITING:
            continue
        ran = (number(a, "trained_epochs") or 0) if t.state.is_finished() else t.params.get("epochs", epochs)
        out.append((entry, number(a, "flops"), float(ran)))
    return out


S = TypeVar("S", bound=optuna.samplers.BaseSampler)


def _sharing(cls: type[S]) -> type[S]:
    """`cls` whose start-up trials (before it models anything: fewer than `n_startup` trials
    COMPLETE or PRUNED, as TPE, GP and CMA-ES count them) take the pool entry that has had the
    least compute (`least_spent`) instead of a random one; among equals, a draw seeded by the
    study's seed and the trial number. A pool entry fifty times costlier then takes one start-up
    trial while a cheap one takes many, and the model the sampler builds afterwards has seen
    both. Every other parameter, and every draw after the start-up, is the sampler's own.
    Counted operations, not timings: the choice is the same on any machine, in every run.
    """

    class Sharing(cls):  # type: ignore[misc, valid-type]
        def __init__(self, share: bool, epochs: int, n_startup: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.share, self.share_epochs, self.share_startup = share, epochs, n_startup
            self.share_seed = kwargs.get("seed") or 0

        def sample_independent(
            self,
            study: optuna.Study,
            trial: optuna.trial.FrozenTrial,
            param_name: str,
            param_distribution: optuna.distributions.BaseDistribution,
        ) -> Any:
            dist = param_distribution
            if (
                self.share
                and param_name == POOL_PARAM
                and isinstance(dist, optuna.distributions.CategoricalDistribution)
            ):
                trials = study.get_trials(deepcopy=False)
                done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
                if len(done) < self.share_startup:
                    entries = [str(c) for c in dist.choices]
                    others = [t for t in trials if t.number != trial.number]
                    low = least_spent(entries, spent_by_trial(others, self.share_epochs))
                    rng = np.random.default_rng([self.share_seed, trial.number, 2])
                    return dist.choices[entries.index(low[int(rng.integers(len(low)))])]
            return super().sample_independent(study, trial, param_name, param_distribution)

    Sharing.__name__ = Sharing.__qualname__ = f"Sharing{cls.__name__}"
    return Sharing


SharingTPE = _sharing(optuna.samplers.TPESampler)
SharingGP = _sharing(optuna.samplers.GPSampler)
SharingCmaEs = _sharing(optuna.samplers.CmaEsSampler)


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


def value_at(values: dict[int, float], cost_per_epoch: float, compute: float) -> float | None:
    """A trial's intermediate value once it had spent `compute`: the value of its last epoch k with
    k * cost_per_epoch <= compute (its final one when it ended sooner); None when even its first
    epoch cost more."""
    steps = [k for k in values if k * cost_per_epoch <= compute * (1 + 1e-9)]
    return values[max(steps)] if steps else None


class EqualComputePruner(optuna.pruners.BasePruner):
    """Percentile pruning (the median at 50) where trials are compared at equal compute: a trial at
    epoch k, having spent c = k x its cost per epoch, is stopped when the best value it reached is
    worse than the `percentile` of the other trials' values at c (`value_at`). A slow pool entry
    thus meets what a fast one reached with as much compute, and goes on only where it is better
    at equal cost; among trials of one cost it prunes as the epoch-wise pruner does.

    The cost of an epoch is the model's recorded `flops` (one image's forward pass): every trial
    of a study sees the same images, so its epochs cost in proportion. Counted, not timed, so a
    decision is the same on any machine and in every run (timings would make pruning, and with it
    the trials that follow, depend on the machine's load). Where a trial has no `flops` (they could
    not be counted), all are compared at equal epochs. As Optuna's pruners do, it compares with
    completed trials; nothing is pruned before `warmup_epochs` nor until `min_trials` completed.
    """

    def __init__(self, percentile: float, min_trials: int, warmup_epochs: int) -> None:
        self.percentile, self.min_trials, self.warmup_epochs = percentile, min_trials, warmup_epochs

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < max(1, self.warmup_epochs):
            return False
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.number != trial.number]
        if len(done) < max(1, self.min_trials):
            return False
        counted = [number(attrs(t), "flops") for t in (trial, *done)]
        # a model whose operations were not counted: every epoch costs alike
        costs = [float(c) for c in counted if c] if all(counted) else [1.0] * len(counted)
        compute = step * costs[0]
        held = [value_at(t.intermediate_values, c, compute) for t, c in zip(done, costs[1:], strict=True)]
        others = [v for v in held if v is not None]
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
