"""The study: the recipe stored in it, checks before anything is written, and the work of one
worker: the search's trials, then the confirmation of its winners (storages: search.storage;
sampler, pruner and constraints: search.sampling; one trial: search.objective; heartbeats,
retries, resuming and the work loop: search.workers).

The normalized recipe lives in the study (user attr `recipe`), so a worker
needs only the storage URL and the study name. `n_trials` is the study-wide
total: a trial that starts when the total is already taken (by finished,
running or waiting trials of lower number) ends at once as FAIL with reason
"study total reached" and is not counted, so any number of workers, runs and
resumes finish exactly `n_trials`.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import (
    budget,
    confirm,
    optuna_api,
    process,
    rank,
    space,
    stopping,
    tracking,
    warmstart,
    weights,
    workers,
)
from search.data import Data, load_data, load_raw
from search.data import check as check_data
from search.errors import SearchError
from search.objective import make_objective, told
from search.outage import Patience
from search.pool import IMAGENET_SOURCES, PoolEntry, parse_pool
from search.progress import Progress, best_so_far, compute_text, trial_line
from search.recipe import Recipe, recipe_from_dict
from search.record import set_study_attrs, study_attrs, versions
from search.resume import resume_dir, study_id, tidy
from search.sampling import make_pruner, make_sampler
from search.storage import (
    check_storage,
    default_storage,
    dir_of,
    mask,
    open_storage,
    require_study,
)
from search.trials import counted, finished

log = logging.getLogger("search")


def stored_form(recipe: Recipe) -> dict[str, Any]:
    """What the study keeps: the normalized recipe, its storage URL as written (${VAR} not filled
    in: no value of the environment is stored) with any password written into it masked."""
    d = recipe.normalized()
    if d["study"]["storage"]:
        d["study"]["storage"] = mask(d["study"]["storage"])
    if d["study"]["warm_start"]:
        name, at, url = d["study"]["warm_start"]["from"].partition("@")  # NAME@STORAGE: as a storage URL
        d["study"]["warm_start"]["from"] = name + at + (mask(url) if url else "")
    return d


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    """Parts that must agree between runs of one study (not the budget, storage or hardware)."""
    d = json.loads(json.dumps(d))
    for key in (
        "storage",
        "timeout",
        "n_trials",
        "heartbeat",
        "storage_patience",
        "confirm",
        "warm_start",
        "budget",
        "stop",
    ):
        d["study"].pop(key, None)
    d.pop("hardware", None)
    d.pop("tracking", None)
    d.get("rank", {}).pop("batch_size", None)  # images per frozen forward: the same features to float rounding
    return d


def diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def open_study(recipe: Recipe, storage_url: str | None = None, force: bool = False) -> optuna.Study:
    """Create the study (schema, recipe) or load it; a changed recipe is refused unless forced."""
    url = storage_url or recipe.study.storage or default_storage(recipe.study.name)
    storage = open_storage(url, recipe.study.heartbeat)
    study = optuna.create_study(
        study_name=recipe.study.name,
        storage=storage,
        load_if_exists=True,
        directions=recipe.study.directions,
        sampler=make_sampler(recipe),
        pruner=make_pruner(recipe),
    )
    new = stored_form(recipe)
    old = study_attrs(study).get("recipe")
    if old is not None and not force and _comparable(old) != _comparable(new):
        changes = diff(_comparable(old), _comparable(new))
        raise SearchError(
            f"study '{recipe.study.name}' in {mask(url)} was created with a different recipe "
            f"({'; '.join(changes[:5])}{' ...' if len(changes) > 5 else ''}); use another study.name, "
            "or --force to continue with the new recipe"
        )
    if old is None:
        set_study_attrs(study, versions=versions())  # what created it; each checkpoint carries its own
    study_id(study)  # set at creation (an older study gets one now): resume states carry it
    if old != new:
        set_study_attrs(study, recipe=new)
    if study.metric_names != recipe.study.names and len(study.directions) == len(recipe.study.names):
        study.set_metric_names(recipe.study.names)  # the dashboard's axes and the report's columns
    return study


def load_stored(storage_url: str, name: str) -> tuple[Recipe, optuna.Study]:
    """The recipe stored in an existing study (for workers and resumes).

    A missing study is refused before the storage is opened for writing: a fresh
    database gets no schema, a journal path no file.
    """
    require_study(
        name,
        storage_url,
        no_file="; check --storage, or create the study with `search run RECIPE`",
        no_study="create it with `python -m search run RECIPE`",
    )
    storage = open_storage(storage_url, heartbeat=None)
    try:
        summary = next(s for s in optuna.get_all_study_summaries(storage) if s.study_name == name)
    except StopIteration:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise SearchError(
            f"no study '{name}' in {mask(storage_url)}; studies there: {', '.join(names) or 'none'}"
        ) from None
    stored = study_attrs(summary).get("recipe")
    if stored is None:
        raise SearchError(f"study '{name}' has no stored recipe: it was not created by `search run`")
    recipe = recipe_from_dict(stored, source=f"recipe stored in study '{name}'")
    if isinstance(storage, optuna.storages.RDBStorage):
        storage.engine.dispose()
        storage = open_storage(storage_url, recipe.study.heartbeat)  # now with the study's heartbeat
    study = optuna.load_study(
        study_name=name, storage=storage, sampler=make_sampler(recipe), pruner=make_pruner(recipe)
    )
    study_id(study)
    return recipe, study


def leakage_warning(entries: list[PoolEntry], data: Data) -> str | None:
    risky = [e.label for e in entries if e.source in IMAGENET_SOURCES]
    if data.overlap == "none" or not risky:
        return None
    kind = "shares classes with" if data.overlap == "semantic" else "may overlap"
    return (
        f"{data.name} {kind} ImageNet, and these pool entries were trained on ImageNet labels: "
        f"{', '.join(risky)}. Their scores may be inflated; fairer choices: pretrained: false, "
        "SSL/SWSL (timm/resnet50.fb_ssl_yfcc100m_ft_in1k), CLIP (timm/vit_base_patch16_clip_224.openai), "
        "DINOv2 (timm/vit_small_patch14_dinov2.lvd142m)."
    )


def preflight(entries: list[PoolEntry]) -> None:
    """Every pretrained entry's weights are cached (or fetched) and plain data before any trial starts."""
    for e in entries:
        if e.pretrained:
            weights.check(e)


