"""Passwords never leak, whatever the storage URL's form: not in a printed line (validate, run,
worker, report, the dashboard and resume commands), a stored attribute of the study or its
trials, a log record, or an exception's text. And a shared recipe's storage URL reads only the
environment variables its user allows.

The URL forms run against real servers (PostgreSQL over TCP and its unix socket, MariaDB with a
user of its own whose password needs quoting, a throwaway redis-server with that password); without
them the tests skip, except under CI (CI=true), where that is a failure (tests/test_storage.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy

from search import optuna_api, storage, workers
from search import study as st
from search.cli import dashboard_command, main
from search.errors import SearchError
from tests.conftest import run_cli, tiny_recipe, write_recipe
from tests.test_storage import _unavailable, database, free_port

SECRET = "S3cr/t$Pw?x"  # a slash, a dollar, a question mark: each broke the former masking
LEAKS = ("S3cr", "Pw?x", "Pw%3F", "$Pw", "%24Pw")  # the password or a piece of it, however quoted


def leaked(*texts: str) -> list[str]:
    text = "\n".join(texts)
    return [mark for mark in LEAKS if mark in text]


# ---------------------------------------------------------------------------
# masking, expanding, scrubbing: exact strings

MASKED = [
    (
        "postgresql+psycopg://u:S3cr/t$Pw?x@db.internal:5432/search",
        "postgresql+psycopg://u:***@db.internal:5432/search",
    ),
    ("postgresql+psycopg://u@h/db?password=S3cr/t$Pw?x", "postgresql+psycopg://u@h/db?password=***"),
    (
        "postgresql:///test?host=/var/run/postgresql&user=postgres&password=S3cr/t$Pw?x",
        "postgresql:///test?host=%2Fvar%2Frun%2Fpostgresql&password=***&user=postgres",
    ),
    ("mysql+pymysql://u:S3cr%2Ft%24Pw%3Fx@h:3306/db", "mysql+pymysql://u:***@h:3306/db"),
    ("mysql+pymysql://u:p@ss@h/x", "mysql+pymysql://***@h/x"),  # '@' twice: the host is a guess, all hidden
    ("postgresql://u:p@ss/x@h/db", "postgresql://***@h/db"),
    ("postgresql://u:pw@h:notaport/x?Token=t", "postgresql://***@h:notaport/x?Token=***"),  # unreadable
    ("redis://:S3cr/t$Pw?x@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("rediss://u:pw@h:6380/0?prefix=a", "rediss://u:***@h:6380/0?prefix=a"),
    ("redis://h:6379/0?password=pw&prefix=x", "redis://h:6379/0?password=***&prefix=x"),
    ("grpc://127.0.0.1:13000?token=S3cr/t$Pw?x", "grpc://127.0.0.1:13000?token=***"),
    ("mongodb://u:pw@h/x", "mongodb://u:***@h/x"),  # unsupported, and still masked in the refusal
    ("u:pw@h/db", "***@h/db"),
    # ${NAME} is a name, not a secret: kept, so printed commands work pasted; anything more is hidden
    (
        "postgresql://u:${SEARCH_DB_PASSWORD}@${PGHOST}:${PGPORT}/db?sslpassword=${PGSSLPASSWORD}&api_key=k&keepalives=1",
        "postgresql://u:${SEARCH_DB_PASSWORD}@${PGHOST}:${PGPORT}/db?api_key=***&keepalives=1"
        "&sslpassword=${PGSSLPASSWORD}",
    ),
    ("postgresql://u:pre${SEARCH_DB_PASSWORD}@h/db", "postgresql://u:***@h/db"),
    # nothing secret: as written
    ("postgresql+psycopg://u@h:5432/db?sslmode=require", "postgresql+psycopg://u@h:5432/db?sslmode=require"),
    ("postgresql://u:@h/db", "postgresql://u:@h/db"),
    ("sqlite:///studies/a.db", "sqlite:///studies/a.db"),
    ("sqlite:///studies/a.db?pw=${SEARCH_PW}", "sqlite:///studies/a.db?pw=${SEARCH_PW}"),
    ("journal:/shared/u:pw@nas/?password=x/j.log", "journal:/shared/u:pw@nas/?password=x/j.log"),  # a path
    ("studies/x.db", "studies/x.db"),
]


@pytest.mark.parametrize(("url", "masked"), MASKED)
def test_mask_hides_every_form_of_password(url, masked):
    assert storage.mask(url) == masked


def test_expand_fills_in_only_braced_names_and_quotes_what_lands_in_user_password_or_query(monkeypatch):
    value = "S3cr/t$Pw?x@%+&${PGHOST}"  # every character that breaks a URL, and a ${...} of its own
    monkeypatch.setenv("SEARCH_DB_PASSWORD", value)
    monkeypatch.setenv("PGUSER", "me@corp")
    monkeypatch.setenv("PGHOST", "db.internal")
    monkeypatch.setenv("SEARCH_DIR", "/srv/$tudies")
    template = (
        "postgresql+psycopg://${PGUSER}:${SEARCH_DB_PASSWORD}@${PGHOST}:5432/search"
        "?password=${SEARCH_DB_PASSWORD}&application_name=$PGHOST"
    )
    full = storage.expand(template)
    assert full == (
        "postgresql+psycopg://me%40corp:S3cr%2Ft%24Pw%3Fx%40%25%2B%26%24%7BPGHOST%7D@db.internal:5432/search"
        "?password=S3cr%2Ft%24Pw%3Fx%40%25%2B%26%24%7BPGHOST%7D&application_name=$PGHOST"
    )
    u = sqlalchemy.engine.make_url(full)  # what the driver gets: the value, whole
    assert (u.username, u.password, u.host, u.query["password"]) == ("me@corp", value, "db.internal", value)
    assert storage.expand("sqlite:///${SEARCH_DIR}/a.db") == "sqlite:////srv/$tudies/a.db"  # paths: literal
    assert storage.expand("journal:${SEARCH_DIR}/j.log") == "journal:/srv/$tudies/j.log"
    assert storage.expand("sqlite:///$SEARCH_DIR/${x/a.db") == "sqlite:///$SEARCH_DIR/${x/a.db"  # not ${NAME}
    assert (
        storage.where(template)
        == "postgresql+psycopg://me%40corp:***@db.internal:5432/search?application_name=%24PGHOST&password=***"
    )
    monkeypatch.delenv("SEARCH_DB_PASSWORD")
    with pytest.raises(SearchError, match=r"^study.storage: environment variable SEARCH_DB_PASSWORD in .* is not set"):
        storage.expand(template)


def test_a_storage_url_reads_only_the_variables_its_user_allows(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("SEARCH_STORAGE_VARS", raising=False)
    assert all(storage.allowed_var(n) for n in ("SEARCH_DB_PASSWORD", "PGPASSWORD", "MYSQL_PWD", "REDIS_PASSWORD"))
    # not by default: other names, and whole URLs (SEARCH_STORAGE) or the allow-list, never a part of one
    assert not any(storage.allowed_var(n) for n in ("AWS_SECRET_ACCESS_KEY", "HOME", "SEARCH_STORAGE", "MYSQLPWD"))
    hostile = "postgresql+psycopg://x:${AWS_SECRET_ACCESS_KEY}@127.0.0.1:1/db"  # a shared recipe's
    write_recipe(tmp_path / "r.yaml", tiny_recipe(study={"storage": hostile}))
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "r.yaml"]) == 2
    out, err = capsys.readouterr()
    [line] = [line for line in err.splitlines() if "AWS_SECRET_ACCESS_KEY" in line]
    assert line == (
        "error: study.storage: 'postgresql+psycopg://x:${AWS_SECRET_ACCESS_KEY}@127.0.0.1:1/db' reads environment "
        "variable AWS_SECRET_ACCESS_KEY, which a storage URL may not read (allowed: SEARCH_*, PG*, MYSQL_*, "
        "REDIS_*); if this URL is yours, allow it: export SEARCH_STORAGE_VARS=AWS_SECRET_ACCESS_KEY (names or "
        "PREFIX*, comma-separated)"
    )
    assert "cannot open" not in err and not leaked(out, err)  # refused before anything connected
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(SearchError, match="reads environment variable AWS_SECRET_ACCESS_KEY"):  # even unset
        storage.check_storage(hostile)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("SEARCH_STORAGE_VARS", " OTHER , AWS_* ")  # names, or prefixes ending in *
    assert storage.allowed_var("AWS_SECRET_ACCESS_KEY") and storage.allowed_var("OTHER")
    assert not storage.allowed_var("OTHER2") and storage.allowed_var("SEARCH_X")
    assert main(["validate", "r.yaml"]) == 2  # allowed now: it connects (nothing listens on port 1)
    out, err = capsys.readouterr()
    assert "storage postgresql+psycopg://x:***@127.0.0.1:1/db" in out.replace("\n  ", " ")
    assert "cannot open postgresql+psycopg://x:***@127.0.0.1:1/db" in err and not leaked(out, err)


def test_scrub_removes_the_password_raw_quoted_and_unquoted():
    url = "postgresql://u:S3cr%2Ft%24Pw%3fx@h/db?sslpassword=S3cr/t$Pw?x"
    text = "auth S3cr/t$Pw?x, S3cr%2Ft%24Pw%3Fx, S3cr%2Ft%24Pw%3fx, S3cr%2Ft%24Pw%3Fx in postgresql://a:b/c@h/x"
    assert storage._scrub(text, url) == "auth ***, ***, ***, *** in postgresql://a:***@h/x"


def test_a_server_url_with_an_unclear_host_is_refused_before_connecting():
    for url in ("postgresql+psycopg://u:p@ss@127.0.0.1:1/db", "redis://:p@ss/w@127.0.0.1:1/0"):
        with pytest.raises(SearchError) as e:
            storage.check_storage(url)
        text = "".join(traceback.format_exception(e.value))
        assert "cannot read" in str(e.value) and "%40" in str(e.value) and "\n" not in str(e.value)
        assert "p@ss" not in text and "ss@" not in text and "ss/w" not in text


# ---------------------------------------------------------------------------
# every URL form, through the commands, against real servers


@contextlib.contextmanager
def mysql_user() -> Iterator[str]:
    """A fresh MariaDB/MySQL database and a user of its own whose password is SECRET: yields
    'USER@HOST:PORT/DB' (no password); both dropped afterwards."""
    with database("mysql") as url:
        u = sqlalchemy.engine.make_url(url)
        user = f"search_pw_{uuid.uuid4().hex[:8]}"
        admin = sqlalchemy.create_engine(u, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(sqlalchemy.text("CREATE USER :u@'%' IDENTIFIED BY :p"), {"u": user, "p": SECRET})
            c.execute(sqlalchemy.text(f"GRANT ALL ON {u.database}.* TO :u@'%'"), {"u": user})
        try:
            yield f"{user}@{u.host}:{u.port or 3306}/{u.database}"
        finally:
            with admin.connect() as c:
                c.execute(sqlalchemy.text("DROP USER :u@'%'"), {"u": user})
            admin.dispose()


@contextlib.contextmanager
def redis_with_password(tmp_path: Path) -> Iterator[int]:
    """A throwaway redis-server on a free loopback port that requires SECRET; yields its port."""
    exe = shutil.which("redis-server")
    if exe is None:
        _unavailable("redis", FileNotFoundError("redis-server"))
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--requirepass", SECRET, "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([exe, *args, "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, password=SECRET)
        deadline = time.time() + 15
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError as e:
                if time.time() > deadline or proc.poll() is not None:
                    _unavailable("redis", e)
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def socket_dir(url: str) -> str:
    """The PostgreSQL server's unix socket directory (skips when it is not on this machine)."""
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as c:
            dirs = c.exec_driver_sql("SHOW unix_socket_directories").scalar_one()
    finally:
        engine.dispose()
    found = [d.strip() for d in dirs.split(",") if Path(d.strip(), f".s.PGSQL.{engine.url.port or 5432}").exists()]
    if not found:
        pytest.skip(f"the PostgreSQL server's socket ({dirs}) is not on this machine")
    return found[0]


