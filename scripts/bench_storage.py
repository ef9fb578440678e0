"""Load test of a shared study: many light clients, directly on PostgreSQL and through `search proxy`.

Each client process runs the harness's own trial life cycle without training: ask, a sampled
parameter, the `heartbeat_at` beat (search.workers.beating), one report per epoch, tell. The
database is PostgreSQL on loopback with a dedicated role whose CONNECTION LIMIT is below what
the clients need (each direct client holds at least one connection), in a database of its own;
both are dropped at the end. Nothing server-wide is changed.

    PYTHONPATH=. python scripts/bench_storage.py [--clients 64 --trials 2000 --limit 20]

Prints, for each route, trials/s, completed trials, and clients that failed (with the first
error). Exits 1 unless the direct route saw connection errors and the proxy none, with exact totals.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import sqlalchemy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search import storage, workers  # noqa: E402
from search.trials import finished  # noqa: E402

EPOCHS = 3


def client(url: str, name: str, quota: int, start_at: float, deadline: float, out: mp.Queue) -> None:
    """Run `quota` trials of study `name` on `url`; put (done, first error or '') on `out`."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    done = 0
    try:
        store = storage.open_storage(url, heartbeat=None)  # ask/tell: Optuna's own heartbeat is for optimize()
        study = optuna.load_study(study_name=name, storage=store, sampler=optuna.samplers.RandomSampler())
        time.sleep(max(0.0, start_at - time.time()))
        while done < quota and time.time() < deadline:
            trial = study.ask()
            x = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
            with workers.beating(trial, 0.5):
                for epoch in range(EPOCHS):
                    trial.report(x * (epoch + 1), epoch)
            study.tell(trial, x)
            done += 1
        out.put((done, "" if done == quota else "deadline"))
    except BaseException as e:  # noqa: BLE001 - counted and reported, not raised
        out.put((done, " ".join(f"{type(e).__name__}: {e}".split())[:400]))


def route(url: str, name: str, clients: int, trials: int, timeout: float) -> tuple[float, int, list[str]]:
    """(seconds, completed by clients, errors) of `clients` processes sharing `trials` on `url`."""
    ctx = mp.get_context("fork")  # children share the parent's imports; no gRPC channel exists yet
    out: mp.Queue = ctx.Queue()
    start_at = time.time() + 3 + clients * 0.05  # every child is up before the clock starts
    deadline = start_at + timeout
    quotas = [trials // clients + (i < trials % clients) for i in range(clients)]
    procs = [ctx.Process(target=client, args=(url, name, q, start_at, deadline, out)) for q in quotas]
    for p in procs:
        p.start()
    results = [out.get(timeout=timeout + 60) for _ in procs]
    seconds = time.time() - start_at
    for p in procs:
        p.join(timeout=10)
    return seconds, sum(d for d, _ in results), [e for _, e in results if e]


def check(url: str, name: str, trials: int) -> str:
    """'' if the study holds exactly `trials` COMPLETE trials, each with every report and a beat."""
    store = storage.open_storage(url, heartbeat=None)
    study = optuna.load_study(study_name=name, storage=store)
    got = study.get_trials(deepcopy=False)
    good = [
        t
        for t in got
        if t.state.name == "COMPLETE"
        and len(t.intermediate_values) == EPOCHS
        and isinstance(t.user_attrs.get(workers.HEARTBEAT_ATTR), float)
    ]
    n = finished(study)
    store.engine.dispose()
    if len(got) == len(good) == trials == n:
        return ""
    return f"{len(got)} trials stored, {len(good)} complete with all reports, {n} finished"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--admin",
        default=os.environ.get("SEARCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL URL allowed to create roles and databases (loopback)",
    )
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--trials", type=int, default=2000)
    p.add_argument("--limit", type=int, default=20, help="CONNECTION LIMIT of the bench role")
    p.add_argument("--threads", type=int, default=10, help="proxy threads (at most this many connections)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per route at most")
    a = p.parse_args()
    admin = sqlalchemy.engine.make_url(a.admin)
    if admin.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("bench_storage: loopback servers only")
    tag = f"search_bench_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.exec_driver_sql(f"CREATE ROLE {tag} LOGIN CONNECTION LIMIT {a.limit}")
        c.exec_driver_sql(f"CREATE DATABASE {tag} OWNER {tag}")
    db = admin.set(username=tag, password=None, database=tag).render_as_string(hide_password=False)
    checker = admin.set(database=tag).render_as_string(hide_password=False)  # counts outside the role's limit
    proxy = None
    try:
        store = storage.open_storage(db, heartbeat=None)  # the schema and both studies, before the clock
        for label in ("direct", "proxy"):
            optuna.create_study(study_name=f"{tag}_{label}", storage=store)
        store.engine.dispose()  # no connection (and no gRPC channel) is shared with forked clients
        port = free_port()
        proxy = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "search",
                "proxy",
                "--storage",
                db,
                "--port",
                str(port),
                "--threads",
                str(a.threads),
            ],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert "listening" in proxy.stdout.readline(), proxy.stderr.read()
        print(
            f"{a.clients} clients, {a.trials} trials ({EPOCHS} reports each), PostgreSQL role limited to "
            f"{a.limit} connections; proxy with {a.threads} threads; {os.cpu_count()} CPUs"
        )
        ok = True
        for label, url in (("direct", db), ("proxy", f"grpc://127.0.0.1:{port}")):
            name = f"{tag}_{label}"
            seconds, done, errors = route(url, name, a.clients, a.trials, a.timeout)
            wrong = check(checker, name, done) if not errors else ""
            print(
                f"{label:>6}: {done / seconds:7.1f} trials/s, {done:5d} of {a.trials} trials in {seconds:6.1f} s, "
                f"{len(errors)} of {a.clients} clients failed{'; totals wrong: ' + wrong if wrong else ''}"
            )
            if errors:
                first = errors[0].split("FATAL:")[-1].split("; check the URL")[0].strip()
                print(f"        first error: {first}"[:100])
            if label == "direct":
                ok &= any("connection" in e.lower() for e in errors)
            else:
                ok &= not errors and done == a.trials and not check(checker, name, a.trials)
        return 0 if ok else 1
    finally:
        if proxy is not None:
            proxy.send_signal(signal.SIGTERM)
            proxy.communicate(timeout=30)
        with engine.connect() as c:
            c.exec_driver_sql(f"DROP DATABASE IF EXISTS {tag} WITH (FORCE)")
            c.exec_driver_sql(f"DROP ROLE IF EXISTS {tag}")
        engine.dispose()


if __name__ == "__main__":
    raise SystemExit(main())
