"""optuna-dashboard on a study, through its JSON API (WSGI, in-process), as `search dashboard` serves it."""

from __future__ import annotations

import base64
import io
import json
import shutil
import sys
from wsgiref.util import setup_testing_defaults

import optuna
import optuna_dashboard
import pytest
from optuna.artifacts import upload_artifact
from optuna_dashboard import wsgi

from search import artifacts, cli
from search.objective import FIRST_ATTRS
from search.recipe import recipe_from_dict
from search.storage import open_storage
from search.study import open_study
from tests.conftest import tiny_recipe, wsgi_get

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
        assert len(attrs) <= 26, sorted(attrs)
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
# `search dashboard` itself: what it serves, and what it says (run_server replaced: nothing listens)


def wsgi_call(app, method: str, path: str, body: dict | None = None) -> tuple[str, bytes]:
    """`method` `path` with a JSON body, to a WSGI app in-process: (status line, body)."""
    data = json.dumps(body).encode() if body is not None else b""
    env: dict = {}
    setup_testing_defaults(env)
    env.update(
        PATH_INFO=path,
        QUERY_STRING="",
        REQUEST_METHOD=method,
        CONTENT_TYPE="application/json",
        CONTENT_LENGTH=str(len(data)),
        **{"wsgi.input": io.BytesIO(data), "wsgi.errors": sys.stderr},
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


def dashboard(monkeypatch, capsys, url: str, *flags: str) -> tuple[dict, str]:
    """`search dashboard tiny --storage URL FLAGS`: (what it hands run_server, its stderr)."""
    served: dict = {}
    monkeypatch.setattr(optuna_dashboard, "run_server", lambda storage, **kw: served.update(storage=storage, **kw))
    capsys.readouterr()
    assert cli.main(["dashboard", "tiny", "--storage", url, *flags]) == 0
    return served, capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "warned"),
    [("0.0.0.0", True), ("::", True), ("10.1.2.3", True), ("127.0.0.1", False), ("localhost", False)],
)
def test_the_dashboard_warns_when_others_can_reach_it(running, monkeypatch, capsys, host, warned):
    url = running[0]
    served, err = dashboard(monkeypatch, capsys, url, "--host", host, "--port", "8123")
    assert served["host"] == host and served["port"] == 8123
    if not warned:
        assert err == ""
        return
    shown = f"[{host}]" if ":" in host else host
    assert err.splitlines() == [
        f"warning: optuna-dashboard has no authentication; anyone who reaches {shown}:8123 can delete "
        f"studies and trials and change notes in {url}. Keep it on a private network, or serve on "
        "127.0.0.1 and reach it through an SSH tunnel."
    ]
    _, err = dashboard(monkeypatch, capsys, url, "--host", host, "--allow-writes")
    assert "can upload and delete artifacts, delete studies and trials" in err and len(err.splitlines()) == 1


def test_the_dashboard_serves_artifacts_read_only_unless_allowed(running, monkeypatch, capsys, tmp_path):
    url, study, trial, kept = running
    sid, tid = study._study_id, trial._trial_id
    files = tmp_path / "studies" / "tiny" / "artifacts"
    before = sorted(p.name for p in files.iterdir())
    upload = {"file": "data:text/plain;base64," + base64.b64encode(b"a note").decode(), "filename": "note.txt"}

    served, _ = dashboard(monkeypatch, capsys, url)
    app = wsgi(served["storage"], artifact_store=served["artifact_store"])
    for method, path, body, what in [
        ("POST", f"/api/artifacts/{sid}/{tid}", upload, "upload"),
        ("POST", f"/api/artifacts/{sid}", upload, "upload"),
        ("DELETE", f"/api/artifacts/{sid}/{tid}/{kept}", None, "delete"),
        ("DELETE", f"/api/studies/{sid}", None, "delete"),  # a study's deletion removes its artifacts first
    ]:
        status, answer = wsgi_call(app, method, path, body)
        assert status.startswith("403"), (method, path, status)
        assert json.loads(answer)["reason"] == artifacts.READ_ONLY.format(what=what)
    assert sorted(p.name for p in files.iterdir()) == before and optuna.get_all_study_names(url) == ["tiny"]
    status, answer = wsgi_get(app, f"/artifacts/{sid}/{tid}/{kept}")
    assert status.startswith("200") and answer == b'{"history": []}'  # still served

    served, _ = dashboard(monkeypatch, capsys, url, "--allow-writes")
    app = wsgi(served["storage"], artifact_store=served["artifact_store"])
    status, answer = wsgi_call(app, "POST", f"/api/artifacts/{sid}/{tid}", upload)
    assert status.startswith("201")
    new = json.loads(answer)["artifact_id"]
    assert (files / new).read_bytes() == b"a note"
    status, _ = wsgi_call(app, "DELETE", f"/api/artifacts/{sid}/{tid}/{kept}")
    assert status.startswith("204") and not (files / kept).exists()
