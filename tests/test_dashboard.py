"""optuna-dashboard on a study, through its JSON API (WSGI, in-process), as `search dashboard` serves it."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from wsgiref.util import setup_testing_defaults

import bottle
import optuna
import pytest
from optuna.artifacts import upload_artifact
from optuna_dashboard import wsgi

from search import artifacts, cli, dashboard
from search.objective import FIRST_ATTRS
from search.recipe import recipe_from_dict
from search.storage import open_storage
from search.study import open_study
from tests.conftest import ROOT, tiny_recipe, wsgi_get

MAX_ATTR_CHARS = 80  # one table cell: the dashboard's rows stay one line high


def _app(cwd):
    store = artifacts.store_for(cwd / "studies" / "tiny")
    app = wsgi(
        open_storage(f"sqlite:///{cwd}/studies/tiny.db", heartbeat=None), artifact_store=artifacts.ServedStore(store)
    )
    return app, store


def _detail(app):
    status, body = wsgi_get(app, "/api/studies")
    assert status.startswith("200")
    [summary] = json.loads(body)["study_summaries"]
    status, body = wsgi_get(app, f"/api/studies/{summary['study_id']}")
    assert status.startswith("200")
    return summary, json.loads(body)


@pytest.mark.slow  # the dashboard over a study run through the CLI
def test_metric_names_short_attributes_first_columns(demo_study):
    app, _ = _app(demo_study)
    summary, detail = _detail(app)
    assert detail["objective_names"] == ["accuracy"]  # not "Objective 0" on every axis
    for t in detail["trials"]:
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        assert "history" not in attrs and len(t["intermediate_values"]) == 2
        long = {k: len(v) for k, v in attrs.items() if len(v) > MAX_ATTR_CHARS}
        assert not long, long
        assert len(attrs) <= 28, sorted(attrs)  # with cpu_format and flops (the pruner's cost of an epoch)
    columns = [a["key"] for a in detail["union_user_attrs"]]
    assert set(FIRST_ATTRS) <= set(columns)


@pytest.mark.slow
def test_every_listed_artifact_downloads_a_removed_checkpoint_says_so(demo_study, tmp_path):
    shutil.copytree(demo_study / "studies", tmp_path / "studies")
    app, store = _app(tmp_path)
    summary, detail = _detail(app)
    checkpoints = [
        (t, a) for t in detail["trials"] for a in t["artifacts"] if a["filename"].endswith(artifacts.CHECKPOINT_SUFFIX)
    ]
    assert len(checkpoints) == 3 and all(len(t["artifacts"]) == 2 for t in detail["trials"])  # + history
    gone_trial, gone = checkpoints[0]
    store.remove(gone["artifact_id"])  # as when a trial drops out of the top-k
    for t in detail["trials"]:
        for a in t["artifacts"]:
            status, body = wsgi_get(app, f"/artifacts/{summary['study_id']}/{t['trial_id']}/{a['artifact_id']}")
            assert status.startswith("200"), (a["filename"], status)
            if a["artifact_id"] == gone["artifact_id"]:
                assert body.startswith(b"removed: this checkpoint was deleted")
            elif a["filename"].endswith(artifacts.HISTORY_SUFFIX):
                assert len(json.loads(body)["history"]) == 2
            else:
                assert body[:2] == b"PK"  # a torch.save zip


# ---------------------------------------------------------------------------
# `search dashboard` itself: what it serves, and what it says (bottle.run replaced: nothing listens)


def wsgi_call(app, method: str, path: str, body: dict | None = None, **headers: str) -> tuple[str, bytes]:
    """`method` `path` with a JSON body, to a WSGI app in-process: (status line, body).
    `headers` as WSGI names them (HTTP_HOST='example.org')."""
    data = json.dumps(body).encode() if body is not None else b""
    env: dict = {}
    setup_testing_defaults(env)  # Host: 127.0.0.1
    env.update(
        PATH_INFO=path,
        QUERY_STRING="",
        REQUEST_METHOD=method,
        CONTENT_TYPE="application/json",
        CONTENT_LENGTH=str(len(data)),
        **{"wsgi.input": io.BytesIO(data), "wsgi.errors": sys.stderr},
        **headers,
    )
    status = []
    out = b"".join(app(env, lambda s, h, *a: status.append(s)))
    return status[0], out


@pytest.fixture
def running(tmp_path):
    """A study as `search run` creates it, one trial running with a history artifact: (url, study, trial, id)."""
    (tmp_path / "studies").mkdir()
    url = f"sqlite:///{tmp_path}/studies/tiny.db"
    open_study(recipe_from_dict(tiny_recipe()), url)
    study = optuna.load_study(study_name="tiny", storage=open_storage(url, heartbeat=None))  # as a worker's, unbeating
    trial = study.ask()  # the dashboard uploads to running trials only
    (tmp_path / "trial-0-history.json").write_text('{"history": []}')
    store = artifacts.store_for(tmp_path / "studies" / "tiny")
    artifact = upload_artifact(
        artifact_store=store, file_path=str(tmp_path / "trial-0-history.json"), study_or_trial=trial
    )
    return url, study, trial, artifact


def dashboard_cli(monkeypatch, capsys, url: str, *flags: str) -> tuple[dict, str]:
    """`search dashboard tiny --storage URL FLAGS`: (what it hands bottle.run, its stderr)."""
    served: dict = {}
    monkeypatch.setattr(bottle, "run", lambda app, **kw: served.update(app=app, **kw))
    capsys.readouterr()
    assert cli.main(["dashboard", "tiny", "--storage", url, *flags]) == 0
    return served, capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "warned"),
    [("0.0.0.0", True), ("::", True), ("10.1.2.3", True), ("127.0.0.1", False), ("localhost", False)],
)
def test_the_dashboard_warns_when_others_can_reach_it(running, monkeypatch, capsys, host, warned):
    url = running[0]
    served, err = dashboard_cli(monkeypatch, capsys, url, "--host", host, "--port", "8123")
    assert served["host"] == host and served["port"] == 8123
    if not warned:
        assert err == ""
        return
    shown = f"[{host}]" if ":" in host else host
    assert err.splitlines() == [
        f"warning: optuna-dashboard has no authentication; anyone who reaches {shown}:8123 can read "
        f"every trial and artifact in {url}. Keep it on a private network, or serve on "
        "127.0.0.1 and reach it through an SSH tunnel."
    ]
    _, err = dashboard_cli(monkeypatch, capsys, url, "--host", host, "--allow-writes")
    assert "can change, finish and delete studies, trials, notes and artifacts in" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("header", "name"),
    [("Example.ORG:8080", "example.org"), ("[::1]:8080", "::1"), ("::1", "::1"), ("localhost", "localhost")],
)
def test_host_of_a_header(header, name):
    assert dashboard.host_of(header) == name


def test_on_a_wildcard_address_any_ip_names_the_dashboard_but_no_other_name(running, monkeypatch, capsys):
    served, _ = dashboard_cli(monkeypatch, capsys, running[0], "--host", "0.0.0.0")
    for host in ("0.0.0.0:8080", "10.1.2.3:8080", "[fe80::1]:8080", "localhost"):
        assert wsgi_call(served["app"], "GET", "/api/studies", HTTP_HOST=host)[0].startswith("200"), host
    assert wsgi_call(served["app"], "GET", "/api/studies", HTTP_HOST="gpu1.lab:8080")[0].startswith("403")
    served, _ = dashboard_cli(monkeypatch, capsys, running[0], "--host", "127.0.0.1")
    assert wsgi_call(served["app"], "GET", "/api/studies", HTTP_HOST="10.1.2.3:8080")[0].startswith("403")


def test_the_guard_passes_reads_and_named_hosts_only(running, monkeypatch, capsys):
    url, study, trial, kept = running
    sid, tid = study._study_id, trial._trial_id
    served, out = dashboard_cli(monkeypatch, capsys, url, "--allow-host", "dash.example")
    app = served["app"]
    for host in ("127.0.0.1:8080", "localhost", "[::1]:8080", "DASH.example:80"):
        status, _ = wsgi_call(app, "GET", "/api/studies", HTTP_HOST=host)
        assert status.startswith("200"), host
    status, answer = wsgi_call(app, "GET", "/api/studies", HTTP_HOST="attacker.example:8080")
    assert status.startswith("403")
    assert json.loads(answer)["reason"] == dashboard.FOREIGN_HOST.format(host="attacker.example")
    status, _ = wsgi_call(app, "GET", "/api/studies", HTTP_HOST="")
    assert status.startswith("400")
    note = {"version": 1, "body": "a note"}
    for method, path, body in [
        ("PUT", f"/api/studies/{sid}/note", note),
        ("PUT", f"/api/studies/{sid}/{tid}/note", note),
        ("POST", f"/api/studies/{sid}/{tid}/skip", {}),
        ("POST", "/api/studies", {"study_name": "x", "directions": ["maximize"]}),
        ("PATCH", f"/api/studies/{sid}", {}),
    ]:
        status, answer = wsgi_call(app, method, path, body)
        assert status.startswith("403"), (method, path, status)
        assert json.loads(answer)["reason"] == dashboard.READ_ONLY.format(method=method, path=path)
    assert optuna.get_all_study_names(url) == ["tiny"]
    assert not [k for k in study._storage.get_study_system_attrs(sid) if k.startswith("dashboard:")]  # no note

    served, _ = dashboard_cli(monkeypatch, capsys, url, "--allow-writes")
    status, answer = wsgi_call(
        app := served["app"], "PUT", f"/api/studies/{sid}/note", note, HTTP_ORIGIN="http://attacker.example"
    )
    assert status.startswith("403") and "origin 'http://attacker.example'" in json.loads(answer)["reason"]
    status, _ = wsgi_call(app, "PUT", f"/api/studies/{sid}/note", note, HTTP_ORIGIN="http://127.0.0.1:8080")
    assert status.startswith("204")
    assert [k for k in study._storage.get_study_system_attrs(sid) if k.startswith("dashboard:")]


def test_the_served_store_refuses_artifact_writes_unless_writable(running, tmp_path):
    """Behind the guard's reads-only rule, the store itself refuses artifact writes as well."""
    url, study, trial, kept = running
    sid, tid = study._study_id, trial._trial_id
    files = tmp_path / "studies" / "tiny" / "artifacts"
    before = sorted(p.name for p in files.iterdir())
    upload = {"file": "data:text/plain;base64," + base64.b64encode(b"a note").decode(), "filename": "note.txt"}
    store = artifacts.store_for(tmp_path / "studies" / "tiny")
    app = wsgi(open_storage(url, heartbeat=None), artifact_store=artifacts.ServedStore(store))
    for method, path, body, what in [
        ("POST", f"/api/artifacts/{sid}/{tid}", upload, "upload"),
        ("DELETE", f"/api/artifacts/{sid}/{tid}/{kept}", None, "delete"),
        ("DELETE", f"/api/studies/{sid}", None, "delete"),  # a study's deletion removes its artifacts first
    ]:
        status, answer = wsgi_call(app, method, path, body)
        assert status.startswith("403"), (method, path, status)
        assert json.loads(answer)["reason"] == artifacts.READ_ONLY.format(what=what)
    assert sorted(p.name for p in files.iterdir()) == before and optuna.get_all_study_names(url) == ["tiny"]

    app = wsgi(open_storage(url, heartbeat=None), artifact_store=artifacts.ServedStore(store, writable=True))
    status, answer = wsgi_call(app, "POST", f"/api/artifacts/{sid}/{tid}", upload)
    assert status.startswith("201")
    assert (files / json.loads(answer)["artifact_id"]).read_bytes() == b"a note"
    status, _ = wsgi_call(app, "DELETE", f"/api/artifacts/{sid}/{tid}/{kept}")
    assert status.startswith("204") and not (files / kept).exists()


