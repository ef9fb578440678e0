"""Confirmation over seeds: the top configurations trained again with further seeds.

After the search (`study.confirm: {top_k, seeds}`) or on demand (`search confirm STUDY`), the top_k
feasible complete trials are trained again with seeds - 1 further seeds, on the same train/val
splits (the test split is never read: `fit` sees train and val only). Their spread says whether
the winner is a winner or noise.

Where the runs live: a companion study `NAME/confirm` in the same storage (a recipe's study name
cannot hold '/', so the name is free). Optuna's samplers read every complete trial of their study
through the storage (TPE, NSGA-II and GP call `study._get_trials` themselves), so confirmation
trials inside the main study would be sampled from unless each sampler were wrapped around
private API; `n_trials` counting, the dashboard's history and importance plots would each need
the same filter. In their own study they are invisible to all of them by construction, workers
pop them from the queue like any trials (shared storage shares the work), and the dashboard
shows them as a study of their own. Each records the trial it confirms (`confirms`), its seed
index (1 .. seeds - 1; index 0 is the source trial itself) and its seed.
"""

from __future__ import annotations

import math
import random
import statistics
import threading
import time
from itertools import product
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import optuna_api
from search.recipe import Recipe

SUFFIX = "/confirm"
EXACT_LIMIT = 200_000  # winner stability: enumerate every draw up to this many, else resample
RESAMPLES = 20_000


def companion_name(name: str) -> str:
    return name + SUFFIX


def companion(study: optuna.Study, create: bool = False) -> optuna.Study | None:
    """The study holding `study`'s confirmation runs (None if it has none and create is False)."""
    name = companion_name(study.study_name)
    sampler = optuna.samplers.RandomSampler(seed=0)  # every parameter is fixed by the queue: nothing is drawn
    if name in {
        s.study_name for s in optuna.get_all_study_summaries(optuna_api.storage_of(study), include_best_trial=False)
    }:
        return optuna.load_study(study_name=name, storage=optuna_api.storage_of(study), sampler=sampler)
    if not create:
        return None
    c = optuna.create_study(
        study_name=name,
        storage=optuna_api.storage_of(study),
        directions=study.directions,
        sampler=sampler,
        load_if_exists=True,
    )
    if study.metric_names:
        c.set_metric_names(study.metric_names)
    c.set_user_attr("confirms_study", study.study_name)
    return c


def confirm_seed(source_seed: int, index: int) -> int:
    """The seed of a configuration's index-th confirmation run (index 0: the source trial's own)."""
    return source_seed if index == 0 else (source_seed * 1_000_003 + 7_919 * index) % 2**31


def key(t: FrozenTrial) -> tuple[int, int] | None:
    """(source trial number, seed index) of a confirmation trial."""
    if "confirms" not in t.user_attrs:
        return None
    return int(t.user_attrs["confirms"]), int(t.user_attrs["seed_index"])


def enqueue(study: optuna.Study, recipe: Recipe, top_k: int, seeds: int) -> int:
    """Queue the missing confirmation runs of the top_k trials; returns how many were queued.

    Idempotent: a (source, seed index) already in the companion study, in any state, is not queued
    again. Two workers queueing at the same moment may both queue one; the later copy ends at
    once as a duplicate when it starts (`objective`).
    """
    from search.report import complete_trials

    sources = complete_trials(study, recipe)[:top_k]
    c = companion(study, create=True)
    assert c is not None  # created if missing
    have = {key(t) for t in c.get_trials(deepcopy=False)}
    n = 0
    for t in sources:
        seed = t.user_attrs.get("seed", 0)
        for i in range(1, seeds):
            if (t.number, i) in have:
                continue
            c.enqueue_trial(
                t.params,
                user_attrs={"confirms": t.number, "seed_index": i, "seed": confirm_seed(seed, i), "source_seed": seed},
            )
            n += 1
    return n


def _duplicate(trial: optuna.Trial) -> bool:
    from search.workers import counted

    k = key(optuna_api.frozen(trial))
    return any(key(t) == k and t.number < trial.number for t in counted(trial.study.get_trials(deepcopy=False)))


def work(recipe: Recipe, study: optuna.Study, *, quiet: bool = False) -> int:
    """Run queued confirmation runs in this process until none is left; returns how many ran here."""
    from search import study as st
    from search import workers
    from search.data import load_data
    from search.pool import parse_pool
    from search.recipe import recipe_from_dict

    c = companion(study)
    if c is None or not any(t.state == TrialState.WAITING for t in c.get_trials(deepcopy=False)):
        return 0
    say = (lambda s: None) if quiet else print
    d = recipe.normalized()
    d["study"]["top_k"] = 0  # confirmation runs keep no checkpoints: retrain makes the final model
    run_recipe = recipe_from_dict(d, source="confirmation")
    entries = parse_pool(recipe.pool)
    data = load_data(recipe.data, recipe.study.seed)  # the same train/val splits as the search
    inner = st.make_objective(run_recipe, data, entries, recipe.hardware.device, on_line=say, counting=False)
    hb = recipe.study.heartbeat

    def objective(trial: optuna.Trial, lost: threading.Event | None = None) -> float | list[float]:
        if _duplicate(trial):
            trial.set_user_attr("fail_reason", "duplicate confirmation")
            raise workers.TrialFailed("duplicate confirmation")
        return inner(trial, lost)

    def line(cs: optuna.Study, t: FrozenTrial) -> None:
        k = key(t)
        v = (
            f"val_{recipe.study.metric} {t.values[0]:.4f}"
            if t.values
            else (t.user_attrs.get("fail_reason") or "failed")
        )
        if k:
            say(f"confirm trial {k[0]:>3} seed #{k[1]}  {t.user_attrs.get('pool_label', ''):<24} {v}")

    ran = 0
    while True:
        workers.sweep(c, hb)
        trials = c.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            workers.stopped()
            done = workers.run_one(c, objective, hb, say)
            if done is not None:
                line(c, done)
            ran += 1
            continue
        if not any(t.state == TrialState.RUNNING for t in trials):
            return ran
        time.sleep(min(hb, 5))  # another worker's run may die and be queued again


# ---------------------------------------------------------------------------
# statistics of the stored runs (pure functions)


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


def confirmed(study: optuna.Study, recipe: Recipe) -> list[dict[str, Any]]:
    """One row per confirmed configuration (source trial + its complete runs), best mean first.

    Row: trial, entry, seeds (n), values (seed index order), mean, std, low, high (95% t-interval),
    feasible, hyperparameters.
    """
    from search.report import POOL_PARAM, _label, value
    from search.sampling import feasible

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
                "entry": _label(src),
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
    sign = -1 if recipe.study.direction == "maximize" else 1
    rows.sort(key=lambda r: (sign * r["mean"], r["trial"]))
    return rows
