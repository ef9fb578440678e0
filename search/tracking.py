"""Tracking: follow a study in MLflow and TensorBoard (`tracking:` in the recipe, off by default).

MLflow (`tracking.mlflow: URI`, or `true` for a SQLite file next to the study): one parent run per
study (opened once however many workers start, search.once; its id is the study attr
`mlflow_run_id`), one nested run per trial, tagged with its pool label, weight source, ImageNet
overlap, trial number and state, its sampled params, every epoch's metrics at step=epoch, ended
FINISHED (complete), KILLED (pruned) or FAILED. A retried trial carries the run id (trial attr
`mlflow_run_id`) and continues that run.

TensorBoard (`tracking.tensorboard: DIR`): one event directory per trial, `DIR/trial-N` (a retry
writes into its original's), the per-epoch scalars, and at the end the HParams summary (params,
pool label, weight source, state and the best value) that TensorBoard's HParams tab compares.

A tracking server that is away never fails a trial: the worker warns once, its trials go on, the
metrics meanwhile are kept and sent when the server answers again (tried at most every
RETRY_SECONDS). MLflow and TensorBoard are imported only when tracking is on (an optional extra).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.errors import SearchError
from search.once import locked, once
from search.optuna_api import frozen
from search.recipe import Recipe, TrackingCfg
from search.record import attrs, set_attrs, set_study_attrs, system_attrs
from search.storage import mask

log = logging.getLogger("search")

EXTRA = "pip install 'search[tracking]'"
RETRY_SECONDS = 30.0  # while the server is away, how often a worker tries it again
END_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
TAGS = ("pool_label", "weight_source", "imagenet_overlap", "warm_start_of")


def check(cfg: TrackingCfg) -> None:
    """Tracking asked for without its packages: one line naming the extra (nothing is imported)."""
    need = [("tracking.mlflow", "mlflow", "MLflow")] if cfg.mlflow else []
    need += [("tracking.tensorboard", "tensorboard", "TensorBoard")] if cfg.tensorboard else []
    for key, module, name in need:
        if importlib.util.find_spec(module) is None:
            raise SearchError(f"{key}: {name} is not installed; install the tracking extra: {EXTRA}")


def mlflow_uri(cfg: TrackingCfg, study_dir: Path) -> str | None:
    """The tracking URI: as given, or for `true` a SQLite file next to the study's own files."""
    if cfg.mlflow is False:
        return None
    if cfg.mlflow is True:  # relative as the default storage is: from where the study runs
        return f"sqlite:///{study_dir / 'mlflow.db'}"
    return cfg.mlflow


def ui_command(uri: str) -> str:
    """The command that shows the runs (a local file: `mlflow ui` reads it; a server: its address)."""
    if uri.startswith(("sqlite:", "file:", "/", "postgresql", "mysql")):
        return f"mlflow ui --backend-store-uri {mask(uri)}"
    return f"open {mask(uri)}"


