"""One trial, from its slot in the study to its outcome: the function every worker runs.

`make_objective(...)` gives `objective(trial, lost=None)`, which reads top to bottom: claim a
slot of the study's total, seed the sampler for this trial, suggest the pool entry and the
hyperparameters, build the model under the trial's seed, measure it, take a place on a GPU,
take over the saved state of the trial it retries, fit (each epoch reported, pruned, saved),
and record the outcome. Each step is a short function below it.

The search's trials and the confirmation runs (counting=False) both run it; the work loops
that call it are search.workers.drain, started by search.study and search.confirm.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from search import artifacts, pack, space
from search.data import Data
from search.hparams import TrainCfg
from search.measure import measure as measure_model
from search.models import build_model, input_resolution
from search.optuna_api import frozen, reseed_sampler
from search.pool import PoolEntry
from search.progress import Progress
from search.recipe import CONSTRAINABLE, Recipe
from search.record import attrs, set_attr, set_attrs, versions
from search.sampling import constraints, record_constraints, sampler_seed, trial_seed
from search.text import shorten
from search.tracking import Tracker
from search.train import FitResult, fit, resolve_device, seed_everything
from search.trials import counted
from search.workers import (
    STATE_FORMAT,
    STOP,
    WORKER,
    TotalReached,
    TrialFailed,
    TrialInterrupted,
    TrialLost,
    resume_dir,
    save_state,
    take_state,
)

FIRST_ATTRS = ("pool_label", "weight_source", "imagenet_overlap", "seed", "fail_reason")  # what users filter on


@dataclass(frozen=True)
class Setup:
    """What every trial of one worker shares: the recipe, the decoded data, the pool, where to run."""

    recipe: Recipe
    data: Data
    entries: list[PoolEntry]
    device: str
    on_line: Callable[[str], None]
    counting: bool  # takes a slot of n_trials (confirmation runs do not)
    progress: Progress | None
    tracker: Tracker | None = None  # MLflow / TensorBoard (search.tracking)


def make_objective(
    recipe: Recipe,
    data: Data,
    entries: list[PoolEntry],
    device: str,
    on_line: Callable[[str], None] = print,
    *,
    counting: bool = True,
    progress: Progress | None = None,
    tracker: Tracker | None = None,
) -> Callable[..., float | list[float]]:
    """The trial function `objective(trial, lost=None)`, returning the objective value(s).

    `lost` (set by the heartbeat when another worker failed the trial) and STOP (SIGTERM,
    Ctrl-C) end the training at the next step: TrialLost, or TrialInterrupted after the trial
    is queued again. A live `progress` gets the trial's steps (search.progress).
    """
    return functools.partial(
        objective, setup=Setup(recipe, data, entries, device, on_line, counting, progress, tracker)
    )


def objective(trial: optuna.Trial, lost: threading.Event | None = None, *, setup: Setup) -> float | list[float]:
    """Claim -> seed -> suggest -> build -> slot -> resume -> fit -> outcome (see the module doc)."""
    s, recipe = setup, setup.recipe
    lost = lost or threading.Event()
    if s.counting:
        claim(trial, recipe.study.n_trials)
    # Sampling is lazy (at the first suggest), so seeding here decides this trial's draws.
    reseed_sampler(trial.study.sampler, sampler_seed(recipe.study.seed, trial.number))
    entry, hp = space.suggest(trial, recipe.space, recipe.train, s.entries, s.data.in_chans)
    seed = seed_of(trial, recipe)
    res, dev = input_resolution(entry, s.data.resolution), resolve_device(s.device)
    for k, v in trial_attrs(entry, seed, res, hp.channel_reduce, str(dev)).items():
        set_attr(trial, k, v)
    if s.tracker is not None:
        s.tracker.start(trial)
    try:
        model = build(trial, entry, hp, s.data, res, seed)
        slot = device_slot(trial, recipe, s.data, entry, res, hp.batch_size, dev, s.on_line)
        measures = record_measures(trial, recipe, model, s.data.in_chans, res, dev)  # before fit: pruned ones have them
        path = resume_dir(trial.study, recipe) / f"trial-{trial.number}.pt"
        state = resume(trial, recipe, path, seed, entry.label, s.on_line)
        result = fit_trial(trial, s, model, hp, entry.label, seed, slot, dev, path, state, lost)
    except KeyboardInterrupt:
        set_attrs(trial, fail_reason="interrupted")
        raise
    return outcome(trial, recipe, model, hp, s.data, result, measures)


# ---------------------------------------------------------------------------
# the steps, in order


def claim(trial: optuna.Trial, n_trials: int) -> None:
    """Take a slot of the study's total: a trial that starts when the total is taken (by finished,
    running or waiting trials of lower number) ends at once, not counted."""
    earlier = [t for t in counted(trial.study.get_trials(deepcopy=False)) if t.number < trial.number]
    if len(earlier) >= n_trials:
        set_attrs(trial, fail_reason="study total reached")  # the work loop then finds nothing to start
        raise TotalReached(f"the study already has its {n_trials} trials")


def seed_of(trial: optuna.Trial, recipe: Recipe) -> int:
    """The trial's training seed: its own (a queued confirmation of a configuration under another
    seed), else the recipe's pinned `study.trial_seed` (a `best` recipe's), else derived from
    the study seed and the trial number. A retry reruns the dead trial with its seed."""
    seed = attrs(trial).get("seed", recipe.study.trial_seed)
    return trial_seed(recipe.study.seed, trial.number) if seed is None else int(seed)


def trial_attrs(entry: PoolEntry, seed: int, resolution: int, channel_reduce: str, device: str) -> dict[str, Any]:
    """A trial's first attributes, in the order optuna-dashboard shows them as columns (the order
    they are first set): the ones users filter on first, `fail_reason` held by null until a
    reason is known (null is also what `counted` reads as "no reason")."""
    first = {
        **entry.attrs(),
        "seed": seed,
        "fail_reason": None,
        "input_resolution": resolution,
        "channel_reduce": channel_reduce,
        "device": device,
        "worker": WORKER,
    }
    return {**{k: first[k] for k in FIRST_ATTRS}, **first}


def build(trial: optuna.Trial, entry: PoolEntry, hp: TrainCfg, data: Data, res: int, seed: int) -> Any:
    """The model, initialised under the trial's seed (not the process's history); a combination
    that cannot be built fails the trial with the reason."""
    try:
        seed_everything(seed)
        return build_model(
            entry,
            num_classes=data.num_classes,
            in_chans=data.in_chans,
            resolution=res,
            dropout=hp.dropout,
            channel_reduce=hp.channel_reduce,
        )
    except (ValueError, RuntimeError) as e:
        set_attrs(trial, fail_reason=f"invalid combination: {e}")
        raise TrialFailed(f"invalid combination: {e}") from None


def record_measures(
    trial: optuna.Trial, recipe: Recipe, model: Any, in_chans: int, res: int, dev: Any
) -> dict[str, Any]:
    """The measures an objective or constraint of the study needs (params, flops, latency, ...), recorded."""
    wanted = [n for n in (*recipe.study.names, *recipe.study.constraints) if n in CONSTRAINABLE]
    measures = measure_model(model, wanted, in_chans, res, dev)
    for k, v in measures.items():
        set_attr(trial, k, v)
    return measures


def device_slot(
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

    def probe_step() -> int:
        shape = build_model(
            entry, num_classes=data.num_classes, in_chans=data.in_chans, resolution=res, pretrained=False
        )  # the same shapes, no weights to load
        return pack.measure_step(shape, data.in_chans, res, batch_size, data.num_classes, dev, precision)

    peak = pack.probe(trial.study, key, probe_step, pack.ledger_path(dev))
    need = peak + data.train.x.numel() + data.val.x.numel()  # uint8 images, kept on the GPU when they fit
    set_attrs(trial, memory_probe_mb=round(peak / 2**20, 1))
    return pack.gpu_slot(
        pack.devices_for(dev),
        need,
        tpg,
        recipe.hardware.memory_margin,
        on_wait=lambda s: on_line(f"trial {trial.number:>3} {shorten(entry.label, 20):<20} {s}"),
    )


def resume(
    trial: optuna.Trial, recipe: Recipe, path: Path, seed: int, label: str, on_line: Callable[[str], None]
) -> dict[str, Any] | None:
    """For a retry (of a dead, preempted or interrupted trial): the state its predecessor saved,
    taken over as this trial's own file, or None (and the reason recorded) to start over."""
    a = attrs(trial)
    if "retry_of" not in a or not recipe.study.resume:
        return None
    state, why = take_state(path.parent, trial, seed)
    if state is None:
        set_attrs(trial, restarted=why)
        return None
    set_attrs(trial, resumed_from_epoch=int(state["epoch"]))
    on_line(
        f"trial {trial.number:>3} {shorten(label, 20):<20} resumes after epoch {state['epoch']} "
        f"(trial {a.get('retry_of')}'s saved state)"
    )
    return state


