"""A storage outage under real workers: a private PostgreSQL server (its own cluster in a temporary
directory, never the machine's shared one) stopped mid-epoch for 12 s, or the `search proxy` in
front of a private SQLite file stopped for 12 s, and started again while two `worker` processes
run a study. Both ride it out; every trial completes, none fails or is lost. The outage outlasts
10 heartbeats (1 s): every running trial missed enough beats to look stale once the storage is
back, and none may be judged so."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
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


N_TRIALS, EPOCHS = 6, 6
HEARTBEAT = 1  # s: a trial silent for 10 beats is stale
OUTAGE = 12  # s: longer than 10 beats, so sweeps after the outage must allow for the beats it refused


def _recipe(name: str):
    return recipe_from_dict(
        tiny_recipe(
            name=name,
            study={"n_trials": N_TRIALS, "heartbeat": HEARTBEAT, "storage_patience": 120},
            data={"max_samples": 600},
            train={"epochs": EPOCHS},
            space={"preset": "quick", "overrides": {"optimizer": "adamw", "batch_size": [16]}},
        )
    )


class Workers:
    """Two `worker` processes on study `name` at `url`; `at_epoch_2` is set once either prints epoch 2."""

    def __init__(self, name: str, url: str, cwd) -> None:
        self.procs = [_worker(name, url, cwd) for _ in range(2)]
        self.lines: list[list[str]] = [[], []]
        self.at_epoch_2 = threading.Event()
        self.readers = [
            threading.Thread(target=_read, args=(p, out, self.at_epoch_2, " epoch   2 "), daemon=True)
            for p, out in zip(self.procs, self.lines, strict=True)
        ]
        for r in self.readers:
            r.start()

    def wait_for_epoch_2(self) -> None:
        assert self.at_epoch_2.wait(240), "".join(self.lines[0] + self.lines[1])[-3000:]

    def finish(self) -> list[str]:
        """Both exit 0 with no traceback, each having said when the storage went away and came back."""
        codes = [p.wait(timeout=300) for p in self.procs]
        for r in self.readers:
            r.join(timeout=10)
        out = ["".join(x) for x in self.lines]
        assert codes == [0, 0], out
        assert all("Traceback" not in o for o in out), out
        assert all("storage unreachable" in o and "storage back after" in o for o in out), out
        return out

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


def _all_complete(trials: list[optuna.trial.FrozenTrial]) -> None:
    """Exactly the study's trials, each COMPLETE with every epoch: none failed, queued again or lost."""
    assert [t.state for t in trials] == [TrialState.COMPLETE] * N_TRIALS, [
        (t.number, t.state, t.user_attrs) for t in trials
    ]
    assert len(counted(trials)) == N_TRIALS
    assert all(sorted(t.intermediate_values) == list(range(1, EPOCHS + 1)) for t in trials)


def test_two_workers_ride_out_a_database_restart_mid_epoch(tmp_path):
    with private_postgres() as pg:
        recipe = _recipe("outage")
        study = st.open_study(recipe, pg.url)
        workers = Workers("outage", pg.url, tmp_path)
        try:
            workers.wait_for_epoch_2()
            pg.ctl("stop", "-m", "fast", "-w")  # mid-epoch: the next epoch end finds no server
            time.sleep(OUTAGE)
            pg.ctl("start", "-w")
            workers.finish()
        finally:
            workers.kill()
        _all_complete(study.get_trials())
        states = tmp_path / resume.resume_dir(study, recipe)  # the workers' directory (a server: under their cwd)
        assert states.is_dir() and not list(states.glob("*"))  # no state or temp file left


def _proxy(db_url: str, port: int) -> subprocess.Popen:
    """`python -m search proxy` in front of db_url on `port`, once it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "search", "proxy", "--storage", db_url, "--port", str(port)],
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    line = proc.stdout.readline()
    if f"listening on grpc://127.0.0.1:{port}" not in line:
        proc.kill()
        raise AssertionError(line + proc.communicate(timeout=30)[0])
    return proc


def _stop(proxy: subprocess.Popen) -> None:
    """SIGTERM, as `systemctl stop` or `kill` sends it: the proxy ends cleanly."""
    proxy.send_signal(signal.SIGTERM)
    out, _ = proxy.communicate(timeout=60)
    assert proxy.returncode == 0 and "storage proxy stopped" in out and "Traceback" not in out, out


def test_two_workers_ride_out_the_storage_proxy_stopped_for_12_s(tmp_path):
    db, port = f"sqlite:///{tmp_path}/proxied.db", free_port()
    url = f"grpc://127.0.0.1:{port}"
    recipe = _recipe("proxied")
    st.open_study(recipe, db)  # the study on the file the proxy serves
    proxy = _proxy(db, port)
    workers = Workers("proxied", url, tmp_path)
    try:
        workers.wait_for_epoch_2()
        _stop(proxy)  # mid-epoch: the next epoch end and heartbeats find no proxy
        time.sleep(OUTAGE)
        proxy = _proxy(db, port)  # the same address, as a restarted service
        workers.finish()
        _stop(proxy)
    finally:
        workers.kill()
        if proxy.poll() is None:
            proxy.kill()
            proxy.wait(timeout=30)
    _all_complete(optuna.load_study(study_name="proxied", storage=db).get_trials())
    states = tmp_path / "studies" / "proxied" / "resume"  # a proxy has no file: under the workers' cwd
    assert states.is_dir() and not list(states.glob("*"))


def test_a_worker_stopped_during_an_outage_exits_at_once_and_keeps_its_trial(tmp_path):
    """SIGTERM while the proxy is away (a preempted node in a network outage): the worker does not
    wait out its 120 s of patience; it exits at once with EX_TEMPFAIL, says why and how to resume,
    and its trial stays RUNNING with its saved state, for the next worker's sweep to queue."""
    db, port = f"sqlite:///{tmp_path}/stopped.db", free_port()
    recipe = _recipe("stopped")
    study = st.open_study(recipe, db)
    proxy = _proxy(db, port)
    worker = _worker("stopped", f"grpc://127.0.0.1:{port}", tmp_path)
    try:
        _until(worker, " epoch   2 ")
        _stop(proxy)
        worker.send_signal(signal.SIGTERM)
        start = time.time()
        out, _ = worker.communicate(timeout=100)
        assert worker.returncode == 75 and time.time() - start < 30, out[-3000:]
    finally:
        for p in (worker, proxy):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    assert "error: SIGTERM while the storage was unreachable at " in out and "Traceback" not in out, out[-3000:]
    assert "resume with: " in out
    running = study.get_trials(states=(TrialState.RUNNING,))
    assert len(running) == 1 and len(running[0].intermediate_values) >= 2
    states = tmp_path / "studies" / "stopped" / "resume"  # a proxy has no file: under the worker's cwd
    assert (states / f"trial-{running[0].number}.pt").is_file()


def _until(proc: subprocess.Popen, mark: str) -> None:
    for line in proc.stdout:
        if mark in line:
            return
    raise AssertionError(f"the worker ended before '{mark}': {proc.wait()}")


def test_after_kills_and_retries_no_state_or_temp_file_is_left(tmp_path):
    """An 8-trial study whose first worker is killed (-9) and whose second is preempted (SIGTERM),
    with a temp file a killed writer left long ago: once a third worker finishes it, the resume
    directory is empty."""
    n = 8
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
