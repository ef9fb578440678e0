"""Choosing a winner: confirmation over seeds, intervals, winner stability, several objectives,
constraints, the Pareto front, `best --pick`, `retrain --seeds`."""

from __future__ import annotations

import json
import math

import matplotlib.image
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from scipy import stats

from search import confirm, confirmed, report, sampling, selection, storage
from search import stats as search_stats
from search import study as st
from search.errors import SearchError
from search.recipe import recipe_from_dict
from search.trials import counted, feasible, finished, ranked
from tests.conftest import pool_trial, run_inline, tiny_recipe, write_recipe, wsgi_get
from tests.test_retrain import spied_test_split  # noqa: F401 - the fixture

DISTS = {"model": CategoricalDistribution(["mini_cnn", "resnet_18"]), "lr": FloatDistribution(1e-4, 1e-1, log=True)}


def _constructed(tmp_path, spread):
    """A main study of 3 trials and a companion with the given further runs: {trial: [values]}."""
    recipe = recipe_from_dict(tiny_recipe(study={"name": "c", "storage": f"sqlite:///{tmp_path}/c.db"}))
    study = st.open_study(recipe)
    for i, vals in enumerate(spread):
        pool_trial(study, vals[0], params={"lr": 1e-3 * (i + 1)}, dists=DISTS, attrs={"seed": i})
    comp = confirm.create_companion(study)
    for n, vals in enumerate(spread):
        for i, v in enumerate(vals[1:], start=1):
            comp.add_trial(
                create_trial(
                    value=v,
                    params={"model": "mini_cnn", "lr": 1e-3 * (n + 1)},
                    distributions=DISTS,
                    user_attrs={"confirms": n, "seed_index": i},
                )
            )
    return recipe, study


def test_intervals_equal_scipy_from_the_stored_runs(tmp_path):
    spread = [[0.90, 0.86, 0.88, 0.91], [0.93, 0.80, 0.84, 0.83], [0.70, 0.72, 0.71, 0.69]]
    recipe, study = _constructed(tmp_path, spread)
    rows = selection.confirmed_rows(study, recipe)
    assert [r["trial"] for r in rows] == [0, 1, 2]  # by mean: 0.8875, 0.85, 0.705
    for r in rows:
        vals = spread[r["trial"]]
        assert r["values"] == vals and r["seeds"] == 4
        lo, hi = stats.t.interval(0.95, len(vals) - 1, loc=stats.tmean(vals), scale=stats.sem(vals))
        assert r["mean"] == pytest.approx(sum(vals) / 4)
        assert r["std"] == pytest.approx(stats.tstd(vals))
        assert (r["low"], r["high"]) == (pytest.approx(lo), pytest.approx(hi))
    # The single best trial (0.93) is trial 1; the confirmed rule picks trial 0.
    t, rule = selection.best_choice(study, recipe)
    assert t.number == 0 and "confirmed mean" in rule and "3 confirmed" in rule
    text = selection.confirmed_text(study, recipe)
    assert "Student-t 95%" in text and f"[{rows[0]['low']:.4f}, {rows[0]['high']:.4f}]" in text
    assert "mini_cnn trial 0 (0.8875)" in text and all(len(line) <= 100 for line in text.splitlines())


def test_winner_stability_on_a_known_spread(tmp_path, monkeypatch):
    # A's mean 0.86 tops B's 0.85; A beats B's constant 0.85 in 2 of its 3 runs; C never competes.
    spread = [[0.90, 0.80, 0.88], [0.85, 0.85, 0.85], [0.50, 0.51, 0.52]]
    recipe, study = _constructed(tmp_path, spread)
    top, share, how = selection.stability(selection.confirmed_rows(study, recipe), recipe)
    assert (top, how) == (0, "exact") and share == pytest.approx(2 / 3)
    # A tie for first counts as a share: A = [0.85, 0.87] against B = [0.85]: (1/2 + 1) / 2.
    assert search_stats.winner_stability({"a": [0.85, 0.87], "b": [0.85]}) == ("a", pytest.approx(0.75), "exact")
    assert "winner stability: trial 0 is first in 66.7% of draws" in selection.confirmed_text(study, recipe)
    monkeypatch.setattr(search_stats, "EXACT_LIMIT", 1)
    top, share, how = search_stats.winner_stability({i: v for i, v in enumerate(spread)})
    assert top == 0 and how == f"resampled {search_stats.RESAMPLES}" and share == pytest.approx(2 / 3, abs=0.015)


