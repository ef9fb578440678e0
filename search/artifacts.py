"""Trial artifacts: each trial's metrics history and the best-epoch checkpoints of the top-k.

Files live in an Optuna `FileSystemArtifactStore` under `studies/<name>/artifacts/`
(beside the study's SQLite or journal file), attached to their trials with
`optuna.artifacts.upload_artifact`, so optuna-dashboard lists and serves them.
Disk stays bounded: when a trial finishes, checkpoints of finished trials that
are no longer among the study's top-k are deleted. Finished trials' attributes
are read-only in Optuna, so a deleted checkpoint stays listed on its trial in
the dashboard, where `search dashboard` serves it as a short "removed" note
(`ServedStore`).

A checkpoint is a `torch.save`d dict that `load_checkpoint` turns back into
the `build_model` model it came from:
`{"state_dict", "model": {spec, num_classes, in_chans, resolution, dropout,
channel_reduce, mean, std}, "trial", "epoch", "metrics"}`.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import optuna
import torch
from bottle import HTTPError  # optuna-dashboard's web framework: ServedStore
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState

from search.files import replacing
from search.models import build_model, info_of
from search.pool import parse_entry
from search.record import attrs, optuna_artifacts, set_attrs, versions
from search.storage import dir_of
from search.trials import best_first, ranked

if TYPE_CHECKING:
    from torch import nn

    from search.data import Data
    from search.hparams import TrainCfg
    from search.recipe import Recipe
    from search.train import FitResult

log = logging.getLogger("search")

CHECKPOINT_SUFFIX = "-best.pt"
HISTORY_SUFFIX = "-history.json"


# ---------------------------------------------------------------------------
# where a study's files live


class WholeFileStore(FileSystemArtifactStore):
    """Optuna's file store, with each artifact written to a temporary file beside it and renamed
    into place: a reader (the dashboard, `report`, another worker) sees no file or the whole file,
    never a half-written one, and a write that fails (a full disk, a kill) leaves no file under
    the artifact's id. `upload_artifact` records an artifact on its trial only after `write`
    returned, so no record points at a missing or truncated file."""

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        path = Path(self._get_filepath(artifact_id))
        with replacing(path, durable=True) as tmp, open(tmp, "wb") as f:
            shutil.copyfileobj(content_body, f)


def store_for(directory: Path) -> FileSystemArtifactStore:
    """The artifact store of a study directory (created on first use)."""
    (directory / "artifacts").mkdir(parents=True, exist_ok=True)
    return WholeFileStore(directory / "artifacts")


REMOVED_NOTE = (
    b"removed: this checkpoint was deleted when its trial dropped out of the study's top-k "
    b"(study.top_k); the trial's history artifact is kept\n"
)


READ_ONLY = (
    "artifacts are served read-only: this dashboard may not {what} them; "
    "restart `search dashboard` with --allow-writes to allow it"
)


class ServedStore:
    """The artifact store as the dashboard serves it.

    A deleted checkpoint downloads as a short "removed" note instead of failing with HTTP 500:
    Optuna keeps finished trials read-only, so their listing cannot drop the file; this makes the
    listed entry say what happened to it. Uploads and deletions are refused (HTTP 403 with the
    reason, which optuna-dashboard shows) unless `writable`: its API has no authentication, and
    the files are the study's checkpoints.
    """

    def __init__(self, store: FileSystemArtifactStore, writable: bool = False) -> None:
        self.store = store
        self.writable = writable

    def open_reader(self, artifact_id: str) -> Any:
        try:
            return self.store.open_reader(artifact_id)
        except ArtifactNotFound:
            return io.BytesIO(REMOVED_NOTE)

    def write(self, artifact_id: str, content_body: Any) -> None:
        self._may("upload")
        self.store.write(artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self._may("delete")
        self.store.remove(artifact_id)

    def _may(self, what: str) -> None:
        # bottle's HTTPError: optuna-dashboard's API views answer it with its status and reason
        # (any other exception becomes a logged "internal server error").
        if not self.writable:
            raise HTTPError(403, READ_ONLY.format(what=what))


# ---------------------------------------------------------------------------
# checkpoints


def spec_of(recipe: Recipe, label: str | None) -> str | dict[str, Any]:
    """The pool entry with this label as the recipe writes it (for build_model and exported recipes)."""
    for spec in recipe.normalized()["pool"]:
        if parse_entry(spec).label == label:
            return {k: v for k, v in spec.items() if v is not None} if isinstance(spec, dict) else spec
    raise KeyError(label)


def model_kwargs(recipe: Recipe, model: nn.Module, hp: TrainCfg, data: Data) -> dict[str, Any]:
    """What load_checkpoint needs to rebuild a `build_model` model (weights come from the checkpoint)."""
    info = info_of(model)
    return {
        "spec": spec_of(recipe, info.label),
        "num_classes": data.num_classes,
        "in_chans": data.in_chans,
        "resolution": info.resolution,
        "dropout": hp.dropout,
        "channel_reduce": info.channel_reduce,
        "mean": list(info.mean),
        "std": list(info.std),
    }


def save_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], model: dict[str, Any], **meta: Any) -> Path:
    """Weights + how to rebuild the model (`model_kwargs`); written aside, then renamed (no torn files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        torch.save(
            {"state_dict": state_dict, "model": model, "versions": versions(meta.pop("device", None)), **meta}, tmp
        )
    return path


def load_checkpoint(source: str | Path | bytes) -> tuple[nn.Module, dict[str, Any]]:
    """(model with the checkpoint's weights, the checkpoint dict) from a file path or downloaded bytes."""
    f = io.BytesIO(source) if isinstance(source, bytes) else source
    ckpt = torch.load(f, map_location="cpu", weights_only=True)
    m = dict(ckpt["model"])
    mean, std = tuple(m.pop("mean")), tuple(m.pop("std"))
    # No pretrained download: every weight comes from the checkpoint.
    model = build_model(m.pop("spec"), pretrained=False, **m)
    model.load_state_dict(ckpt["state_dict"])
    model.info = replace(info_of(model), mean=mean, std=std)  # type: ignore[assignment]  # a plain attribute
    return model, ckpt


# ---------------------------------------------------------------------------
# the hook the objective calls after fit


def _upload(trial: optuna.Trial, store: FileSystemArtifactStore, path: Path) -> str:
    return upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)


