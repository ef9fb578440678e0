"""Shared storages with real worker processes: PostgreSQL, MariaDB, SQLite, journal file, Redis,
and PostgreSQL behind a real `search proxy` (gRPC) subprocess.

Each test gets a fresh database (or Redis key prefix), dropped afterwards. The servers come
from SEARCH_TEST_POSTGRES_URL, SEARCH_TEST_MYSQL_URL and SEARCH_TEST_REDIS_URL (loopback
defaults); without them the tests skip, except under CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import optuna
import pytest
import sqlalchemy
from optuna.storages.journal import JournalFileSymlinkLock
from optuna.trial import TrialState

from search import storage, workers
from search import study as st
from search.errors import SearchError
from search.recipe import recipe_from_dict
from search.trials import STALE_REASON, counted, remaining
from tests.conftest import ROOT, run_cli, run_inline, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow  # real worker processes and database servers

SERVERS = {
    "postgres": ("SEARCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    "mysql": ("SEARCH_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
    "redis": ("SEARCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
}


def _unavailable(kind: str, error: Exception) -> None:
    var, default = SERVERS[kind]
    msg = (
        f"no {kind} server at {storage.mask(os.environ.get(var, default))} ({type(error).__name__}); "
        f"set {var} to a URL of one"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI: storage test cannot run: {msg}")
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def proxy(db_url: str, *extra: str):
    """`python -m search proxy` in front of db_url on a free loopback port: yields its grpc:// URL.
    Stopped with SIGTERM afterwards, which must end it cleanly (exit 0, no traceback)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "search", "proxy", "--storage", db_url, "--port", str(port), *extra],
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # the listening line, once the server is up
    assert f"listening on grpc://127.0.0.1:{port}" in line, (
        line,
        proc.stderr.read() if proc.poll() is not None else "",
    )
    try:
        yield f"grpc://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "Traceback" not in err and "storage proxy stopped" in out, (
            proc.returncode,
            err,
        )


@contextlib.contextmanager
def database(param: str):
    """A fresh, empty database on the `kind[-proxy]` server, behind a proxy with '-proxy'; dropped afterwards."""
    kind, _, via = param.partition("-")
    var, default = SERVERS[kind]
    admin = sqlalchemy.engine.make_url(os.environ.get(var, default))
    name = f"search_test_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as c:
            c.exec_driver_sql(f"CREATE DATABASE {name}")
    except sqlalchemy.exc.OperationalError as e:
        _unavailable(kind, e)
    try:
        url = admin.set(database=name).render_as_string(hide_password=False)
        with proxy(url) if via else contextlib.nullcontext(url) as url:
            yield url
    finally:
        with engine.connect() as c:
            force = " WITH (FORCE)" if kind == "postgres" else ""
            c.exec_driver_sql(f"DROP DATABASE {name}{force}")
        engine.dispose()


@pytest.fixture(params=["postgres", "mysql", "postgres-proxy"])
def rdb_url(request):
    """A fresh database on each server, and PostgreSQL again through a `search proxy`."""
    with database(request.param) as url:
        yield url


@pytest.fixture
def redis_url():
    import redis

    var, default = SERVERS["redis"]
    url = os.environ.get(var, default)
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as e:
        _unavailable("redis", e)
    prefix = f"search_test_{uuid.uuid4().hex[:10]}"
    yield f"{url}?prefix={prefix}"
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


def _workers(url: str, name: str, n: int, cwd) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SEARCH_STORAGE": url, "OMP_NUM_THREADS": "1"}
    return [
        subprocess.Popen(
            [sys.executable, "-m", "search", "worker", "--study", name, "--no-report"],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]


def _finish(procs, timeout=240) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout + stderr))
    return out


def _create(url: str, name: str, **over):
    recipe = recipe_from_dict(tiny_recipe(name=name, **over))
    return recipe, st.open_study(recipe, url)


