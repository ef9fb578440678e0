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
import torch

from search import artifacts, cpu_format, pack, space, weights
from search.data import Data
from search.device import resolve_device
from search.errors import TotalReached, TrialFailed, TrialInterrupted, TrialLost
from search.hparams import TrainCfg
from search.measure import measure as measure_model
from search.models import build_model, input_resolution
from search.optuna_api import frozen, reseed_sampler
from search.outage import Patience
from search.pool import PoolEntry
from search.process import STOP, WORKER
from search.progress import Progress
from search.recipe import CONSTRAINABLE, CPU_FORMATS, Recipe
from search.record import attrs, set_attr, set_attrs, system_attrs, versions
from search.resume import fingerprint, forget, identity, resume_dir, save_state, study_id, take_state, tidy
from search.sampling import constraints, counts_flops, record_constraints, sampler_seed, trial_seed
from search.storage import dir_of
from search.text import shorten
from search.tracking import Tracker
from search.train import FitResult, fit, seed_everything
from search.trials import counted

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
    patience: Patience  # with the storage (search.outage)
    fingerprint: str  # of the recipe and data, carried by resume states (search.resume)
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
    patience: Patience | None = None,
) -> Callable[..., float | list[float]]:
    """The trial function `objective(trial, lost=None)`, returning the objective value(s).

    `lost` (set by the heartbeat when another worker failed the trial) and STOP (SIGTERM,
    Ctrl-C) end the training at the next step: TrialLost, or TrialInterrupted after the trial
    is queued again. A live `progress` gets the trial's steps (search.progress). Its storage
    calls at each epoch end and at the end wait out an outage (`patience`, default the study's).
    """
    patience = patience or Patience(recipe.study.storage_patience)
    fp = fingerprint(recipe, data)
    setup = Setup(recipe, data, entries, device, on_line, counting, progress, patience, fp, tracker)
    return functools.partial(objective, setup=setup)


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
        measures = record_measures(trial, recipe, len(s.entries), model, s.data.in_chans, res, dev)  # before fit
        fmt = cpu_format_of(trial, recipe, entry.label, model, s.data, res, hp.batch_size, dev)
        path = resume_dir(trial.study, recipe) / f"trial-{trial.number}.pt"
        state = resume(trial, s, path, seed, entry.label, dev, fmt)
        result = fit_trial(trial, s, model, hp, entry.label, seed, slot, dev, path, state, lost, fmt)
    except KeyboardInterrupt:
        set_attrs(trial, fail_reason="interrupted")
        raise
    return s.patience.call(lambda: outcome(trial, recipe, model, hp, s.data, result, measures), "recording the end")


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
        **({"weights_sha256": weights.file_sha256(weights.fetch(entry))} if entry.weights else {}),
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
    trial: optuna.Trial, recipe: Recipe, n_entries: int, model: Any, in_chans: int, res: int, dev: Any
) -> dict[str, Any]:
    """The measures an objective or constraint of the study needs (params, flops, latency, ...), recorded
    before training, so pruned trials have them too."""
    wanted = [n for n in (*recipe.study.names, *recipe.study.constraints) if n in CONSTRAINABLE]
    if counts_flops(recipe, n_entries) and "flops" not in wanted:
        wanted.append("flops")  # the cost of an epoch to the pruner and the start-up (search.sampling)
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


def cpu_format_of(
    trial: optuna.Trial, recipe: Recipe, label: str, model: Any, data: Data, res: int, batch_size: int, dev: Any
) -> str:
    """On the CPU, the format the trial trains in (search.cpu_format), recorded on the trial: the one
    already recorded (a retry: the run it continues trained in it), else `hardware.cpu_format`
    (`auto`: the cached or probed fastest). 'nchw' elsewhere, unrecorded."""
    if dev.type != "cpu":
        return "nchw"
    fmt = attrs(trial).get("cpu_format")
    if fmt not in CPU_FORMATS:
        key = cpu_format.probe_key(label, res, batch_size)
        step = cpu_format.training_step(model, data.in_chans, res, batch_size, data.num_classes)
        fmt = cpu_format.choose(recipe.hardware.cpu_format, key, step, amp=recipe.hardware.amp)
        set_attrs(trial, cpu_format=fmt)
    return str(fmt)


def resume(
    trial: optuna.Trial, s: Setup, path: Path, seed: int, label: str, dev: Any, fmt: str = "nchw"
) -> dict[str, Any] | None:
    """For a retry (of a dead, preempted or interrupted trial): the state its predecessor saved,
    taken over as this trial's own file, or None (and the reason recorded) to start over: a state
    of another study, recipe, data, device, precision or GPU count is not restored."""
    a = attrs(trial)
    if "retry_of" not in a or not s.recipe.study.resume:
        return None
    numbers = {trial.number, *system_attrs(frozen(trial)).get("retry_history", ())}
    state, why = take_state(path.parent, trial, state_identity(trial, s, seed, dev, fmt), numbers)
    if state is None:
        set_attrs(trial, restarted=why)
        return None
    set_attrs(trial, resumed_from_epoch=int(state["epoch"]))
    s.on_line(
        f"trial {trial.number:>3} {shorten(label, 20):<20} resumes after epoch {state['epoch']} "
        f"(trial {a.get('retry_of')}'s saved state)"
    )
    return state