def top_numbers(study: optuna.Study, k: int, extra: tuple[int, float] | None = None) -> set[int]:
    """Numbers of the k best ranked trials (complete and feasible: search.trials.ranked), with
    `extra`, a feasible trial finishing now as (number, primary value), placed among them."""
    scored = [(t.number, t.values[0]) for t in ranked(study)] + ([extra] if extra else [])
    return set(best_first(study, scored)[:k])


ARTIFACT_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")  # Optuna's: uuid4


def records(trial: optuna.trial.FrozenTrial) -> list[dict[str, str]]:
    """The trial's artifact records (Optuna's `artifacts:*` system attrs) that are well formed: a
    JSON object with a uuid `artifact_id` and a `filename`. A shared database is written by every
    worker and anyone with access to it; a malformed record (no filename, an id like '../x') is
    skipped with a warning rather than failing every trial that reads it."""
    out = []
    for key, raw in optuna_artifacts(trial).items():
        if raw is None:
            continue
        try:
            meta = json.loads(raw) if isinstance(raw, str) else raw
            ok = ARTIFACT_ID.fullmatch(meta["artifact_id"]) and isinstance(meta["filename"], str)
        except (ValueError, TypeError, KeyError):
            ok = False
        if ok:
            out.append(meta)
        else:
            log.warning("trial %d: artifact record %s is malformed (%.80r); skipped", trial.number, key, raw)
    return out


def checkpoint_meta(trial: optuna.trial.FrozenTrial) -> list[dict[str, str]]:
    """Artifact metadata of a trial's checkpoints (live or deleted)."""
    return [m for m in records(trial) if m["filename"].endswith(CHECKPOINT_SUFFIX)]


def history_of(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> list[dict[str, Any]]:
    """The per-epoch records a finished trial stored as its history artifact ([] when none is kept)."""
    for meta in records(trial):
        if meta["filename"].endswith(HISTORY_SUFFIX):
            try:
                with store_for(dir_of(study)).open_reader(meta["artifact_id"]) as f:
                    return json.load(f)["history"]
            except (ArtifactNotFound, ValueError, KeyError, TypeError):
                return []
    return []


def prune(
    study: optuna.Study, store: FileSystemArtifactStore, k: int, extra: tuple[int, float] | None = None
) -> list[int]:
    """Delete checkpoints of finished trials outside the top-k; returns their numbers.

    Running trials are left alone: their own hook decides when they finish.
    """
    keep = top_numbers(study, k, extra)
    removed = []
    for t in study.get_trials(deepcopy=False):
        if t.number in keep or t.state in (TrialState.RUNNING, TrialState.WAITING) or (extra and t.number == extra[0]):
            continue
        for meta in checkpoint_meta(t):
            try:
                store.remove(meta["artifact_id"])
                removed.append(t.number)
            except ArtifactNotFound:  # removed earlier, or by another worker
                pass
    return removed


def after_fit(
    trial: optuna.Trial,
    recipe: Recipe,
    model: nn.Module,
    hp: TrainCfg,
    data: Data,
    result: FitResult,
    feasible: bool = True,
) -> None:
    """Store the trial's metrics history; keep its best-epoch checkpoint while it is in the top-k
    (an infeasible trial keeps none: it can never be chosen). The checkpoints it displaces are
    deleted once its end is told (`prune`, from search.objective.told), not before."""
    directory = dir_of(trial.study)
    store = store_for(directory)
    metric = recipe.study.metric
    with tempfile.TemporaryDirectory() as tmp:
        hist = Path(tmp) / f"trial-{trial.number}{HISTORY_SUFFIX}"
        hist.write_text(
            json.dumps(
                {
                    "trial": trial.number,
                    "pool_label": info_of(model).label,
                    "metric": metric,
                    "best_epoch": result.best_epoch,
                    "history": result.history,
                },
                indent=1,
            )
        )
        _upload(trial, store, hist)
        k = recipe.study.top_k
        if k == 0 or result.failed or result.best_state is None or not feasible:
            return
        value = result.best[metric]
        if trial.number not in top_numbers(trial.study, k, (trial.number, value)):
            return
        ckpt = save_checkpoint(
            Path(tmp) / f"trial-{trial.number}{CHECKPOINT_SUFFIX}",
            result.best_state,
            model_kwargs(recipe, model, hp, data),
            trial=trial.number,
            epoch=result.best_epoch,
            metrics=result.best,
            device=attrs(trial).get("device"),
        )
        set_attrs(trial, checkpoint=_upload(trial, store, ckpt))
