from __future__ import annotations

import json

import optuna
import pytest
from optuna.trial import TrialState

from search import artifacts, workers
from search.objective import FIRST_ATTRS
from search.storage import open_storage
from search.trials import counted
from tests.conftest import run_inline, wsgi_get

ATTRS = {
    "pool_label",
    "params",
    "epochs",
    "sec_per_epoch",
    "seed",
    "weight_source",
    "imagenet_overlap",
    "fail_reason",
    "input_resolution",
    "channel_reduce",
    "device",
}


def _study(cwd):
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{cwd}/studies/tiny.db")


@pytest.mark.slow
def test_run_records_trials_with_attrs(demo_study):
    study = _study(demo_study)
    trials = study.get_trials()
    assert len(trials) == 3
    assert all(t.state == TrialState.COMPLETE for t in trials)
    stored = study.user_attrs["recipe"]
    assert stored["study"]["n_trials"] == 3 and stored["pool"] == ["mini_cnn"]
    for t in trials:
        assert ATTRS <= set(t.user_attrs), ATTRS - set(t.user_attrs)
        assert t.user_attrs["pool_label"] == "mini_cnn"
        history = artifacts.history_of(study, t)  # the per-epoch records: an artifact, not an attribute
        assert len(history) == 2 == len(t.intermediate_values) == t.user_attrs["epochs"]
        assert t.value == max(h["val_accuracy"] for h in history) == max(t.intermediate_values.values())
        assert t.user_attrs["sec_per_epoch"] == round(sum(h["seconds"] for h in history) / 2, 3)
        assert set(FIRST_ATTRS) <= set(t.user_attrs) and t.user_attrs["fail_reason"] is None
        assert 0.0 <= t.value <= 1.0
    assert len({t.user_attrs["seed"] for t in trials}) == 3


@pytest.mark.slow
def test_second_run_keeps_total(demo_study):
    proc = run_inline("run", "tiny.yaml", cwd=demo_study)
    assert proc.returncode == 0, proc.stderr
    assert "0 of 3 trials to run" in proc.stdout
    assert "mini_cnn" in proc.stdout  # the leaderboard
    assert len(_study(demo_study).get_trials()) == 3
    assert len(optuna.get_all_study_summaries(f"sqlite:///{demo_study}/studies/tiny.db")) == 1


@pytest.mark.slow
def test_raising_the_total_continues_a_changed_recipe_is_refused(tmp_path):
    from tests.conftest import tiny_recipe, write_recipe

    write_recipe(tmp_path / "r.yaml", tiny_recipe(study={"n_trials": 1}, train={"epochs": 1}))
    assert run_inline("run", "r.yaml", cwd=tmp_path).returncode == 0
    proc = run_inline("run", "r.yaml", "--set", "study.n_trials=2", "--set", "train.epochs=2", cwd=tmp_path)
    assert proc.returncode == 2 and "different recipe" in proc.stderr and "train.epochs: 1 -> 2" in proc.stderr
    proc = run_inline("run", "r.yaml", "--set", "study.n_trials=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/studies/tiny.db")
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 2


@pytest.mark.slow
def test_dashboard_serves_the_study(demo_study):
    from optuna_dashboard import wsgi

    app = wsgi(open_storage(f"sqlite:///{demo_study}/studies/tiny.db", heartbeat=None))
    status, body = wsgi_get(app, "/api/studies")
    assert status.startswith("200")
    studies = json.loads(body)["study_summaries"]
    assert [s["study_name"] for s in studies] == ["tiny"]
    status, body = wsgi_get(app, f"/api/studies/{studies[0]['study_id']}")
    assert status.startswith("200")
    detail = json.loads(body)
    assert len(detail["trials"]) == 3
    t0 = detail["trials"][0]
    assert len(t0["intermediate_values"]) == 2
    keys = {a["key"] for a in t0["user_attrs"]}
    assert {"pool_label", "params", "epochs"} <= keys


def _dead_trial_retried(tmp_path, **over):
    """A study whose trial 0 reported 0.111 at epoch 1 and died; its retry is queued. (study, recipe)"""
    from search import study as st
    from search.pool import parse_pool
    from search.recipe import recipe_from_dict
    from search.space import suggest
    from tests.conftest import tiny_recipe

    recipe = recipe_from_dict(tiny_recipe(train={"epochs": 3}, **over))
    study = st.open_study(recipe, f"journal:{tmp_path}/j.log")
    dead = study.ask()
    suggest(dead, recipe.space, recipe.train, parse_pool(recipe.pool), 1)  # digits: 1 channel
    dead.set_user_attr("seed", 777)
    dead.report(0.111, 1)
    study.tell(dead, state=TrialState.FAIL)
    return study, recipe