@pytest.mark.slow
def test_confirmation_runs_are_not_sampled_counted_or_tested(tmp_path, monkeypatch, spied_test_split):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    recipe = recipe_from_dict(
        tiny_recipe(study={"n_trials": 3, "confirm": {"top_k": 2, "seeds": 3}, "top_k": 1}, data={"max_samples": 120})
    )
    study = st.open_study(recipe)
    st.work(recipe, study, quiet=True)
    assert [r for r in spied_test_split if r[2] != "__len__"] == []  # neither search nor confirmation read test
    main = study.get_trials(deepcopy=False)
    assert len(main) == 3 and len(counted(main)) == 3 and finished(study) == 3  # nothing added, nothing counted
    assert all("confirms" not in t.user_attrs for t in main)
    comp = confirmed.companion(study)
    runs = comp.get_trials(deepcopy=False)
    top2 = [t.number for t in ranked(study)[:2]]
    assert sorted(confirmed.key(t) for t in runs) == sorted((n, i) for n in top2 for i in (1, 2))
    for t in runs:
        src = main[t.user_attrs["confirms"]]
        assert t.state == TrialState.COMPLETE and t.params == src.params
        assert t.user_attrs["seed"] == confirm.confirm_seed(src.user_attrs["seed"], t.user_attrs["seed_index"])
        assert t.user_attrs["seed"] != src.user_attrs["seed"] and "checkpoint" not in t.user_attrs
    # The main study's sampler sees its own trials only; another worker finds nothing left to do.
    assert st.work(recipe, study, quiet=True) == 0 and len(comp.get_trials(deepcopy=False)) == 4
    # Queueing again is idempotent; a racing duplicate ends at once without training.
    assert confirm.enqueue(study, 2, 3) == 0
    rows = selection.confirmed_rows(study, recipe)
    assert [r["seeds"] for r in rows] == [3, 3]


def test_infeasible_trials_are_never_best(tmp_path):
    recipe = recipe_from_dict(
        tiny_recipe(
            study={"name": "f", "storage": f"sqlite:///{tmp_path}/f.db", "constraints": {"params": {"max": 1e6}}}
        )
    )
    study = st.open_study(recipe)
    pool_trial(study, 0.99, "resnet_18", params={"lr": 1e-3}, dists=DISTS, system_attrs={"constraints:params": 10.2})
    pool_trial(study, 0.80, "mini_cnn", params={"lr": 1e-3}, dists=DISTS, system_attrs={"constraints:params": -0.9})
    pool_trial(study, 0.75, params={"lr": 1e-3}, dists=DISTS)
    assert selection.best_trial(study, recipe).number == 1
    assert [r["best"] for r in report.leaderboard(study, recipe)] == [0.80, None]
    assert [t.number for t in ranked(study)] == [1, 2]
    assert sampling.constraint_values(recipe.study.constraints, {"params": 2e6}) == {"params": pytest.approx(1.0)}
    assert sampling.constraint_values(recipe.study.constraints, {"params": 5e5}) == {"params": pytest.approx(-0.5)}
    assert [t.number for t in study.best_trials] == [1]  # Optuna reads the same stored values


def test_pareto_front_and_pick():
    pts = [(0.9, 5.0), (0.8, 1.0), (0.85, 6.0), (0.9, 4.0), (0.7, 0.5)]
    assert selection.pareto_front(pts, ["maximize", "minimize"]) == [1, 3, 4]
    assert selection.parse_pick("latency_ms<=5, params < 1e6") == [("latency_ms", "<=", 5.0), ("params", "<", 1e6)]
    with pytest.raises(SearchError, match="expected NAME OP NUMBER"):
        selection.parse_pick("latency_ms=<5")


@pytest.mark.slow
def test_a_pruner_or_cmaes_with_several_objectives_is_one_line(tmp_path):
    r = tiny_recipe(study={"objectives": ["accuracy", "latency_ms"], "pruner": "median"})
    proc = run_inline("validate", str(write_recipe(tmp_path / "r.yaml", r)))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.rstrip().endswith("(Optuna cannot prune multi-objective trials); set study.pruner: none")
    r["study"].update(pruner="none", sampler="cmaes")
    proc = run_inline("validate", str(write_recipe(tmp_path / "r.yaml", r)))
    assert proc.returncode == 2 and "optimizes one objective only" in proc.stderr and "nsga2" in proc.stderr
    r["study"].update(sampler="nsga2", objectives=["latency_ms", "accuracy"])
    proc = run_inline("validate", str(write_recipe(tmp_path / "r.yaml", r)))
    assert proc.returncode == 2 and "put one of accuracy" in proc.stderr
    r["study"].update(objectives=["accuracy"], constraints={"loss": {"max": 1}})
    proc = run_inline("validate", str(write_recipe(tmp_path / "r.yaml", r)))
    assert proc.returncode == 2 and "measured before training" in proc.stderr


