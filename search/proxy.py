"""`search proxy`: Optuna's gRPC storage proxy in front of one SQL database (its client, the
grpc:// storage URL, is search.storage's).

Hundreds of workers that each hold their own database connections meet the server's connection
limit ("too many clients"). The proxy holds a bounded pool of connections (one per server
thread at most) and a cache of finished trials; workers reach it with `grpc://HOST:PORT`.

The protocol has no authentication and no encryption: the proxy belongs on a private network,
next to the database. It listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import optuna

from search.errors import SearchError
from search.optuna_api import grpc_server
from search.reach import is_loopback
from search.storage import mask, needs_grpc, open_storage, where

# What the proxy can stand in front of, and why the others are refused.
PROXIED = ("sqlite", "postgresql", "postgres", "mysql", "mariadb")
REFUSED = {
    "journal": "Optuna's gRPC proxy does not support journal storage (optuna#6084); "
    "put the study on PostgreSQL or MySQL to use a proxy, or point workers at the journal directly",
    "redis": "Optuna's gRPC proxy does not support journal storage, which redis:// is (optuna#6084); "
    "put the study on PostgreSQL or MySQL to use a proxy, or point workers at Redis directly",
    "grpc": "a proxy in front of another proxy adds nothing; point this one at the database",
}
REFUSED["rediss"] = REFUSED["redis"]


def backend(url: str) -> optuna.storages.BaseStorage:
    """The database storage the proxy serves: an SQL URL only, with Optuna's in-process cache."""
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in REFUSED:
        raise SearchError(f"proxy --storage: cannot serve '{mask(url)}': {REFUSED[scheme]}")
    if scheme not in PROXIED:
        raise SearchError(
            f"proxy --storage: '{mask(url)}' is not a database URL; use "
            "postgresql+psycopg://USER:PASS@HOST/DB or mysql+pymysql://USER:PASS@HOST/DB"
        )
    # No Optuna heartbeat on the database side: its clients cannot record one through the proxy,
    # so dead workers are found by the `heartbeat_at` attr they write (see workers.sweep).
    storage = open_storage(url, heartbeat=None)
    return optuna.storages.get_storage(storage)  # the cache Optuna's docs ask for in front of an RDB


def serve(url: str, host: str, port: int, threads: int = 10, ready: Any = None) -> int:
    """Serve the database at `url` on host:port until SIGTERM or Ctrl-C; returns the exit code."""
    needs_grpc()
    if not 0 < port < 65536:
        raise SearchError(f"proxy --port: {port} is not a port (1-65535; default 13000)")
    if threads < 1:
        raise SearchError(f"proxy --threads: {threads}; give at least 1 (each thread may hold one connection)")
    storage = backend(url)
    try:
        server = grpc_server(storage, host, port, ThreadPoolExecutor(max_workers=threads))
    except RuntimeError as e:  # grpcio raises on a port it cannot bind
        raise SearchError(
            f"proxy: cannot listen on {host}:{port} ({e}); is another proxy running there? choose another --port"
        ) from None
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    server.start()
    if not is_loopback(host):
        print(
            f"warning: the storage proxy protocol has no authentication or encryption; anyone who reaches "
            f"{host}:{port} can read and change every study in {where(url)}. Keep it on a private network.",
            file=sys.stderr,
        )
    print(
        f"storage proxy for {where(url)} listening on grpc://{_bracket(host)}:{port} "
        f"({threads} threads); workers: --storage grpc://{_bracket(host)}:{port}  (Ctrl-C to stop)",
        flush=True,
    )
    if ready is not None:
        ready.set()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop(grace=5).wait()  # running calls finish; new ones are refused
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("storage proxy stopped", flush=True)
    return 0


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
