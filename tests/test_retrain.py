from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib.image
import optuna
import pytest
import torch

from search import artifacts, cli, metrics, retrain
from search import data as datamod
from search import study as st
from search.augment import AugmentCfg
from search.data import Split
from search.models import build_model
from search.recipe import load_recipe, recipe_from_dict
from search.train import predict
from tests.conftest import ROOT, run_cli, tiny_recipe, write_recipe


class SpySplit(Split):
    """A split that records who reads its images or labels (file, function)."""

    reads: list[tuple[str, str, str]] = []

    def __getattribute__(self, name):
        if name in ("x", "y"):
            code = sys._getframe(1).f_code
            SpySplit.reads.append((name, code.co_filename, code.co_name))
        return object.__getattribute__(self, name)


@pytest.fixture
def spied_test_split(monkeypatch):
    """Every Data the package loads carries a SpySplit as its test split."""
    real = datamod.load_data
    SpySplit.reads = []

    def load_data(cfg, seed=0):
        d = real(cfg, seed)
        return replace(d, test=SpySplit(d.test.x, d.test.y))

    monkeypatch.setattr(datamod, "load_data", load_data)
    monkeypatch.setattr(st, "load_data", load_data)
    return SpySplit.reads


@pytest.mark.slow
def test_best_then_retrain_reads_the_test_split_once(tmp_path, monkeypatch, spied_test_split, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = recipe_from_dict(tiny_recipe(study={"n_trials": 2}, data={"max_samples": 100}))
    st.work(recipe, st.open_study(recipe), quiet=True)
    assert [r for r in spied_test_split if r[2] != "__len__"] == []  # the search never read the test split

    calls = []
    real_eval = retrain.evaluate_test
    monkeypatch.setattr(retrain, "evaluate_test", lambda *a: calls.append(1) or real_eval(*a))
    assert cli.main(["best", "tiny", "--out", "best.yaml"]) == 0
    assert cli.main(["retrain", "best.yaml"]) == 0
    out = capsys.readouterr().out

    assert len(calls) == 1
    reads = [r for r in spied_test_split if r[2] != "__len__"]  # len() tells the size, not the data
    assert reads and {(f, fn) for _, f, fn in reads} == {(retrain.__file__, "evaluate_test")}
    assert {name for name, _, _ in reads} == {"x", "y"}

    study = optuna.load_study(study_name="tiny", storage="sqlite:///studies/tiny.db")
    record = study.user_attrs["retrain"]
    saved = json.loads((tmp_path / "studies/tiny/retrain/test_metrics.json").read_text())
    assert record == saved
    assert record["split"] == "test" and record["pool_label"] == "mini_cnn" and record["epochs"] == 2
    assert set(record["test_metrics"]) == {
        "test_loss",
        "test_accuracy",
        "test_balanced_accuracy",
        "test_f1",
        "test_auc",
    }
    acc = record["test_metrics"]["test_accuracy"]
    assert 0.0 <= acc <= 1.0 and f"test_accuracy {acc:.4f}" in out
    best = study.best_trial
    assert record["hyperparameters"]["lr"] == best.params["lr"]
    png = tmp_path / "studies/tiny/retrain/confusion.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and matplotlib.image.imread(png).shape[0] > 100
    names = {m.filename for m in optuna.artifacts.get_all_artifact_meta(study)}
    assert names == {"test_metrics.json", "confusion.png", "model.pt"}

    # The final checkpoint is the evaluated model: it scores the recorded accuracy on the test split.
    model, ckpt = artifacts.load_checkpoint(tmp_path / "studies/tiny/retrain/model.pt")
    d = datamod.load_data(load_recipe(tmp_path / "best.yaml").data, 0)
    info = model.info
    logits = predict(model, d.test.x, info.resolution, info.mean, info.std, torch.device("cpu"), None, False)
    assert float((logits.argmax(1) == d.test.y).float().mean()) == pytest.approx(acc, abs=1e-6)
    assert len(d.test) == record["n_test"] == 269  # 15 % of 1,797 digits, stratified

    # The terminal report shows the test result next to the validation leaderboard.
    capsys.readouterr()
    assert cli.main(["report", "tiny"]) == 0
    shown = capsys.readouterr().out
    assert (
        f"test split (by retrain, evaluated once, n=269): mini_cnn trained on train+val for 2 epochs, seed 0:\n"
        f"  test_loss {record['test_metrics']['test_loss']:.4f}  test_accuracy {acc:.4f}"
    ) in shown


def test_retrain_refuses_a_recipe_that_still_searches(tmp_path):
    f = write_recipe(
        tmp_path / "search.yaml", tiny_recipe(pool=["mini_cnn", {"model": "resnet_18", "pretrained": False}])
    )
    with pytest.raises(
        retrain.SearchError, match=r"found 2 pool entries; export one with `\S*python\S* -m search best"
    ):
        retrain.retrain(load_recipe(f))
    with pytest.raises(
        retrain.SearchError, match=r"found sampled parameters lr, weight_decay, batch_size, dropout; export"
    ):
        retrain.retrain(load_recipe(write_recipe(tmp_path / "one.yaml", tiny_recipe())))
    # A sampled optimizer: momentum's condition reads it and must not fail on its absence.
    f = write_recipe(tmp_path / "opt.yaml", tiny_recipe(space={"preset": "quick", "overrides": {"lr": 0.003}}))
    with pytest.raises(retrain.SearchError, match=r"found sampled parameters optimizer, weight_decay, momentum, "):
        retrain.retrain(load_recipe(f))


def test_retrain_needs_its_origin_study(tmp_path):
    f = write_recipe(
        tmp_path / "b.yaml",
        tiny_recipe(
            study={"name": "x-best", "origin": "x"},
            space={"preset": "quick", "overrides": FIXED},
        ),
    )
    with pytest.raises(retrain.SearchError, match=r"study.origin: no study database at .*s\.db; .*remove study.origin"):
        retrain.retrain(load_recipe(f), storage=f"sqlite:///{tmp_path}/s.db")
    assert not (tmp_path / "s.db").exists()  # a misspelt origin creates no database
    optuna.create_study(study_name="y", storage=f"sqlite:///{tmp_path}/s.db")
    with pytest.raises(retrain.SearchError, match=r"study.origin: no study 'x' in sqlite:///.*studies there: y"):
        retrain.retrain(load_recipe(f), storage=f"sqlite:///{tmp_path}/s.db")


FIXED = {
    "optimizer": "adamw",
    "lr": 0.003,
    "weight_decay": 0.0,
    "batch_size": 32,
    "dropout": 0.0,
    "momentum": None,
    "backbone_lr_mult": None,
}


def fixed_recipe(path, epochs: int = 1):
    """A recipe as `best` exports it: one pool entry, nothing sampled."""
    space = {"preset": "quick", "overrides": FIXED}
    return write_recipe(path, tiny_recipe(study={"name": "fixed"}, space=space, train={"epochs": epochs}))


@pytest.mark.slow  # two retrain processes
def test_retrain_stopped_by_sigterm_goes_on_with_the_next_seed(tmp_path):
    fixed_recipe(tmp_path / "fixed.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "search", "retrain", "fixed.yaml", "--seeds", "3"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("test, seed 0"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    partial = tmp_path / "studies/fixed/retrain.partial"
    assert err.strip().splitlines() == [
        "retrain stopped (SIGTERM): seed 0 kept in studies/fixed/retrain.partial; run the same command again to go on"
    ]
    assert "test, seed 1" not in rest  # stopped inside seed 1
    assert sorted(p.name for p in partial.iterdir()) == ["seed-0.json", "seed-0.pt"]
    assert not (tmp_path / "studies/fixed/retrain").exists()  # nothing half written
    first = json.loads((partial / "seed-0.json").read_text())["test_metrics"]

    again = run_cli("retrain", "fixed.yaml", "--seeds", "3", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr
    assert "seed 0: tested in an earlier run; kept, not trained again" in again.stdout
    assert "seed 0 epoch" not in again.stdout and "seed 1 epoch   1/1" in again.stdout
    assert "seed 2 epoch   1/1" in again.stdout
    out = tmp_path / "studies/fixed/retrain"
    record = json.loads((out / "test_metrics.json").read_text())
    assert [r["seed"] for r in record["seeds"]] == [0, 1, 2] and record["test_metrics"] == first
    assert not partial.exists() and sorted(p.name for p in out.parent.iterdir()) == ["artifacts", "retrain"]

    # model.pt is the model the record describes: its digest, and its score on the test split.
    assert hashlib.sha256((out / "model.pt").read_bytes()).hexdigest() == record["model_sha256"]
    model, _ = artifacts.load_checkpoint(out / "model.pt")
    d = datamod.load_data(load_recipe(tmp_path / "fixed.yaml").data, 0)
    logits = predict(
        model, d.test.x, model.info.resolution, model.info.mean, model.info.std, torch.device("cpu"), None, False
    )
    assert float((logits.argmax(1) == d.test.y).float().mean()) == pytest.approx(first["test_accuracy"], abs=1e-6)


def test_a_seed_kept_for_another_recipe_is_trained_again(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = fixed_recipe(tmp_path / "fixed.yaml")
    partial = tmp_path / "studies/fixed/retrain.partial"
    partial.mkdir(parents=True)
    (partial / "seed-0.json").write_text(json.dumps({"key": "another", "seed": 0, "test_metrics": {}}))
    said = []
    record = retrain.retrain(load_recipe(f), say=said.append)
    assert not any("earlier run" in line for line in said) and any("seed 0 epoch   1/1" in line for line in said)
    assert record["epochs"] == 1 and not partial.exists()
    assert (tmp_path / "studies/fixed/retrain/model.pt").is_file()


def test_retrain_tta_flip_reports_both_sets_and_the_plain_one_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = recipe_from_dict(
        tiny_recipe(space={"preset": "quick", "overrides": FIXED}, data={"max_samples": 150}, train={"epochs": 1})
    )
    plain = retrain.retrain(recipe, storage="sqlite:///plain.db", say=lambda _: None)
    lines: list[str] = []
    with_tta = retrain.retrain(recipe, storage="sqlite:///tta.db", say=lines.append, tta="flip")
    assert with_tta["test_metrics"] == plain["test_metrics"]  # bit for bit: the same floats
    assert "tta" not in plain and "test_metrics_tta" not in plain
    tta = with_tta["test_metrics_tta"]
    assert with_tta["tta"] == "flip" and set(tta) == set(plain["test_metrics"])
    assert tta != plain["test_metrics"] and 0.0 <= tta["test_accuracy"] <= 1.0
    assert with_tta["seeds"][0]["test_metrics_tta"] == tta
    text = "\n".join(lines)
    assert "test, seed 0 (official split, evaluated once):" in text
    assert "test with TTA flip, seed 0 (image and mirror image, probabilities averaged; never selected on):" in text
    assert "note: digits trains without flips" in text and all(len(x) <= 100 for x in text.splitlines())
    saved = json.loads((Path(with_tta["dir"]) / "test_metrics.json").read_text())
    assert saved["test_metrics_tta"] == tta
    with pytest.raises(retrain.SearchError, match="retrain --tta crop: unknown test-time augmentation; allowed: flip"):
        retrain.retrain(recipe, storage="sqlite:///tta.db", tta="crop")


def test_tta_averages_the_probabilities_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = build_model("mini_cnn", num_classes=3, in_chans=1, resolution=8).eval()
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    split = Split(x, torch.arange(6) % 3)
    data = datamod.Data("d", split, split, split, ("a", "b", "c"), "none", AugmentCfg(), 8)
    plain, cm, tta = retrain.evaluate_test(model, data, torch.device("cpu"), "flip")
    info = model.info
    p = [
        predict(model, v, 8, info.mean, info.std, torch.device("cpu"), None, False).softmax(1) for v in (x, x.flip(-1))
    ]
    want = metrics.evaluate(((p[0] + p[1]) / 2).log(), data.test.y)
    assert tta == pytest.approx(want, abs=1e-6) and plain == retrain.evaluate_test(model, data, torch.device("cpu"))[0]
