"""Tracking (search.tracking): MLflow runs read back with MLflow's own client on a SQLite backend,
TensorBoard event files read with TensorBoard's EventAccumulator, a tracking server that is away."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from search.errors import SearchError
from search.recipe import TrackingCfg
from search.tracking import END_STATUS, check
from search.trials import counted
from tests.conftest import ROOT, run_cli, run_inline, tiny_recipe, write_recipe


def test_import_search_without_the_tracking_packages():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('mlflow', 'tensorboard'): raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import search.study, search.cli, search.tracking, search.report\n"
        "assert 'mlflow' not in sys.modules and 'tensorboard' not in sys.modules\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True
    )
    assert proc.returncode == 0, proc.stderr


def test_tracking_without_its_packages_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(SearchError, match=r"^tracking.mlflow: MLflow is not installed; install the tracking extra: "):
        check(TrackingCfg(mlflow=True))
    check(TrackingCfg(tensorboard="tb"))  # TensorBoard is there
    write_recipe(tmp_path / "r.yaml", tiny_recipe())
    proc = run_inline("run", "r.yaml", "--set", "tracking.mlflow=true", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("install the tracking extra: pip install 'search[tracking]'")
    assert not (tmp_path / "studies").exists()  # refused before anything was written


def _runs(uri: str, name: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return client, parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


@pytest.mark.slow
def test_six_trials_two_workers_one_parent_six_nested_runs_and_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe("trk", study={"n_trials": 6, "pruner": {"name": "median", "min_trials": 2}})
    write_recipe(tmp_path / "r.yaml", recipe)
    sets = ("--set", "tracking.mlflow=true", "--set", "tracking.tensorboard=tb")
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = run_inline("run", "r.yaml", "--workers", "2", *sets, cwd=tmp_path, env=env)  # real worker processes
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "follow it in MLflow: mlflow ui --backend-store-uri sqlite:///studies/trk/mlflow.db" in proc.stdout
    uri = f"sqlite:///{tmp_path}/studies/trk/mlflow.db"
    trials = optuna.load_study(study_name="trk", storage=f"sqlite:///{tmp_path}/studies/trk.db").get_trials()
    client, parents, nested = _runs(uri, "trk")
    assert len(parents) == 1 and len(nested) == 6 and parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in nested} == {parents[0].info.run_id}
    by_number = {int(r.data.tags["trial_number"]): r for r in nested}
    for t in trials:
        run = by_number[t.number]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"]
        assert run.info.status == END_STATUS[t.state] and run.data.tags["state"] == t.state.name
        assert run.data.tags["pool_label"] == "mini_cnn" and run.data.tags["weight_source"] == "none"
        assert run.data.tags["imagenet_overlap"] == "none"
        assert run.data.params == {k: str(v) for k, v in t.params.items()}
        steps, values = sorted(t.intermediate_values), [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == steps and [m.value for m in history] == pytest.approx(values)
        acc = EventAccumulator(str(tmp_path / "tb" / f"trial-{t.number}"))
        acc.Reload()
        scalars = acc.Scalars("val_accuracy")
        assert [x.step for x in scalars] == steps and [x.value for x in scalars] == pytest.approx(values, rel=1e-6)
        assert set(acc.PluginTagToContent("hparams")) == {
            "_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"
        }  # fmt: skip
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}


@pytest.mark.slow
def test_a_killed_and_resumed_trial_keeps_one_run(tmp_path):
    recipe = tiny_recipe("kill", study={"n_trials": 1, "heartbeat": 1}, data={"max_samples": 1000}, train={"epochs": 5})
    write_recipe(tmp_path / "r.yaml", recipe)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "search", "run", "r.yaml", "--set", "tracking.mlflow=true"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    for line in proc.stdout:
        if " epoch   2 " in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the worker that resumes it: in this process (the killed one is the process under test)
    again = run_inline("worker", "--storage", "sqlite:///studies/kill.db", "--study", "kill", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = optuna.load_study(study_name="kill", storage=f"sqlite:///{tmp_path}/studies/kill.db").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["retry_of"] == 0
    client, parents, nested = _runs(f"sqlite:///{tmp_path}/studies/kill/mlflow.db", "kill")
    assert len(nested) == 1 and nested[0].info.run_id == trials[1].user_attrs["mlflow_run_id"]
    assert nested[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(nested[0].info.run_id, "val_accuracy")]
    assert steps[:2] == [1, 2] and steps[-1] == 5


@pytest.mark.slow
def test_a_tracking_server_that_is_away_fails_no_trial_and_warns_once_per_worker(tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_recipe(tmp_path / "r.yaml", tiny_recipe("away", study={"n_trials": 4}, train={"epochs": 1}))
    uri = f"http://127.0.0.1:{port}"
    proc = run_cli(
        "run", "r.yaml", "--workers", "2", "--set", f"tracking.mlflow={uri}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(f"tracking: MLflow at {uri} is not answering") == 2
    trials = optuna.load_study(study_name="away", storage=f"sqlite:///{tmp_path}/studies/away.db").get_trials()
    assert [t.state for t in counted(trials)] == [TrialState.COMPLETE] * 4
    # Two workers asking at the end may start one trial past the total: it ends at once, not counted.
    extra = [t for t in trials if t not in counted(trials)]
    assert all(t.user_attrs.get("fail_reason") == "study total reached" for t in extra), extra


@pytest.mark.slow
def test_a_study_tracked_at_another_uri_gets_a_parent_there(tmp_path):
    write_recipe(tmp_path / "r.yaml", tiny_recipe("moved", study={"n_trials": 1}, train={"epochs": 1}))
    for i, n in enumerate((1, 2)):
        uri = f"sqlite:///{tmp_path}/m{i}.db"
        over = ("--set", f"tracking.mlflow={uri}", "--set", f"study.n_trials={n}")
        proc = run_inline("run", "r.yaml", *over, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "not answering" not in proc.stderr
        _, parents, nested = _runs(uri, "moved")
        assert len(parents) == 1 and [r.data.tags["trial_number"] for r in nested] == [str(n - 1)]