def fit_trial(
    trial: optuna.Trial,
    s: Setup,
    model: Any,
    hp: TrainCfg,
    label: str,
    seed: int,
    slot: contextlib.AbstractContextManager[Any],
    dev: Any,
    path: Path,
    state: dict[str, Any] | None,
    lost: threading.Event,
) -> FitResult:
    """`fit` in the trial's slot, every epoch reported and its state saved; the saved state is
    removed when the trial ends here (nothing will resume it)."""
    recipe, epochs = s.recipe, Epochs(trial, s.recipe, label, s.on_line, lost, state, s.tracker)
    shown = s.progress if s.progress is not None and s.progress.live else None
    if shown is not None:
        shown.trial(trial.number, label, hp.epochs, int(state["epoch"]) + 1 if state else 1)
    try:
        with slot as placed:
            if placed != dev:
                set_attrs(trial, device=str(placed))
            result = fit(
                model,
                s.data,
                hp,
                device=placed,
                on_epoch=epochs.end,
                monitor=recipe.study.metric,
                seed=seed,
                amp=recipe.hardware.amp,
                compile=recipe.hardware.compile,
                gpu_memory_share=recipe.hardware.gpu_memory_share,
                keep_best=recipe.study.top_k > 0,
                on_state=functools.partial(epochs.save, path, seed) if recipe.study.resume else None,
                state=state,
                stop=lambda: lost.is_set() or STOP.is_set(),
                on_step=shown.step if shown is not None else None,
            )
    except (TrialLost, optuna.exceptions.UpdateFinishedTrialError):
        raise TrialLost(f"trial {trial.number} was failed by another worker") from None
    except Exception:
        path.unlink(missing_ok=True)
        raise
    finally:
        if shown is not None:
            shown.close_trial()
    raise_if_interrupted(trial, result, lost)
    path.unlink(missing_ok=True)
    return result