def _states(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


# PostgreSQL judges dead workers by Optuna's heartbeat table, the proxy by the heartbeat attribute;
# MariaDB takes the first path too, and runs real worker processes in tests/test_secrets.py.
@pytest.mark.parametrize("server", ["postgres", "postgres-proxy"])
def test_three_workers_and_a_killed_one_finish_exactly_n_trials(server, tmp_path):
    with database(server) as url:
        _killed_one(url, tmp_path)


def _killed_one(rdb_url: str, tmp_path) -> None:
    n = 4
    # heartbeat 2: a beat through a proxy on a loaded 2-core box can land over a second late
    recipe, study = _create(rdb_url, "shared", study={"n_trials": n, "heartbeat": 2}, train={"epochs": 3})
    procs = _workers(rdb_url, "shared", 3, tmp_path)
    seen = None
    deadline = time.time() + 180
    while seen is None and time.time() < deadline:  # a trial past its first epoch: kill its worker
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        seen = next((t for t in running if t.intermediate_values and "worker" in t.user_attrs), None)
        if seen is None:
            time.sleep(0.2)
    assert seen is not None, _finish(procs)
    os.kill(int(seen.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    # The trial it was running when killed: the one seen may have finished in between. A dead trial
    # stays RUNNING until 10 beats (20 s) went missing, so this read finds it.
    held = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    dying = [t for t in held if t.user_attrs.get("worker") == seen.user_attrs["worker"]]
    assert len(dying) == 1, (seen.number, [t.number for t in held], _finish(procs))
    victim = dying[0]
    results = _finish(procs)
    codes = sorted(rc for rc, _ in results)
    assert codes == [-signal.SIGKILL, 0, 0], results
    trials = study.get_trials()
    dead = trials[victim.number]
    assert dead.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].user_attrs["retry_of"] == victim.number
    assert retries[0].params == dead.params
    assert set(dead.intermediate_values.items()) <= set(retries[0].intermediate_values.items())
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n and len(counted(trials)) == n, _states(study)
    assert retries[0] in complete or retries[0].user_attrs.get("fail_reason") == "study total reached"
    assert all(
        t.user_attrs.get("fail_reason") == "study total reached"
        for t in trials
        if t.state == TrialState.FAIL and t.number != victim.number
    )
    assert not any(
        "locked" in out or "Traceback" in out or "already reported" in out for rc, out in results if rc == 0
    ), results
    assert retries[0].user_attrs["seed"] == dead.user_attrs["seed"]  # the retry reruns the same training
    assert "password" not in str(study.user_attrs["recipe"])


def test_sixteen_workers_on_one_sqlite_file_with_a_four_second_heartbeat(tmp_path):
    url = f"sqlite:///{tmp_path}/many.db"
    write_recipe(
        tmp_path / "r.yaml",
        tiny_recipe(
            name="many",
            # Stale after 10 silent beats: 40 s. With 2 s, 16 workers starting at once beside another
            # test's workers on 2 cores were seen to miss 20 s (a load of 20 processes per core).
            study={"n_trials": 16, "storage": url, "heartbeat": 4},
            data={"max_samples": 100},
            train={"epochs": 1},
        ),
    )
    proc = run_cli("run", "r.yaml", "--workers", "16", cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "started 16 workers" in proc.stdout
    assert "locked" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    study = optuna.load_study(study_name="many", storage=url)
    trials = study.get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 16, _states(study)
    assert len(counted(trials)) == 16
    # 16 processes on 2 cores: every live trial still beats, so none is failed as stale or retried
    assert not [
        t.number for t in trials if t.user_attrs.get("fail_reason") == STALE_REASON or "retry_of" in t.user_attrs
    ]
    assert all(t.user_attrs.get("fail_reason") for t in trials if t.state == TrialState.FAIL)
    assert len({t.user_attrs["worker"] for t in trials if t.state == TrialState.COMPLETE}) > 1
    assert "leaderboard" in proc.stdout  # printed once, by the coordinator


@pytest.mark.parametrize("kind", ["journal", "redis"])
def test_three_workers_on_journal_storage(kind, tmp_path, request):
    url = f"journal:{tmp_path}/shared.log" if kind == "journal" else request.getfixturevalue("redis_url")
    n = 4
    recipe, study = _create(url, "journal", study={"n_trials": n}, train={"epochs": 1})
    results = _finish(_workers(url, "journal", 3, tmp_path))
    assert [rc for rc, _ in results] == [0, 0, 0], results
    study = st.load_stored(url, "journal")[1]
    trials = study.get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == n, _states(study)
    assert all(
        isinstance(t.user_attrs.get(workers.HEARTBEAT_ATTR), float) for t in trials if t.state == TrialState.COMPLETE
    )


@pytest.mark.parametrize("kind", ["journal", "postgres-proxy"])
def test_fail_stale_command_fails_and_requeues_silent_trials(kind, tmp_path, capsys):
    with contextlib.nullcontext(f"journal:{tmp_path}/j.log") if kind == "journal" else database(kind) as url:
        _fail_stale_round(url, capsys)


def _fail_stale_round(url, capsys):
    from search.cli import main

    recipe, study = _create(url, "stale", study={"n_trials": 2})
    alive, dead = study.ask(), study.ask()
    for t in (alive, dead):
        t.suggest_float("lr", 0.002, 0.005)
    storage = study._storage
    storage.set_trial_user_attr(dead._trial_id, workers.HEARTBEAT_ATTR, time.time() - 600)
    storage.set_trial_user_attr(alive._trial_id, workers.HEARTBEAT_ATTR, time.time())
    assert main(["fail-stale", "--storage", url, "--study", "stale", "--older-than", "300"]) == 0
    assert f"failed 1 stale trial(s): {dead.number}" in capsys.readouterr().out
    trials = st.load_stored(url, "stale")[1].get_trials()
    assert [t.state for t in trials] == [TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING]
    assert trials[1].user_attrs["fail_reason"] == STALE_REASON
    assert trials[2].params == trials[1].params and trials[2].user_attrs["retry_of"] == dead.number
    assert len(counted(trials)) == 2  # the retry holds the dead trial's slot
    assert main(["fail-stale", "--storage", url, "--study", "stale", "--older-than", "300"]) == 0
    assert "failed 0 stale trial(s)" in capsys.readouterr().out


def test_passwords_are_masked_and_never_stored(tmp_path, monkeypatch):
    assert storage.mask("postgresql+psycopg://u:s3cret@db:5432/x") == "postgresql+psycopg://u:***@db:5432/x"
    assert storage.mask("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert storage.mask("mysql+pymysql://u:p@ss@h/x") == "mysql+pymysql://***@h/x"  # host unclear: all hidden
    assert storage.mask("sqlite:///studies/a.db") == "sqlite:///studies/a.db"
    from search.errors import SearchError

    with pytest.raises(SearchError) as e:  # port 1: nothing listens
        storage.open_storage("postgresql+psycopg://u:s3cret@127.0.0.1:1/x")
    assert "s3cret" not in str(e.value) and "u:***@127.0.0.1:1" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("SEARCH_TEST_PW", "s3cret")
    url = f"sqlite:///{tmp_path}/a.db?pw=${{SEARCH_TEST_PW}}"
    assert storage.expand(url).endswith("pw=s3cret")
    recipe = recipe_from_dict(tiny_recipe(name="pw", study={"storage": "postgresql+psycopg://u:s3cret@h/x"}))
    assert "s3cret" not in str(st.stored_form(recipe)) and "u:***@h" in str(st.stored_form(recipe))
    assert "s3cret" not in workers.resume_command(recipe, recipe.study.storage)


def test_changed_recipe_is_refused_on_a_shared_database(rdb_url):
    recipe, study = _create(rdb_url, "refuse", study={"n_trials": 2})
    study.enqueue_trial({"lr": 0.003})
    changed = recipe_from_dict(tiny_recipe(name="refuse", train={"epochs": 5}))
    from search.errors import SearchError

    with pytest.raises(SearchError, match=r"different recipe \(train.epochs: 2 -> 5\); .*--force"):
        st.open_study(changed, rdb_url)
    stored, again = st.load_stored(rdb_url, "refuse")
    assert stored.train.epochs == 2 and [t.state for t in again.get_trials()] == [TrialState.WAITING]
    assert remaining(again, 2) == 1  # the queued trial holds its slot


def test_proxy_command_refuses_what_it_cannot_serve_in_one_line(tmp_path):
    cases = [
        (("--storage", f"journal:{tmp_path}/j.log"), "does not support journal storage"),
        (("--storage", "redis://127.0.0.1:6379/0"), "does not support journal storage, which redis://"),
        (("--storage", "grpc://127.0.0.1:13000"), "point this one at the database"),
        (("--storage", "ftp://x"), "is not a database URL"),
        (("--storage", "sqlite:///${SEARCH_TEST_UNSET_VAR}/a.db"), "SEARCH_TEST_UNSET_VAR"),
        (("--storage", "postgresql+psycopg://u:s3cret@127.0.0.1:1/x"), "u:***@127.0.0.1:1"),
        (("--storage", f"sqlite:///{tmp_path}/a.db", "--port", "70000"), "--port"),
    ]
    for args, key in cases:
        proc = run_inline("proxy", *args, cwd=tmp_path, env={"SEARCH_STORAGE": ""})
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and key in lines[0], (args, proc.stderr)
        assert "s3cret" not in proc.stderr + proc.stdout
    proc = run_inline("worker", "--storage", f"grpc://127.0.0.1:{free_port()}", "--study", "x", cwd=tmp_path)
    assert proc.returncode == 2 and "no storage proxy answers at grpc://127.0.0.1:" in proc.stderr, proc.stderr
    proc = run_inline("worker", "--storage", "grpc://somewhere", "--study", "x", cwd=tmp_path)
    assert proc.returncode == 2 and "is not grpc://HOST:PORT" in proc.stderr, proc.stderr


def test_proxy_serves_loopback_only_and_stops_cleanly_on_ctrl_c(tmp_path):
    from search.reach import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("db.internal")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "search", "proxy", "--storage", f"sqlite:///{tmp_path}/a.db", "--port", str(port)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert f"listening on grpc://127.0.0.1:{port}" in proc.stdout.readline()
    study = optuna.create_study(storage=storage.open_storage(f"grpc://127.0.0.1:{port}"), study_name="p")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err and "stopped" in out, err
    assert len(optuna.load_study(study_name="p", storage=f"sqlite:///{tmp_path}/a.db").get_trials()) == 3


# ---------------------------------------------------------------------------
# journal file: the lock's grace, a torn last line


def _journal_with_a_trial(path) -> str:
    url = f"journal:{path}"
    study = optuna.create_study(study_name="j", storage=storage.open_storage(url, heartbeat=None))
    study.tell(study.ask(), 1.0)
    return url


def test_the_journal_lock_outlasts_an_nfs_stall(tmp_path):
    opened = storage.open_storage(_journal_with_a_trial(tmp_path / "j.log"), heartbeat=None)
    assert opened._backend._lock.grace_period == storage.JOURNAL_LOCK_GRACE_SECONDS == 600  # Optuna's: 30


def test_a_torn_last_line_is_refused_with_its_repair(tmp_path):
    path = tmp_path / "j.log"
    url = _journal_with_a_trial(path)
    whole = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b'{"op_code":4,"worker_id":"x","stu')  # a writer killed mid-append
    with pytest.raises(SearchError) as e:
        storage.open_storage(url, heartbeat=None)
    assert str(e.value) == (
        f"journal {path}: its last line is torn (33 bytes after the last complete record: a writer stopped "
        f"mid-append); stop every worker on it, then cut it: truncate -s {whole} {path}"
    )
    subprocess.run(["truncate", "-s", str(whole), str(path)], check=True)  # the repair, as printed
    [trial] = optuna.load_study(study_name="j", storage=storage.open_storage(url, heartbeat=None)).trials
    assert trial.value == 1.0


def test_an_append_in_progress_is_not_taken_for_a_torn_line(tmp_path):
    path = tmp_path / "j.log"
    url = _journal_with_a_trial(path)
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()  # a writer, half-way through its append
    with open(path, "ab") as f:
        f.write(b'{"op_code":4,"worker_id":"x","study_id":0,')

    def finish():
        time.sleep(0.5)
        with open(path, "ab") as f:
            f.write(b'"datetime_start":"2026-01-01T00:00:00.000000+00:00"}\n')
        lock.release()

    writer = threading.Thread(target=finish)
    writer.start()
    study = optuna.load_study(study_name="j", storage=storage.open_storage(url, heartbeat=None))
    writer.join()
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]


def test_a_sqlite_study_keeps_a_write_ahead_log_that_closes_with_it(tmp_path):
    """WAL with normal syncs on every connection; a reader sees what a writer committed while the
    writer's connection is still open; the log is folded back once the last connection closes."""
    import sqlite3

    path = tmp_path / "s.db"
    store = storage.open_storage(f"sqlite:///{path}", heartbeat=None)
    study = optuna.create_study(study_name="wal", storage=store, direction="maximize")
    with store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        c.rollback()
    trial = study.ask()
    trial.report(0.5, 1)
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert (tmp_path / "s.db-wal").exists()
    other = storage.open_storage(f"sqlite:///{path}", heartbeat=None)
    reader = optuna.load_study(study_name="wal", storage=other)
    assert reader.trials[0].intermediate_values == {1: 0.5}
    study.tell(trial, 0.7)
    other.engine.dispose()
    store.engine.dispose()
    assert not (tmp_path / "s.db-wal").exists()
    assert sqlite3.connect(path).execute("SELECT value FROM trial_values").fetchall() == [(0.7,)]
