from __future__ import annotations

import errno
import io
import json
import uuid
from pathlib import Path

import optuna
import pytest
import torch
from optuna.artifacts import upload_artifact

from search import artifacts, storage
from search.data import load_data
from search.models import build_model
from search.recipe import recipe_from_dict
from search.storage import open_storage
from search.study import load_stored
from search.train import FitResult, predict
from tests.conftest import tiny_recipe, wsgi_get


def kept(trial, store) -> bool:
    """Whether a checkpoint of the trial is still in the store (deleted ones stay listed on the trial)."""
    from optuna.artifacts.exceptions import ArtifactNotFound

    for meta in artifacts.checkpoint_meta(trial):
        try:
            store.open_reader(meta["artifact_id"]).close()
            return True
        except ArtifactNotFound:
            continue
    return False


def test_study_dir_follows_the_storage_file(tmp_path):
    assert storage.study_dir("x", storage.url_file("sqlite:///studies/x.db")) == storage.STUDIES / "x"
    assert storage.study_dir("x", storage.url_file(f"sqlite:///{tmp_path}/a/x.db")) == tmp_path / "a" / "x"
    assert storage.study_dir("x", storage.url_file("journal:///shared/j.log")) == Path("/shared/x")
    assert storage.study_dir("x", storage.url_file("postgresql+psycopg://u@h/db")) == storage.STUDIES / "x"
    study = optuna.create_study(study_name="x", storage=open_storage(f"sqlite:///{tmp_path}/a/x.db", heartbeat=None))
    assert storage.dir_of(study) == tmp_path / "a" / "x"