@pytest.mark.slow
def test_multi_objective_study_end_to_end(tmp_path):
    r = tiny_recipe(
        "mo",
        study={
            "n_trials": 4,
            "objectives": ["accuracy", "latency_ms"],
            "sampler": {"name": "tpe", "n_startup_trials": 2},
            "constraints": {"params": {"max": 1.0e6}},
        },
        pool=["mini_cnn", {"model": "resnet_18", "pretrained": False}],
        data={"max_samples": 150},
        train={"epochs": 1},
    )
    write_recipe(tmp_path / "mo.yaml", r)
    proc = run_inline("run", "mo.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    url = f"sqlite:///{tmp_path}/studies/mo.db"
    recipe, study = st.load_stored(url, "mo")
    assert study.metric_names == ["accuracy", "latency_ms"] and len(study.directions) == 2
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert len(trials) == 4
    for t in trials:  # the sampler was handed the constraint values the trial stored
        assert t.user_attrs["latency_ms"] == t.values[1] > 0 and "throughput" not in t.user_attrs
        assert t.user_attrs["flops"] > 0  # what TPE's start-up shares the two pool entries by
        assert set(t.constraints) == {"params", "out_of_memory"}  # as Optuna's samplers read them
        assert t.constraints["params"] == pytest.approx(t.user_attrs["params"] / 1e6 - 1)
    front = selection.front_trials(study, recipe)
    assert front and all(feasible(t) for t in front)
    assert all(t.user_attrs["pool_label"] == "mini_cnn" for t in front)  # resnet_18 (11M params) is infeasible

    proc = run_inline("report", "mo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    front_text = proc.stdout[proc.stdout.index("Pareto front:") :].split("\n\n")[0]
    assert all(len(line) <= 100 for line in front_text.splitlines())
    assert all(f"{t.number:>5} mini_cnn" in front_text for t in front)
    png = tmp_path / "studies" / "mo" / "report" / "pareto.png"
    assert png.stat().st_size > 10_000 and matplotlib.image.imread(png).shape[0] > 300

    proc = run_inline("best", "mo", cwd=tmp_path)
    assert proc.returncode == 2 and "Pareto front" in proc.stderr and "--pick" in proc.stderr.splitlines()[-1]
    slowest = max(t.values[1] for t in front)
    proc = run_inline("best", "mo", "--pick", f"latency_ms<={slowest}", "--out", "b.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    chosen = max(front, key=lambda t: (t.values[0], -t.number))
    assert f"best trial {chosen.number} " in proc.stdout and "on the Pareto front" in proc.stdout
    fastest = min(front, key=lambda t: t.values[1])
    picked = selection.pick(study, recipe, f"latency_ms<={fastest.values[1]}")
    assert picked.values[0] == max(t.values[0] for t in front if t.values[1] <= fastest.values[1])
    with pytest.raises(SearchError, match="no trial on the Pareto front meets it"):
        selection.pick(study, recipe, "latency_ms<=0")

    from optuna_dashboard import wsgi

    status, body = wsgi_get(wsgi(storage.open_storage(url, heartbeat=None)), f"/api/studies/{study._study_id}")
    assert status.startswith("200")
    assert json.loads(body)["objective_names"] == ["accuracy", "latency_ms"]


@pytest.mark.slow
def test_retrain_over_seeds_records_each_and_the_interval(tmp_path, monkeypatch):
    from search import cli

    monkeypatch.chdir(tmp_path)
    recipe = recipe_from_dict(tiny_recipe(study={"n_trials": 1}, data={"max_samples": 100}))
    st.work(recipe, st.open_study(recipe), quiet=True)
    assert cli.main(["best", "tiny", "--out", "best.yaml"]) == 0
    assert cli.main(["retrain", "best.yaml", "--seeds", "3"]) == 0
    study = optuna.load_study(study_name="tiny", storage="sqlite:///studies/tiny.db")
    rec = study.user_attrs["retrain"]
    assert [r["seed"] for r in rec["seeds"]] == [0, 1, 2] and rec["checkpoint"].startswith("model.pt: seed 0")
    accs = [r["test_metrics"]["test_accuracy"] for r in rec["seeds"]]
    s = rec["test_summary"]["test_accuracy"]
    lo, hi = stats.t.interval(0.95, 2, loc=sum(accs) / 3, scale=stats.sem(accs))
    assert s["mean"] == pytest.approx(sum(accs) / 3) and s["std"] == pytest.approx(stats.tstd(accs))
    assert (s["low"], s["high"]) == (pytest.approx(lo), pytest.approx(hi)) or math.isnan(lo)
    assert rec["test_metrics"] == rec["seeds"][0]["test_metrics"]  # the kept model's numbers