class Epochs:
    """What happens at the end of each epoch of a trial: report (and prune), print, save the state.

    A retried trial reruns the dead one (same params and seed); the epochs that run reported
    stand (Optuna keeps a step's first value), so only later epochs are reported again, and
    the pruner judges this run's epochs only.
    """

    def __init__(
        self,
        trial: optuna.Trial,
        recipe: Recipe,
        label: str,
        on_line: Callable[[str], None],
        lost: threading.Event,
        state: dict[str, Any] | None,
        tracker: Tracker | None = None,
    ) -> None:
        self.trial, self.recipe, self.label, self.on_line, self.lost = trial, recipe, label, on_line, lost
        self.tracker = tracker
        self.history: list[dict[str, float]] = list(state["history"]) if state else []
        self.resumed = len(self.history)  # epochs a retry takes over: trained by the trial it retries
        self.reported = set(frozen(trial).intermediate_values) if "retry_of" in attrs(trial) else set()
        self.reports = len(recipe.study.names) == 1  # Optuna neither takes intermediate values nor prunes several

    def end(self, epoch: int, record: dict[str, float]) -> None:
        trial, metric = self.trial, self.recipe.study.metric
        if self.lost.is_set():
            raise TrialLost(f"trial {trial.number} was failed by another worker")
        self.history.append(record)
        if self.tracker is not None:
            self.tracker.epoch(trial, epoch, record)
        fresh = self.reports and epoch not in self.reported
        if fresh:
            trial.report(record[f"val_{metric}"], epoch)
        # Short attributes: the per-epoch history is in the intermediate values and, when the
        # trial ends, its history artifact; the dashboard's table stays one line a row.
        seconds = round(sum(r["seconds"] for r in self.history) / len(self.history), 3)
        set_attrs(
            trial, epochs=len(self.history), sec_per_epoch=seconds, trained_epochs=len(self.history) - self.resumed
        )
        if attrs(trial).get("micro_batch") != record["micro_batch"]:  # smaller after out of memory
            set_attrs(trial, micro_batch=int(record["micro_batch"]))
        self.on_line(
            f"trial {trial.number:>3} {shorten(self.label, 20):<20} epoch {epoch:>3}  "
            f"val_{metric} {record[f'val_{metric}']:.4f}  {record['seconds']:.1f}s"
        )
        if fresh and trial.should_prune():
            set_attrs(trial, fail_reason=f"pruned at epoch {epoch}")
            record_constraints(trial, self.recipe.study.constraints)
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    def save(self, path: Path, seed: int, state: dict[str, Any]) -> None:
        """The epoch's full training state, with what identifies the run it belongs to."""
        if self.lost.is_set():
            return
        trial = self.trial
        meta = {
            "format": STATE_FORMAT,
            "study": trial.study.study_name,
            "number": trial.number,
            "params": trial.params,
            "seed": seed,
            "versions": versions(attrs(trial).get("device")),
        }
        save_state(path, {"trial": meta, **state})


