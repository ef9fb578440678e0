"""The study: the recipe stored in it, checks before anything is written, the objective, the
work loop of one worker (storages: search.storage; sampler, pruner and constraints:
search.sampling; heartbeats, retries, resuming, counting and the process pool: search.workers).

The normalized recipe lives in the study (user attr `recipe`), so a worker
needs only the storage URL and the study name. `n_trials` is the study-wide
total: a trial that starts when the total is already taken (by finished,
running or waiting trials of lower number) ends at once as FAIL with reason
"study total reached" and is not counted, so any number of workers, runs and
resumes finish exactly `n_trials`.

About 570 lines; most of it is the objective, one function from sampling to the stored result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from search import artifacts, optuna_api, pack, report, space, weights
from search.data import Data, load_data, load_raw
from search.data import check as check_data
from search.errors import SearchError
from search.measure import measure as measure_model
from search.models import build_model, input_resolution
from search.optuna_api import reseed_sampler
from search.pool import IMAGENET_SOURCES, PoolEntry, parse_pool
from search.progress import Progress
from search.recipe import CONSTRAINABLE, Recipe, recipe_from_dict
from search.record import versions
from search.sampling import make_pruner, make_sampler, record_constraints, sampler_seed
from search.storage import check_storage, default_storage, expand, mask, open_storage, study_names
from search.text import shorten
from search.train import fit, resolve_device, seed_everything
from search.workers import (
    STATE_FORMAT,
    STOP,
    WORKER,
    TotalReached,
    TrialFailed,
    TrialInterrupted,
    TrialLost,
    counted,
    finished,
    resume_dir,
    run_one,
    save_state,
    stopped,
    stopping_on_signals,
    sweep,
    take_state,
)

log = logging.getLogger("search")


def stored_form(recipe: Recipe) -> dict[str, Any]:
    """What the study keeps: the normalized recipe, storage password masked."""
    d = recipe.normalized()
    if d["study"]["storage"]:
        d["study"]["storage"] = mask(d["study"]["storage"])
    return d


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    """Parts that must agree between runs of one study (not the budget, storage or hardware)."""
    d = json.loads(json.dumps(d))
    for key in ("storage", "timeout", "n_trials", "heartbeat", "confirm"):
        d["study"].pop(key, None)
    d.pop("hardware", None)
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
    old = study.user_attrs.get("recipe")
    if old is not None and not force and _comparable(old) != _comparable(new):
        changes = diff(_comparable(old), _comparable(new))
        raise SearchError(
            f"study '{recipe.study.name}' in {mask(url)} was created with a different recipe "
            f"({'; '.join(changes[:5])}{' ...' if len(changes) > 5 else ''}); use another study.name, "
            "or --force to continue with the new recipe"
        )
    if old is None:
        study.set_user_attr("versions", versions())  # what created it; each checkpoint carries its own
    if old != new:
        study.set_user_attr("recipe", new)
    if study.metric_names != recipe.study.names and len(study.directions) == len(recipe.study.names):
        study.set_metric_names(recipe.study.names)  # the dashboard's axes and the report's columns
    return study


def load_stored(storage_url: str, name: str) -> tuple[Recipe, optuna.Study]:
    """The recipe stored in an existing study (for workers and resumes).

    A missing study is refused before the storage is opened for writing: a fresh
    database gets no schema, a journal path no file.
    """
    path = storage_url.removeprefix("sqlite:///")
    if storage_url.startswith("sqlite:///") and not Path(expand(path)).is_file():
        raise SearchError(f"no study database at {path}; check --storage, or create the study with `search run RECIPE`")
    check_storage(storage_url)
    names = study_names(storage_url)
    if names is not None and name not in names:
        raise SearchError(
            f"no study '{name}' in {mask(storage_url)}; studies there: {', '.join(names) or 'none'}; "
            "create it with `python -m search run RECIPE`"
        )
    storage = open_storage(storage_url, heartbeat=None)
    try:
        summary = next(s for s in optuna.get_all_study_summaries(storage) if s.study_name == name)
    except StopIteration:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise SearchError(
            f"no study '{name}' in {mask(storage_url)}; studies there: {', '.join(names) or 'none'}"
        ) from None
    stored = summary.user_attrs.get("recipe")
    if stored is None:
        raise SearchError(f"study '{name}' has no stored recipe: it was not created by `search run`")
    recipe = recipe_from_dict(stored, source=f"recipe stored in study '{name}'")
    if isinstance(storage, optuna.storages.RDBStorage):
        storage.engine.dispose()
        storage = open_storage(storage_url, recipe.study.heartbeat)  # now with the study's heartbeat
    study = optuna.load_study(
        study_name=name, storage=storage, sampler=make_sampler(recipe), pruner=make_pruner(recipe)
    )
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
    entries = parse_pool(recipe.pool)
    check_data(recipe.data)
    preflight(entries)
    load_raw(recipe.data)
    return entries


FIRST_ATTRS = ("pool_label", "weight_source", "imagenet_overlap", "seed", "fail_reason")  # what users filter on


def trial_attrs(entry: PoolEntry, seed: int, resolution: int, channel_reduce: str, device: str) -> dict[str, Any]:
    """A trial's first attributes, in the order optuna-dashboard shows them as columns (the order
    they are first set): the ones users filter on first, `fail_reason` held by null until a
    reason is known (null is also what `counted` reads as "no reason")."""
    attrs = {
        **entry.attrs(),
        "seed": seed,
        "fail_reason": None,
        "input_resolution": resolution,
        "channel_reduce": channel_reduce,
        "device": device,
        "worker": WORKER,
    }
    return {**{k: attrs[k] for k in FIRST_ATTRS}, **attrs}


def ranked_entries(
    study: optuna.Study, recipe: Recipe, entries: list[PoolEntry], data: Data, say: Callable[[str], None] = print
) -> list[PoolEntry]:
    """The entries the search samples under `study.rank`, in rank order.

    The first worker ranks the pool (see search.rank) and stores the rows and the decision in
    the study (user attr `rank`); every later worker and resume reads them, so all sample the
    same entries. Entries that could not be ranked stay in, with the reason shown.
    """
    from search import rank

    assert recipe.study.rank is not None  # only called under study.rank
    stored = study.user_attrs.get("rank")
    if stored is None:
        say(
            f"ranking {len(entries)} pool entries on frozen features before the search "
            f"(keep {recipe.study.rank.keep or 'all'}, by {recipe.rank.by})"
        )
        rows = rank.rank_pool(recipe, data)
        decision = {"rows": rows, **rank.decide(rows, recipe.study.rank.keep, recipe.rank.by)}
        stored = study.user_attrs.get("rank")  # another worker may have stored its ranking meanwhile
        if stored is None:
            study.set_user_attr("rank", decision)
            stored = decision
    say(rank.table(stored["rows"], stored["by"]))
    say(rank.decision_text(stored))
    by_label = {e.label: e for e in entries}
    return [by_label[label] for label in stored["order"] if label in by_label]


def trial_seed(study_seed: int, number: int) -> int:
    """Trial `number`'s training seed: initial weights, data order, augmentation, mixing, dropout."""
    return (study_seed * 1_000_003 + number) % 2**31


