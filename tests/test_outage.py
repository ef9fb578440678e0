"""A storage outage under real workers: a private PostgreSQL server (its own cluster in a temporary
directory, never the machine's shared one) stopped mid-epoch for 20 s and started again while two
`worker` processes run a study. Both ride it out; every trial completes, none fails or is lost."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from optuna.trial import TrialState

from search import resume
from search import study as st
from search.recipe import recipe_from_dict
from search.trials import STALE_REASON, counted
from tests.conftest import ROOT, start_worker, tiny_recipe
from tests.test_storage import free_port

pytestmark = pytest.mark.slow  # a database server stopped and started under worker processes

PG_BIN = Path("/usr/lib/postgresql/15/bin")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _as_postgres(*cmd: str) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)


class Server:
    """A private PostgreSQL cluster: initdb into a temporary directory, a free loopback port."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.data = root / "data"

    def ctl(self, *args: str) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), *args),
            check=True,
            capture_output=True,
            timeout=60,
        )

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"


@contextlib.contextmanager
def private_postgres() -> Iterator[Server]:
    if not (PG_BIN / "initdb").exists() or (os.geteuid() == 0 and not shutil.which("runuser")):
        msg = f"no PostgreSQL server binaries at {PG_BIN} (apt install postgresql-15) to start a private one"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI: {msg}")
        pytest.skip(msg)
    root = Path(tempfile.mkdtemp(prefix="search-pg-", dir="/tmp"))  # not under pytest's 0700 directory
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    server = Server(root)
    try:
        subprocess.run(
            _as_postgres(str(PG_BIN / "initdb"), "-D", str(server.data), "-A", "trust", "-U", "postgres", "--no-sync"),
            check=True,
            capture_output=True,
            timeout=120,
        )
        server.ctl("start", "-w")
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.ctl("stop", "-m", "immediate")
        shutil.rmtree(root, ignore_errors=True)


def _worker(name: str, url: str, cwd) -> subprocess.Popen:
    return start_worker(name, url, cwd, ENV, subprocess.STDOUT)


def _read(proc: subprocess.Popen, lines: list[str], seen: threading.Event, mark: str) -> None:
    for line in proc.stdout:
        lines.append(line)
        if mark in line:
            seen.set()


def test_two_workers_ride_out_a_database_restart_mid_epoch(tmp_path):
    n, epochs = 6, 6
    with private_postgres() as pg:
        recipe = recipe_from_dict(
            tiny_recipe(
                name="outage",
                study={"n_trials": n, "heartbeat": 2, "storage_patience": 120},
                data={"max_samples": 600},
                train={"epochs": epochs},
                space={"preset": "quick", "overrides": {"optimizer": "adamw", "batch_size": [16]}},
            )
        )
        study = st.open_study(recipe, pg.url)
        procs = [_worker("outage", pg.url, tmp_path) for _ in range(2)]
        lines: list[list[str]] = [[], []]
        at_epoch_2 = threading.Event()
        readers = [
            threading.Thread(target=_read, args=(p, out, at_epoch_2, " epoch   2 "), daemon=True)
            for p, out in zip(procs, lines, strict=True)
        ]
        for r in readers:
            r.start()
        assert at_epoch_2.wait(240), "".join(lines[0] + lines[1])[-3000:]
        pg.ctl("stop", "-m", "fast", "-w")  # mid-epoch: the next epoch end finds no server
        time.sleep(20)
        pg.ctl("start", "-w")
        codes = [p.wait(timeout=300) for p in procs]
        for r in readers:
            r.join(timeout=10)
        out = ["".join(x) for x in lines]
        assert codes == [0, 0], out
        assert all("Traceback" not in o for o in out), out
        assert any("storage unreachable" in o for o in out) and any("storage back after" in o for o in out), out
        trials = study.get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE] * n, [
            (t.number, t.state, t.user_attrs) for t in trials
        ]
        assert len(counted(trials)) == n
        assert all(sorted(t.intermediate_values) == list(range(1, epochs + 1)) for t in trials)
        assert not list(resume.resume_dir(study, recipe).glob("*"))  # no state or temp file left


def _until(proc: subprocess.Popen, mark: str) -> None:
    for line in proc.stdout:
        if mark in line:
            return
    raise AssertionError(f"the worker ended before '{mark}': {proc.wait()}")


def test_after_kills_and_retries_no_state_or_temp_file_is_left(tmp_path):
    """A 20-trial study whose first worker is killed (-9) and whose second is preempted (SIGTERM),
    with a temp file a killed writer left long ago: once a third worker finishes it, the resume
    directory is empty."""
    n = 20
    url = f"sqlite:///{tmp_path}/leak.db"
    recipe = recipe_from_dict(
        tiny_recipe(name="leak", study={"n_trials": n, "heartbeat": 1}, data={"max_samples": 300}, train={"epochs": 2})
    )
    study = st.open_study(recipe, url)
    states = resume.resume_dir(study, recipe)
    states.mkdir(parents=True)
    torn = states / ".trial-7.pt.0123456789ab.tmp"
    torn.write_bytes(b"torn")
    os.utime(torn, (time.time() - 2 * resume.STALE_TEMP,) * 2)
    first = _worker("leak", url, tmp_path)
    _until(first, " epoch   1 ")
    first.kill()
    first.communicate(timeout=60)
    second = _worker("leak", url, tmp_path)
    _until(second, " epoch   1 ")
    second.send_signal(signal.SIGTERM)
    second.communicate(timeout=120)
    assert second.returncode == 143
    assert list(states.glob("trial-*.pt"))  # the killed and the preempted trials' states wait for their retries
    third = _worker("leak", url, tmp_path)
    out, _ = third.communicate(timeout=600)
    assert third.returncode == 0 and "Traceback" not in out, out[-3000:]
    trials = study.get_trials()
    assert len(counted(trials)) == n and all(t.state == TrialState.COMPLETE for t in counted(trials))
    assert {t.user_attrs.get("fail_reason") for t in trials if t.state == TrialState.FAIL} == {
        "interrupted",
        STALE_REASON,
    }
    assert sorted(p.name for p in states.iterdir()) == []  # no state, no temp file
