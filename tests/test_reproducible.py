"""Reproducible trials and per-trial sampler seeds: real processes, real storages."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from search import optuna_api, sampling, space
from search import study as st
from search.datasets import channels
from search.pool import parse_pool
from search.recipe import recipe_from_dict
from search.trials import counted
from tests.conftest import ROOT, run_cli, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow  # fresh processes and workers compared trial by trial

SPACE = {
    "preset": "quick",
    "overrides": {
        "optimizer": "adamw",
        "lr": {"low": 1e-3, "high": 1e-2, "log": True},
        "weight_decay": {"low": 1e-5, "high": 1e-2, "log": True},
        "batch_size": [16, 32],
    },
}


def _curves(url: str, name: str) -> list[tuple[int, dict, dict, str]]:
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    return [(t.number, t.params, t.intermediate_values, t.state.name) for t in trials]


def test_two_fresh_processes_give_identical_trials_and_best_yaml_reproduces_the_curve(tmp_path):
    recipe = tiny_recipe(
        name="twice",
        study={
            "n_trials": 8,
            "sampler": {"name": "tpe", "n_startup_trials": 3},
            "pruner": {"name": "median", "min_trials": 2},
        },
        data={"max_samples": 200},
        space=SPACE,
    )
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = []
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        write_recipe(tmp_path / d / "r.yaml", recipe)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "search", "run", "r.yaml", "-q"],
                cwd=tmp_path / d,
                env={**__import__("os").environ, **env},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-2000:]
    a, b = (_curves(f"sqlite:///{tmp_path / d}/studies/twice.db", "twice") for d in ("a", "b"))
    assert len(a) == 8 and a == b
    assert len({str(params) for _, params, _, _ in a}) == 8  # eight different configurations
    assert all(len(v) >= 1 for _, _, v, _ in a)

    best = run_cli("best", "twice", "--out", "best.yaml", cwd=tmp_path / "a", env=env)
    assert best.returncode == 0, best.stderr
    again = run_cli("run", "best.yaml", "-q", cwd=tmp_path / "a", env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    origin = optuna.load_study(study_name="twice", storage=f"sqlite:///{tmp_path}/a/studies/twice.db").best_trial
    [rerun] = optuna.load_study(
        study_name="twice-best", storage=f"sqlite:///{tmp_path}/a/studies/twice-best.db"
    ).get_trials()
    assert rerun.user_attrs["seed"] == origin.user_attrs["seed"]
    assert rerun.intermediate_values == origin.intermediate_values and rerun.value == origin.value


def _draw(study: optuna.Study, recipe, entries) -> optuna.Trial:
    """What the objective does before training: the trial's sampler seed, then the suggestions."""
    trial = study.ask()
    optuna_api.reseed_sampler(study.sampler, sampling.sampler_seed(recipe.study.seed, trial.number))
    space.suggest(trial, recipe.space, recipe.train, entries, channels(recipe.data))
    return trial


@pytest.mark.parametrize("sampler", ["random", "tpe", "qmc", "gp", "cmaes"])
def test_interleaved_workers_never_repeat_and_a_resume_replays_nothing(sampler, tmp_path):
    recipe = recipe_from_dict(
        tiny_recipe(name="s", study={"sampler": {"name": sampler, "n_startup_trials": 4}}, space=SPACE)
    )
    entries = parse_pool(recipe.pool)
    url = f"sqlite:///{tmp_path}/s.db"
    workers = [
        optuna.create_study(study_name="s", storage=url, load_if_exists=True, sampler=sampling.make_sampler(recipe))
        for _ in range(2)
    ]
    asked = [_draw(workers[i % 2], recipe, entries) for i in range(4)]  # 4 running at once, 2 processes
    for t in asked:
        workers[0].tell(t, t.params["lr"])
    for i in range(8):  # then one after the other, alternating
        t = _draw(workers[i % 2], recipe, entries)
        workers[i % 2].tell(t, t.params["lr"])
    params = [str(t.params) for t in workers[0].get_trials()]
    assert len(params) == 12 and len(set(params)) == 12, params


def test_random_sampler_resumed_gives_the_same_params_per_trial_number(tmp_path):
    recipe = recipe_from_dict(tiny_recipe(name="r", space=SPACE))
    entries = parse_pool(recipe.pool)

    def run(study: optuna.Study, n: int) -> None:
        for _ in range(n):
            t = _draw(study, recipe, entries)
            study.tell(t, t.params["lr"])

    whole = optuna.create_study(sampler=sampling.make_sampler(recipe))
    run(whole, 6)
    url = f"sqlite:///{tmp_path}/r.db"
    run(optuna.create_study(study_name="r", storage=url, sampler=sampling.make_sampler(recipe)), 3)
    resumed = optuna.load_study(study_name="r", storage=url, sampler=sampling.make_sampler(recipe))  # a new process
    run(resumed, 3)
    assert [t.params for t in resumed.get_trials()] == [t.params for t in whole.get_trials()]


def test_a_queued_trial_keeps_its_params_and_its_seed(tmp_path):
    url = f"sqlite:///{tmp_path}/q.db"
    recipe = recipe_from_dict(
        tiny_recipe(name="q", study={"n_trials": 2, "storage": url}, train={"epochs": 1}, data={"max_samples": 100})
    )
    study = st.open_study(recipe, url)
    study.enqueue_trial({"model": "mini_cnn", "lr": 0.003}, user_attrs={"seed": 12345})
    st.work(recipe, study, quiet=True)
    first, second = study.get_trials()
    assert first.state == second.state == TrialState.COMPLETE
    assert first.params["lr"] == 0.003 and first.user_attrs["seed"] == 12345
    assert second.user_attrs["seed"] == sampling.trial_seed(0, 1)


# TPE, the default sampler, end to end; every sampler's per-trial seeding is proven without processes
# by test_interleaved_workers_never_repeat_and_a_resume_replays_nothing.
@pytest.mark.parametrize("sampler", ["tpe"])
def test_four_workers_on_postgresql_never_repeat_a_configuration(sampler, tmp_path):
    from tests.test_storage import database

    with database("postgres") as url:
        write_recipe(
            tmp_path / "r.yaml",
            tiny_recipe(
                name="four",
                # 12 trials, 4 of them model-based (after 4 random ones), 1 epoch of the smallest model:
                # enough for 4 workers to ask at once and for TPE to model, little else to wait for.
                study={"n_trials": 12, "storage": url, "sampler": {"name": sampler, "n_startup_trials": 4}},
                data={"max_samples": 100},
                train={"epochs": 1},
                space=SPACE,
            ),
        )
        proc = run_cli("run", "r.yaml", "--workers", "4", "-q", cwd=tmp_path, timeout=600, env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        trials = optuna.load_study(study_name="four", storage=url).get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 12 and len(counted(trials)) == 12
    assert len({t.user_attrs["worker"] for t in done}) == 4  # all four took part
    configs = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(configs)) == 12, [c for c in configs if configs.count(c) > 1]