# ---------------------------------------------------------------------------
# the running `search dashboard` process, over HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    """Start `search dashboard tiny` processes on free ports: `start(*flags) -> (port, its stdout)`."""
    procs: list[subprocess.Popen] = []

    def start(url: str, *flags: str) -> tuple[int, str]:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "search", "dashboard", "tiny", "--storage", url, "--port", str(port), *flags],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        procs.append(proc)
        first = proc.stdout.readline() + proc.stdout.readline()  # printed before it listens
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port, first
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"the dashboard did not listen on {port}: {first}")

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def request(port: int, method: str, path: str, body: dict | None = None, host: str | None = None):
    """(status, body) of one HTTP request to 127.0.0.1:port; `host` replaces the Host header."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", "Host": host or f"127.0.0.1:{port}"}
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    answer = conn.getresponse()
    data = answer.read()
    conn.close()
    return answer.status, data


@pytest.mark.slow  # two dashboard processes
def test_the_running_dashboard_refuses_writes_and_foreign_hosts(running, served):
    url, study, trial, kept = running
    sid, tid = study._study_id, trial._trial_id
    port, printed = served(url)
    assert "read-only: --allow-writes to change the study or its artifacts" in printed

    for method, path, body in [
        ("POST", f"/api/trials/{tid}/tell", {"state": "Complete", "values": [9.99]}),
        ("POST", f"/api/trials/{tid}/user-attrs", {"user_attrs": {"heartbeat_at": "x"}}),
        ("POST", f"/api/studies/{sid}/rename", {"study_name": "renamed"}),
        ("DELETE", f"/api/studies/{sid}", {"remove_associated_artifacts": False}),
        ("DELETE", f"/api/studies/{sid}", None),
        ("PUT", f"/api/studies/{sid}/{tid}/note", {"version": 1, "body": "x"}),
    ]:
        status, answer = request(port, method, path, body)
        assert status == 403, (method, path, answer)
        assert json.loads(answer)["reason"] == dashboard.READ_ONLY.format(method=method, path=path)
    [now] = study.get_trials()
    assert now.state == optuna.trial.TrialState.RUNNING and now.values is None
    assert "heartbeat_at" not in now.user_attrs
    assert optuna.get_all_study_names(url) == ["tiny"]

    status, answer = request(port, "GET", "/api/studies", host="attacker.example")
    assert status == 403 and b"attacker.example" in answer
    status, answer = request(port, "GET", "/dashboard", host=f"localhost:{port}")
    assert status == 200 and b"<html" in answer.lower()
    reads = ["/dashboard", f"/dashboard/studies/{sid}", "/static/bundle.js", "/api/meta", "/api/studies"]
    for path in [*reads, f"/api/studies/{sid}", f"/csv/{sid}"]:
        assert request(port, "GET", path)[0] == 200, path
    assert request(port, "HEAD", "/dashboard")[0] == 200
    assert request(port, "GET", f"/artifacts/{sid}/{tid}/{kept}") == (200, b'{"history": []}')
    status, answer = request(port, "GET", f"/csv/{sid}")
    assert status == 200 and b"Number" in answer

    port, printed = served(url, "--allow-writes", "--allow-host", "dash.example")
    assert "writes allowed" in printed
    assert request(port, "GET", "/api/studies", host="dash.example:8080")[0] == 200
    status, _ = request(port, "POST", f"/api/trials/{tid}/tell", {"state": "Complete", "values": [9.99]})
    assert status == 204
    [now] = study.get_trials()
    assert now.state == optuna.trial.TrialState.COMPLETE and now.values == [9.99]
