"""The resume state: a running trial's full training state, saved at every epoch end, that a
retry (of a dead, preempted or interrupted trial) takes over and goes on from.

It lives in `trial-N.pt` under the study's resume directory (`study.checkpoint_dir`/NAME,
default `studies/NAME/resume`; a shared path for many machines), written atomically and
durably, and carries what identifies the run it belongs to (format, the study's id, the trial
number, params, seed, a recipe + data fingerprint) and where it can be restored (device type,
precision, GPU count): a state of another run or another kind of device is not resumed, the
retry starts over with the reason recorded (`restarted`), never failed. At most the epoch in progress is lost,
and on the CPU the resumed history is exactly the uninterrupted one's. The file is removed once
its trial's end is told (`forget`); the sweep removes any left by trials that ended otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from search.files import replacing
from search.recipe import Recipe
from search.record import attrs, set_study_attrs, study_attrs
from search.storage import dir_of

STATE_NAME = re.compile(r"trial-(\d+)\.pt")
TEMP_NAME = re.compile(r"\.trial-\d+\.pt\.[0-9a-f]+\.tmp")  # search.files.new_beside's names
STATE_FORMAT = 2  # of the per-epoch resume files (2: study id, fingerprint, device, precision, GPUs)


def resume_dir(study: optuna.Study, recipe: Recipe) -> Path:
    """Where a study's running trials keep their last epoch's state."""
    if recipe.study.checkpoint_dir:
        return Path(recipe.study.checkpoint_dir).expanduser() / study.study_name
    return dir_of(study) / "resume"


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (a crash leaves the previous file whole) and durably (a shared filesystem
    sees all of it once the name does)."""
    with replacing(path, durable=True) as tmp:
        torch.save(state, tmp)


def forget(directory: Path, number: int) -> None:
    """Remove a trial's saved state: called once its end is told, and not before (a kill, full disk
    or outage until then leaves the state for the retry)."""
    (directory / f"trial-{number}.pt").unlink(missing_ok=True)


def study_id(study: optuna.Study) -> str:
    """The study's own id (a UUID stored on it at creation; an older study gets one now): a study
    deleted and created again under the same name has another, so its states are not resumed."""
    sid = study_attrs(study).get("study_id")
    if not isinstance(sid, str):
        sid = str(uuid.uuid4())
        set_study_attrs(study, study_id=sid)
    return sid


