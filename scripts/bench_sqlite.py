"""What a trial's storage writes cost in a SQLite study: the write-ahead log against the rollback journal.

A trial writes some 60 times (its attributes when it starts, each epoch's value and attributes,
its end); each write is a transaction. Both routes open the file through `search.storage` (the
BEGIN IMMEDIATE transactions the package uses); the rollback route then switches the file back
to `journal_mode=DELETE` and `synchronous=FULL`, SQLite's defaults. Runs alternate (WAL,
rollback, WAL, ...) on fresh files in one directory, and the medians are compared.

    python scripts/bench_sqlite.py [--trials 20 --epochs 10 --runs 5 --dir /path/on/the/disk/to/test]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna
import sqlalchemy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search.record import set_attrs  # noqa: E402
from search.storage import open_storage  # noqa: E402


def rollback(dbapi_connection, record) -> None:  # noqa: ANN001 - SQLAlchemy's connect event
    dbapi_connection.execute("PRAGMA journal_mode=DELETE")
    dbapi_connection.execute("PRAGMA synchronous=FULL")


def one_run(path: Path, wal: bool, trials: int, epochs: int) -> float:
    """Seconds per trial of the harness's writes (no training) on a new file at `path`."""
    storage = open_storage(f"sqlite:///{path}", heartbeat=None)
    if not wal:
        sqlalchemy.event.listen(storage.engine, "connect", rollback)
        storage.engine.dispose()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="bench", storage=storage, direction="maximize")
    t0 = time.perf_counter()
    for _ in range(trials):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        for name in ("pool_label", "weight_source", "imagenet_overlap", "arch", "tag", "device", "worker"):
            set_attrs(trial, **{name: "x"})
        for epoch in range(1, epochs + 1):
            trial.report(epoch / epochs, epoch)
            set_attrs(trial, epochs=epoch, sec_per_epoch=0.1, train_seconds=0.1 * epoch)
            set_attrs(trial, heartbeat_at=time.time())
        set_attrs(trial, best_epoch=epochs, best_accuracy=1.0, status="ok")
        study.tell(trial, 1.0)
    seconds = (time.perf_counter() - t0) / trials
    storage.engine.dispose()
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert (mode == "wal") == wal, mode  # the file is in the mode measured
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the files go (default: a temporary directory)")
    args = ap.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench-sqlite-"))
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.runs):
        for wal in (True, False):
            times[wal].append(
                one_run(base / f"run{i}-{'wal' if wal else 'rollback'}.db", wal, args.trials, args.epochs)
            )
    writes = 1 + 7 + 3 * args.epochs + 2  # ask, start attributes, per epoch, end
    wal, rb = statistics.median(times[True]), statistics.median(times[False])
    print(
        f"{args.trials} trials x {args.epochs} epochs ({writes} writes a trial), median of {args.runs} runs, in {base}"
    )
    print(f"  write-ahead log:  {wal * 1000:7.1f} ms a trial")
    print(f"  rollback journal: {rb * 1000:7.1f} ms a trial")
    print(f"  rollback / WAL = {rb / wal:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
