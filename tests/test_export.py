from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import optuna
import pytest
import torch
from PIL import Image

from search import artifacts, cli, export, predict
from search import data as datamod
from search.augment import eval_input
from search.data import folder
from search.errors import SearchError
from search.recipe import recipe_from_dict
from tests.conftest import built_once

ROOT = Path(__file__).resolve().parents[1]


def _winner(cwd: Path, demo: Path) -> None:
    """The demo study's winner, retrained: best -> retrain, in a copy of the study."""
    shutil.copytree(demo, cwd, dirs_exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        assert cli.main(["best", "tiny", "--out", "best.yaml"]) == 0
        assert cli.main(["retrain", "best.yaml"]) == 0


@pytest.fixture(scope="module")
def winner(tmp_path_factory, demo_study) -> Path:
    """Working directory with studies/tiny (3 trials) and its winner's retrain output."""
    return built_once(tmp_path_factory, "export-winner", lambda p: _winner(p, demo_study))


@pytest.fixture
def run(winner, tmp_path, monkeypatch) -> Path:
    """A private copy of the winner's working directory; returns the retrain directory in it."""
    shutil.copytree(winner, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    return Path("studies/tiny/retrain")


def _digit_pngs(recipe_file: Path, out: Path, n: int = 10) -> torch.Tensor:
    """The first n test images as PNGs in class folders (the image-folder layout); returns them (uint8)."""
    recipe = recipe_from_dict(json.loads(recipe_file.read_text()))
    test = datamod.load_data(recipe.data, recipe.study.seed).test
    for i in range(n):
        d = out / str(int(test.y[i]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.x[i, 0].numpy()).save(d / f"img{i:02d}.png")
    return test.x[:n]


@pytest.mark.slow
def test_export_of_the_winner_agrees_on_the_whole_test_split_and_predict_imports_no_torch(run, capsys, tmp_path):
    assert cli.main(["export", str(run)]) == 0
    out = capsys.readouterr().out
    meta = json.loads((run / "model.json").read_text())
    check = meta["check"]
    record = json.loads((run / "test_metrics.json").read_text())
    assert check["split"] == "test" and check["n"] == record["n_test"] > 0
    assert check["max_abs_logit_diff"] <= 1e-4 and check["argmax_agreement"] == 1.0
    assert f"max |logit difference| {check['max_abs_logit_diff']:.2e}" in out
    assert f"on the whole test split ({check['n']} images)" in out and "agreement 100.00%" in out
    assert meta["classes"] == [str(i) for i in range(10)] and meta["label"] == "mini_cnn"
    assert meta["input"] == {**meta["input"], "size": 8, "channels": 1, "fit": None, "name": "image"}
    assert meta["metrics"]["test_accuracy"] == record["test_metrics"]["test_accuracy"]
    assert meta["weight_source"] == "none" and meta["recipe_fingerprint"].startswith("sha256:")
    assert meta["pool_entry"] == "mini_cnn" and meta["metrics_split"] == "test"

    proto = onnx.load(run / "model.onnx")
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["search"]) == meta and json.loads(props["classes"]) == meta["classes"]
    from safetensors.torch import load_file

    model, _ = artifacts.load_checkpoint(run / "model.pt")
    saved = load_file(str(run / "model.safetensors"))
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())

    images = _digit_pngs(run / "recipe.json", tmp_path / "imgs")
    code = (
        "import sys; from search import cli\n"
        f"rc = cli.main(['predict', {str((run / 'model.onnx').resolve())!r}, {str(tmp_path / 'imgs')!r}, '-k', '3', "
        f"'--csv', {str(tmp_path / 'p.csv')!r}])\n"
        "print('torch loaded:', 'torch' in sys.modules); sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "torch loaded: False" in proc.stdout
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert list(rows[0]) == ["path", "top1", "p1", "top2", "p2", "top3", "p3"] and len(rows) == 10
    with torch.no_grad():
        logits = model.eval()(eval_input(images, 8, mean=model.info.mean, std=model.info.std))
    want = {f"img{i:02d}.png": (str(int(k)), float(p)) for i, (k, p) in enumerate(zip(*_top1(logits), strict=True))}
    for r in rows:
        top1, p1 = want[Path(r["path"]).name]
        assert r["top1"] == top1 and float(r["p1"]) == pytest.approx(p1, abs=2e-6)
        assert float(r["p1"]) >= float(r["p2"]) >= float(r["p3"])


def _top1(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = logits.double().softmax(1)
    return p.argmax(1), p.max(1).values


@pytest.mark.slow
def test_an_export_whose_onnx_differs_from_pytorch_is_refused(run, monkeypatch):
    real = export.to_onnx

    def drifted(model, example):
        blob = real(model, example)
        with torch.no_grad():  # one weight changes after the export: PyTorch and ONNX now differ
            model.fc.weight[0, 0] += 0.5
        return blob

    monkeypatch.setattr(export, "to_onnx", drifted)
    with pytest.raises(SearchError, match=r"differ from PyTorch's by up to .* over the tolerance 0\.0001; nothing"):
        export.export(export.from_retrain(run), say=lambda _: None)
    assert not (run / "model.onnx").exists() and not (run / "model.json").exists()
    assert cli.main(["export", str(run)]) == 2  # through the CLI: the one-line error


@pytest.mark.slow
def test_export_of_a_trial_checks_on_validation_and_bench_prints_both(run, capsys):
    study = optuna.load_study(study_name="tiny", storage="sqlite:///studies/tiny.db")
    kept = [t.number for t in study.trials if t.user_attrs.get("checkpoint")]
    assert kept
    assert cli.main(["export", "tiny", "--trial", str(kept[0]), "--bench", "3"]) == 0
    out = capsys.readouterr().out
    meta = json.loads(Path(f"studies/tiny/export/trial-{kept[0]}/model.json").read_text())
    assert meta["check"]["split"] == "val" and meta["metrics_split"] == "val" and meta["check"]["n"] > 0
    assert set(meta["bench_ms"]) == {"onnxruntime", "pytorch"}
    assert all(set(v) == {"batch_1", "batch_32"} and min(v.values()) > 0 for v in meta["bench_ms"].values())
    assert "CPU latency, median of 3 runs" in out and "PyTorch eager" in out
    assert all(len(line) <= 100 for line in out.splitlines())
    missing = [t.number for t in study.trials if not t.user_attrs.get("checkpoint")]
    if missing:
        with pytest.raises(SearchError, match="keeps no checkpoint"):
            export.from_trial("tiny", missing[0])
    with pytest.raises(SearchError, match="has no trial 99"):
        export.from_trial("tiny", 99)


def test_export_of_a_directory_that_is_no_retrain_output_names_what_it_lacks(tmp_path):
    with pytest.raises(SearchError, match="is not a retrain output: it lacks model.pt, recipe.json, test_metrics"):
        export.from_retrain(tmp_path)


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as when not installed
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(
        SearchError, match=r"onnxruntime is not installed; predict needs it: pip install 'search\[export\]'"
    ):
        predict.open_model(tmp_path)
    with pytest.raises(SearchError, match=r"export and predict need it: pip install 'search\[export\]'"):
        export.need("onnxruntime")


@pytest.mark.parametrize("size", [8, 16, 48])
def test_predict_input_equals_the_training_evaluation_input(size):
    """numpy + Pillow resize/normalise = augment.eval_input (shrinking antialiased, enlarging, equal)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 20, 20), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    meta = {"input": {"size": size, "mean": list(mean), "std": list(std)}}
    got = predict.model_input(x, meta)
    want = eval_input(torch.from_numpy(x)[None], size, mean=mean, std=std)[0].numpy()
    assert got.shape == want.shape == (3, size, size) and got.dtype == np.float32
    assert np.abs(got - want).max() < 1e-5


@pytest.mark.parametrize(("mode", "channels"), [("RGB", 3), ("L", 1), ("RGB", 1), ("I;16", 1)])
def test_predict_decodes_a_file_as_the_image_folder_does(tmp_path, mode, channels):
    rng = np.random.default_rng(1)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65536, (30, 45), dtype=np.uint16))
    else:
        im = Image.fromarray(rng.integers(0, 256, (30, 45, 3) if mode == "RGB" else (30, 45), dtype=np.uint8))
    path = tmp_path / "a.png"
    im.save(path)
    for fit in (None, 12):
        want = folder._decoded("x", path, "L" if channels == 1 else "RGB", fit)
        assert np.array_equal(predict.pixels(path, channels, fit), want)


def test_predict_finds_the_images_of_an_image_folder_and_refuses_what_is_not_one(tmp_path):
    for part, cls in (("train", "a"), ("train", "b"), ("test", "a")):
        (tmp_path / part / cls).mkdir(parents=True)
        Image.new("L", (4, 4)).save(tmp_path / part / cls / "x.png")
    (tmp_path / "train" / "a" / ".hidden.png").write_bytes(b"")
    (tmp_path / "train" / "notes.txt").write_text("")
    files = predict.image_files([str(tmp_path)])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["test/a/x.png", "train/a/x.png", "train/b/x.png"]
    with pytest.raises(SearchError, match="no such image file or folder"):
        predict.image_files([str(tmp_path / "nope.png")])
    with pytest.raises(SearchError, match="holds no image files"):
        predict.image_files([str(_empty(tmp_path))])
    with pytest.raises(SearchError, match="no ONNX model at"):
        predict.open_model(tmp_path)


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"