def check_all(recipe: Recipe, url: str) -> list[PoolEntry]:
    """Everything a study needs, checked before anything of it is written.

    Storage (scheme, ${VAR}, reachability), the dataset (known, single-label,
    folders present, official files present and matching their checksums,
    decodable) and the pool's weights (cached and plain data): a refusal here
    leaves no study, schema or file behind. The decoded dataset stays in this
    process's memory for the trials that follow.
    """
    check_storage(url)
    tracking.check(recipe.tracking)
    entries = parse_pool(recipe.pool)
    check_data(recipe.data)
    preflight(entries)
    load_raw(recipe.data)
    return entries


def ranked_entries(
    study: optuna.Study, recipe: Recipe, entries: list[PoolEntry], data: Data, say: Callable[[str], None] = print
) -> list[PoolEntry]:
    """The entries the search samples under `study.rank`, in rank order.

    The first worker ranks the pool (see search.rank) and stores the rows and the decision in
    the study (user attr `rank`); every later worker and resume reads them, so all sample the
    same entries. Entries that could not be ranked stay in, with the reason shown.
    """
    assert recipe.study.rank is not None  # only called under study.rank
    stored = study_attrs(study).get("rank")
    if stored is None:
        say(
            f"ranking {len(entries)} pool entries on frozen features before the search "
            f"(keep {recipe.study.rank.keep or 'all'}, by {recipe.rank.by})"
        )
        rows = rank.rank_pool(recipe, data)
        decision = {"rows": rows, **rank.decide(rows, recipe.study.rank.keep, recipe.rank.by)}
        stored = study_attrs(study).get("rank")  # another worker may have stored its ranking meanwhile
        if stored is None:
            set_study_attrs(study, rank=decision)
            stored = decision
    say(rank.table(stored["rows"], stored["by"]))
    say(rank.decision_text(stored))
    by_label = {e.label: e for e in entries}
    return [by_label[label] for label in stored["order"] if label in by_label]


def start_clock(study: optuna.Study, recipe: Recipe) -> None:
    """A `run` starts the study-wide timeout afresh (or clears it); workers share its deadline."""
    set_study_attrs(study, deadline=time.time() + recipe.study.timeout if recipe.study.timeout else None)


def _deadline(study: optuna.Study, recipe: Recipe) -> float | None:
    deadline = study_attrs(study).get("deadline")
    if deadline is None and recipe.study.timeout:  # workers started without `run`: the first starts the clock
        deadline = time.time() + recipe.study.timeout
        set_study_attrs(study, deadline=deadline)
    return deadline if recipe.study.timeout else None


def work(recipe: Recipe, study: optuna.Study, *, quiet: bool = False) -> int:
    """Run trials in this process until the study's total (or its deadline) is reached.

    Returns the number of trials this process ran. SIGTERM or Ctrl-C stops the
    running trial at its next step, queues it again (it resumes from its last
    finished epoch) and raises KeyboardInterrupt. When the total is taken but
    other workers' trials still run, this worker waits: if one of them dies, its
    retry is run here, so the study still ends with n_trials.
    """
    with process.stopping_on_signals():
        return _work(recipe, study, quiet=quiet)


def _work(recipe: Recipe, study: optuna.Study, *, quiet: bool = False) -> int:
    optuna_api.quiet()
    entries = parse_pool(recipe.pool)
    preflight(entries)
    data = load_data(recipe.data, recipe.study.seed)
    warning = leakage_warning(entries, data)
    if warning:
        log.warning(warning)
    # What lives for the whole process (modules, the data) leaves the collector's scans: the
    # collection after every trial then looks at that trial's objects only.
    gc.freeze()
    progress = Progress(recipe.study.n_trials, quiet=quiet)
    try:
        return _search(recipe, study, entries, data, progress, quiet)
    finally:
        progress.close()