def state_identity(trial: optuna.Trial, s: Setup, seed: int, dev: Any, fmt: str = "nchw") -> dict[str, Any]:
    """What this trial's resume states carry (search.resume.identity), on device `dev` (and, on the
    CPU, in format `fmt`: a state of another format is not restored)."""
    gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    precision = pack.precision_name(dev, s.recipe.hardware.amp)
    if dev.type == "cpu" and fmt != "nchw":
        precision = fmt
    return identity(trial, study_id(trial.study), seed, s.fingerprint, dev.type, precision, gpus)


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
    fmt: str = "nchw",
) -> FitResult:
    """`fit` in the trial's slot, every epoch reported and its state saved. The saved state stays
    until the trial's end is told (search.workers.run_one's `on_told`): a kill, full disk or
    storage outage before then leaves it for the retry."""
    recipe, epochs = s.recipe, Epochs(trial, s.recipe, label, s.on_line, lost, state, s.patience, s.tracker)
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
                on_state=functools.partial(epochs.save, path, state_identity(trial, s, seed, placed, fmt))
                if recipe.study.resume
                else None,
                state=state,
                stop=lambda: lost.is_set() or STOP.is_set(),
                on_step=shown.step if shown is not None else None,
                cpu_format=fmt,
            )
    except (TrialLost, optuna.exceptions.UpdateFinishedTrialError):
        raise TrialLost(f"trial {trial.number} was failed by another worker") from None
    finally:
        if shown is not None:
            shown.close_trial()
    raise_if_interrupted(trial, result, lost)
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
        patience: Patience,
        tracker: Tracker | None = None,
    ) -> None:
        self.trial, self.recipe, self.label, self.on_line, self.lost = trial, recipe, label, on_line, lost
        self.patience = patience
        self.tracker = tracker
        self.saved: int | None = int(state["epoch"]) if state else None  # the last epoch whose state is on disk
        self.unsaved = False  # the last save failed (full disk): said once until one succeeds
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
        prune = self.patience.call(lambda: self.record(epoch, record, fresh), f"epoch {epoch} of trial {trial.number}")
        self.on_line(
            f"trial {trial.number:>3} {shorten(self.label, 20):<20} epoch {epoch:>3}  "
            f"val_{metric} {record[f'val_{metric}']:.4f}  {record['seconds']:.1f}s"
        )
        if prune:
            self.patience.call(lambda: self.pruned(epoch), f"pruning trial {trial.number}")
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    def pruned(self, epoch: int) -> None:
        set_attrs(self.trial, fail_reason=f"pruned at epoch {epoch}")
        record_constraints(self.trial, self.recipe.study.constraints)

    def record(self, epoch: int, record: dict[str, float], fresh: bool) -> bool:
        """The epoch's storage writes (all of them safe to repeat after an outage); whether to prune."""
        trial = self.trial
        if fresh:
            trial.report(record[f"val_{self.recipe.study.metric}"], epoch)
        # Short attributes: the per-epoch history is in the intermediate values and, when the
        # trial ends, its history artifact; the dashboard's table stays one line a row.
        spent = sum(r["seconds"] for r in self.history)  # device-seconds so far: a pruned trial has them too
        set_attrs(
            trial,
            epochs=len(self.history),
            sec_per_epoch=round(spent / len(self.history), 3),
            train_seconds=round(spent, 3),
            trained_epochs=len(self.history) - self.resumed,
        )
        if attrs(trial).get("micro_batch") != record["micro_batch"]:  # smaller after out of memory
            set_attrs(trial, micro_batch=int(record["micro_batch"]))
        return fresh and trial.should_prune()

    def save(self, path: Path, meta: dict[str, Any], state: dict[str, Any]) -> None:
        """The epoch's full training state, with what identifies the run it belongs to. A write
        that fails (a full disk) is said once and the trial goes on: the last good state stays."""
        if self.lost.is_set():
            return
        trial, epoch = self.trial, int(state["epoch"])
        meta = {**meta, "versions": versions(attrs(trial).get("device"))}
        try:
            save_state(path, {"trial": meta, **state})
        except OSError as e:
            if not self.unsaved:
                kept = f"epoch {self.saved}'s is kept" if self.saved is not None else "none was saved before"
                self.on_line(
                    f"trial {trial.number:>3} resume state of epoch {epoch} not saved "
                    f"({e.strerror or e}: {path.parent}); {kept}; training goes on"
                )
            self.unsaved = True
            return
        if self.unsaved:
            self.on_line(f"trial {trial.number:>3} resume state saved again (epoch {epoch})")
        self.saved, self.unsaved = epoch, False


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


def told(recipe: Recipe, study: optuna.Study) -> Callable[[optuna.trial.FrozenTrial], None]:
    """What follows a trial's told end (search.workers.run_one's `on_told`): its resume state
    goes, the states nothing will resume go (search.resume.tidy), and checkpoints of finished
    trials outside the top-k are deleted. Done only now, so a kill, full disk or storage error
    before the tell leaves the state to resume from and the top-k whole."""
    directory = resume_dir(study, recipe)

    def after(trial: optuna.trial.FrozenTrial) -> None:
        forget(directory, trial.number)
        tidy(directory, study.get_trials(deepcopy=False))
        if trial.state == optuna.trial.TrialState.COMPLETE and recipe.study.top_k > 0:
            artifacts.prune(study, artifacts.store_for(dir_of(study)), recipe.study.top_k)

    return after
