"""The records the harness keeps in a study: every user attribute of a trial and of a study, and
the system attributes of a retry, with its type and meaning, in one place. Nothing else in the
package touches `user_attrs` or `system_attrs` (tests/test_record.py holds that, and checks that
a real study stores nothing undeclared here).

Reading: `attrs(trial)`, `system_attrs(trial)`, `study_attrs(study)` give the typed records; a
value of the wrong type (written by another version or by hand) reads as absent, with a warning
once per process, never a crash. Writing: `set_attrs(trial, ...)`, `set_study_attrs(study, ...)`
and `set_stored_attrs(storage, trial_id, ...)` take the declared names as keywords, so a misspelt
name or a wrong type is a type error, not a silent None; `set_attr` checks a name chosen at run
time (a measure, a `best_` metric) when it is written.

Also the versions that made a study or a checkpoint (`versions()`), stamped on both.
"""

from __future__ import annotations

import functools
import logging
import platform
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any, Literal, TypedDict, Unpack, cast

if TYPE_CHECKING:
    import optuna

log = logging.getLogger("search")

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
    cpu_format: str  # on the CPU: nchw, channels_last, bf16, channels_last_bf16 (search.cpu_format)
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
    train_seconds: float  # device-seconds of its epochs so far (training and validation)
    checkpoint: str  # artifact id of the best-epoch weights, while the trial is in the top-k
    warm_start_of: str  # a configuration queued by study.warm_start: SOURCE#N (trial N of study SOURCE)
    trained_epochs: int  # epochs this trial trained itself (a retry's resumed ones not included)
    mlflow_run_id: str  # its MLflow run (tracking.mlflow); a retry continues it
    confirms: int  # a confirmation run (companion study NAME/confirm): the trial it confirms
    seed_index: int  # and which of its seeds (0: the search's own run)
    source_seed: int  # and the seed of the trial it confirms


class TrialSystemAttrs(TypedDict, total=False):
    """System attributes of a retry (search.workers.retry); Optuna's RetryHeartbeatStaleTrialCallback
    and its helpers read the first two."""

    failed_trial: int  # the first trial of the chain of retries this one continues
    retry_history: list[int]  # the trials of that chain before this one, oldest first
    deaths: int  # how many of them a dead worker ended (preemptions do not count)


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
    taken_at: float  # on a lock study (search.once): when its holder took it, epoch seconds


MEMORY_PROBE = "memory_probe:"  # a study attr per probed configuration (search.pack.probe_key): peak bytes

# ---------------------------------------------------------------------------
# reading: the declared records, values of the wrong type left out


def fits(value: Any, tp: Any) -> bool:
    """Whether a stored (JSON) value is of the declared type `tp` (an int is a float; a bool is no int)."""
    return _checker(tp)(value)


@functools.cache
def _checker(tp: Any) -> Callable[[Any], bool]:
    """A predicate for values of type `tp`, built once per type (attrs() runs for every trial read)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return lambda v: True
    if tp is type(None):
        return lambda v: v is None
    if origin in (typing.Union, types.UnionType):
        alternatives = [_checker(a) for a in args]
        return lambda v: any(c(v) for c in alternatives)
    if origin is Literal:
        return lambda v: isinstance(v, str | int) and v in args
    if origin is dict:
        key, item = _checker(args[0]), _checker(args[1])
        return lambda v: isinstance(v, dict) and all(key(k) and item(x) for k, x in v.items())
    if origin is list:
        item = _checker(args[0])
        return lambda v: isinstance(v, list) and all(item(x) for x in v)
    kinds = (int, float) if tp is float else tp
    if tp is bool:
        return lambda v: isinstance(v, bool)
    return lambda v: isinstance(v, kinds) and not isinstance(v, bool)


@functools.cache
def declared(record: type) -> dict[str, Any]:
    """The names and types of a record (TrialAttrs, TrialSystemAttrs, StudyAttrs)."""
    return typing.get_type_hints(record)


@functools.cache
def _exact(record: type) -> dict[str, frozenset[type]]:
    """The plain types each name's value may have (str, int, float, None), for a quick first look."""
    plain = {str, int, float, bool, type(None)}
    out = {}
    for k, tp in declared(record).items():
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        out[k] = frozenset(a for a in args if a in plain) | ({int} if float in args else set())
    return out


@functools.cache
def _checkers(record: type) -> dict[str, Callable[[Any], bool]]:
    return {k: _checker(tp) for k, tp in declared(record).items()}


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


_WARNED: set[tuple[str, str]] = set()


def _checked(values: Mapping[str, Any], record: type, where: str) -> Any:
    """`values` without the declared names whose value is of another type (each warned once)."""
    exact, checks, probe = _exact(record), _checkers(record), _checker(int)
    wrong = [
        k
        for k, v in values.items()
        if type(v) not in exact.get(k, ())
        and not (checks[k](v) if k in checks else probe(v) if k.startswith(MEMORY_PROBE) else True)
    ]
    if not wrong:
        return values
    types_of = declared(record)
    for k in wrong:
        if (where, k) not in _WARNED:
            _WARNED.add((where, k))
            log.warning(
                "%s: attribute %r holds %r (%s), not %s; read as absent",
                where,
                k,
                values[k],
                type(values[k]).__name__,
                _type_name(types_of.get(k, int)),
            )
    return {k: v for k, v in values.items() if k not in wrong}