def gpu_slot(
    trial: optuna.Trial,
    recipe: Recipe,
    data: Data,
    entry: PoolEntry,
    res: int,
    batch_size: int,
    dev: Any,
    on_line: Callable[[str], None],
) -> contextlib.AbstractContextManager[Any]:
    """Where packing is on (`hardware.trials_per_gpu`, a CUDA device): the trial's place on a GPU,
    admitted by its probe (measured once per study and key) plus its data; it yields the GPU
    (any visible one for device cuda/auto). Else it yields `dev`."""
    tpg = recipe.hardware.trials_per_gpu
    if tpg is None or dev.type != "cuda":
        return contextlib.nullcontext(dev)
    precision = pack.precision_name(dev, recipe.hardware.amp)
    key = pack.probe_key(entry.label, res, batch_size, precision)

    def measure() -> int:
        shape = build_model(
            entry, num_classes=data.num_classes, in_chans=data.in_chans, resolution=res, pretrained=False
        )  # the same shapes, no weights to load
        return pack.measure_step(shape, data.in_chans, res, batch_size, data.num_classes, dev, precision)

    peak = pack.probe(trial.study, key, measure, pack.ledger_path(dev))
    need = peak + data.train.x.numel() + data.val.x.numel()  # uint8 images, kept on the GPU when they fit
    trial.set_user_attr("memory_probe_mb", round(peak / 2**20, 1))
    import torch

    devices = [dev] if dev.index is not None else [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return pack.gpu_slot(
        devices,
        need,
        tpg,
        recipe.hardware.memory_margin,
        on_wait=lambda s: on_line(f"trial {trial.number:>3} {shorten(entry.label, 20):<20} {s}"),
    )


def make_objective(
    recipe: Recipe,
    data: Data,
    entries: list[PoolEntry],
    device: str,
    on_line: Callable[[str], None] = print,
    *,
    counting: bool = True,
    progress: Progress | None = None,
) -> Callable[..., float | list[float]]:
    """The trial function `objective(trial, lost=None)`: sample, build, measure, train (resumed
    from a saved state for a retry); returns the objective value(s).

    counting=False (confirmation runs) takes no slot of n_trials. `lost` (set by the heartbeat
    when another worker failed the trial) and STOP (SIGTERM, Ctrl-C) end the training at the
    next step: TrialLost, or TrialInterrupted after the trial is queued again. A live
    `progress` gets the trial's steps (search.progress).
    """
    metric = recipe.study.metric
    n_trials = recipe.study.n_trials
    names = recipe.study.names
    multi = len(names) > 1  # Optuna neither takes intermediate values nor prunes these
    wanted = [n for n in (*names, *recipe.study.constraints) if n in CONSTRAINABLE]

    def objective(trial: optuna.Trial, lost: threading.Event | None = None) -> float | list[float]:
        lost = lost or threading.Event()
        trials = trial.study.get_trials(deepcopy=False)
        earlier = [t for t in counted(trials) if t.number < trial.number]
        if counting and len(earlier) >= n_trials:
            trial.set_user_attr("fail_reason", "study total reached")  # the work loop then finds nothing to start
            raise TotalReached(f"the study already has its {n_trials} trials")
        # Sampling is lazy (at the first suggest), so seeding here decides this trial's draws.
        reseed_sampler(trial.study.sampler, sampler_seed(recipe.study.seed, trial.number))
        entry, hp = space.suggest(trial, recipe, entries)
        # A retried trial reruns the dead one (same params and seed); the epochs that run reported
        # stand (Optuna keeps a step's first value), so only later epochs are reported again.
        # A queued trial may carry its own `seed` (a confirmation of a configuration under
        # another seed); `study.trial_seed` pins every trial's (a `best` recipe's).
        retried = "retry_of" in trial.user_attrs
        seed = trial.user_attrs.get("seed", recipe.study.trial_seed)
        seed = trial_seed(recipe.study.seed, trial.number) if seed is None else int(seed)
        reported = {s for t in trials if t.number == trial.number for s in t.intermediate_values} if retried else set()
        res = input_resolution(entry, data.resolution)
        dev = resolve_device(device)
        for k, v in trial_attrs(entry, seed, res, hp.channel_reduce, str(dev)).items():
            trial.set_user_attr(k, v)
        try:
            try:
                seed_everything(seed)  # the initial weights are this trial's, not the process's history
                model = build_model(
                    entry,
                    num_classes=data.num_classes,
                    in_chans=data.in_chans,
                    resolution=res,
                    dropout=hp.dropout,
                    channel_reduce=hp.channel_reduce,
                )
            except (ValueError, RuntimeError) as e:
                trial.set_user_attr("fail_reason", f"invalid combination: {e}")
                raise TrialFailed(f"invalid combination: {e}") from None
            slot = gpu_slot(trial, recipe, data, entry, res, hp.batch_size, dev, on_line)
            measures = measure_model(model, wanted, data.in_chans, res, dev)  # before training: pruned trials have them
            for k, v in measures.items():
                trial.set_user_attr(k, v)
            where = resume_dir(trial.study, recipe)
            path = where / f"trial-{trial.number}.pt"
            state = None
            if retried and recipe.study.resume:
                state, why = take_state(where, trial, seed)
                if state is not None:
                    trial.set_user_attr("resumed_from_epoch", int(state["epoch"]))
                    on_line(
                        f"trial {trial.number:>3} {shorten(entry.label, 20):<20} resumes after epoch {state['epoch']} "
                        f"(trial {trial.user_attrs['retry_of']}'s saved state)"
                    )
                else:
                    trial.set_user_attr("restarted", why)
            history: list[dict[str, float]] = list(state["history"]) if state else []
            meta = {
                "format": STATE_FORMAT,
                "study": trial.study.study_name,
                "number": trial.number,
                "params": trial.params,
                "seed": seed,
                "versions": versions(str(dev)),
            }

            def on_state(s: dict[str, Any]) -> None:
                if not lost.is_set():
                    save_state(path, {"trial": meta, **s})

            def on_epoch(epoch: int, record: dict[str, float]) -> None:
                if lost.is_set():
                    raise TrialLost(f"trial {trial.number} was failed by another worker")
                history.append(record)
                if epoch not in reported and not multi:
                    trial.report(record[f"val_{metric}"], epoch)
                # Short attributes: the per-epoch history is in the intermediate values and, when
                # the trial ends, its history artifact; the dashboard's table stays one line a row.
                trial.set_user_attr("epochs", len(history))
                trial.set_user_attr("sec_per_epoch", round(sum(r["seconds"] for r in history) / len(history), 3))
                if trial.user_attrs.get("micro_batch") != record["micro_batch"]:  # smaller after out of memory
                    trial.set_user_attr("micro_batch", int(record["micro_batch"]))
                on_line(
                    f"trial {trial.number:>3} {shorten(entry.label, 20):<20} epoch {epoch:>3}  "
                    f"val_{metric} {record[f'val_{metric}']:.4f}  {record['seconds']:.1f}s"
                )
                if (
                    epoch not in reported and not multi and trial.should_prune()
                ):  # the pruner judges this run's epochs only
                    trial.set_user_attr("fail_reason", f"pruned at epoch {epoch}")
                    record_constraints(trial, recipe.study.constraints)
                    raise optuna.TrialPruned(f"pruned at epoch {epoch}")

            shown = progress if progress is not None and progress.live else None
            if shown is not None:
                shown.trial(trial.number, entry.label, hp.epochs, int(state["epoch"]) + 1 if state else 1)
            try:
                with slot as placed:
                    if placed != dev:
                        trial.set_user_attr("device", str(placed))
                    result = fit(
                        model,
                        data,
                        hp,
                        device=placed,
                        on_epoch=on_epoch,
                        monitor=metric,
                        seed=seed,
                        amp=recipe.hardware.amp,
                        compile=recipe.hardware.compile,
                        gpu_memory_share=recipe.hardware.gpu_memory_share,
                        keep_best=recipe.study.top_k > 0,
                        on_state=on_state if recipe.study.resume else None,
                        state=state,
                        micro_batch=int(state["micro_batch"]) if state else None,
                        stop=lambda: lost.is_set() or STOP.is_set(),
                        on_step=shown.step if shown is not None else None,
                    )
            except (TrialLost, optuna.exceptions.UpdateFinishedTrialError):
                raise TrialLost(f"trial {trial.number} was failed by another worker") from None
            except Exception:
                path.unlink(missing_ok=True)  # the trial ends here: nothing will resume it
                raise
            finally:
                if shown is not None:
                    shown.close_trial()
            if result.status == "interrupted":
                if lost.is_set():
                    raise TrialLost(f"trial {trial.number} was failed by another worker")
                trial.set_user_attr("fail_reason", "interrupted")
                raise TrialInterrupted(result.reason)
            path.unlink(missing_ok=True)
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            raise
        artifacts.after_fit(trial, recipe, model, hp, data, result)  # history; checkpoint while in the top-k
        trial.set_user_attr("status", result.status)
        peak = max((r["peak_memory_mb"] for r in result.history), default=0.0)
        if peak:  # GPU memory; nothing to say on a CPU
            trial.set_user_attr("peak_memory_mb", round(peak, 1))
        if result.status == "oom":
            # PRUNED, not FAIL: samplers learn only from COMPLETE and PRUNED trials, and this one must
            # reach them as infeasible so that they stop proposing its neighbours.
            trial.set_user_attr("fail_reason", result.reason)
            trial.set_user_attr("micro_batch", result.micro_batch)
            record_constraints(trial, recipe.study.constraints)
            raise optuna.TrialPruned(result.reason)
        if result.failed:
            trial.set_user_attr("fail_reason", result.reason)
            raise TrialFailed(result.reason)
        trial.set_user_attr("best_epoch", result.best_epoch)
        for k, v in result.best.items():
            trial.set_user_attr(f"best_{k}", round(v, 6))  # a short cell; full values in the history
        record_constraints(trial, recipe.study.constraints)
        measures["train_seconds"] = round(sum(r["seconds"] for r in result.history), 3)
        trial.set_user_attr("train_seconds", measures["train_seconds"])
        values = [result.best[n] if n in result.best else measures[n] for n in names]
        return values if multi else values[0]

    return objective


def start_clock(study: optuna.Study, recipe: Recipe) -> None:
    """A `run` starts the study-wide timeout afresh (or clears it); workers share its deadline."""
    study.set_user_attr("deadline", time.time() + recipe.study.timeout if recipe.study.timeout else None)


def _deadline(study: optuna.Study, recipe: Recipe) -> float | None:
    deadline = study.user_attrs.get("deadline")
    if deadline is None and recipe.study.timeout:  # workers started without `run`: the first starts the clock
        deadline = time.time() + recipe.study.timeout
        study.set_user_attr("deadline", deadline)
    return deadline if recipe.study.timeout else None


def work(recipe: Recipe, study: optuna.Study, *, quiet: bool = False) -> int:
    """Run trials in this process until the study's total (or its deadline) is reached.

    Returns the number of trials this process ran. SIGTERM or Ctrl-C stops the
    running trial at its next step, queues it again (it resumes from its last
    finished epoch) and raises KeyboardInterrupt. When the total is taken but
    other workers' trials still run, this worker waits: if one of them dies, its
    retry is run here, so the study still ends with n_trials.
    """
    with stopping_on_signals():
        return _work(recipe, study, quiet=quiet)


def _work(recipe: Recipe, study: optuna.Study, *, quiet: bool = False) -> int:
    optuna_api.quiet()
    entries = parse_pool(recipe.pool)
    preflight(entries)
    data = load_data(recipe.data, recipe.study.seed)
    warning = leakage_warning(entries, data)
    if warning:
        log.warning(warning)
    progress = Progress(recipe.study.n_trials, quiet=quiet)
    try:
        return _search(recipe, study, entries, data, progress, quiet)
    finally:
        progress.close()


def _show(progress: Progress, study: optuna.Study) -> None:
    """The study line of a live display: counted trials ended, pruned, failed, best so far."""
    if progress.live:
        ended = [t for t in counted(study.get_trials(deepcopy=False)) if t.state.is_finished()]
        pruned = sum(t.state == TrialState.PRUNED for t in ended)
        failed = sum(t.state == TrialState.FAIL for t in ended)
        progress.study(len(ended), pruned, failed, report.best_so_far(study))


def _search(
    recipe: Recipe, study: optuna.Study, entries: list[PoolEntry], data: Data, progress: Progress, quiet: bool
) -> int:
    say = progress.say
    if recipe.study.rank is not None:
        entries = ranked_entries(study, recipe, entries, data, say)
    if recipe.study.rank is not None and recipe.study.rank.order and not study.user_attrs.get("rank_enqueued"):
        study.set_user_attr("rank_enqueued", True)
        for e in entries:  # best ranked first; this replaces the pool-order baselines
            study.enqueue_trial(space.baseline_params(recipe, e), skip_if_exists=True)
    elif recipe.study.baselines and not study.user_attrs.get("baselines_enqueued"):
        study.set_user_attr("baselines_enqueued", True)
        for e in entries:
            study.enqueue_trial(space.baseline_params(recipe, e), skip_if_exists=True)
    hb = recipe.study.heartbeat
    sweep(study, hb)
    n_total = recipe.study.n_trials
    say(f"{data.summary()}; {n_total - finished(study)} of {n_total} trials to run")
    deadline = _deadline(study, recipe)
    objective = make_objective(recipe, data, entries, recipe.hardware.device, on_line=say, progress=progress)

    ran = 0
    _show(progress, study)
    while deadline is None or time.time() < deadline:
        stopped()
        sweep(study, hb)
        trials = study.get_trials(deepcopy=False)
        if len(counted(trials)) < n_total or any(t.state == TrialState.WAITING for t in trials):
            done = run_one(study, objective, hb, say)
            ran += 1
            line = done and report.trial_line(study, done, finished(study), n_total, recipe.study.metric)
            if line:
                say(line)
            _show(progress, study)
            continue
        if not any(t.state == TrialState.RUNNING for t in trials):
            break
        STOP.wait(min(hb, 5))  # another worker's trial is running: it may die and need a retry
    if deadline is not None and time.time() >= deadline:
        say(f"study timeout of {recipe.study.timeout:g} s reached")
        return ran
    if recipe.study.confirm:  # the search is over: every worker helps confirm its top configurations
        from search import confirm

        cfg = recipe.study.confirm
        queued = confirm.enqueue(study, recipe, cfg.top_k, cfg.seeds)
        if queued:
            say(f"confirming the top {cfg.top_k} configurations over {cfg.seeds} seeds: {queued} runs queued")
        ran += confirm.work(recipe, study, quiet=quiet)
    return ran
