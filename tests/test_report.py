from __future__ import annotations

import csv
import shutil
import statistics

import matplotlib.image
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from search import cli, report, space
from search.recipe import load_recipe, recipe_from_dict
from search.study import load_stored, open_storage
from tests.conftest import run_cli, tiny_recipe

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _load(cwd):
    return load_stored(f"sqlite:///{cwd}/studies/tiny.db", "tiny")


def _assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, (path, img.shape)
    assert img[..., :3].std() > 0.01, f"{path} is blank"


def test_leaderboard_numbers_equal_the_trials(demo_study):
    recipe, study = _load(demo_study)
    trials = study.get_trials()
    values = [t.value for t in trials if t.state == TrialState.COMPLETE]
    epochs = sum(t.user_attrs["epochs"] for t in trials)
    sec_per_epoch = sum(t.user_attrs["epochs"] * t.user_attrs["sec_per_epoch"] for t in trials) / epochs
    [row] = report.leaderboard(study, recipe)
    assert row["entry"] == "mini_cnn"
    assert row["best"] == max(values) and row["median"] == statistics.median(values)
    assert (row["complete"], row["pruned"], row["failed"], row["running"]) == (3, 0, 0, 0)
    assert row["sec_per_epoch"] == pytest.approx(sec_per_epoch)
    assert row["params"] == trials[0].user_attrs["params"] > 50_000
    assert (row["source"], row["overlap"]) == ("none", "none")
    top = report.top_trials(study, recipe, 2)
    ranked = sorted(trials, key=lambda t: (-t.value, t.number))
    assert [r["trial"] for r in top] == [t.number for t in ranked[:2]]
    assert top[0]["hyperparameters"] == {k: v for k, v in ranked[0].params.items() if k != "model"}
    assert set(top[0]["hyperparameters"]) == {"lr", "weight_decay", "batch_size", "dropout"}
    text = report.leaderboard_text(study, recipe, top=2)
    assert f"{max(values):.4f}" in text and f"#1 trial {ranked[0].number:>3} mini_cnn" in text


def test_report_command_writes_tables_and_plots(demo_study):
    proc = run_cli("report", "tiny", cwd=demo_study)
    assert proc.returncode == 0, proc.stderr
    assert "leaderboard (validation accuracy)" in proc.stdout and "top 3 trials:" in proc.stdout
    out = demo_study / "studies" / "tiny" / "report"
    assert sorted(p.name for p in out.iterdir()) == sorted(["leaderboard.md", "leaderboard.csv", "trials.csv",
                                                            *report.PLOTS])
    recipe, study = _load(demo_study)
    with (out / "leaderboard.csv").open() as f:
        [row] = list(csv.DictReader(f))
    assert row["entry"] == "mini_cnn" and float(row["best"]) == study.best_value and row["complete"] == "3"
    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["value"]) for r in rows] == [t.value for t in study.get_trials()]
    assert [float(r["lr"]) for r in rows] == [t.params["lr"] for t in study.get_trials()]
    md = (out / "leaderboard.md").read_text()
    assert "| mini_cnn |" in md and "![history](history.png)" in md
    for name in report.PLOTS:
        _assert_png(out / name)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_report_on_a_running_study(demo_study, tmp_path):
    """A trial still running (with two epochs reported) shows up in the counts and the curves."""
    shutil.copy(demo_study / "studies" / "tiny.db", tmp_path / "tiny.db")
    url = f"sqlite:///{tmp_path}/tiny.db"
    recipe, study = load_stored(url, "tiny")
    trial = study.ask()
    trial.suggest_categorical("model", ["mini_cnn"])
    trial.set_user_attr("pool_label", "mini_cnn")
    trial.set_user_attr("epochs", 1)
    trial.set_user_attr("sec_per_epoch", 0.5)
    trial.report(0.3, 1)
    [row] = report.leaderboard(study, recipe)
    assert (row["complete"], row["running"]) == (3, 1)
    assert "1 running" in report.leaderboard_text(study, recipe)
    files = report.write_report(study, recipe, tmp_path / "report")
    with (tmp_path / "report" / "trials.csv").open() as f:
        assert [r["state"] for r in csv.DictReader(f)] == ["COMPLETE"] * 3 + ["RUNNING"]
    for f in files:
        if f.suffix == ".png":
            _assert_png(f)