def _finishing(tmp_path, top_k: int):
    """(recipe, data, model, its weights, a study) for trials that end through artifacts.after_fit."""
    recipe = recipe_from_dict(tiny_recipe(study={"top_k": top_k}, data={"max_samples": 50}))
    data = load_data(recipe.data, 0)
    model = build_model("mini_cnn", num_classes=data.num_classes, in_chans=data.in_chans, resolution=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    study = optuna.create_study(
        study_name="tiny", direction="maximize", storage=open_storage(f"sqlite:///{tmp_path}/tiny.db", heartbeat=None)
    )
    return recipe, data, model, state, study


def test_only_the_top_k_checkpoints_stay_on_disk(tmp_path):
    """Trials finish in an order where earlier leaders drop out; their checkpoint files are deleted."""
    recipe, data, model, state, study = _finishing(tmp_path, top_k=2)
    values = [0.5, 0.7, 0.6, 0.9, 0.4, 0.8]
    for v in values:
        trial = study.ask()
        hist = [{"epoch": 1, "val_accuracy": v, "seconds": 0.1}]
        res = FitResult("ok", "", 1, {"accuracy": v}, {"accuracy": v}, hist, state)
        artifacts.after_fit(trial, recipe, model, recipe.train, data, res)
        study.tell(trial, v)
        artifacts.prune(study, artifacts.store_for(tmp_path / "tiny"), 2)  # once the end is told
    store = artifacts.store_for(tmp_path / "tiny")
    live = {t.number for t in study.get_trials() if kept(t, store)}
    assert live == {3, 5}  # 0.9 and 0.8
    # trial 4 (0.4) never entered the top 2: no checkpoint was written for it
    assert [len(artifacts.checkpoint_meta(t)) for t in study.get_trials()] == [1, 1, 1, 1, 0, 1]
    files = list((tmp_path / "tiny" / "artifacts").iterdir())
    assert len(files) == len(values) + 2  # every history, two checkpoints
    hist = [
        json.loads(store.open_reader(m.artifact_id).read())
        for t in study.get_trials()
        for m in optuna.artifacts.get_all_artifact_meta(t, storage=study._storage)
        if m.filename.endswith(artifacts.HISTORY_SUFFIX)
    ]
    assert [h["history"][0]["val_accuracy"] for h in hist] == values


def test_an_infeasible_trial_keeps_no_checkpoint_and_frees_its_place(tmp_path):
    """A trial that violates a constraint can never be chosen: it writes no checkpoint, and a
    feasible trial finishing after it takes the top-k place the infeasible one's value would hold."""
    recipe, data, model, state, study = _finishing(tmp_path, top_k=1)
    for v, feasible in ((0.9, False), (0.5, True)):
        trial = study.ask()
        trial.set_constraint("params", 0.0 if feasible else 1.0)  # as sampling.record_constraints stores it
        res = FitResult("ok", "", 1, {"accuracy": v}, {"accuracy": v}, [{"epoch": 1, "val_accuracy": v}], state)
        artifacts.after_fit(trial, recipe, model, recipe.train, data, res, feasible)
        study.tell(trial, v)
    assert [len(artifacts.checkpoint_meta(t)) for t in study.get_trials()] == [0, 1]
    assert artifacts.top_numbers(study, 1) == {1}  # the 0.9 trial is not ranked at all
    assert artifacts.top_numbers(study, 1, (2, 0.6)) == {2}


def test_no_checkpoints_when_top_k_is_zero(tmp_path):
    recipe, data, model, _, study = _finishing(tmp_path, top_k=0)
    trial = study.ask()
    artifacts.after_fit(
        trial,
        recipe,
        model,
        recipe.train,
        data,
        FitResult("ok", "", 1, {"accuracy": 1.0}, {"accuracy": 1.0}, [], model.state_dict()),
    )
    assert [p.suffix for p in (tmp_path / "tiny" / "artifacts").iterdir()] == [""]
    assert artifacts.checkpoint_meta(study.get_trials()[0]) == []


@pytest.mark.slow
def test_dashboard_serves_the_best_checkpoint_which_reproduces_its_score(demo_study):
    from optuna_dashboard import wsgi

    url = f"sqlite:///{demo_study}/studies/tiny.db"
    recipe, study = load_stored(url, "tiny")
    best = study.best_trial
    store = artifacts.store_for(demo_study / "studies" / "tiny")
    app = wsgi(open_storage(url, heartbeat=None), artifact_store=store)
    status, body = wsgi_get(app, f"/api/studies/{study._study_id}")
    assert status.startswith("200")
    trial = next(t for t in json.loads(body)["trials"] if t["number"] == best.number)
    names = sorted(a["filename"] for a in trial["artifacts"])
    assert names == [f"trial-{best.number}-best.pt", f"trial-{best.number}-history.json"]
    ckpt_id = next(a["artifact_id"] for a in trial["artifacts"] if a["filename"].endswith(".pt"))
    assert ckpt_id == best.user_attrs["checkpoint"]
    status, body = wsgi_get(app, f"/artifacts/{study._study_id}/{trial['trial_id']}/{ckpt_id}")
    assert status.startswith("200") and len(body) > 10_000

    model, ckpt = artifacts.load_checkpoint(body)
    assert ckpt["trial"] == best.number and ckpt["epoch"] == best.user_attrs["best_epoch"]
    assert ckpt["model"]["spec"] == "mini_cnn" and ckpt["model"]["dropout"] == best.params["dropout"]
    # The served weights are the best epoch's: they score the trial's value on the validation split again.
    data = load_data(recipe.data, recipe.study.seed)
    info = model.info
    logits = predict(model, data.val.x, info.resolution, info.mean, info.std, torch.device("cpu"), None, False)
    acc = float((logits.argmax(1) == data.val.y).float().mean())
    assert acc == pytest.approx(best.value, abs=1e-6)

    status, body = wsgi_get(
        app, f"/artifacts/{study._study_id}/{trial['trial_id']}/{'0' * 8}-0000-0000-0000-{'0' * 12}"
    )
    assert status.startswith("404")


def test_malformed_artifact_records_are_skipped_with_a_warning(tmp_path, caplog):
    """Records in a shared database are anyone's to write: no filename, an id that climbs out of
    the store, or not JSON at all must not fail the trials that read them."""
    import logging
    import uuid

    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    good = {"artifact_id": str(uuid.uuid4()), "filename": "trial-0-best.pt"}
    bad = {
        "artifacts:a": json.dumps({"artifact_id": "../../etc/passwd", "filename": "x-best.pt"}),
        "artifacts:b": json.dumps({"artifact_id": str(uuid.uuid4())}),  # no filename
        "artifacts:c": "not json",
        "artifacts:d": json.dumps(good),
    }
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/a.db", direction="maximize")
    study.add_trial(
        create_trial(
            state=TrialState.COMPLETE,
            value=0.5,
            params={"lr": 0.1},
            distributions={"lr": FloatDistribution(0.01, 1.0)},
            system_attrs=bad,
        )
    )
    with caplog.at_level(logging.WARNING, logger="search"):
        assert artifacts.checkpoint_meta(study.trials[0]) == [good]
        assert artifacts.prune(study, artifacts.store_for(tmp_path / "s"), k=0) == []  # the good one: not there
    assert sum("malformed" in r.message for r in caplog.records) == 6  # three bad records, read twice
    assert not (tmp_path / "etc").exists()


class Source(io.RawIOBase):
    """Bytes to upload that check, as they are read, that nothing is at `final` yet; and fail
    with a full disk after `fail_after` bytes when given."""

    def __init__(self, data: bytes, final, fail_after: int | None = None) -> None:
        self.data, self.final, self.fail_after, self.pos = data, final, fail_after, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        assert not self.final.exists(), "a reader could see a partial artifact"
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = min(len(b), len(self.data) - self.pos, 1000)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def test_an_artifact_appears_whole_or_not_at_all(tmp_path):
    store = artifacts.store_for(tmp_path)
    data = bytes(range(256)) * 40  # 10 kB, read in 1 kB pieces
    aid = str(uuid.uuid4())
    final = tmp_path / "artifacts" / aid
    with pytest.raises(OSError, match="No space left"):  # a full disk half-way: no file, no temporary file
        store.write(aid, Source(data, final, fail_after=5000))
    assert list(final.parent.iterdir()) == []
    store.write(aid, Source(data, final))  # checks at every read that nothing is at `final` yet
    assert [p.name for p in final.parent.iterdir()] == [aid] and final.read_bytes() == data


def test_an_artifact_is_recorded_only_once_written(tmp_path, monkeypatch):
    store = artifacts.store_for(tmp_path / "x")
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/x.db", heartbeat=None))
    trial = study.ask()
    (tmp_path / "upload.bin").write_bytes(b"x" * 1000)

    def full_disk(src, dst, *args):
        dst.write(src.read(10))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts.shutil, "copyfileobj", full_disk)
    with pytest.raises(OSError, match="No space left"):
        upload_artifact(artifact_store=store, file_path=str(tmp_path / "upload.bin"), study_or_trial=trial)
    assert list((tmp_path / "x" / "artifacts").iterdir()) == [] and artifacts.records(study.trials[0]) == []
    monkeypatch.undo()
    aid = upload_artifact(artifact_store=store, file_path=str(tmp_path / "upload.bin"), study_or_trial=trial)
    [record] = artifacts.records(study.trials[0])
    assert record["artifact_id"] == aid and (tmp_path / "x" / "artifacts" / aid).read_bytes() == b"x" * 1000
