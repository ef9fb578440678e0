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

Runs are trained by the same objective as the search's trials (search.objective, not counted
towards n_trials) in the same work loop (search.workers.drain).
"""

from __future__ import annotations

import threading
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import optuna_api, workers
from search.data import load_data
from search.errors import TrialFailed
from search.objective import make_objective, told
from search.outage import Patience
from search.pool import parse_pool
from search.recipe import Recipe, recipe_from_dict
from search.record import attrs, new_attrs, set_attrs, set_study_attrs
from search.stats import t_interval
from search.trials import POOL_PARAM, counted, feasible, label, ranked, value

SUFFIX = "/confirm"


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
    set_study_attrs(c, confirms_study=study.study_name)
    return c


def confirm_seed(source_seed: int, index: int) -> int:
    """The seed of a configuration's index-th confirmation run (index 0: the source trial's own)."""
    return source_seed if index == 0 else (source_seed * 1_000_003 + 7_919 * index) % 2**31


def key(t: FrozenTrial) -> tuple[int, int] | None:
    """(source trial number, seed index) of a confirmation trial."""
    a = attrs(t)
    if "confirms" not in a:
        return None
    return int(a.get("confirms", 0)), int(a.get("seed_index", 0))


def enqueue(study: optuna.Study, top_k: int, seeds: int) -> int:
    """Queue the missing confirmation runs of the top_k trials; returns how many were queued.

    Idempotent: a (source, seed index) already in the companion study, in any state, is not queued
    again. Two workers queueing at the same moment may both queue one; the later copy ends at
    once as a duplicate when it starts (`objective`).
    """
    sources = ranked(study)[:top_k]
    c = companion(study, create=True)
    assert c is not None  # created if missing
    have = {key(t) for t in c.get_trials(deepcopy=False)}
    n = 0
    for t in sources:
        seed = attrs(t).get("seed", 0)
        for i in range(1, seeds):
            if (t.number, i) in have:
                continue
            c.enqueue_trial(
                t.params,
                user_attrs=new_attrs(confirms=t.number, seed_index=i, seed=confirm_seed(seed, i), source_seed=seed),
            )
            n += 1
    return n


def _duplicate(trial: optuna.Trial) -> bool:
    k = key(optuna_api.frozen(trial))
    return any(key(t) == k and t.number < trial.number for t in counted(trial.study.get_trials(deepcopy=False)))


def run(recipe: Recipe, study: optuna.Study, *, quiet: bool = False) -> int:
    """Run queued confirmation runs in this process until none is left; returns how many ran here."""
    c = companion(study)
    if c is None or not any(t.state == TrialState.WAITING for t in c.get_trials(deepcopy=False)):
        return 0
    say = (lambda s: None) if quiet else print
    d = recipe.normalized()
    d["study"]["top_k"] = 0  # confirmation runs keep no checkpoints: retrain makes the final model
    run_recipe = recipe_from_dict(d, source="confirmation")
    data = load_data(recipe.data, recipe.study.seed)  # the same train/val splits as the search
    patience = Patience(recipe.study.storage_patience)
    inner = make_objective(
        run_recipe,
        data,
        parse_pool(recipe.pool),
        recipe.hardware.device,
        on_line=say,
        counting=False,
        patience=patience,
    )

    def objective(trial: optuna.Trial, lost: threading.Event | None = None) -> float | list[float]:
        if _duplicate(trial):
            set_attrs(trial, fail_reason="duplicate confirmation")
            raise TrialFailed("duplicate confirmation")
        return inner(trial, lost)

    def on_end(t: FrozenTrial | None) -> None:
        k = key(t) if t is not None else None
        if t is None or k is None:
            return
        v = f"val_{recipe.study.metric} {t.values[0]:.4f}" if t.values else (attrs(t).get("fail_reason") or "failed")
        say(f"confirm trial {k[0]:>3} seed #{k[1]}  {attrs(t).get('pool_label', ''):<24} {v}")

    return workers.drain(
        c, objective, recipe.study.heartbeat, say=say, on_end=on_end, patience=patience, on_told=told(run_recipe, c)
    )


def confirmed(study: optuna.Study, recipe: Recipe) -> list[dict[str, Any]]:
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
    sign = -1 if recipe.study.direction == "maximize" else 1
    rows.sort(key=lambda r: (sign * r["mean"], r["trial"]))
    return rows
