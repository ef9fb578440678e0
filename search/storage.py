"""Storages: URLs (`${VAR}` filled in from the variables a user allows, passwords masked),
checks before anything is created, and opening (SQL with SQLite locking, journal file, Redis, a
client of the gRPC proxy: `search proxy`, search.proxy, serves one).

A URL is read as SQLAlchemy reads it, for masking as for connecting, so what is hidden is what
the driver takes for the password; what it cannot read unambiguously is masked wholesale and
refused before connecting.

A URL is checked (scheme, variables, reachability, a creatable file) before a study, schema or
file exists, so a refused run leaves nothing behind.

About 550 lines: reading a URL (masking, variables, what is refused) and opening it share one
parser and one list of schemes; apart, the two would drift.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote, unquote_plus

import optuna
import sqlalchemy
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock, JournalRedisBackend

from search import optuna_api
from search.errors import SearchError
from search.text import command

STALE_BEATS = 10  # heartbeats of silence before a running trial is judged dead (a slow process still beats)

STUDIES = Path("studies")
READY_TIMEOUT = 10.0  # seconds a client waits for the storage proxy before giving up
# A gRPC channel that cannot connect waits 1 s, then 1.6 times longer after each failure, up to
# 120 s, failing every call meanwhile without trying: a worker would see a proxy restarted after
# a minute's outage up to a minute late, and its trials look stale to workers that saw it at once.
# Capped at 5 s, each worker finds the proxy within a few seconds of its return.
GRPC_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 5000)]


def default_storage(name: str) -> str:
    return f"sqlite:///{STUDIES / name}.db"


HIDDEN = "***"

# ${NAME} only: `$NAME` and a lone `$` are literal (passwords contain them), and so is every `$` of
# a value, since the URL is scanned once, before any value is put in.
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Variables a URL may read unless SEARCH_STORAGE_VARS allows more: a recipe is shared, and a
# `${VAR}` in its storage URL sends that variable's value to the host the recipe names.
ALLOWED_PREFIXES = ("SEARCH_", "PG", "MYSQL_", "REDIS_")
# ... except these two: whole URLs and the allow-list itself, never a part of a URL.
NOT_BY_DEFAULT = ("SEARCH_STORAGE", "SEARCH_STORAGE_VARS")
ALLOW_VAR = "SEARCH_STORAGE_VARS"

# Query keys whose values are masked (psycopg's password, sslpassword, MySQL's passwd, tokens...).
SECRET_KEY = re.compile(r"pass|pwd|secret|token|key|auth|cred|^pw$", re.IGNORECASE)
QUERY_PAIR = re.compile(r"([?&;]([^?&;=#]*)=)([^&;#]*)")

# SQLAlchemy's own URL pattern (sqlalchemy.engine.url._parse_url, which exposes no spans): where
# `${VAR}` lands in a URL is decided exactly as the drivers will later read it.
URL_PARTS = re.compile(
    r"""
        (?P<name>[\w\+]+)://
        (?:(?P<username>[^:/]*)(?::(?P<password>[^@]*))?@)?
        (?:(?:\[(?P<ipv6host>[^/\?]+)\]|(?P<ipv4host>[^/:\?]+))?(?::(?P<port>[^/\?]*))?)?
        (?:/(?P<database>[^\?]*))?
        (?:\?(?P<query>.*))?
    """,
    re.X,
)


def _secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key))


def _conservative(url: str) -> str:
    """A URL SQLAlchemy cannot read, or reads ambiguously: all between :// and the last @ hidden,
    and the values of secret-looking query keys."""
    start = url.find("://") + 3 if "://" in url else 0
    at = url.rfind("@")
    out = url[:start] + HIDDEN + url[at:] if at >= start else url
    return QUERY_PAIR.sub(lambda m: m.group(1) + (HIDDEN if _secret_key(m.group(2)) else m.group(3)), out)


def _tokens(url: str) -> tuple[str, dict[str, str], str]:
    """The URL with each ${NAME} replaced by a token of digits (which SQLAlchemy's parsing and
    quoting leave alone, in a port too), {token: '${NAME}'}, and one more token, unused."""
    base = "730195"  # no prefix of it is a suffix: a token is never found straddling other digits
    while base in url:
        base += "4"
    refs: dict[str, str] = {}

    def token(m: re.Match[str]) -> str:
        t = f"{base}{len(refs):03d}"
        refs[t] = m.group(0)
        return t

    return VAR.sub(token, url), refs, f"{base}999"


def _ambiguous(u: sqlalchemy.engine.URL, text: str) -> bool:
    """A password with a raw '@': where it ends and the host begins is a guess."""
    return "@" in (u.host or "") or (u.password is not None and text.split("://", 1)[1].count("@") > 1)


def _parse(text: str) -> sqlalchemy.engine.URL | None:
    """The URL as SQLAlchemy reads it, or None when it cannot, or cannot tell the host from the password."""
    try:
        u = sqlalchemy.engine.make_url(text)
    except Exception:  # noqa: BLE001 - ArgumentError, or ValueError of a port that is not a number
        return None
    return None if _ambiguous(u, text) else u


def _values(v: str | tuple[str, ...]) -> tuple[str, ...]:
    return v if isinstance(v, tuple) else (v,)


def mask(url: str) -> str:
    """The URL for logs, messages, printed commands and the stored recipe: its password and the
    values of secret-looking query keys (password, passwd, pwd, secret, token, key...) as ***.

    As written when nothing is secret; else as SQLAlchemy renders it. A password or query value
    that is exactly one ${NAME} stays (a name, not a secret: the command still works pasted).
    A journal path is a file name and kept whole; a URL SQLAlchemy cannot read, or that has '@'
    in its password, loses everything between :// and its last @.
    """
    if _scheme(url) == "journal":
        return url
    if "://" not in url:
        return _conservative(url)
    text, refs, masked = _tokens(url)
    u = _parse(text)
    if u is None:
        return _conservative(url)
    hide_password = bool(u.password) and u.password not in refs
    hidden = [k for k, v in u.query.items() if _secret_key(k) and any(x not in refs for x in _values(v))]
    if not hide_password and not hidden:
        return url
    u = u.update_query_dict(dict.fromkeys(hidden, masked))
    out = u.render_as_string(hide_password=hide_password).replace(masked, HIDDEN)
    for t, ref in refs.items():
        out = out.replace(t, ref)
    return out


def _secrets(full: str) -> list[str]:
    """What may be a password in a URL: its password and secret query values, as written, quoted
    and unquoted (longest first)."""
    found: list[str] = []
    u = _parse(full) if "://" in full else None
    if u is None:
        start = full.find("://") + 3 if "://" in full else 0
        segment = full[start : full.rfind("@")] if full.rfind("@") > start else ""
        found += [segment, segment.partition(":")[2]]
    else:
        found += [u.password or ""]
        found += [x for k, v in u.query.items() if _secret_key(k) for x in _values(v)]
    m = re.match(r"[^:/]*:([^@]*)@", full.partition("://")[2])
    found += [m.group(1)] if m else []
    found += [m.group(3) for m in QUERY_PAIR.finditer(full) if _secret_key(m.group(2))]
    forms = {
        f(s)
        for s in found
        for f in (str, quote_plus, unquote, unquote_plus, lambda x: quote(x, safe=""), lambda x: quote(x, safe=" +"))
    }
    return sorted((s for s in forms if s), key=len, reverse=True)


def _scrub(text: str, url: str) -> str:
    """Text (e.g. a driver's error) with the URL's password removed wherever it appears: raw,
    quoted or unquoted, and any user:password@ of a URL quoted in it."""
    for secret in _secrets(url):
        text = text.replace(secret, HIDDEN)
    return re.sub(r"(://[^\s:/@]*:)[^\s@]*@", rf"\1{HIDDEN}@", text)


def allowed_var(name: str, env: Mapping[str, str] = os.environ) -> bool:
    """May a storage URL read this variable? Names starting SEARCH_, PG, MYSQL_ or REDIS_ (not
    SEARCH_STORAGE, SEARCH_STORAGE_VARS), and those SEARCH_STORAGE_VARS lists: comma-separated
    names, or prefixes ending in *."""
    extra = [e.strip() for e in env.get(ALLOW_VAR, "").split(",") if e.strip()]
    if name in extra or any(e.endswith("*") and name.startswith(e[:-1]) for e in extra):
        return True
    return name.startswith(ALLOWED_PREFIXES) and name not in NOT_BY_DEFAULT


def _quoted_spans(url: str) -> list[tuple[int, int]]:
    """Where a value is URL-quoted: the user and password, and each query value (host, port,
    database and paths take values literally)."""
    m = URL_PARTS.match(url) if "://" in url else None
    if m is None:
        return []
    spans = [m.span(g) for g in ("username", "password") if m.group(g) is not None]
    if m.group("query") is not None:
        start = m.start("query")
        for pair in re.finditer(r"[^&]+", m.group("query")):
            key, eq, _ = pair.group(0).partition("=")
            if eq:
                spans.append((start + pair.start() + len(key) + 1, start + pair.end()))
    return spans


def expand(url: str) -> str:
    """${NAME} in a storage URL taken from the environment, so passwords stay out of recipes.

    Only variables `allowed_var` admits are read. A value that lands in the user, password or a
    query value is URL-quoted (a password may hold / @ ? $ %); elsewhere it is taken literally.
    """
    refs = list(VAR.finditer(url))
    for m in refs:
        if not allowed_var(m.group(1)):
            raise SearchError(
                f"study.storage: '{mask(url)}' reads environment variable {m.group(1)}, which a storage URL may "
                f"not read (allowed: {', '.join(p + '*' for p in ALLOWED_PREFIXES)}); if this URL is yours, "
                f"allow it: export {ALLOW_VAR}={m.group(1)} (names or PREFIX*, comma-separated)"
            )
    quoted = _quoted_spans(url)
    out, last = [], 0
    for m in refs:
        value = os.environ.get(m.group(1))
        if value is None:
            raise SearchError(
                f"study.storage: environment variable {m.group(1)} in '{mask(url)}' is not set; "
                f"export {m.group(1)}=... before starting the study or its workers"
            )
        inside = any(a <= m.start() and m.end() <= b for a, b in quoted)
        out += [url[last : m.start()], quote(value, safe="") if inside else value]
        last = m.end()
    return "".join(out) + url[last:]


# Plain schemes get the drivers this package installs (SQLAlchemy would pick psycopg2/MySQLdb).
DRIVERS = {
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mysql+pymysql",
}


def _sqlite_connect(dbapi_connection: Any, record: Any) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy's begin event issues BEGIN, not pysqlite
    # Write-ahead log, synced at checkpoints: a commit appends to the log instead of syncing the
    # database file (a trial commits some 60 times; each sync cost 10-15 ms here). A killed
    # process loses nothing (the log is in the OS's cache); only a power cut may lose the last
    # commits, never the database. Readers no longer wait for a writer.
    dbapi_connection.execute("PRAGMA journal_mode=WAL")
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def _sqlite_begin(conn: Any) -> None:
    # Every transaction takes the write lock up front: a deferred transaction that reads and then
    # writes gets "database is locked" at once (no busy wait) when another process wrote meanwhile.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _driver_url(full: str) -> str:
    """The URL a driver gets: this package's driver for a plain scheme; a server's URL as SQLAlchemy
    renders it, so user, password and database are quoted whole (Optuna also runs str.format on
    it, which a raw { or } in a password would break)."""
    scheme, rest = full.split("://", 1)
    if scheme.startswith("sqlite"):
        return full  # no credentials; the path stays as written (artifacts are found beside it)
    u = sqlalchemy.engine.make_url(full)
    return u.set(drivername=DRIVERS.get(scheme, scheme)).render_as_string(hide_password=False)


def _rdb(full: str, heartbeat: int | None) -> optuna.storages.BaseStorage:
    scheme, rest = full.split("://", 1)
    url = _driver_url(full)
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


# Optuna's file lock breaks a lock not released for 30 s; an NFS server that stalls longer than
# that (failover, a loaded filer) lets a second writer append beside the first, and the
# interleaved bytes make the journal unreadable for every reader. A lock is held only for one
# append (milliseconds), so a long grace costs waiting only when a worker died holding it.
JOURNAL_LOCK_GRACE_SECONDS = 600


def complete_size(path: Path, block: int = 1 << 16) -> int | None:
    """The size of a journal file up to the end of its last complete line, when a torn line
    (no newline: a writer stopped mid-append) follows it; None when the file ends whole."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            if pos == end and chunk.endswith(b"\n"):
                return None
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                return start + cut + 1
            pos = start
    return None if end == 0 else 0


def _check_tail(path: Path, lock: JournalFileSymlinkLock) -> None:
    """Refuse a journal whose last line is torn, naming the repair; the tail is judged under the
    writers' lock, so an append in progress is not taken for a torn one."""
    if complete_size(path) is None:
        return
    lock.acquire()
    try:
        size = complete_size(path)
    finally:
        lock.release()
    if size is not None:
        torn = path.stat().st_size - size
        raise SearchError(
            f"journal {path}: its last line is torn ({torn} bytes after the last complete record: a "
            f"writer stopped mid-append); stop every worker on it, then cut it: truncate -s {size} {path}"
        )


def _journal_file(url: str, heartbeat: int | None) -> optuna.storages.BaseStorage:
    path = url[len("journal:") :].removeprefix("//")
    if not path:
        raise SearchError("study.storage: 'journal:' needs a file, e.g. journal:/shared/studies/NAME.log")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lock = JournalFileSymlinkLock(path, grace_period=JOURNAL_LOCK_GRACE_SECONDS)
    backend = JournalFileBackend(path, lock_obj=lock)  # creates the file
    _check_tail(Path(path), lock)
    return optuna.storages.JournalStorage(backend)


def _redis_url(full: str) -> tuple[str, str]:
    """(URL for redis-py, key prefix): ?prefix=NAME is ours (it keeps several users' or tests'
    journals apart on one server), the rest redis-py's. Rendered by SQLAlchemy, so a password
    with / ? # reaches redis-py's urlparse quoted, and ?password= stays."""
    u = sqlalchemy.engine.make_url(full)
    prefix = _values(u.query.get("prefix", ""))[0]
    return u.difference_update_query(["prefix"]).render_as_string(hide_password=False), prefix


def _redis(full: str, heartbeat: int | None) -> optuna.storages.BaseStorage:
    import redis

    base, prefix = _redis_url(full)
    redis.Redis.from_url(base, socket_connect_timeout=10).ping()  # fail now, clearly, not at the first write
    return optuna.storages.JournalStorage(JournalRedisBackend(base, prefix=prefix))


def parse_address(url: str) -> tuple[str, int]:
    """(host, port) of grpc://HOST:PORT (IPv6 hosts in brackets)."""
    m = re.fullmatch(r"grpc://(\[[^\]]+\]|[^:/\[\]]+):(\d{1,5})/?", url)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise SearchError(
            f"study.storage: '{mask(url)}' is not grpc://HOST:PORT (e.g. grpc://10.0.0.5:13000, "
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
        storage = optuna_api.GrpcClient(host=host, port=port, options=GRPC_RECONNECT)
    try:
        storage.wait_server_ready(timeout=READY_TIMEOUT)
    except ConnectionError:
        storage.close()
        raise SearchError(
            f"study.storage: no storage proxy answers at {mask(url)} within {READY_TIMEOUT:g} s; "
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


# Servers reached with credentials: their URLs must read unambiguously before anything connects.
SERVERS = ("postgresql", "postgres", "mysql", "mariadb", "redis", "rediss")


def resolve_url(url: str) -> str:
    """The URL with ${VAR} filled in, after its scheme is checked (nothing is opened).

    A server's URL that SQLAlchemy cannot read, or in which a raw '@' leaves the host unclear, is
    refused here: guessed at, a piece of the password would go out as a host name."""
    scheme = _scheme(url)
    if scheme not in STORAGES or (scheme != "journal" and "://" not in url):
        raise SearchError(
            f"study.storage: unsupported URL '{mask(url)}'; use sqlite:///PATH.db (one machine), "
            "postgresql+psycopg://USER:PASS@HOST/DB or mysql+pymysql://... (many machines), "
            "journal:PATH.log (shared filesystem), redis://HOST:PORT or grpc://HOST:PORT "
            "(a `search proxy` in front of a database)"
        )
    full = expand(url)
    if scheme in SERVERS and _parse(full) is None:
        raise SearchError(
            f"study.storage: cannot read '{mask(url)}' as USER:PASSWORD@HOST:PORT/DB; write @ : / ? in a "
            "user or password as %40 %3A %2F %3F (or put the password in an environment variable: "
            ":${SEARCH_DB_PASSWORD}@), and give the port as a number"
        )
    return full


def where(url: str) -> str:
    """The storage as it will be opened, ${VAR} filled in and passwords masked: printed before
    connecting, so the host a password goes to is seen (the URL masked as written if it cannot
    be resolved; resolving says why)."""
    try:
        return mask(resolve_url(url))
    except SearchError:
        return mask(url)


def storage_error(url: str, full: str, e: Exception) -> SearchError:
    root: BaseException = e  # Optuna wraps driver errors ("An exception is raised during the commit"): say the cause
    while (cause := root.__cause__ or root.__context__) is not None:
        root = cause
    text = " ".join(str(root if root is not e and str(root) else e).split()) or type(e).__name__
    text = re.sub(r"\(Background on this error at: \S+\)", "", text).strip()
    return SearchError(
        f"study.storage: cannot open {mask(full)}: {_scrub(text, full)[:300]}; "
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
    args = {} if full.startswith("sqlite") else {"connect_timeout": 10}
    return sqlalchemy.create_engine(_driver_url(full), poolclass=sqlalchemy.pool.NullPool, connect_args=args)


def _reach_server(full: str) -> None:
    engine = _engine(full)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    finally:
        engine.dispose()


def _reach_redis(full: str) -> None:
    import redis

    redis.Redis.from_url(_redis_url(full)[0], socket_connect_timeout=10).ping()


def _reach_grpc(full: str) -> None:
    """The address only: a proxy that is not up yet is waited for when the storage is opened."""
    parse_address(full)


REACHABLE: dict[str, Callable[[str], None]] = {
    "sqlite": _reach_file,
    "journal": _reach_file,
    "postgresql": _reach_server,
    "postgres": _reach_server,
    "mysql": _reach_server,
    "mariadb": _reach_server,
    "redis": _reach_redis,
    "rediss": _reach_redis,
    "grpc": _reach_grpc,
}


def check_storage(url: str, connect: bool = True) -> bool:
    """Scheme, ${VAR} and reachability of a storage URL, creating nothing. With `connect` false a
    database server is not contacted (files and addresses are still checked); returns whether
    the storage's reachability was checked."""
    full = resolve_url(url)
    reach = REACHABLE.get(_scheme(url))
    if reach is None:
        return True
    if not connect and _scheme(url) in SERVERS:
        return False
    try:
        reach(full)
    except SearchError:
        raise
    except Exception as e:  # noqa: BLE001 - connection problems are the user's to fix
        raise storage_error(url, full, e) from None
    return True


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
    full = resolve_url(url)
    lister = STUDY_NAMES.get(_scheme(url))
    try:
        return lister(full) if lister else None
    except Exception as e:  # noqa: BLE001 - connection problems are the user's to fix
        raise storage_error(url, full, e) from None


# ---------------------------------------------------------------------------
# where a study's files live


def require_study(name: str, url: str, *, where: str = "", no_file: str, no_study: str) -> None:
    """Refuse a study that is not in `url` before anything is opened for writing: a misspelt
    SQLite path gets no database, a server no schema. `where` leads each message (a key path),
    `no_file` and `no_study` end them (how to fix)."""
    path = url.removeprefix("sqlite:///")
    if url.startswith("sqlite:///") and not Path(expand(path)).is_file():
        raise SearchError(f"{where}no study database at {path}{no_file}")
    check_storage(url)
    names = study_names(url)
    if names is not None and name not in names:
        raise SearchError(
            f"{where}no study '{name}' in {mask(url)}; studies there: {', '.join(names) or 'none'}; {no_study}"
        )


def storage_file(storage: Any) -> Path | None:
    """The SQLite or journal file behind an Optuna storage (None for server storages)."""
    backend = getattr(storage, "_backend", storage)  # create_study wraps RDB storages in a cache
    url = getattr(backend, "url", None)
    if isinstance(url, str) and url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///") :])
    journal = backend if hasattr(backend, "_file_path") else getattr(backend, "_backend", None)  # JournalStorage
    path = getattr(journal, "_file_path", None)
    return Path(path) if path else None


def url_file(url: str) -> Path | None:
    """The SQLite or journal file of a storage URL (None for server storages)."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///") :])
    if url.startswith("journal:"):
        return Path(url[len("journal:") :].removeprefix("//"))
    return None


def study_dir(name: str, file: Path | None) -> Path:
    """`<dir of the study file>/<name>/`: `studies/<name>/` for the default storage.

    Server storages (PostgreSQL, MySQL, Redis) keep files under ./studies/<name>/
    of the machine that writes them.
    """
    return (file.parent if file else STUDIES) / name


def dir_of(study: optuna.Study) -> Path:
    return study_dir(study.study_name, storage_file(optuna_api.storage_of(study)))