def _show(progress: Progress, study: optuna.Study, recipe: Recipe) -> None:
    """The study line of a live display: counted trials ended, pruned, failed, best so far, budget used."""
    if progress.live:
        trials = study.get_trials(deepcopy=False)
        ended = [t for t in counted(trials) if t.state.is_finished()]
        pruned = sum(t.state == TrialState.PRUNED for t in ended)
        failed = sum(t.state == TrialState.FAIL for t in ended)
        spent = budget.text(recipe.study.budget, budget.used(trials, recipe.train.epochs))
        spent = spent.replace("budget used: ", "  budget ")  # the bar's line holds 100 columns
        progress.study(len(ended), pruned, failed, best_so_far(study) + spent)


def _search(
    recipe: Recipe, study: optuna.Study, entries: list[PoolEntry], data: Data, progress: Progress, quiet: bool
) -> int:
    say = progress.say
    if recipe.study.rank is not None:
        entries = ranked_entries(study, recipe, entries, data, say)
    warm = warmstart.queue(study, recipe, entries, data.in_chans)  # before the baselines: queued first
    if warm:
        say(warm)
    enqueue_baselines(study, recipe, entries, data)
    hb, n_total = recipe.study.heartbeat, recipe.study.n_trials
    patience = Patience(recipe.study.storage_patience, say)
    workers.sweep(study, hb, patience)
    tidy(resume_dir(study, recipe), patience.call(lambda: study.get_trials(deepcopy=False), "reading the trials"))
    say(f"{data.summary()}; {n_total - finished(study)} of {n_total} trials to run")
    deadline = _deadline(study, recipe)
    tracker = None
    if recipe.tracking.mlflow or recipe.tracking.tensorboard:
        tracker = tracking.Tracker(recipe, study, dir_of(study))
        for line in tracker.where():
            say(line)
    objective = make_objective(
        recipe,
        data,
        entries,
        recipe.hardware.device,
        on_line=say,
        progress=progress,
        tracker=tracker,
        patience=patience,
    )

    def on_end(done: FrozenTrial | None) -> None:
        if done is not None and tracker is not None:
            tracker.end(done)
        line = done and trial_line(study, done, finished(study), n_total, recipe.study.metric)
        if line:
            say(line)
        if line and recipe.study.budget and not progress.live:
            say(
                "  "
                + budget.text(recipe.study.budget, budget.used(study.get_trials(deepcopy=False), recipe.train.epochs))
            )
        _show(progress, study, recipe)

    _show(progress, study, recipe)
    closed = stopping.closing(recipe, study)  # a budget spent, a stop rule
    ran = workers.drain(
        study,
        objective,
        hb,
        more=lambda trials: len(counted(trials)) < n_total,
        deadline=deadline,
        say=say,
        on_end=on_end,
        closed=closed,
        patience=patience,
        on_told=told(recipe, study),
    )
    spent = compute_text(study.get_trials(deepcopy=False))
    if spent and ran:
        say(spent)
    reason = closed(study.get_trials(deepcopy=False))
    if reason:
        set_study_attrs(study, ended=reason)  # for the report: why the study ended before n_trials
        say(f"the search stopped taking trials: {reason}")
    if tracker is not None:
        tracker.finish(done=bool(reason) or finished(study) >= n_total)
    if deadline is not None and time.time() >= deadline:
        say(f"study timeout of {recipe.study.timeout:g} s reached")
        return ran
    if recipe.study.confirm:  # the search is over: every worker helps confirm its top configurations
        cfg = recipe.study.confirm
        queued = confirm.enqueue(study, cfg.top_k, cfg.seeds)
        if queued:
            say(f"confirming the top {cfg.top_k} configurations over {cfg.seeds} seeds: {queued} runs queued")
        ran += confirm.run(recipe, study, quiet=quiet)
    return ran


def enqueue_baselines(study: optuna.Study, recipe: Recipe, entries: list[PoolEntry], data: Data) -> None:
    """Once per study: one trial per entry with the `train` defaults, queued first (study.baselines),
    or, under study.rank with `order`, one per kept entry in rank order (replacing the former)."""
    ordered = recipe.study.rank is not None and recipe.study.rank.order
    done = study_attrs(study).get("rank_enqueued" if ordered else "baselines_enqueued")
    if not (ordered or recipe.study.baselines) or done:
        return
    if ordered:
        set_study_attrs(study, rank_enqueued=True)
    else:
        set_study_attrs(study, baselines_enqueued=True)
    for e in entries:  # best ranked first under `order`
        params = space.baseline_params(recipe.space, recipe.train, e, data.in_chans)
        study.enqueue_trial(params, skip_if_exists=True)
