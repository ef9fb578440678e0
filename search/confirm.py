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
towards n_trials) in the same work loop (search.workers.drain). Reading them (the companion
study, the rows of `report` and `best`) is search.confirmed, which trains nothing.
"""

from __future__ import annotations

import threading

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import optuna_api, workers
from search.confirmed import companion, companion_name, key
from search.data import load_data
from search.errors import TrialFailed
from search.objective import make_objective, told
from search.outage import Patience
from search.pool import parse_pool
from search.recipe import Recipe, recipe_from_dict
from search.record import attrs, new_attrs, set_attrs, set_study_attrs
from search.trials import counted, ranked


def create_companion(study: optuna.Study) -> optuna.Study:
    """The study holding `study`'s confirmation runs, created if it has none."""
    c = companion(study)
    if c is not None:
        return c
    c = optuna.create_study(
        study_name=companion_name(study.study_name),
        storage=optuna_api.storage_of(study),
        directions=study.directions,
        sampler=optuna.samplers.RandomSampler(seed=0),  # every parameter is fixed by the queue
        load_if_exists=True,
    )
    if study.metric_names:
        c.set_metric_names(study.metric_names)
    set_study_attrs(c, confirms_study=study.study_name)
    return c


def confirm_seed(source_seed: int, index: int) -> int:
    """The seed of a configuration's index-th confirmation run (index 0: the source trial's own)."""
    return source_seed if index == 0 else (source_seed * 1_000_003 + 7_919 * index) % 2**31


def enqueue(study: optuna.Study, top_k: int, seeds: int) -> int:
    """Queue the missing confirmation runs of the top_k trials; returns how many were queued.

    Idempotent: a (source, seed index) already in the companion study, in any state, is not queued
    again. Two workers queueing at the same moment may both queue one; the later copy ends at
    once as a duplicate when it starts (`objective`).
    """
    sources = ranked(study)[:top_k]
    c = create_companion(study)
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
