"""Storages: URLs (`${VAR}` expanded, passwords masked), checks before anything is created, and
opening (SQL with SQLite locking, journal file, Redis, a client of the gRPC proxy: `search proxy`,
search.proxy, serves one).

A URL is checked (scheme, variables, reachability, a creatable file) before a study, schema or
file exists, so a refused run leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages.journal import JournalFileBackend, JournalRedisBackend

from search.errors import SearchError
from search.text import command

STALE_BEATS = 10  # heartbeats of silence before a running trial is judged dead (a slow process still beats)

STUDIES = Path("studies")
READY_TIMEOUT = 10.0  # seconds a client waits for the storage proxy before giving up


def default_storage(name: str) -> str:
    return f"sqlite:///{STUDIES / name}.db"


def mask(url: str) -> str:
    """The URL with its password replaced by ***, for logs, messages and the stored recipe."""
    return re.sub(r"(://[^:/@]*:)[^/]*@", r"\1***@", url)


def _scrub(text: str, url: str) -> str:
    """Text (e.g. a driver's error) with the URL's password removed wherever it appears."""
    m = re.search(r"://[^:/@]*:([^/]*)@", url)
    return mask(text.replace(m.group(1), "***") if m and m.group(1) else text)


def expand(url: str) -> str:
    """${VAR} in a storage URL taken from the environment, so passwords stay out of recipes."""
    out = os.path.expandvars(url)
    missing = re.findall(r"\$\{?(\w+)", out)
    if missing:
        raise SearchError(
            f"study.storage: environment variable {missing[0]} in '{mask(url)}' is not set; "
            f"export {missing[0]}=... before starting the study or its workers"
        )
    return out


# Plain schemes get the drivers this package installs (SQLAlchemy would pick psycopg2/MySQLdb).
DRIVERS = {
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mysql+pymysql",
}


def _sqlite_connect(dbapi_connection: Any, record: Any) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy's begin event issues BEGIN, not pysqlite


def _sqlite_begin(conn: Any) -> None:
    # Every transaction takes the write lock up front: a deferred transaction that reads and then
    # writes gets "database is locked" at once (no busy wait) when another process wrote meanwhile.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _rdb(url: str, heartbeat: int | None) -> optuna.storages.BaseStorage:
    scheme, rest = url.split("://", 1)
    url = f"{DRIVERS.get(scheme, scheme)}://{rest}"
    sqlite = scheme.startswith("sqlite")
    if sqlite and rest.startswith("/") and rest != "/:memory:":
        Path(rest[1:]).parent.mkdir(parents=True, exist_ok=True)
    engine: dict[str, Any] = (
        {"connect_args": {"timeout": 120}}
        if sqlite
        # busy timeout, seconds
        else {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    )
    kwargs: dict[str, Any] = {"engine_kwargs": engine}
    if heartbeat:
        kwargs.update(heartbeat_interval=heartbeat, grace_period=STALE_BEATS * heartbeat)
    storage = optuna.storages.RDBStorage(url, **kwargs)
    if sqlite:
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_connect)
        sqlalchemy.event.listen(storage.engine, "begin", _sqlite_begin)
        storage.engine.dispose()  # connections opened while creating the schema predate the listeners
    return storage


def _journal_file(url: str, heartbeat: int | None) -> optuna.storages.BaseStorage:
    path = url[len("journal:") :].removeprefix("//")
    if not path:
        raise SearchError("study.storage: 'journal:' needs a file, e.g. journal:/shared/studies/NAME.log")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(path))


def _redis(url: str, heartbeat: int | None) -> optuna.storages.BaseStorage:
    # ?prefix=NAME keeps several users' (or tests') journals apart on one server.
    base, _, query = url.partition("?")
    params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
    prefix = params.pop("prefix", "")
    base += ("?" + "&".join(f"{k}={v}" for k, v in params.items())) if params else ""
    import redis

    redis.Redis.from_url(base, socket_connect_timeout=10).ping()  # fail now, clearly, not at the first write
    return optuna.storages.JournalStorage(JournalRedisBackend(base, prefix=prefix))


def parse_address(url: str) -> tuple[str, int]:
    """(host, port) of grpc://HOST:PORT (IPv6 hosts in brackets)."""
    m = re.fullmatch(r"grpc://(\[[^\]]+\]|[^:/\[\]]+):(\d{1,5})/?", url)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise SearchError(
            f"study.storage: '{url}' is not grpc://HOST:PORT (e.g. grpc://10.0.0.5:13000, "
            "the address a `search proxy` listens on)"
        )
    return m.group(1).strip("[]"), int(m.group(2))


def needs_grpc() -> None:
    """grpcio is an extra: say how to install it rather than fail on the import."""
    try:
        import grpc  # noqa: F401
    except ImportError:
        raise SearchError(
            "grpc:// storage and `search proxy` need grpcio; install it with: pip install 'search[grpc]'"
        ) from None


def _grpc(url: str, heartbeat: int | None) -> optuna.storages.BaseStorage:
    """A client of `search proxy` (Optuna's gRPC storage proxy), once the proxy answers. It keeps
    no heartbeat table, so dead workers are found by our `heartbeat_at` attr, as on journal
    storages."""
    needs_grpc()
    host, port = parse_address(url)
    with warnings.catch_warnings():  # experimental since 4.2, stable in use; the warning is noise
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.GrpcStorageProxy(host=host, port=port)
    try:
        storage.wait_server_ready(timeout=READY_TIMEOUT)
    except ConnectionError:
        storage.close()
        raise SearchError(
            f"study.storage: no storage proxy answers at {url} within {READY_TIMEOUT:g} s; "
            f"start one there with `{command('proxy --storage DATABASE_URL')} "
            f"--host {host} --port {port}`, or check the address"
        ) from None
    return storage


STORAGES: dict[str, Callable[[str, int | None], optuna.storages.BaseStorage]] = {
    "sqlite": _rdb,
    "postgresql": _rdb,
    "postgres": _rdb,
    "mysql": _rdb,
    "mariadb": _rdb,
    "journal": _journal_file,
    "redis": _redis,
    "rediss": _redis,
    "grpc": _grpc,
}


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].split("+", 1)[0].lower() if ":" in url else ""