@pytest.mark.slow
def test_a_retry_reruns_the_dead_trials_seed_and_reports_only_later_epochs(tmp_path, monkeypatch):
    import warnings

    from search import study as st

    monkeypatch.chdir(tmp_path)
    study, recipe = _dead_trial_retried(tmp_path, study={"n_trials": 1})
    workers.retry(study, study.get_trials()[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert st.work(recipe, study, quiet=True) == 1
    assert not [w for w in caught if "already reported" in str(w.message)]
    rerun = study.get_trials()[1]
    assert rerun.state == TrialState.COMPLETE and rerun.user_attrs["retry_of"] == 0
    assert rerun.params == study.get_trials()[0].params and rerun.user_attrs["seed"] == 777
    history = artifacts.history_of(study, rerun)
    assert len(history) == 3 == rerun.user_attrs["epochs"]  # the training ran again from epoch 1 ...
    assert (
        sorted(rerun.intermediate_values) == [1, 2, 3] and rerun.intermediate_values[1] == 0.111
    )  # ... epoch 1 stands
    assert rerun.intermediate_values[3] == history[2]["val_accuracy"]


@pytest.mark.slow
def test_a_retry_is_not_pruned_on_the_dead_runs_epochs(tmp_path, monkeypatch):
    # A finished trial far better at every epoch: a median pruner judging the inherited 0.111 at
    # epoch 1 would prune the rerun there. The dead run passed epoch 1; the rerun is judged from epoch 2.
    from search import study as st

    monkeypatch.chdir(tmp_path)
    study, recipe = _dead_trial_retried(
        tmp_path, study={"n_trials": 2, "pruner": {"name": "median", "warmup_epochs": 0, "min_trials": 1}}
    )
    dead = study.get_trials()[0]
    study.add_trial(
        optuna.create_trial(
            state=TrialState.COMPLETE,
            value=0.99,
            params=dead.params,
            distributions=dead.distributions,
            user_attrs={"seed": 1},
            intermediate_values={1: 0.99, 2: 0.99, 3: 0.99},
        )
    )
    workers.retry(study, dead)
    assert st.work(recipe, study, quiet=True) == 1
    rerun = study.get_trials()[2]
    assert rerun.user_attrs["retry_of"] == 0 and rerun.user_attrs["epochs"] >= 2
    assert rerun.user_attrs.get("fail_reason") != "pruned at epoch 1"


@pytest.mark.slow
def test_a_diverged_trial_is_one_progress_line_not_a_traceback(tmp_path):
    from tests.conftest import tiny_recipe, write_recipe

    space = {"preset": "quick", "overrides": {"optimizer": "sgd", "lr": 1e38, "weight_decay": 0.0, "batch_size": [32]}}
    write_recipe(tmp_path / "r.yaml", tiny_recipe(study={"n_trials": 1}, space=space))
    proc = run_inline("run", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "failed: diverged at epoch" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr and "failed with value None" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_out_of_memory_at_the_smallest_micro_batch_reaches_the_sampler_as_infeasible(tmp_path, monkeypatch):
    # "too_big" stands for a model that fits no micro-batch: its training forward raises CUDA's
    # out-of-memory error (what a CPU cannot produce for real) through the real fit and objective.
    import torch
    from optuna.samplers._tpe.sampler import _get_infeasible_trial_score, _split_trials

    from search import objective, space
    from search import study as st
    from search.datasets import channels
    from search.pool import parse_pool
    from search.recipe import recipe_from_dict
    from tests.conftest import tiny_recipe

    real_build = objective.build_model

    def build(entry, **kw):
        model = real_build(entry, **kw)
        if entry.label == "too_big":

            def oom(module, args):
                if module.training:
                    raise torch.OutOfMemoryError(f"CUDA out of memory ({len(args[0])} images)")

            model.register_forward_pre_hook(oom)
        return model

    monkeypatch.setattr(objective, "build_model", build)
    monkeypatch.chdir(tmp_path)
    recipe = recipe_from_dict(
        tiny_recipe(
            study={"n_trials": 6}, pool=["mini_cnn", {"model": "mini_cnn", "label": "too_big"}], train={"epochs": 1}
        )
    )
    study = st.open_study(recipe, f"journal:{tmp_path}/j.log")
    lines = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert st.work(recipe, study) == 6
    trials = study.get_trials()
    big = [t for t in trials if t.user_attrs["pool_label"] == "too_big"]
    fits = [t for t in trials if t.user_attrs["pool_label"] == "mini_cnn"]
    assert big and fits, [t.params for t in trials]  # the random sampler drew both
    for t in big:  # ends PRUNED (what samplers read), with the reason and the constraint violated
        assert t.state == TrialState.PRUNED and t.user_attrs["status"] == "oom"
        assert t.user_attrs["fail_reason"] == "out of memory at batch size 32 in micro-batches of 1"
        assert t.user_attrs["micro_batch"] == 1 and t.constraints == {"out_of_memory": 1.0}
    for t in fits:
        assert t.state == TrialState.COMPLETE and t.constraints == {"out_of_memory": 0.0}
        assert t.user_attrs["micro_batch"] == 32
    assert any("infeasible: out of memory at batch size 32" in line for line in lines), lines
    assert len(counted(trials)) == 6 and study.best_trial.user_attrs["pool_label"] == "mini_cnn"

    # What TPE receives: the stored COMPLETE and PRUNED trials; the OOM ones as infeasible, all
    # on the "bad" side of its split, so it proposes the feasible entry.
    received = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert {t.number for t in received} == {t.number for t in trials}
    assert {t.number for t in received if _get_infeasible_trial_score(t) > 0} == {t.number for t in big}
    below, above = _split_trials(study, received, n_below=len(fits))
    assert {t.number for t in below} == {t.number for t in fits} and {t.number for t in big} <= {
        t.number for t in above
    }
    tpe = optuna.load_study(
        study_name=study.study_name,
        storage=study._storage,
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=0),
    )
    entries = parse_pool(recipe.pool)
    drawn = []
    for _ in range(12):
        t = tpe.ask()
        drawn.append(space.suggest(t, recipe.space, recipe.train, entries, channels(recipe.data))[0].label)
        tpe.tell(t, state=TrialState.FAIL)  # FAIL: invisible to the sampler, the stored trials stay its data
    assert drawn.count("too_big") <= 2, drawn


@pytest.mark.slow
def test_fail_stale_and_confirm_refuse_values_that_would_hurt_the_study(demo_study):
    """--older-than under two heartbeats would fail live trials; --top-k 0 and --seeds 0 are not
    defaults in disguise. One line, exit 2, and the study untouched."""
    url = f"sqlite:///{demo_study}/studies/tiny.db"
    before = [(t.number, t.state) for t in optuna.load_study(study_name="tiny", storage=url).trials]
    cases = [
        (
            ("fail-stale", "--storage", "sqlite:///studies/tiny.db", "--study", "tiny", "--older-than", "0"),
            "fail-stale --older-than 0: live trials beat every 20 s (study.heartbeat), so anything under 40 s",
        ),
        (("confirm", "tiny", "--top-k", "0"), "confirm: --top-k 0 --seeds 3: need top-k >= 1 and seeds >= 2"),
        (("confirm", "tiny", "--seeds", "0"), "confirm: --top-k 3 --seeds 0: need top-k >= 1 and seeds >= 2"),
    ]
    for args, message in cases:
        proc = run_inline(*args, cwd=demo_study)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, (args, proc.stderr)
    assert [(t.number, t.state) for t in optuna.load_study(study_name="tiny", storage=url).trials] == before
    assert "tiny/confirm" not in {s.study_name for s in optuna.get_all_study_summaries(url)}


def test_rank_batch_size_is_not_a_recipe_change(tmp_path):
    """Images per frozen forward change no feature beyond rounding: a study stored with a fixed
    rank.batch_size opens with the default (sized by memory); other changes are still refused."""
    from search.errors import SearchError
    from search.recipe import recipe_from_dict
    from search.study import open_study
    from tests.conftest import tiny_recipe

    url = f"sqlite:///{tmp_path}/s.db"
    open_study(recipe_from_dict(tiny_recipe(rank={"batch_size": 256})), url)
    study = open_study(recipe_from_dict(tiny_recipe()), url)  # not refused
    assert study.study_name == "tiny" and study.user_attrs["recipe"]["rank"]["batch_size"] is None
    with pytest.raises(SearchError, match="different recipe"):
        open_study(recipe_from_dict(tiny_recipe(train={"epochs": 7})), url)
