from __future__ import annotations

import csv
import sqlite3
import statistics

import matplotlib.image
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from search import cli, progress, report, selection, space
from search.errors import SearchError
from search.recipe import load_recipe, recipe_from_dict
from search.storage import open_storage
from search.study import load_stored
from search.text import shorten
from tests.conftest import pool_trial, run_inline, tiny_recipe

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _load(cwd):
    return load_stored(f"sqlite:///{cwd}/studies/tiny.db", "tiny")


def _assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, (path, img.shape)
    assert img[..., :3].std() > 0.01, f"{path} is blank"


@pytest.mark.slow
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
    assert f"{max(values):.4f}" in text
    lines = text.splitlines()
    assert lines[3] == "weight source none (ImageNet overlap none):"
    assert lines[4].split()[:2] == ["mini_cnn", f"{max(values):.4f}"]
    first = lines[lines.index("top 2 trials:") + 3]
    assert first.split()[:5] == [
        "1",
        str(ranked[0].number),
        "mini_cnn",
        f"{ranked[0].value:.4f}",
        str(ranked[0].user_attrs["best_epoch"]),
    ]
    assert all(len(line) <= 100 for line in lines)


@pytest.mark.slow
def test_report_command_writes_tables_and_plots(demo_study):
    proc = run_inline("report", "tiny", cwd=demo_study)
    assert proc.returncode == 0, proc.stderr
    assert "leaderboard (validation accuracy)" in proc.stdout and "top 3 trials:" in proc.stdout
    out = demo_study / "studies" / "tiny" / "report"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["leaderboard.md", "leaderboard.csv", "trials.csv", *report.PLOTS]
    )
    recipe, study = _load(demo_study)
    with (out / "leaderboard.csv").open() as f:
        [row] = list(csv.DictReader(f))
    assert row["entry"] == "mini_cnn" and float(row["best"]) == study.best_value and row["complete"] == "3"
    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["value"]) for r in rows] == [t.value for t in study.get_trials()]
    assert [(r["source"], r["overlap"]) for r in rows] == [("none", "none")] * 3
    assert (
        "parameter importances (fANOVA over 3 complete trials; under 20: a rough hint, not a ranking):" in proc.stdout
    )
    assert [float(r["lr"]) for r in rows] == [t.params["lr"] for t in study.get_trials()]
    md = (out / "leaderboard.md").read_text()
    assert "| mini_cnn |" in md and "![history](history.png)" in md
    for name in report.PLOTS:
        _assert_png(out / name)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_report_on_a_running_study(demo_study, tmp_path):
    """A trial still running (with two epochs reported) shows up in the counts and the curves."""
    with sqlite3.connect(demo_study / "studies" / "tiny.db") as src, sqlite3.connect(tmp_path / "tiny.db") as dst:
        src.backup(dst)  # a live SQLite file is copied whole, its write-ahead log included
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
    running = report.running_text(study, recipe)
    assert running[0] == "running now (1):" and running[3].split()[:4] == [
        str(trial.number),
        "mini_cnn",
        "1/2",
        "0.3000",
    ]
    assert "running now (1):" in report.report_text(study, recipe)
    files = report.write_report(study, recipe, tmp_path / "report")
    with (tmp_path / "report" / "trials.csv").open() as f:
        assert [r["state"] for r in csv.DictReader(f)] == ["COMPLETE"] * 3 + ["RUNNING"]
    for f in files:
        if f.suffix == ".png":
            _assert_png(f)


def test_report_of_a_study_without_results_yet(tmp_path):
    """No complete trial: tables are empty, plots say why, importances explain what they need."""
    recipe = recipe_from_dict(tiny_recipe())
    study = optuna.create_study(
        study_name="tiny", direction="maximize", storage=open_storage(f"sqlite:///{tmp_path}/tiny.db", heartbeat=None)
    )
    t = study.ask()
    t.suggest_categorical("model", ["mini_cnn"])
    study.tell(t, state=TrialState.PRUNED)
    assert report.importances(study) == "parameter importances need at least 2 complete trials, found 0"
    assert report.top_text(study, recipe, 3) == ["top trials: none yet, no trial has completed (1 pruned)"]
    assert "top 3 trials" not in report.report_text(study, recipe)
    assert "No complete trial yet (1 pruned)." in report.markdown(study, recipe)
    files = report.write_report(study, recipe, tmp_path / "report")
    assert len(files) == 3 + len(report.PLOTS)
    for f in files[3:]:
        _assert_png(f)
    with pytest.raises(SearchError, match="has no complete trial yet"):
        selection.best_trial(study, recipe)


