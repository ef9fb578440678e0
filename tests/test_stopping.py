"""A study that stops itself (search.stopping): patience and Optuna's Terminator."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution

from search import confirm
from search.recipe import recipe_from_dict
from search.stopping import closing, patience, seed_spread, terminator
from tests.conftest import run_inline, tiny_recipe, write_recipe


@pytest.mark.parametrize(
    ("values", "maximize", "expected"),
    [
        ([0.5, 0.6, 0.61, 0.6, None], True, "in the last 3 finished trials (best 0.6)"),  # 0.61 is within delta
        ([0.5, 0.6, 0.61, 0.7], True, None),
        ([0.5, None, None], True, None),  # two without improvement: not yet three
        ([None, None, None], True, None),  # nothing to improve on yet
        ([1.0, 0.9, 0.95, 0.91, 0.99], False, "in the last 3 finished trials (best 0.9)"),
    ],
)
def test_patience_counts_finished_trials_since_the_last_real_improvement(values, maximize, expected):
    why = patience(values, 3, 0.05, maximize)
    assert why == (None if expected is None else f"patience: no improvement beyond 0.05 {expected}")


def test_a_patience_rule_stops_the_study_and_the_report_says_why(tmp_path):
    stop = {"patience": 2, "min_delta": 0.5}  # nothing beats the first trial by 0.5: 1 + 2 trials
    write_recipe(tmp_path / "p.yaml", tiny_recipe("p", study={"n_trials": 10, "stop": stop}, train={"epochs": 1}))
    proc = run_inline("run", "p.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name="p", storage=f"sqlite:///{tmp_path}/studies/p.db")
    assert len(study.get_trials()) == 3
    reason = "patience: no improvement beyond 0.5 in the last 2 finished trials"
    assert study.user_attrs["ended"].startswith(reason)
    assert f"the search stopped taking trials: {reason}" in proc.stdout
    report = run_inline("report", "p", cwd=tmp_path)
    assert f"ended before 10 trials: {reason}" in report.stdout


def _study_with_seeds(tmp_path, spread: float) -> tuple[optuna.Study, object]:
    """12 complete trials of a smooth 1-D curve, the best three confirmed over 3 seeds each."""
    recipe = recipe_from_dict(tiny_recipe("term", study={"stop": {"terminator": True, "min_trials": 10}}))
    study = optuna.create_study(study_name="term", storage=f"sqlite:///{tmp_path}/t.db", direction="maximize")
    dist = {"x": FloatDistribution(0, 1)}
    for i in range(12):
        x = i / 11
        study.add_trial(optuna.create_trial(params={"x": x}, distributions=dist, value=0.9 - (x - 0.5) ** 2))
    c = confirm.companion(study, create=True)
    for t in sorted(study.trials, key=lambda t: -t.value)[:3]:
        for i, d in ((1, spread), (2, -spread)):
            attrs = {"confirms": t.number, "seed_index": i}
            c.add_trial(optuna.create_trial(params=t.params, distributions=dist, value=t.value + d, user_attrs=attrs))
    return study, recipe


def test_the_terminator_takes_the_spread_of_the_confirmation_seeds_as_the_error(tmp_path):
    study, recipe = _study_with_seeds(tmp_path, spread=0.3)
    assert seed_spread(study, recipe) == pytest.approx(0.3)
    why = terminator(study, recipe, recipe.study.stop, study.get_trials())
    assert why is not None and why.startswith("terminator: regret bound ")
    assert why.endswith("below the error 0.3 (the spread of the confirmation seeds)")
    assert closing(recipe, study)(study.get_trials()) == why


def test_the_terminator_goes_on_while_the_error_is_small_or_trials_are_few(tmp_path):
    study, recipe = _study_with_seeds(tmp_path, spread=1e-9)
    assert terminator(study, recipe, recipe.study.stop, study.get_trials()) is None
    assert terminator(study, recipe, recipe.study.stop, study.get_trials()[:9]) is None  # under min_trials
