"""The records the harness keeps in a study: every user attribute of a trial and of a study,
with its type and meaning, in one place. Code reads and writes them by these names;
tests/test_record.py checks that a real study stores nothing undeclared here. `attrs(trial)`
and `study_attrs(study)` read the attributes as the typed records and `set_attrs(trial, ...)`
writes a trial's, so a misspelt name or a wrong type is a type error, not a silent None.

Also the versions that made a study or a checkpoint (`versions()`), stamped on both.
"""

from __future__ import annotations

import functools
import platform
from importlib import metadata
from typing import TYPE_CHECKING, Any, Literal, TypedDict, Unpack, cast

if TYPE_CHECKING:
    import optuna

FitStatus = Literal["ok", "early_stopped", "diverged", "oom", "interrupted"]


class TrialAttrs(TypedDict, total=False):
    """User attributes of a trial, in the order the dashboard shows them as columns."""

    # what users filter on first (search.objective.FIRST_ATTRS)
    pool_label: str  # the pool entry, e.g. resnet_18 or timm/convnext_tiny.fb_in22k@112
    weight_source: str  # imagenet-1k, imagenet-21k, ssl, swsl, clip, dinov2, none
    imagenet_overlap: str  # none, semantic, possible: how the data relates to ImageNet's labels
    seed: int  # the training seed (initial weights, data order, augmentation, mixing, dropout)
    fail_reason: str | None  # why it did not complete; None while running (and for a process that died)
    arch: str  # the entry's architecture
    tag: str  # its timm pretrained tag ('' for built-ins)
    weights_file: str  # an own weights file the entry names (pool entry `weights:`)
    weights_sha256: str  # and its sha256, read when the trial starts
    input_resolution: int  # pixels the model sees
    channel_reduce: str  # how pretrained RGB stems take 1-channel data
    device: str  # where it trained (cpu, cuda:0)
    worker: str  # host:pid of the process that ran it
    heartbeat_at: float  # epoch seconds of its last sign of life
    memory_probe_mb: float  # the probed peak of one step (hardware.trials_per_gpu)
    params: int  # measures, when an objective or constraint needs them (search.measure)
    flops: int
    latency_ms: float
    throughput: float
    epochs: int  # epochs finished so far
    sec_per_epoch: float
    micro_batch: int  # images per forward/backward after out-of-memory retries
    retry_of: int  # the dead, preempted or interrupted trial this one runs again
    resumed_from_epoch: int  # a retry that went on from this epoch's saved state
    restarted: str  # a retry that found no readable state, and why
    status: FitStatus
    peak_memory_mb: float  # GPU memory, highest epoch
    best_epoch: int
    best_accuracy: float  # validation metrics of the best epoch (search.metrics)
    best_balanced_accuracy: float
    best_f1: float
    best_auc: float
    best_loss: float
    train_seconds: float
    checkpoint: str  # artifact id of the best-epoch weights, while the trial is in the top-k
    warm_start_of: str  # a configuration queued by study.warm_start: SOURCE#N (trial N of study SOURCE)
    trained_epochs: int  # epochs this trial trained itself (a retry's resumed ones not included)
    mlflow_run_id: str  # its MLflow run (tracking.mlflow); a retry continues it
    confirms: int  # a confirmation run (companion study NAME/confirm): the trial it confirms
    seed_index: int  # and which of its seeds (0: the search's own run)


class StudyAttrs(TypedDict, total=False):
    """User attributes of a study (besides `memory_probe:KEY`, one per probed configuration)."""

    recipe: dict[str, Any]  # the normalized recipe, storage password masked
    versions: dict[str, str]  # what created the study (versions())
    study_id: str  # a UUID set at creation: resume states carry it (search.resume)
    deadline: float | None  # epoch seconds when study.timeout ends the search
    baselines_enqueued: bool
    rank: dict[str, Any]  # the pool ranking and the decision taken from it (search.rank)
    rank_enqueued: bool
    retrain: dict[str, Any]  # test-split results of the final model(s) (search.retrain)
    warm_start: dict[str, Any]  # what study.warm_start queued: from, queued, changes, line (search.warmstart)
    ended: str  # why the search stopped taking trials before n_trials (budget spent, a stop rule)
    mlflow_run_id: str  # the study's parent run (tracking.mlflow)
    confirms_study: str  # on a companion study: the study whose configurations it confirms


def attrs(trial: optuna.trial.FrozenTrial | optuna.Trial) -> TrialAttrs:
    """A trial's user attributes as the declared record (read-only use)."""
    return cast(TrialAttrs, trial.user_attrs)


def study_attrs(study: optuna.Study | optuna.study.StudySummary) -> StudyAttrs:
    """A study's user attributes as the declared record (read-only use)."""
    return cast(StudyAttrs, study.user_attrs)


def set_attrs(trial: optuna.Trial, **values: Unpack[TrialAttrs]) -> None:
    """Set declared user attributes of a running trial, in the order given."""
    for key, v in values.items():
        trial.set_user_attr(key, v)


@functools.cache
def _installed() -> tuple[tuple[str, str], ...]:
    """Read once per process: every checkpoint and resume state of every trial carries them."""
    out = []
    for name in ("search", "torch", "torchvision", "timm", "optuna"):
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, "not installed"))
    return (*out, ("python", platform.python_version()))


def versions(device: str | None = None) -> dict[str, str]:
    """The versions of search, torch, torchvision, timm, optuna and Python (and the device, if given)."""
    out = dict(_installed())
    if device is not None:
        out["device"] = device
    return out


def versions_line(v: dict[str, str]) -> str:
    return ", ".join(f"{k} {v[k]}" for k in ("search", "torch", "timm", "optuna", "device") if k in v)