def test_progress_line():
    study = optuna.create_study(direction="maximize")
    t = study.ask()
    t.suggest_categorical("model", ["mini_cnn"])
    t.set_user_attr("pool_label", "mini_cnn")
    t.set_user_attr("epochs", 2)
    t.set_user_attr("sec_per_epoch", 1.125)
    study.tell(t, 0.875)
    line = progress.trial_line(study, study.trials[0], 3, 12, "accuracy")
    assert line == ("[##........] 3/12 trial   0 mini_cnn             val_accuracy 0.8750  best 0.8750 (trial 0)  2.2s")
    t = study.ask()
    t.suggest_categorical("model", ["mini_cnn"])
    t.set_user_attr("pool_label", "timm/convnext_tiny.fb_in22k_ft_in1k@112")
    t.set_user_attr("fail_reason", "invalid combination: " + "x" * 200)
    study.tell(t, state=TrialState.FAIL)
    long = progress.trial_line(study, study.trials[1], 30, 120, "accuracy")
    assert (
        len(long) == 100
        and long.endswith("…  0.0s")
        and f"trial   1 {shorten(t.user_attrs['pool_label'], 20)} failed: invalid" in long
    )
    t = study.ask()  # ended before sampling: nothing to say
    study.tell(t, state=TrialState.FAIL)
    assert progress.trial_line(study, study.trials[2], 3, 12, "accuracy") == ""


@pytest.mark.slow
def test_best_yaml_reads_as_the_winner(demo_study, tmp_path, capsys):
    """train: holds the winning values (first, under a comment), the pool the winning entry,
    nothing is sampled, the seed is pinned, the header names the trial and its metric."""
    url = f"sqlite:///{demo_study}/studies/tiny.db"
    out = tmp_path / "best.yaml"
    assert cli.main(["best", "tiny", "--storage", url, "--out", str(out)]) == 0
    recipe, study = _load(demo_study)
    best = study.best_trial
    printed = capsys.readouterr().out
    assert f"best trial {best.number} (mini_cnn, val accuracy {best.value:.4f})" in printed
    content = out.read_text()
    assert content.startswith(
        f"# Best trial {best.number} of study 'tiny': mini_cnn, val accuracy "
        f"{best.value:.4f} (epoch {best.user_attrs['best_epoch']}), "
        f"seed {best.user_attrs['seed']}.\n"
    )
    won = {k: v for k, v in best.params.items() if k != "model"}
    raw = yaml.safe_load(content)
    assert list(raw)[:2] == ["pool", "train"] and raw["pool"] == ["mini_cnn"]
    assert list(raw["train"])[:4] == list(won) and {k: raw["train"][k] for k in won} == won
    assert raw["train"]["optimizer"] == "adamw" and raw["train"]["epochs"] == 2  # the recipe's, kept
    assert raw["train"]["momentum"] == recipe.train.momentum  # not in effect for adamw: as in the trial
    assert raw["space"] == {"preset": "none", "overrides": {}}
    assert raw["study"]["trial_seed"] == best.user_attrs["seed"] and raw["study"]["origin"] == "tiny"
    lines = content.splitlines()
    assert lines[lines.index("train:") + 1] == f"  # trial {best.number}'s values, sampled by the search:"
    assert all(len(line) <= 100 for line in lines)

    fixed = load_recipe(out)
    assert (fixed.study.name, fixed.study.n_trials, fixed.study.origin) == ("tiny-best", 1, "tiny")
    assert space.resolve(fixed.space, fixed.train) == ({}, {})  # nothing sampled, nothing left in overrides
    assert {k: getattr(fixed.train, k) for k in won} == won
    assert fixed.data == recipe.data and fixed.train.model_dump() == {**recipe.train.model_dump(), **won}