FORMS = ["slash", "query", "dollar-var", "socket", "mysql", "redis", "grpc", "journal"]


@contextlib.contextmanager
def url_form(form: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(storage URL template of this form, the text the storage line must show: its host or path)."""
    if form in ("slash", "query", "socket"):  # PostgreSQL trusts loopback here: any password is let in
        with database("postgres") as url:
            u = sqlalchemy.engine.make_url(url)
            at = f"{u.host}:{u.port or 5432}/{u.database}"
            if form == "slash":
                yield f"postgresql+psycopg://{u.username}:{SECRET}@{at}", f"{u.username}:***@{at}"
            elif form == "query":
                yield f"postgresql+psycopg://{u.username}@{at}?password={SECRET}", f"@{at}?password=***"
            else:
                d = socket_dir(url)
                yield f"postgresql:///{u.database}?host={d}&user={u.username}&password={SECRET}", quote(d, safe="")
    elif form in ("dollar-var", "mysql"):  # a real password check: a wrongly quoted one is refused
        with mysql_user() as where:
            user, at = where.split("@")
            if form == "dollar-var":
                yield f"mysql+pymysql://{user}:${{SEARCH_DB_PASSWORD}}@{at}", f"{user}:***@{at}"
            else:
                yield f"mysql+pymysql://{user}:{quote(SECRET, safe='')}@{at}", f"{user}:***@{at}"
    elif form == "redis":
        with redis_with_password(tmp_path) as port:
            yield f"redis://:{SECRET}@127.0.0.1:{port}/0", f"redis://:***@127.0.0.1:{port}/0"
    elif form == "grpc":  # no proxy takes a token: refused, and the refusal shows none
        yield f"grpc://127.0.0.1:{free_port()}?token={SECRET}", "?token=***"
    else:  # a path that looks like credentials is a path: shown whole, opened as written
        path = tmp_path / "u:pw@nas" / "?password=x" / "secret.log"
        yield f"journal:{path}", f"journal:{path}"


def _attrs(study) -> list[str]:
    """Every attribute of the study and its trials, as text."""
    store = optuna_api.storage_of(study)
    system = store.get_study_system_attrs(store.get_study_id_from_name(study.study_name))
    out = [json.dumps(study.user_attrs, default=str), json.dumps(system, default=str)]
    for t in study.get_trials(deepcopy=False):
        out += [json.dumps(t.user_attrs, default=str), json.dumps(t.system_attrs, default=str)]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_no_form_of_storage_url_leaks_its_password(form, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, as -v; and those that set their own level, each SQL statement
    for name in ("sqlalchemy", "alembic", "psycopg", "pymysql", "redis", "optuna"):
        caplog.set_level(logging.DEBUG, logger=name)
    monkeypatch.setenv("SEARCH_DB_PASSWORD", SECRET)
    monkeypatch.chdir(tmp_path)
    seen: list[str] = []

    def cli(*args: str) -> tuple[int, str, str]:
        code = main(["-v", *args])
        out, err = capsys.readouterr()
        seen.extend([out, err])
        return code, out, err

    with url_form(form, tmp_path) as (url, shown):
        caplog.clear()  # the set-up's own statements (CREATE USER ... IDENTIFIED BY) are not the harness's
        write_recipe(
            tmp_path / "r.yaml",
            tiny_recipe(
                name="secret",
                study={"n_trials": 1, "storage": url},
                data={"max_samples": 100},
                train={"epochs": 1},
            ),
        )
        opens = form != "grpc"
        code, out, err = cli("validate", "r.yaml")
        assert code == (0 if opens else 2), err
        assert shown in out.replace("\n  ", ""), out  # where it goes, printed before connecting
        code, out, err = cli("run", "r.yaml")
        assert code == (0 if opens else 2), err
        first = out.replace("\n  ", "").splitlines()[0]  # a long URL is wrapped to 100 columns
        assert first.startswith("storage:") and shown in first, out
        code, out, err = cli("worker", "--storage", url, "--study", "secret")
        assert code == (0 if opens else 2), err
        code, out, err = cli("report", "secret", "--storage", url)
        assert code == (0 if opens else 2), err
        if opens:
            recipe, study = st.load_stored(url, "secret")
            assert recipe.study.storage == storage.mask(url)  # the template, masked; nothing expanded
            assert len(study.get_trials()) == 1
            seen += [dashboard_command(recipe, url), workers.resume_command(recipe, url), *_attrs(study)]
            if form == "dollar-var":  # ${VAR} kept: the printed command works pasted
                assert "${SEARCH_DB_PASSWORD}" in workers.resume_command(recipe, url)
            if form == "journal":
                assert Path(url.removeprefix("journal:")).is_file()
        else:
            assert err.startswith("error: study.storage: '") and err.count("\n") == 1, err
            with pytest.raises(SearchError) as e:
                st.load_stored(url, "secret")
            seen.append("".join(traceback.format_exception(e.value)))
    assert any(r.name.startswith("sqlalchemy") for r in caplog.records) or form in ("grpc", "journal", "redis")
    seen += [caplog.text, *(str(r.args) for r in caplog.records)]
    assert not leaked(*seen), [s[:3000] for s in seen if leaked(s)]


@pytest.mark.slow
def test_worker_processes_and_debug_logs_keep_the_password(tmp_path, monkeypatch):
    """`run --workers 2` in a real process, with -v: the workers get the URL (template) in their
    environment, fill in ${SEARCH_DB_PASSWORD} themselves and log at debug level."""
    with mysql_user() as where:
        user, at = where.split("@")
        url = f"mysql+pymysql://{user}:${{SEARCH_DB_PASSWORD}}@{at}"
        write_recipe(
            tmp_path / "r.yaml",
            tiny_recipe(name="procs", study={"n_trials": 2, "storage": url}, data={"max_samples": 100}),
        )
        env = {"SEARCH_DB_PASSWORD": SECRET, "OMP_NUM_THREADS": "1", "SEARCH_STORAGE_VARS": ""}
        proc = run_cli("-v", "run", "r.yaml", "--workers", "2", cwd=tmp_path, env=env, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.startswith(f"storage: mysql+pymysql://{user}:***@{at}\n"), proc.stdout[:500]
        assert "started 2 workers" in proc.stdout and "leaderboard" in proc.stdout
        monkeypatch.setenv("SEARCH_DB_PASSWORD", SECRET)
        study = st.load_stored(url, "procs")[1]
        assert sum(t.state.is_finished() for t in study.get_trials()) == 2
        assert not leaked(proc.stdout, proc.stderr, *_attrs(study))