def attrs(trial: optuna.trial.FrozenTrial | optuna.Trial) -> TrialAttrs:
    """A trial's user attributes as the declared record (read-only use)."""
    return cast(TrialAttrs, _checked(trial.user_attrs, TrialAttrs, f"trial {trial.number}"))


def system_attrs(trial: optuna.trial.FrozenTrial) -> TrialSystemAttrs:
    """A trial's system attributes of retries as the declared record (read-only use)."""
    mine = {k: v for k, v in trial.system_attrs.items() if k in declared(TrialSystemAttrs)}
    return cast(TrialSystemAttrs, _checked(mine, TrialSystemAttrs, f"trial {trial.number}"))


def study_attrs(study: optuna.Study | optuna.study.StudySummary) -> StudyAttrs:
    """A study's user attributes as the declared record (read-only use)."""
    return cast(StudyAttrs, _checked(study.user_attrs, StudyAttrs, f"study {study.study_name}"))


def stored_study_attrs(storage: optuna.storages.BaseStorage, study_id: int) -> StudyAttrs:
    """A study's user attributes read through the storage by id (search.once's lock studies)."""
    return cast(StudyAttrs, _checked(storage.get_study_user_attrs(study_id), StudyAttrs, f"study {study_id}"))


def rejected(trial: optuna.trial.FrozenTrial, name: str) -> Any:
    """The value stored under the declared `name` that `attrs` leaves out for its type, else None
    (for a caller that says more about it)."""
    v = trial.user_attrs.get(name)
    return None if v is None or fits(v, declared(TrialAttrs).get(name, Any)) else v


def optuna_artifacts(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """Optuna's own `artifacts:*` system attributes of a trial, as stored (search.artifacts checks each)."""
    return {k: v for k, v in trial.system_attrs.items() if k.startswith("artifacts:")}


def number(a: TrialAttrs, name: str) -> float | None:
    """The numeric attribute `name` (chosen at run time: a measure, `best_` + a metric), or None."""
    v = cast(Mapping[str, Any], a).get(name)
    return v if isinstance(v, int | float) and not isinstance(v, bool) else None


def omit(a: TrialAttrs, names: Iterable[str]) -> TrialAttrs:
    """A copy of the record without `names`."""
    left = set(names)
    return cast(TrialAttrs, {k: v for k, v in a.items() if k not in left})


def memory_probe(study: optuna.Study, key: str) -> int | None:
    """The probed peak bytes under `key` (MEMORY_PROBE + configuration, search.pack.probe_key), if
    a worker stored them."""
    v = _checked(study.user_attrs, StudyAttrs, f"study {study.study_name}").get(key)
    return None if v is None else int(v)


# ---------------------------------------------------------------------------
# writing: declared names only


def new_attrs(base: TrialAttrs | None = None, /, **values: Unpack[TrialAttrs]) -> dict[str, Any]:
    """The user attributes of a trial to create (`create_trial`, `enqueue_trial`): `base`'s, then `values`."""
    return {**(base or {}), **values}


def new_system_attrs(**values: Unpack[TrialSystemAttrs]) -> dict[str, Any]:
    """The system attributes of a retry to create (`create_trial`)."""
    return dict(values)


def set_attrs(trial: optuna.Trial, **values: Unpack[TrialAttrs]) -> None:
    """Set declared user attributes of a running trial, in the order given."""
    for key, v in values.items():
        trial.set_user_attr(key, v)


def set_attr(trial: optuna.Trial, name: str, value: Any) -> None:
    """Set one declared user attribute named at run time; TypeError for an undeclared name or a
    value of another type (a bug here, not the user's)."""
    types_of = declared(TrialAttrs)
    if name not in types_of or not fits(value, types_of[name]):
        raise TypeError(f"trial attribute {name!r} = {value!r}: not declared as such in search.record.TrialAttrs")
    trial.set_user_attr(name, value)


def set_stored_attrs(storage: optuna.storages.BaseStorage, trial_id: int, **values: Unpack[TrialAttrs]) -> None:
    """Set declared user attributes through the storage, for a trial this process does not run
    (a heartbeat thread, a sweep failing another worker's trial)."""
    for key, v in values.items():
        storage.set_trial_user_attr(trial_id, key, v)


def set_study_attrs(study: optuna.Study, **values: Unpack[StudyAttrs]) -> None:
    """Set declared user attributes of a study, in the order given."""
    for key, v in values.items():
        study.set_user_attr(key, v)


def set_stored_study_attrs(storage: optuna.storages.BaseStorage, number: int, /, **values: Unpack[StudyAttrs]) -> None:
    """Set declared user attributes of the study of id `number` through the storage (search.once's
    lock studies)."""
    for key, v in values.items():
        storage.set_study_user_attr(number, key, v)


def set_study_attr(study: optuna.Study, name: str, value: Any) -> None:
    """Set one declared study attribute named at run time (search.once); TypeError for an
    undeclared name or a value of another type."""
    types_of = declared(StudyAttrs)
    if name not in types_of or not fits(value, types_of[name]):
        raise TypeError(f"study attribute {name!r} = {value!r}: not declared as such in search.record.StudyAttrs")
    study.set_user_attr(name, value)


def set_memory_probe(study: optuna.Study, key: str, peak: int) -> None:
    """Store one configuration's probed peak bytes (one attr per key: workers never overwrite each other)."""
    if not key.startswith(MEMORY_PROBE):
        raise TypeError(f"study attribute {key!r}: a memory probe's name starts with {MEMORY_PROBE!r}")
    study.set_user_attr(key, int(peak))


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