def test_best_of_a_focal_trial_exports_a_recipe_that_loads(tmp_path):
    """label_smoothing 0.1 in train acts in the ce trials only; the best focal trial's recipe must load."""
    from optuna.distributions import CategoricalDistribution

    from search.selection import best_recipe
    from tests.conftest import tiny_recipe

    recipe = recipe_from_dict(
        tiny_recipe(space={"preset": "quick", "overrides": {"loss": ["ce", "focal"]}}, train={"label_smoothing": 0.1})
    )
    study = optuna.create_study(direction="maximize")
    dists = {"model": CategoricalDistribution(["mini_cnn"]), "loss": CategoricalDistribution(["ce", "focal"])}
    study.add_trial(
        optuna.trial.create_trial(params={"model": "mini_cnn", "loss": "focal"}, distributions=dists, value=0.9)
    )
    exported = recipe_from_dict(best_recipe(study, recipe, study.trials[0]))
    assert space.resolve(exported.space, exported.train) == ({}, {})
    assert exported.train.loss == "focal" and exported.train.label_smoothing == 0.0


def test_curves_show_one_epoch_trials_as_markers(tmp_path):
    """A trial pruned after its first epoch is one point: drawn with a marker, not an invisible line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipe = recipe_from_dict(tiny_recipe())
    study = optuna.create_study(direction="maximize")
    for state, curve in ((TrialState.COMPLETE, {1: 0.5, 2: 0.7}), (TrialState.PRUNED, {1: 0.2})):
        pool_trial(study, 0.7 if state == TrialState.COMPLETE else None, state=state, intermediate_values=curve)
    fig, ax = plt.subplots()
    report.plot_curves(study, recipe, ax)
    lines = ax.get_lines()
    assert [list(ln.get_xdata()) for ln in lines] == [[1, 2], [1]]
    one = lines[1]
    assert one.get_marker() == "o" and one.get_markersize() >= 3 and one.get_linestyle() == "--"
    assert list(one.get_ydata()) == [0.2]
    plt.close(fig)


def test_importances_say_how_many_trials_they_rest_on(tmp_path):
    dists = {
        "model": optuna.distributions.CategoricalDistribution(["mini_cnn"]),
        "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
        "dropout": optuna.distributions.FloatDistribution(0.0, 0.5),
    }

    def study_of(n):
        s = optuna.create_study(direction="maximize")
        for i in range(n):
            lr, dropout = 1e-4 * 1.4**i, (i * 7 % 10) / 20
            params = {"model": "mini_cnn", "lr": lr, "dropout": dropout}
            s.add_trial(optuna.trial.create_trial(value=lr * 10 + dropout / 100, params=params, distributions=dists))
        return s

    few = " ".join(line.strip() for line in report.importance_text(study_of(5)))
    assert (
        few.startswith("parameter importances (fANOVA over 5 complete trials; under 20: a rough hint, not a ranking): ")
        and "lr 0." in few
        and "dropout 0." in few
    )
    many = " ".join(line.strip() for line in report.importance_text(study_of(20)))
    assert many.startswith("parameter importances (fANOVA over 20 complete trials): lr ")
    imp = report.importances(study_of(20))
    assert list(imp)[0] == "lr" and imp["lr"] > 0.5  # the value follows lr above all


def test_leaderboard_groups_entries_by_weight_source():
    recipe = recipe_from_dict(tiny_recipe())
    study = optuna.create_study(direction="maximize")
    dist = {"model": optuna.distributions.CategoricalDistribution(["a", "b", "c"])}
    for label, source, overlap, v in (
        ("a", "in1k", "full", 0.9),
        ("b", "none", "none", 0.95),
        ("c", "in1k", "full", 0.8),
        ("b", "none", "none", 0.85),
    ):
        pool_trial(study, v, label, dists=dist, attrs={"weight_source": source, "imagenet_overlap": overlap})
    lines = report.leaderboard_text(study, recipe).splitlines()
    assert [line.split()[0] if line.startswith("  ") else line for line in lines[3:]] == [
        "weight source none (ImageNet overlap none):",
        "b",
        "weight source in1k (ImageNet overlap full):",
        "a",
        "c",
    ]
    assert report.source_rows(study, recipe) == [
        ["none", "none", "b", "0.9500", 2],
        ["in1k", "full", "a, c", "0.9000", 2],
    ]
    assert "| in1k | full | a, c | 0.9000 | 2 |" in report.markdown(study, recipe)
