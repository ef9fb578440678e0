"""optuna-dashboard on a study, through its JSON API (WSGI, in-process), as `search dashboard` serves it."""

from __future__ import annotations

import json
import shutil

import pytest
from optuna_dashboard import wsgi

from search import artifacts
from search.objective import FIRST_ATTRS
from search.storage import open_storage
from tests.conftest import wsgi_get

pytestmark = pytest.mark.slow  # the dashboard over a study run through the CLI

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