def resolve_url(url: str) -> str:
    """The URL with ${VAR} filled in, after its scheme is checked (nothing is opened)."""
    scheme = _scheme(url)
    if scheme not in STORAGES or (scheme != "journal" and "://" not in url):
        raise SearchError(
            f"study.storage: unsupported URL '{mask(url)}'; use sqlite:///PATH.db (one machine), "
            "postgresql+psycopg://USER:PASS@HOST/DB or mysql+pymysql://... (many machines), "
            "journal:PATH.log (shared filesystem), redis://HOST:PORT or grpc://HOST:PORT "
            "(a `search proxy` in front of a database)"
        )
    return expand(url)


def storage_error(url: str, full: str, e: Exception) -> SearchError:
    root: BaseException = e  # Optuna wraps driver errors ("An exception is raised during the commit"): say the cause
    while (cause := root.__cause__ or root.__context__) is not None:
        root = cause
    text = " ".join(str(root if root is not e and str(root) else e).split()) or type(e).__name__
    text = re.sub(r"\(Background on this error at: \S+\)", "", text).strip()
    return SearchError(
        f"study.storage: cannot open {mask(url)}: {_scrub(text, full)[:300]}; "
        "check the URL, that the server runs, and that the database exists"
    )


def _local_path(full: str) -> Path | None:
    """The file of a sqlite:/// or journal: URL (None for an in-memory database)."""
    if full.startswith("journal:"):
        return Path(full[len("journal:") :].removeprefix("//"))
    rest = full.split("://", 1)[1].split("?", 1)[0]
    return Path(rest[1:]) if rest.startswith("/") and rest not in ("/", "/:memory:") else None


