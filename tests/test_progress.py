"""Live progress on a terminal (a real pseudo-terminal), plain lines in a pipe."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from search.progress import Progress
from tests.conftest import ROOT, run_inline, tiny_recipe, write_recipe

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _recipe(tmp_path, name: str):
    return write_recipe(
        tmp_path / "r.yaml",
        tiny_recipe(name=name, study={"n_trials": 2}, train={"epochs": 3}, data={"max_samples": 600}),
    )


def _in_terminal(args: list[str], cwd) -> tuple[int, str]:
    """Run `python -m search ARGS` with stdout and stderr on a pseudo-terminal, 100 columns wide."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))  # rows, columns
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm", "COLUMNS": "100", "LINES": "40"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "search", *args], cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=300), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_a_terminal_shows_live_study_and_trial_bars_within_100_columns(tmp_path):
    _recipe(tmp_path, "live")
    code, out = _in_terminal(["run", "r.yaml"], tmp_path)
    assert code == 0, out[-3000:]
    screens = [ANSI.sub("", s) for s in re.split(r"[\r\n]", out)]
    trial_bars = [s for s in screens if s.startswith("trial   0 mini_cnn") and " ep " in s]
    assert trial_bars and any("img/s" in s and "<" in s for s in trial_bars), screens[:40]
    assert any(re.search(r"ep [123]/3 \d+/\d+", s) for s in trial_bars)
    study_bars = [s for s in screens if s.startswith("study ") and "pruned" in s]
    assert any(s.startswith("study 2/2") and "best 0." in s and "(trial " in s for s in study_bars), study_bars
    assert any("epoch   3" in s for s in screens)  # the epoch lines still print, above the bars
    progress = [s for s in screens if s.startswith(("study ", "trial ", "["))]
    assert max(len(s) for s in progress) <= 100, max(progress, key=len)


@pytest.mark.slow
def test_a_pipe_gets_plain_lines_only_at_epoch_and_trial_ends(tmp_path):
    _recipe(tmp_path, "plain")
    proc = run_inline("run", "r.yaml", cwd=tmp_path)  # stdout is not a terminal: as in a pipe
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout and "img/s" not in proc.stdout
    epoch_lines = [line for line in proc.stdout.splitlines() if re.match(r"trial +\d+ \S+ +epoch +\d+", line)]
    assert len(epoch_lines) == 6  # 2 trials x 3 epochs
    assert sum(bool(re.match(r"\[[#.]+\] [12]/2 trial", line)) for line in proc.stdout.splitlines()) == 2


def test_quiet_and_plain_modes_never_draw_bars(capsys):
    p = Progress(4, live=False)
    p.study(1, 0, 0, "")
    p.trial(0, "mini_cnn", 3)
    p.step(1, 1, 10, 32)
    p.say("a line")
    p.close()
    assert capsys.readouterr().out == "a line\n"
    q = Progress(4, quiet=True, live=True)
    assert not q.live
    q.say("nothing")
    assert capsys.readouterr().out == ""


def test_compute_per_entry_counts_every_trial_that_trained():
    """Device-seconds per pool entry, most first: pruned trials count, a trial that recorded only
    epochs and seconds per epoch counts as their product, one that never trained not at all."""
    import optuna
    from optuna.trial import TrialState

    from search.progress import compute_text
    from tests.conftest import pool_trial

    study = optuna.create_study(direction="maximize")
    dists = {"model": optuna.distributions.CategoricalDistribution(["mini_cnn", "resnet_18-scratch"])}
    pool_trial(study, 0.9, "mini_cnn", dists=dists, attrs={"train_seconds": 30.0})
    pool_trial(study, None, "mini_cnn", dists=dists, attrs={"train_seconds": 10.0}, state=TrialState.PRUNED)
    pool_trial(study, 0.8, "resnet_18-scratch", dists=dists, attrs={"epochs": 4, "sec_per_epoch": 30.0})
    pool_trial(study, None, "resnet_18-scratch", dists=dists, state=TrialState.FAIL)
    assert compute_text(study.get_trials()) == (
        "compute per pool entry (2m40s in all): resnet_18-scratch 2m00s (75%), mini_cnn 40s (25%)"
    )
    assert compute_text([]) == ""