def test_report_of_a_study_without_results_yet(tmp_path):
    """No complete trial: tables are empty, plots say why, importances explain what they need."""
    recipe = recipe_from_dict(tiny_recipe())
    study = optuna.create_study(study_name="tiny", direction="maximize",
                                storage=open_storage(f"sqlite:///{tmp_path}/tiny.db", heartbeat=None))
    t = study.ask()
    t.suggest_categorical("model", ["mini_cnn"])
    study.tell(t, state=TrialState.PRUNED)
    assert report.importances(study) == "parameter importances need at least 2 complete trials, found 0"
    files = report.write_report(study, recipe, tmp_path / "report")
    assert len(files) == 3 + len(report.PLOTS)
    for f in files[3:]:
        _assert_png(f)
    with pytest.raises(report.SearchError, match="has no complete trial yet"):
        report.best_trial(study, recipe)


def test_progress_line():
    study = optuna.create_study(direction="maximize")
    t = study.ask()
    t.suggest_categorical("model", ["mini_cnn"])
    t.set_user_attr("pool_label", "mini_cnn")
    t.set_user_attr("epochs", 2)
    t.set_user_attr("sec_per_epoch", 1.125)
    study.tell(t, 0.875)
    line = report.trial_line(study, study.trials[0], 3, 12, "accuracy")
    assert line == ("[#####...............] 3/12  trial   0 mini_cnn                 val_accuracy 0.8750  "
                    "best 0.8750 (trial 0)  2.2s")
    t = study.ask()  # ended before sampling: nothing to say
    study.tell(t, state=TrialState.FAIL)
    assert report.trial_line(study, study.trials[1], 3, 12, "accuracy") == ""


def test_best_exports_a_recipe_that_searches_nothing(demo_study, tmp_path, capsys):
    url = f"sqlite:///{demo_study}/studies/tiny.db"
    out = tmp_path / "best.yaml"
    assert cli.main(["best", "tiny", "--storage", url, "--out", str(out)]) == 0
    recipe, study = _load(demo_study)
    best = study.best_trial
    assert f"best trial {best.number}" in capsys.readouterr().out
    assert out.read_text().startswith(f"# Best trial {best.number} of study 'tiny': mini_cnn")
    fixed = load_recipe(out)
    assert fixed.pool == ["mini_cnn"]
    assert (fixed.study.name, fixed.study.n_trials, fixed.study.origin) == ("tiny-best", 1, "tiny")
    sampled, values = space.resolve(fixed)
    assert sampled == {}
    assert {k: values[k] for k in best.params if k != "model"} == {k: v for k, v in best.params.items() if k != "model"}
    assert values["optimizer"] == "adamw"  # fixed in the original recipe, kept
    raw = yaml.safe_load(out.read_text())
    assert raw["space"]["overrides"]["momentum"] is None  # not in effect for adamw: the train default
    assert fixed.train == recipe.train and fixed.data == recipe.data


def test_best_of_a_focal_trial_exports_a_recipe_that_loads(tmp_path):
    """label_smoothing 0.1 in train acts in the ce trials only; the best focal trial's recipe must load."""
    from optuna.distributions import CategoricalDistribution

    from search.report import best_recipe
    from tests.conftest import tiny_recipe

    recipe = recipe_from_dict(tiny_recipe(space={"preset": "quick", "overrides": {"loss": ["ce", "focal"]}},
                                          train={"label_smoothing": 0.1}))
    study = optuna.create_study(direction="maximize")
    dists = {"model": CategoricalDistribution(["mini_cnn"]), "loss": CategoricalDistribution(["ce", "focal"])}
    study.add_trial(optuna.trial.create_trial(params={"model": "mini_cnn", "loss": "focal"}, distributions=dists,
                                              value=0.9))
    exported = recipe_from_dict(best_recipe(study, recipe, study.trials[0]))
    _, fixed = space.resolve(exported)
    assert fixed["loss"] == "focal" and fixed["label_smoothing"] == 0.0