class Tracker:
    """One worker's tracking: the study's parent run, each trial's run and event directory."""

    def __init__(self, recipe: Recipe, study: optuna.Study, study_dir: Path) -> None:
        check(recipe.tracking)
        self.recipe, self.study, self.cfg = recipe, study, recipe.tracking
        self.uri = mlflow_uri(self.cfg, study_dir)
        self.client: Any = None
        self.parent: str | None = None
        self.away_until = 0.0  # while the server is away: when to try it again
        self.warned = False
        self.pending: list[tuple[str, list[Any]]] = []  # (run id, metrics) not sent while away
        self.writers: dict[int, Any] = {}  # trial number -> SummaryWriter
        if self.uri is not None:
            study_dir.mkdir(parents=True, exist_ok=True)
            # A server that is away answers at once, not after minutes of retries (the user's settings win).
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
            self.artifacts = (study_dir / "mlflow-artifacts").resolve().as_uri()
            self._call(lambda: None)  # connect now: a server that is away is said at the start

    def where(self) -> list[str]:
        """What the worker prints when it starts: where the runs go and how to see them."""
        out = []
        if self.uri is not None:
            out += [f"tracking to MLflow at {mask(self.uri)}; see the runs with:", f"  {ui_command(self.uri)}"]
        if self.cfg.tensorboard:
            tb = self.cfg.tensorboard
            out += [f"tracking to TensorBoard in {tb}; see it with:", f"  tensorboard --logdir {tb}"]
        return out

    # -- MLflow, through one guard: a failure warns once and keeps the trial going

    def _call(self, fn: Callable[[], Any]) -> Any:
        if self.uri is None or time.monotonic() < self.away_until:
            return None
        try:
            if self.parent is None:
                self._connect()
            self._flush()
            return fn()
        except Exception as e:  # noqa: BLE001 - tracking is a view; the trial goes on without it
            self.away_until = time.monotonic() + RETRY_SECONDS
            if not self.warned:
                self.warned = True
                log.warning(
                    "tracking: MLflow at %s is not answering (%s: %s); the trials go on, their metrics are "
                    "kept and sent when it answers again",
                    mask(self.uri or ""),
                    type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else "",
                )
            return None

    def _connect(self) -> None:
        """The client and the study's parent run. One worker at a time: a new SQLite backend gets
        its tables from the first client, and two creating them together collide."""
        from mlflow import MlflowClient

        with locked(self.study, "mlflow"):
            self.client = MlflowClient(tracking_uri=self.uri)
            parent, _ = once(self.study, "mlflow_run_id", self._new_parent)
            if not self._exists(parent):  # the study was tracked at another URI before: a parent here
                parent = self._new_parent()
                set_study_attrs(self.study, mlflow_run_id=parent)
            self.parent = parent

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def _new_parent(self) -> str:
        name = self.cfg.experiment or self.study.study_name
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name, artifact_location=self.artifacts)
        run = self.client.create_run(exp_id, run_name=self.study.study_name, tags={"study": self.study.study_name})
        return str(run.info.run_id)

    def _flush(self) -> None:
        while self.pending:
            run_id, metrics = self.pending[0]
            self.client.log_batch(run_id, metrics=metrics)
            self.pending.pop(0)

    def _run_of(self, trial: optuna.Trial | FrozenTrial) -> str | None:
        return attrs(trial).get("mlflow_run_id")

    def start(self, trial: optuna.Trial) -> None:
        """A trial has sampled its params and recorded its entry: its run opens (a retry's reopens)."""
        if self.uri is not None:
            self._call(lambda: self._start_run(trial))
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            first = system_attrs(frozen(trial)).get("failed_trial", trial.number)  # a retry writes beside its original
            self.writers[trial.number] = SummaryWriter(str(Path(self.cfg.tensorboard) / f"trial-{first}"))

    def _start_run(self, trial: optuna.Trial) -> None:
        from mlflow.entities import Param, RunTag

        a = attrs(trial)
        tags = {k: str(a.get(k)) for k in TAGS if a.get(k) is not None}
        tags.update(trial_number=str(trial.number), state="RUNNING")
        run_id = self._run_of(trial)
        if run_id is not None and not self._exists(run_id):
            run_id = None  # tracked at another URI before
        if run_id is not None:  # a retry: the same run goes on
            self.client.update_run(run_id, status="RUNNING")
        else:
            exp_id = self.client.get_run(self.parent).info.experiment_id
            run = self.client.create_run(
                exp_id, run_name=f"trial {trial.number}", tags={"mlflow.parentRunId": self.parent}
            )
            run_id = run.info.run_id
            set_attrs(trial, mlflow_run_id=run_id)
        params = [Param(k, str(v)) for k, v in trial.params.items()]
        self.client.log_batch(run_id, params=params, tags=[RunTag(k, v) for k, v in tags.items()])

    def epoch(self, trial: optuna.Trial, epoch: int, record: dict[str, float]) -> None:
        """An epoch ended: its metrics at step=epoch."""
        numbers = {k: float(v) for k, v in record.items() if k != "epoch" and isinstance(v, int | float)}
        writer = self.writers.get(trial.number)
        if writer is not None:
            for k, v in numbers.items():
                writer.add_scalar(k, v, epoch)
            writer.flush()
        run_id = self._run_of(trial)
        if self.uri is None or run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, epoch) for k, v in numbers.items()]
        if self._call(lambda: self.client.log_batch(run_id, metrics=metrics) or True) is None:
            self.pending.append((run_id, metrics))

    def end(self, trial: FrozenTrial) -> None:
        """The trial ended (COMPLETE, PRUNED or FAIL): its state, status and HParams summary."""
        writer = self.writers.pop(trial.number, None)
        if writer is not None:
            self._hparams(writer, trial)
        run_id = self._run_of(trial)
        if self.uri is None or run_id is None or trial.state not in END_STATUS:
            return

        def close() -> None:
            self.client.set_tag(run_id, "state", trial.state.name)
            if trial.values:
                self.client.log_metric(run_id, f"best_val_{self.recipe.study.metric}", trial.values[0])
            self.client.set_terminated(run_id, status=END_STATUS[trial.state])

        self._call(close)

    def _hparams(self, writer: Any, trial: FrozenTrial) -> None:
        from torch.utils.tensorboard.summary import hparams

        a = attrs(trial)
        values: dict[str, Any] = {k: v for k, v in trial.params.items() if isinstance(v, int | float | str | bool)}
        values.update({k: str(a.get(k)) for k in TAGS[:3] if a.get(k) is not None})
        values["state"] = trial.state.name
        best = f"best_val_{self.recipe.study.metric}"
        metrics = {best: float(trial.values[0])} if trial.values else {}
        for summary in hparams(values, metrics):
            writer.file_writer.add_summary(summary)
        for k, v in metrics.items():
            writer.add_scalar(k, v)
        writer.close()

    def finish(self, done: bool) -> None:
        """This worker leaves: the parent run ends FINISHED when the study is done; writers close."""
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
        if done and self.parent is not None:
            parent = self.parent
            self._call(lambda: self.client.set_terminated(parent, status="FINISHED"))
