"""Preempted trials resume: kill -9, SIGTERM and Ctrl-C mid-trial, real worker processes on a
real SQLite study; the resumed histories equal those of uninterrupted runs exactly (CPU)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys

import optuna
import pytest
import torch
from optuna.trial import TrialState

from search import artifacts, resume, workers
from search import study as st
from search.recipe import recipe_from_dict
from search.trials import STALE_REASON, counted, finished
from tests.conftest import ROOT, run_cli, start_worker, tiny_recipe, write_recipe
from tests.conftest import timeless as _metrics  # per-epoch metrics less the timings

pytestmark = pytest.mark.slow  # killed, preempted and interrupted worker processes

EPOCH = re.compile(r"trial +(\d+) .* epoch +(\d+) ")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _recipe(name: str, **study) -> dict:
    # ~0.3 s an epoch on one core: long enough to signal a trial between two epochs. A heartbeat of
    # 2 s: a killed trial is stale after 20 s, longer than a worker takes to start on a busy machine
    return tiny_recipe(
        name=name,
        study={"n_trials": 2, "heartbeat": 2, **study},
        data={"max_samples": 1000},
        train={"epochs": 6},
        space={
            "preset": "quick",
            "overrides": {"optimizer": "adamw", "batch_size": [16], "lr": {"low": 2e-3, "high": 5e-3, "log": True}},
        },
    )


def _worker(name: str, url: str, cwd) -> subprocess.Popen:
    return start_worker(name, url, cwd, ENV)


def _reference(tmp_path, name: str) -> dict[int, tuple[list[dict], dict]]:
    """The same study run uninterrupted by a worker like the others (the same threads, so the
    same floating-point sums): trial number -> (history, intermediate values)."""
    url = f"sqlite:///{tmp_path}/ref/{name}.db"
    study = st.open_study(recipe_from_dict(_recipe(name)), url)
    proc = _worker(name, url, tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return {t.number: (_metrics(artifacts.history_of(study, t)), t.intermediate_values) for t in study.get_trials()}


def _until_epoch(proc: subprocess.Popen, epoch: int) -> int:
    """Read the worker's lines until one of its trials reports `epoch`; returns the trial number."""
    for line in proc.stdout:
        m = EPOCH.search(line)
        if m and int(m.group(2)) == epoch:
            return int(m.group(1))
    raise AssertionError(f"the worker ended before epoch {epoch}: {proc.wait()} {proc.stderr.read()[-2000:]}")


def _run(tmp_path, name: str) -> subprocess.Popen:
    """`python -m search run` of a one-worker study, its output piped."""
    write_recipe(tmp_path / "r.yaml", _recipe(name, heartbeat=20))
    return subprocess.Popen(
        [sys.executable, "-m", "search", "run", "r.yaml"],
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )


def test_a_killed_and_a_preempted_trial_resume_with_the_uninterrupted_histories(tmp_path):
    ref = _reference(tmp_path, "pre")
    url = f"sqlite:///{tmp_path}/pre.db"
    recipe = recipe_from_dict(_recipe("pre"))
    study = st.open_study(recipe, url)
    resume_dir = resume.resume_dir(study, recipe)

    first = _worker("pre", url, tmp_path)
    killed = _until_epoch(first, 3)
    first.kill()  # kill -9 after epoch 3: the trial stays RUNNING until its heartbeat is missed
    first.communicate(timeout=60)
    second = _worker("pre", url, tmp_path)
    preempted = _until_epoch(second, 2)
    second.send_signal(signal.SIGTERM)  # preemption after epoch 2: saved and queued again at once
    _, err = second.communicate(timeout=120)
    assert second.returncode == 143 and "Traceback" not in err, err[-2000:]
    waiting = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert [t.user_attrs["retry_of"] for t in waiting] == [preempted]
    assert (resume_dir / f"trial-{killed}.pt").exists() and (resume_dir / f"trial-{preempted}.pt").exists()

    third = _worker("pre", url, tmp_path)  # runs the preempted trial's retry, then the dead one's once stale
    out, err = third.communicate(timeout=300)
    assert third.returncode == 0 and "Traceback" not in err, err[-2000:]
    trials = study.get_trials()
    assert len(counted(trials)) == 2 and finished(study) == 2
    done = {t.user_attrs["retry_of"]: t for t in trials if t.state == TrialState.COMPLETE}
    assert sorted(done) == sorted([killed, preempted]), [(t.number, t.state, t.user_attrs) for t in trials]
    assert trials[killed].user_attrs["fail_reason"] == STALE_REASON
    assert trials[preempted].user_attrs["fail_reason"] == "interrupted"
    assert done[killed].user_attrs["resumed_from_epoch"] in (2, 3)  # the kill may beat epoch 3's save
    assert done[preempted].user_attrs["resumed_from_epoch"] == 2
    assert f"resumes after epoch {done[preempted].user_attrs['resumed_from_epoch']}" in out
    for original, t in done.items():
        assert t.params == trials[original].params
        history, values = ref[original]
        assert _metrics(artifacts.history_of(study, t)) == history, original  # exactly, epoch by epoch
        assert t.intermediate_values == values
    assert not list(resume_dir.glob("*.pt"))  # a finished trial leaves no state behind


def test_sigterm_queues_the_trial_again_and_the_printed_command_resumes_it(tmp_path):
    proc = _run(tmp_path, "term")
    _until_epoch(proc, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert "SIGTERM: stopping at the next step" in err
    url = f"sqlite:///{tmp_path}/studies/term.db"
    trials = optuna.load_study(study_name="term", storage=url).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].user_attrs["fail_reason"] == "interrupted" and trials[1].user_attrs["retry_of"] == 0
    state = torch.load(tmp_path / "studies/term/resume/trial-0.pt", weights_only=True)
    assert state["epoch"] == 2 and state["trial"]["params"] == trials[0].params
    resume = next(line for line in err.splitlines() if line.startswith("resume with: ")).removeprefix("resume with: ")
    prefix, rest = resume.split(" -m search ", 1)  # `python`, or this interpreter's path when not on PATH
    assert prefix in ("python", sys.executable) and rest == "worker --storage 'sqlite:///studies/term.db' --study term"
    out = run_cli(*shlex.split(resume)[3:], cwd=tmp_path, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    trials = optuna.load_study(study_name="term", storage=url).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].user_attrs["resumed_from_epoch"] == 2 and len(trials[1].intermediate_values) == 6


def test_ctrl_c_twice_quits_at_once_and_the_trial_is_still_queued_again(tmp_path):
    proc = _run(tmp_path, "twice")
    _until_epoch(proc, 1)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    trials = optuna.load_study(study_name="twice", storage=f"sqlite:///{tmp_path}/studies/twice.db").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]


def test_a_retry_without_a_readable_state_starts_over_and_says_so(tmp_path):
    url = f"sqlite:///{tmp_path}/lost.db"
    recipe = recipe_from_dict(_recipe("lost", n_trials=1))
    recipe = recipe_from_dict({**recipe.normalized(), "train": {**recipe.normalized()["train"], "epochs": 2}})
    study = st.open_study(recipe, url)
    trial = study.ask({"model": optuna.distributions.CategoricalDistribution(["mini_cnn"])})
    study.tell(trial, state=TrialState.FAIL)
    workers.retry(study, study.get_trials()[0])
    where = resume.resume_dir(study, recipe)
    where.mkdir(parents=True)
    (where / "trial-0.pt").write_bytes(b"torn")
    st.work(recipe, study, quiet=True)
    done = study.get_trials()[1]
    assert done.state == TrialState.COMPLETE and "resumed_from_epoch" not in done.user_attrs
    assert done.user_attrs["restarted"].startswith(f"saved state {where / 'trial-0.pt'} unreadable")
    assert len(done.intermediate_values) == 2