def fingerprint(recipe: Recipe, data: Any) -> str:
    """What a saved state's training depends on besides its parameters and seed: the recipe (less
    the budget, storage and hardware settings a study may change between runs) and the data
    (shapes, labels and a sample of the images)."""
    d = recipe.normalized()
    for key in ("storage", "timeout", "n_trials", "heartbeat", "storage_patience", "confirm"):
        d["study"].pop(key, None)
    d.pop("hardware", None)
    h = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode())
    for split in (data.train, data.val):
        x = split.x.reshape(-1)
        h.update(repr((tuple(split.x.shape), tuple(split.y.shape))).encode())
        h.update(split.y.to(torch.int64).numpy().tobytes())
        h.update(x[:: max(1, x.numel() // 65536)].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def identity(
    trial: optuna.Trial, sid: str, seed: int, fingerprint: str, device: str, precision: str, gpus: int
) -> dict[str, Any]:
    """What a saved state carries to say which run it belongs to and where it can be restored."""
    return {
        "format": STATE_FORMAT,
        "study": trial.study.study_name,
        "study_id": sid,
        "number": trial.number,
        "params": trial.params,
        "seed": seed,
        "fingerprint": fingerprint,
        "device_type": device,
        "precision": precision,
        "gpus": gpus,
    }


def mismatch(meta: dict[str, Any], expected: dict[str, Any], numbers: set[int]) -> str:
    """'' when a state's identity fits this trial (its number one of the retry chain's), else why not."""
    if meta.get("format") != STATE_FORMAT:
        return f"format {meta.get('format')}, expected {STATE_FORMAT}"
    if meta.get("study_id") != expected["study_id"]:
        return "written by another study of the same name (deleted and created again)"
    if meta.get("number") not in numbers:
        return f"of trial {meta.get('number')}, not of this trial's retries ({sorted(numbers)})"
    if meta.get("fingerprint") != expected["fingerprint"]:
        return "the recipe or the data changed since"
    if meta.get("seed") != expected["seed"]:
        return "its seed differs"
    if json.dumps(meta.get("params"), sort_keys=True) != json.dumps(expected["params"], sort_keys=True):
        return "its parameters differ"
    for key, what in (("device_type", "device"), ("precision", "precision"), ("gpus", "GPU count")):
        if meta.get(key) != expected[key]:
            return f"saved with {what} {meta.get(key)}, this trial runs with {expected[key]}"
    return ""


def take_state(
    directory: Path, trial: optuna.Trial, expected: dict[str, Any], numbers: set[int]
) -> tuple[dict[str, Any] | None, str]:
    """For a retry: the state its predecessor saved (or the trial's own, from an earlier attempt),
    moved to this trial's own file (so a retry that dies in turn leaves it to the next), or None
    and why it starts over. A state that is not this run's (`mismatch`) is never restored."""
    mine = directory / f"trial-{trial.number}.pt"
    source = directory / f"trial-{attrs(trial).get('retry_of')}.pt"
    candidates = [p for p in dict.fromkeys((mine, source)) if p.exists()]
    if not candidates:
        return None, f"no saved state at {source}: trained from the first epoch"
    why = ""
    for path in candidates:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a torn or foreign file: start over, and say so
            why = f"saved state {path} unreadable ({type(e).__name__}: {e}): trained from the first epoch"
            continue
        meta = state.get("trial", {}) if isinstance(state, dict) else {}
        wrong = mismatch(meta if isinstance(meta, dict) else {}, expected, numbers)
        if wrong:
            why = f"saved state {path} is of another run ({wrong}): trained from the first epoch"
            continue
        if path != mine:
            os.replace(path, mine)
        return state, ""
    return None, why


STALE_TEMP = 3600.0  # seconds: a temp file this old has no writer left (a state is written in seconds)
ABANDONED = 3600.0  # seconds after a trial failed without a retry before its state is given up


def tidy(directory: Path, trials: list[optuna.trial.FrozenTrial], now: float | None = None) -> list[Path]:
    """Remove the states nothing will resume and stale temp files; returns what it removed.

    A state goes when its trial is COMPLETE or PRUNED, or FAIL with its retry past WAITING (the
    retry took the state over, or ended), or FAIL for an hour with no retry (past the retry
    limit, failed by hand). States of trials this list does not know (newer ones) stay.
    """
    now = time.time() if now is None else now
    if not directory.is_dir():
        return []
    by_number = {t.number: t for t in trials}
    retried = {attrs(t).get("retry_of"): t for t in trials if "retry_of" in attrs(t)}
    removed = []
    for path in directory.iterdir():
        m = STATE_NAME.fullmatch(path.name)
        if m is None:
            with contextlib.suppress(FileNotFoundError):  # renamed into place meanwhile by its writer
                if TEMP_NAME.fullmatch(path.name) and now - path.stat().st_mtime > STALE_TEMP:
                    path.unlink(missing_ok=True)
                    removed.append(path)
            continue
        t = by_number.get(int(m.group(1)))
        if t is None or not _abandoned(t, retried.get(t.number), now):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _abandoned(t: optuna.trial.FrozenTrial, retry: optuna.trial.FrozenTrial | None, now: float) -> bool:
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    if t.state != TrialState.FAIL:
        return False
    if retry is not None:
        return retry.state != TrialState.WAITING
    ended = t.datetime_complete.timestamp() if t.datetime_complete else now
    return now - ended > ABANDONED


def disk_use(directory: Path) -> tuple[int, int]:
    """(files, bytes) of the resume states and temp files under `directory`."""
    files = [p for p in directory.iterdir() if p.is_file()] if directory.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)