def raise_if_interrupted(trial: optuna.Trial, result: FitResult, lost: threading.Event) -> None:
    """A fit that stopped early: lost to another worker, or interrupted (queued again by the loop)."""
    if result.status != "interrupted":
        return
    if lost.is_set():
        raise TrialLost(f"trial {trial.number} was failed by another worker")
    set_attrs(trial, fail_reason="interrupted")
    raise TrialInterrupted(result.reason)


def outcome(
    trial: optuna.Trial,
    recipe: Recipe,
    model: Any,
    hp: TrainCfg,
    data: Data,
    result: FitResult,
    measures: dict[str, Any],
) -> float | list[float]:
    """Record how the trial ended; its value(s), or PRUNED (out of memory) / FAIL (diverged)."""
    ok = all(v <= 0 for v in constraints(attrs(trial), recipe.study.constraints).values())
    artifacts.after_fit(trial, recipe, model, hp, data, result, ok)  # history; checkpoint while in the top-k
    set_attrs(trial, status=result.status)
    peak = max((r["peak_memory_mb"] for r in result.history), default=0.0)
    if peak:  # GPU memory; nothing to say on a CPU
        set_attrs(trial, peak_memory_mb=round(peak, 1))
    if result.status == "oom":
        # PRUNED, not FAIL: samplers learn only from COMPLETE and PRUNED trials, and this one must
        # reach them as infeasible so that they stop proposing its neighbours.
        set_attrs(trial, fail_reason=result.reason, micro_batch=result.micro_batch)
        record_constraints(trial, recipe.study.constraints)
        raise optuna.TrialPruned(result.reason)
    if result.failed:
        set_attrs(trial, fail_reason=result.reason)
        raise TrialFailed(result.reason)
    set_attrs(trial, best_epoch=result.best_epoch)
    for k, v in result.best.items():
        set_attr(trial, f"best_{k}", round(v, 6))  # a short cell; full values in the history
    record_constraints(trial, recipe.study.constraints)
    measures["train_seconds"] = round(sum(r["seconds"] for r in result.history), 3)
    set_attrs(trial, train_seconds=measures["train_seconds"])
    values = [result.best[n] if n in result.best else measures[n] for n in recipe.study.names]
    return values if len(values) > 1 else values[0]
