"""The README's commands work as written: every command of "Using it" and "Results", run in an
activated shell after the demo, in the order the README gives them.

The demo recipe is made small (3 trials of 1 epoch on 150 images, mini_cnn only). Every command is
the README's line, comment and all; the first goes through bash in an activated environment, the
dashboard serves from its own process, the others run in this one (seconds of imports each saved).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run_inline

SECTIONS = ("Using it", "Results")


def readme_commands(sections=SECTIONS) -> list[str]:
    """The command lines of the code blocks in those sections (a '$ ' prompt dropped)."""
    text = (ROOT / "README.md").read_text()
    out = []
    for name in sections:
        body = re.search(rf"^## {re.escape(name)}\n(.*?)(?=^## )", text, re.S | re.M).group(1)
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", body, re.S | re.M):
            out += [
                line.removeprefix("$ ")
                for line in block.splitlines()
                if line.removeprefix("$ ").startswith("python -m search ")
            ]
    return out


def activated_env(tmp: Path) -> dict[str, str]:
    """What `. .venv/bin/activate` gives: the environment's bin first on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HOME": str(tmp),
    }


def small_demo(cwd: Path) -> None:
    recipe = yaml.safe_load((ROOT / "recipes" / "digits.yaml").read_text())
    recipe["study"].update(n_trials=3, sampler={"name": "tpe", "n_startup_trials": 2})
    recipe["data"]["max_samples"] = 150
    recipe["pool"] = ["mini_cnn"]
    recipe["train"]["epochs"] = 1
    (cwd / "recipes").mkdir()
    (cwd / "recipes" / "digits.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def test_readme_lists_the_commands_it_promises():
    cmds = readme_commands()
    assert len(cmds) >= 14 and all("NAME" not in c and " URL " not in c for c in cmds), cmds
    assert (
        readme_commands(("Using it",))[0] == "python -m search validate recipes/digits.yaml       "
        "# check a recipe, print the search space"
    )


def _dashboard(cmd: str, cwd: Path, env: dict) -> None:
    """The dashboard serves forever: it must answer on its port, then it is stopped."""
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {cmd}"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen("http://127.0.0.1:8080/api/studies", timeout=5) as r:
                    body = r.read().decode()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else cmd
                time.sleep(1)
        assert '"study_name": "digits"' in body
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "optuna-dashboard on http://127.0.0.1:8080/dashboard/ with artifacts from" in out


def _shell(cmd: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _inline(cmd: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """The README line as its shell would split it (comment dropped), run in this process."""
    words = shlex.split(cmd, comments=True)
    assert words[:3] == ["python", "-m", "search"], cmd
    return run_inline(*words[3:], cwd=cwd, env=env)


@pytest.mark.slow
def test_every_readme_command_works_as_written_after_the_demo(tmp_path):
    """The demo, then every command in the README's order. The first line of the walk goes through
    bash in an activated environment, as a user types it, and so does the dashboard (it serves);
    the others run in this process on the same study (each new interpreter would cost seconds of
    imports and test nothing more)."""
    env = activated_env(tmp_path)
    small_demo(tmp_path)
    demo = _inline("python -m search run recipes/digits.yaml", tmp_path, env)  # `make demo`, activated
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "browse it (with its artifacts): python -m search dashboard digits" in demo.stdout
    suggested = []
    for i, cmd in enumerate(readme_commands()):
        if " dashboard " in cmd:
            _dashboard(cmd, tmp_path, env)
            continue
        proc = (_shell if i == 0 else _inline)(cmd, tmp_path, env)
        assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-3000:])
        printed = proc.stdout + proc.stderr
        suggested += [m.group(0) for m in re.finditer(r"\S*python\S* -m search \S+", printed)]
        progress = re.compile(r"^(\[[#.]+\] |trial +\d+ |retrain )")  # progress lines: not tables
        assert all(
            len(line) <= 100
            for line in proc.stdout.splitlines()
            if "-m search" not in line and not progress.match(line)
        ), (cmd, proc.stdout)
    assert suggested and all(s.startswith("python -m search ") for s in suggested), suggested
    assert (tmp_path / "best.yaml").is_file() and (tmp_path / "studies" / "digits" / "retrain").is_dir()