def _creatable(path: Path) -> None:
    """`path` is a file, or can be created: its nearest existing ancestor is a writable directory."""
    if path.exists():
        if not path.is_file():
            raise SearchError(f"study.storage: {path} exists and is not a file")
        return
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SearchError(f"study.storage: cannot create {path}: {parent} is not a writable directory")


def _reach_file(full: str) -> None:
    path = _local_path(full)
    if full.startswith("journal:") and not full[len("journal:") :].removeprefix("//"):
        raise SearchError("study.storage: 'journal:' needs a file, e.g. journal:/shared/studies/NAME.log")
    if path is not None:
        _creatable(path)


def _engine(full: str) -> sqlalchemy.engine.Engine:
    scheme, rest = full.split("://", 1)
    args = {} if scheme.startswith("sqlite") else {"connect_timeout": 10}
    return sqlalchemy.create_engine(
        f"{DRIVERS.get(scheme, scheme)}://{rest}", poolclass=sqlalchemy.pool.NullPool, connect_args=args
    )


def _reach_server(full: str) -> None:
    engine = _engine(full)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    finally:
        engine.dispose()


def _reach_redis(full: str) -> None:
    import redis

    base = full.partition("?")[0]
    redis.Redis.from_url(base, socket_connect_timeout=10).ping()


REACHABLE: dict[str, Callable[[str], None]] = {
    "sqlite": _reach_file,
    "journal": _reach_file,
    "postgresql": _reach_server,
    "postgres": _reach_server,
    "mysql": _reach_server,
    "mariadb": _reach_server,
    "redis": _reach_redis,
    "rediss": _reach_redis,
}


def check_storage(url: str) -> None:
    """Scheme, ${VAR} and reachability of a storage URL, creating nothing."""
    full = resolve_url(url)
    reach = REACHABLE.get(_scheme(url))
    if reach is None:
        return
    try:
        reach(full)
    except SearchError:
        raise
    except Exception as e:  # noqa: BLE001 - connection problems are the user's to fix
        raise storage_error(url, full, e) from None


def _names_rdb(full: str) -> list[str]:
    """Study names in an RDB storage, read without creating Optuna's schema."""
    engine = _engine(full)
    try:
        with engine.connect() as conn:
            if not sqlalchemy.inspect(conn).has_table("studies"):
                return []
            return [n for (n,) in conn.exec_driver_sql("SELECT study_name FROM studies")]
    finally:
        engine.dispose()


def _names_journal(full: str) -> list[str] | None:
    path = _local_path(full)
    return [] if path is not None and not path.is_file() else None  # None: the file exists, open it


def open_storage(url: str, heartbeat: int | None = 60) -> optuna.storages.BaseStorage:
    """An Optuna storage for a URL; RDB storages beat every `heartbeat` seconds and retry dead workers' trials."""
    full = resolve_url(url)
    try:
        return STORAGES[_scheme(url)](full, heartbeat)
    except SearchError:
        raise
    except Exception as e:  # noqa: BLE001 - connection problems are the user's to fix
        raise storage_error(url, full, e) from None


# Study names without writing, per scheme; None (or no lister): open the storage to list them.
STUDY_NAMES: dict[str, Callable[[str], list[str] | None]] = {
    "sqlite": _names_rdb,
    "postgresql": _names_rdb,
    "postgres": _names_rdb,
    "mysql": _names_rdb,
    "mariadb": _names_rdb,
    "journal": _names_journal,
}


def study_names(url: str) -> list[str] | None:
    """The study names in the storage, read without writing anything (None: this storage cannot
    be listed without opening it)."""
    full = expand(url)
    lister = STUDY_NAMES.get(_scheme(url))
    try:
        return lister(full) if lister else None
    except Exception as e:  # noqa: BLE001 - connection problems are the user's to fix
        raise storage_error(url, full, e) from None
