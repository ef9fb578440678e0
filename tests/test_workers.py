"""Interrupting a run: SIGTERM mid-trial, the printed resume command, local GPU assignment."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

import optuna
from optuna.trial import TrialState

from search.study import gpu_assignment
from tests.conftest import ROOT, run_cli, tiny_recipe, write_recipe


def test_sigterm_mid_trial_fails_it_and_the_resume_command_completes_the_total(tmp_path):
    write_recipe(tmp_path / "r.yaml", tiny_recipe(name="term", study={"n_trials": 2}, train={"epochs": 4}))
    proc = subprocess.Popen([sys.executable, "-m", "search", "run", "r.yaml"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # the first epoch of the first trial: it is mid-trial now
        if "epoch   1" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    url = f"sqlite:///{tmp_path}/studies/term.db"
    trials = optuna.load_study(study_name="term", storage=url).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL]
    assert trials[0].user_attrs["fail_reason"] == "interrupted" and trials[0].intermediate_values
    resume = next(line for line in err.splitlines() if line.startswith("resume with: ")).removeprefix("resume with: ")
    prefix, rest = resume.split(" -m search ", 1)  # `python`, or this interpreter's path when not on PATH
    assert prefix in ("python", sys.executable) and rest == "worker --storage 'sqlite:///studies/term.db' --study term"
    args = shlex.split(resume)[3:]  # after `python -m search`
    out = run_cli(*args, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    trials = optuna.load_study(study_name="term", storage=url).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]


def test_gpus_round_robin_over_visible_devices():
    assert gpu_assignment(5, None, 2) == ["0", "1", "0", "1", "0"]
    assert gpu_assignment(3, "2,5", 8) == ["2", "5", "2"]
    assert gpu_assignment(2, None, 0) == [None, None]
