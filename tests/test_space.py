"""The search space, samplers and pruners through ask/tell, with no model at all."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from search import space
from search.pool import parse_pool
from search.recipe import PRUNERS, SAMPLERS, recipe_from_dict
from search.study import make_pruner, make_sampler
from tests.conftest import tiny_recipe

POOL = ["mini_cnn", {"model": "resnet_18", "pretrained": False}, "resnet_18"]  # scratch, scratch, pretrained


def _recipe(preset: str = "full", overrides: dict | None = None, train: dict | None = None, **study) -> object:
    return recipe_from_dict(tiny_recipe(pool=POOL, space={"preset": preset, "overrides": overrides or {}},
                                        study={"name": "s", **study}, train=train or {}))


def _ask(recipe, n: int = 40, sampler: optuna.samplers.BaseSampler | None = None):
    study = optuna.create_study(sampler=sampler or optuna.samplers.RandomSampler(seed=0), direction="maximize")
    entries = parse_pool(recipe.pool)
    out = []
    for i in range(n):
        trial = study.ask()
        entry, hp = space.suggest(trial, recipe, entries)
        study.tell(trial, float(hp.lr) + i * 1e-6)
        out.append((entry, hp, study.trials[-1].params))
    return out


def test_conditional_params_only_when_they_take_effect():
    rows = _ask(_recipe())
    seen = set()
    for entry, hp, params in rows:
        assert ("momentum" in params) == ("nesterov" in params) == (params["optimizer"] == "sgd")
        assert ("finetune" in params) == entry.pretrained
        assert ("backbone_lr_mult" in params) == (entry.pretrained and params["finetune"] != "linear_probe")
        assert ("lp_epochs" in params) == (entry.pretrained and params["finetune"] == "lp_ft")
        assert ("mix_prob" in params) == (params["mixup_alpha"] > 0 or params["cutmix_alpha"] > 0)
        assert hp.optimizer == params["optimizer"] and hp.lr == params["lr"]
        if "momentum" not in params:
            assert hp.momentum == 0.9  # the train default, untouched
        seen.add((entry.label, params["optimizer"]))
    assert {("mini_cnn", "sgd"), ("mini_cnn", "adamw"), ("resnet_18", "sgd")} <= seen


def test_conditions_see_the_recipes_train_values():
    # optimizer not tuned, but the recipe trains with SGD: momentum takes effect and is sampled
    r = recipe_from_dict(tiny_recipe(pool=POOL, train={"optimizer": "sgd"}, space={"preset": "quick", "overrides": {}}))
    r = r.model_copy(update={"space": r.space.model_copy(update={"overrides": {"optimizer": None}})})
    rows = _ask(r, n=5)
    assert all("momentum" in p and "optimizer" not in p for _, _, p in rows)
    assert "momentum" in space.reachable(r)


def test_overrides_ranges_choices_fixed_and_removed():
    r = _recipe("quick", {"lr": {"low": 0.01, "high": 0.02}, "batch_size": [16, 32], "optimizer": "sgd",
                          "dropout": None, "weight_decay": {"low": 1, "high": 4, "step": 1}, "schedule": ["step"],
                          "step_size": {"low": 3, "high": 4}})
    sampled, fixed = space.resolve(r)
    assert fixed == {"optimizer": "sgd"}
    assert "dropout" not in sampled and sampled["batch_size"].choices == (16, 32)
    for _, hp, params in _ask(r, n=30):
        assert 0.01 <= params["lr"] <= 0.02 and not sampled["lr"].log
        assert params["batch_size"] in (16, 32) and hp.batch_size == params["batch_size"]
        assert "optimizer" not in params and hp.optimizer == "sgd" and "momentum" in params
        assert "dropout" not in params and hp.dropout == 0.0
        assert params["weight_decay"] in (1.0, 2.0, 3.0, 4.0)
        assert params["step_size"] in (3, 4) and isinstance(params["step_size"], int)


def test_seeded_tpe_reproduces_its_first_trials():
    r = _recipe(sampler={"name": "tpe", "n_startup_trials": 3})

    def first(n: int) -> list[dict]:
        return [p for _, _, p in _ask(r, n=n, sampler=make_sampler(r))]

    a, b = first(6), first(6)
    assert a == b  # startup and the first modelled trials
    other = recipe_from_dict({**r.normalized(), "study": {**r.normalized()["study"], "seed": 1}})
    assert [p for _, _, p in _ask(other, n=3, sampler=make_sampler(other))] != a[:3]


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_runs_ask_tell(name):
    r = _recipe("quick", sampler={"name": name, "n_startup_trials": 2})
    sampler = make_sampler(r)
    rows = _ask(r, n=5, sampler=sampler)
    expected = {"tpe": "TPESampler", "random": "RandomSampler", "gp": "GPSampler", "cmaes": "CmaEsSampler",
                "qmc": "QMCSampler", "nsga2": "NSGAIISampler"}
    assert isinstance(sampler, getattr(optuna.samplers, expected[name]))
    assert len(rows) == 5 and all(1e-4 <= p["lr"] <= 1e-1 for _, _, p in rows)


@pytest.mark.parametrize("name", PRUNERS)
def test_every_pruner_runs_and_prunes_bad_curves(name):
    r = _recipe("quick", pruner={"name": name, "warmup_epochs": 1, "min_trials": 2, "reduction_factor": 2},
                train={"epochs": 4})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), pruner=make_pruner(r),
                                direction="maximize", study_name="pruners")  # Hyperband's brackets hash the name
    for i in range(8):
        trial = study.ask()
        space.suggest(trial, r)
        good = i < 4
        pruned = False
        for epoch in range(1, 5):
            trial.report((0.9 if good else 0.1) + 0.01 * epoch, epoch)
            if trial.should_prune():
                pruned = True
                break
        study.tell(trial, state=TrialState.PRUNED) if pruned else study.tell(trial, 0.9 + 0.01 * 4 if good else 0.14)
    states = [t.state for t in study.trials]
    assert states[:2] == [TrialState.COMPLETE] * 2  # never before min_trials / the first rung has peers
    if name == "none":
        assert TrialState.PRUNED not in states
    else:
        assert TrialState.PRUNED in states[4:], states
        assert all(s == TrialState.COMPLETE for s in states[:4]), states


def test_baseline_params_use_train_defaults_where_they_fit():
    r = _recipe()
    entries = {e.label: e for e in parse_pool(r.pool)}
    pre = space.baseline_params(r, entries["resnet_18"])
    scratch = space.baseline_params(r, entries["mini_cnn"])
    assert pre["model"] == "resnet_18" and pre["optimizer"] == "adamw" and pre["finetune"] == "full"
    assert pre["backbone_lr_mult"] == 1.0 and pre["batch_size"] == 128 and pre["lr"] == 1e-3
    assert "momentum" not in pre and "finetune" not in scratch and "mix_prob" not in scratch
    assert math.isclose(pre["warmup_epochs"], 0.0)
    study = optuna.create_study()
    study.enqueue_trial(pre)
    entry, hp = space.suggest(study.ask(), r, list(entries.values()))
    assert entry.label == "resnet_18" and hp.lr == 1e-3 and hp.finetune == "full"


def test_describe_leaves_out_params_that_can_never_be_sampled():
    r = _recipe(overrides={"optimizer": "adamw", "mixup_alpha": 0.0, "cutmix_alpha": None})
    text = space.describe(r)
    live = [line.split()[0] for line in text.splitlines() if not line.strip().startswith("never")]
    assert "momentum" not in live and "nesterov" not in live and "mix_prob" not in live
    assert "backbone_lr_mult" in live and "finetune" in live  # resnet_18 is pretrained
    assert "never sampled (condition cannot hold): momentum (if optimizer=sgd)" in text
    scratch = recipe_from_dict(tiny_recipe(pool=["mini_cnn"], space={"preset": "full", "overrides": {}}))
    assert {"finetune", "lp_epochs", "backbone_lr_mult"}.isdisjoint(space.reachable(scratch))
    assert "momentum" in space.reachable(scratch)


class _Reads(dict):
    """A dict that remembers which keys were read."""

    def __init__(self, *a):
        super().__init__(*a)
        self.read: set[str] = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)


def test_conditions_read_only_the_declared_conditioning_params():
    from search.recipe import TrainCfg

    entry = parse_pool(["resnet_18"])[0]
    for name, p in space.PARAMS.items():
        if p.when is None:
            continue
        for finetune in ("full", "lp_ft"):
            values = _Reads({**TrainCfg().model_dump(), "finetune": finetune, "mixup_alpha": 0.0})
            p.when(values, entry)
            assert values.read <= set(space.CONDITIONING), (name, values.read)
        assert p.when in space.CONDITION_TEXT, name
