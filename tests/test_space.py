"""The search space, samplers and pruners through ask/tell, with no model at all."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from search import space
from search.datasets import channels
from search.pool import parse_pool
from search.recipe import PRUNERS, SAMPLERS, recipe_from_dict
from search.record import set_attrs
from search.sampling import (
    EqualComputePruner,
    counts_flops,
    least_spent,
    make_pruner,
    make_sampler,
    spent_by_trial,
    value_at,
)
from tests.conftest import tiny_recipe

POOL = ["mini_cnn", {"model": "resnet_18", "pretrained": False}, "resnet_18"]  # scratch, scratch, pretrained


def _recipe(preset: str = "full", overrides: dict | None = None, train: dict | None = None, **study) -> object:
    return recipe_from_dict(
        tiny_recipe(
            pool=POOL,
            space={"preset": preset, "overrides": overrides or {}},
            study={"name": "s", **study},
            train=train or {},
        )
    )


def _entries(r) -> list:
    return parse_pool(r.pool)


def _suggest(trial, r, entries=None):
    """space.suggest with the recipe's sections, as the objective calls it."""
    return space.suggest(trial, r.space, r.train, entries or _entries(r), channels(r.data))


def _reachable(r) -> dict:
    return space.reachable(r.space, r.train, _entries(r), channels(r.data))


def _sections(r) -> tuple:
    return r.space, r.train


def _ask(recipe, n: int = 40, sampler: optuna.samplers.BaseSampler | None = None):
    study = optuna.create_study(sampler=sampler or optuna.samplers.RandomSampler(seed=0), direction="maximize")
    entries = parse_pool(recipe.pool)
    out = []
    for i in range(n):
        trial = study.ask()
        entry, hp = _suggest(trial, recipe, entries)
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
    assert "momentum" in _reachable(r)


def test_overrides_ranges_choices_fixed_and_removed():
    r = _recipe(
        "quick",
        {
            "lr": {"low": 0.01, "high": 0.02},
            "batch_size": [16, 32],
            "optimizer": "sgd",
            "dropout": None,
            "weight_decay": {"low": 1, "high": 4, "step": 1},
            "schedule": ["step"],
            "step_size": {"low": 3, "high": 4},
        },
        train={"epochs": 5},
    )  # steps below the epochs
    sampled, fixed = space.resolve(*_sections(r))
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
    expected = {
        "tpe": "TPESampler",
        "random": "RandomSampler",
        "gp": "GPSampler",
        "cmaes": "CmaEsSampler",
        "qmc": "QMCSampler",
        "nsga2": "NSGAIISampler",
    }
    assert isinstance(sampler, getattr(optuna.samplers, expected[name]))
    assert len(rows) == 5 and all(1e-4 <= p["lr"] <= 1e-1 for _, _, p in rows)


@pytest.mark.parametrize("name", PRUNERS)
def test_every_pruner_runs_and_prunes_bad_curves(name):
    r = _recipe(
        "quick", pruner={"name": name, "warmup_epochs": 1, "min_trials": 2, "reduction_factor": 2}, train={"epochs": 4}
    )
    study = optuna.create_study(
        sampler=optuna.samplers.RandomSampler(seed=0), pruner=make_pruner(r), direction="maximize", study_name="pruners"
    )  # Hyperband's brackets hash the name
    for i in range(8):
        trial = study.ask()
        _suggest(trial, r)
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


def test_value_at_reads_the_last_epoch_within_the_compute():
    values = {1: 0.5, 2: 0.7, 3: 0.8}
    assert value_at(values, 2.0, 4.0) == 0.7  # epochs 1 and 2 cost 2 and 4
    assert value_at(values, 2.0, 5.9) == 0.7
    assert value_at(values, 2.0, 100.0) == 0.8  # ended sooner: its final value
    assert value_at(values, 2.0, 1.9) is None  # even its first epoch cost more


def _costed_trial(values: dict[int, float], flops: int, state=TrialState.COMPLETE):
    return optuna.trial.create_trial(
        state=state,
        value=max(values.values()) if state == TrialState.COMPLETE else None,
        intermediate_values=values,
        user_attrs={"flops": flops},
    )


@pytest.mark.parametrize("compare", ["epoch", "compute"])
def test_a_slow_entry_is_judged_at_equal_compute(compare):
    """Fast trials (1 flop an epoch) reach 0.9 by epoch 4; a slow one (4 flops) has 0.6 after its
    first epoch, better than the fast ones' epoch 1 (0.5) but worse than what they held after the
    same compute: the epoch-wise median keeps it, the equal-compute one stops it. A slow trial better
    than that (0.95) is kept by both. Without counted operations, trials compare at equal epochs."""
    r = _recipe("quick", pruner={"name": "median", "warmup_epochs": 1, "min_trials": 2, "compare": compare})
    pruner = make_pruner(r)
    assert isinstance(pruner, EqualComputePruner) == (compare == "compute")
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for _ in range(3):
        study.add_trial(_costed_trial({1: 0.5, 2: 0.7, 3: 0.8, 4: 0.9}, 1))
    study.add_trial(_costed_trial({1: 0.1, 2: 0.1}, 1, TrialState.PRUNED))  # pruned: not compared with
    verdicts = []
    for first in (0.6, 0.95):
        trial = study.ask()
        set_attrs(trial, flops=4)
        trial.report(first, 1)
        verdicts.append(trial.should_prune())
        study.tell(trial, state=TrialState.PRUNED)
    assert verdicts == ([True, False] if compare == "compute" else [False, False])
    if compare == "compute":
        uncounted = study.ask()
        uncounted.report(0.6, 1)
        assert not uncounted.should_prune()  # no flops: its epoch 1 against theirs (0.5)


def test_equal_compute_waits_for_min_trials_and_warmup():
    r = _recipe("quick", pruner={"name": "median", "warmup_epochs": 2, "min_trials": 2, "compare": "compute"})
    study = optuna.create_study(direction="maximize", pruner=make_pruner(r))
    study.add_trial(_costed_trial({1: 0.9, 2: 0.9, 3: 0.9}, 1))
    trial = study.ask()
    set_attrs(trial, flops=1)
    for epoch in (1, 2):
        trial.report(0.1, epoch)
        assert not trial.should_prune()  # epoch 1: warm-up; epoch 2: one trial completed of 2
    study.add_trial(_costed_trial({1: 0.9, 2: 0.9, 3: 0.9}, 1))
    assert trial.should_prune()
    minimize = optuna.create_study(direction="minimize", pruner=make_pruner(r))
    for _ in range(2):
        minimize.add_trial(_costed_trial({1: 0.5, 2: 0.3, 3: 0.2}, 1))
    low, high = minimize.ask(), minimize.ask()
    for t, v in ((low, 0.25), (high, 0.4)):
        set_attrs(t, flops=1)
        t.report(v, 1)
        t.report(v, 2)
    assert (low.should_prune(), high.should_prune()) == (False, True)  # losses: lower is better


def test_least_spent_takes_untried_entries_first_then_the_least_compute():
    assert least_spent(["a", "b", "c"], [("b", 10.0, 4.0)]) == ["a", "c"]
    # a: 3 trials x 4 epochs x 1 = 12; b: one trial of 2 epochs (pruned) x 10 = 20; c: 4 x 5 = 20
    spent = [("a", 1.0, 4.0)] * 3 + [("b", 10.0, 2.0), ("c", 5.0, 4.0)]
    assert least_spent(["a", "b", "c"], spent) == ["a"]
    assert least_spent(["b", "c"], spent) == ["b", "c"]  # equal: both
    assert least_spent(["a", "b", "c"], [*spent, ("a", 1.0, 9.0)]) == ["b", "c"]  # a: 21
    # a running trial of b without flops yet costs what b's others recorded (median)
    assert least_spent(["a", "b"], [("a", 1.0, 40.0), ("b", 10.0, 1.0), ("b", None, 4.0)]) == ["a"]
    # no flops recorded for c: every epoch counts alike (a: 12 epochs, b: 2, c: 4)
    assert least_spent(["a", "b", "c"], [*spent[:4], ("c", None, 4.0)]) == ["b"]
    assert least_spent(["x"], [("gone", 1.0, 4.0)]) == ["x"]  # entries outside the pool: not counted


def test_spent_by_trial_counts_trained_epochs_or_the_planned_ones():
    """A finished trial counts the epochs it trained itself (several objectives leave no intermediate
    values; a retry's resumed epochs are its predecessor's), a running one all it plans, a queued none."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    dist = {"model": optuna.distributions.CategoricalDistribution(["a", "b"])}
    a = {"pool_label": "a", "flops": 3}
    study.add_trial(
        optuna.trial.create_trial(
            params={"model": "a"}, distributions=dist, values=[0.5, 1.0], user_attrs={**a, "trained_epochs": 4}
        )
    )
    study.add_trial(
        optuna.trial.create_trial(
            params={"model": "a"},
            distributions=dist,
            values=[0.6, 1.0],
            user_attrs={**a, "trained_epochs": 1, "epochs": 4},
        )
    )  # resumed 3
    study.add_trial(
        optuna.trial.create_trial(
            params={"model": "b"}, distributions=dist, state=TrialState.RUNNING, user_attrs={"pool_label": "b"}
        )
    )
    study.enqueue_trial({"model": "b"})
    assert spent_by_trial(study.get_trials(), 6) == [("a", 3, 4.0), ("a", 3, 1.0), ("b", None, 6.0)]


@pytest.mark.parametrize("share", ["compute", "random"])
def test_start_up_trials_share_the_pool_by_compute(share):
    """A pool of one cheap entry (1 flop an epoch) and two costly ones (50): shared by compute, the
    first three start-up trials try each entry once, and the other seven go to the cheap one
    (8 x 4 = 32 against 200); the costly ones get start-up trials again only once the cheap one
    spent as much. Drawn at random, the costly entries take most of them. The same seeds give the
    same choices; after the start-up TPE samples the pool entry itself."""

    def picks(seed: int) -> list[str]:
        r = _recipe("quick", seed=seed, sampler={"name": "tpe", "startup_pool": share})
        study = optuna.create_study(direction="maximize", sampler=make_sampler(r))
        out = []
        for _ in range(12):
            trial = study.ask()
            entry, _ = _suggest(trial, r)
            set_attrs(trial, flops=1 if entry.label == "mini_cnn" else 50, trained_epochs=4)  # as a trial records them
            study.tell(trial, 0.5 + 0.01 * len(out))
            out.append(entry.label)
        return out

    first = picks(0)
    assert first == picks(0)
    startup = first[:10]
    if share == "compute":
        assert sorted(startup[:3]) == sorted(e.label for e in _entries(_recipe()))
        assert startup.count("mini_cnn") == 8
    else:
        assert startup.count("mini_cnn") < 8
        assert sorted(set(picks(1)[:10]) | set(startup)) == sorted(e.label for e in _entries(_recipe()))
    assert isinstance(make_sampler(_recipe(sampler={"startup_pool": share})), optuna.samplers.TPESampler)


def test_flops_are_counted_where_the_pruner_or_the_start_up_weighs_by_them():
    tpe = {"name": "tpe"}
    assert counts_flops(_recipe(sampler=tpe), 3)
    assert not counts_flops(_recipe(sampler=tpe), 1)  # one entry: nothing to share
    assert not counts_flops(_recipe(sampler={**tpe, "startup_pool": "random"}), 3)
    assert not counts_flops(_recipe(sampler="random"), 3)
    assert counts_flops(_recipe(sampler="random", pruner={"compare": "compute"}), 1)


def test_baseline_params_use_train_defaults_where_they_fit():
    r = _recipe()
    entries = {e.label: e for e in parse_pool(r.pool)}
    pre = space.baseline_params(r.space, r.train, entries["resnet_18"], channels(r.data))
    scratch = space.baseline_params(r.space, r.train, entries["mini_cnn"], channels(r.data))
    assert pre["model"] == "resnet_18" and pre["optimizer"] == "adamw" and pre["finetune"] == "full"
    assert pre["backbone_lr_mult"] == 1.0 and pre["batch_size"] == 128 and pre["lr"] == 1e-3
    assert "momentum" not in pre and "finetune" not in scratch and "mix_prob" not in scratch
    assert math.isclose(pre["warmup_epochs"], 0.0)
    study = optuna.create_study()
    study.enqueue_trial(pre)
    entry, hp = _suggest(study.ask(), r, list(entries.values()))
    assert entry.label == "resnet_18" and hp.lr == 1e-3 and hp.finetune == "full"


def test_describe_leaves_out_params_that_can_never_be_sampled():
    r = _recipe(overrides={"optimizer": "adamw", "mixup_alpha": 0.0, "cutmix_alpha": None})
    text = space.describe(r.space, r.train, _entries(r), channels(r.data))
    live = [line.split()[0] for line in text.splitlines() if not line.strip().startswith("never")]
    assert "momentum" not in live and "nesterov" not in live and "mix_prob" not in live
    assert "backbone_lr_mult" in live and "finetune" in live  # resnet_18 is pretrained
    assert "never sampled (condition cannot hold): momentum (if optimizer=sgd)" in text
    scratch = recipe_from_dict(tiny_recipe(pool=["mini_cnn"], space={"preset": "full", "overrides": {}}))
    assert {"finetune", "lp_epochs", "backbone_lr_mult"}.isdisjoint(_reachable(scratch))
    assert "momentum" in _reachable(scratch)


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


# ---------------------------------------------------------------------------
# only what takes effect: mixing can be off, and nothing is sampled or fixed that cannot act


def test_the_full_preset_switches_mixing_off_in_some_trials():
    rows = _ask(_recipe(), n=60)
    off = [hp for _, hp, p in rows if p["mixup_alpha"] == 0 and p["cutmix_alpha"] == 0]
    assert off and all(hp.mixup_alpha == 0 and hp.cutmix_alpha == 0 for hp in off)
    assert all("mix_prob" not in p for _, _, p in rows if p["mixup_alpha"] == 0 and p["cutmix_alpha"] == 0)
    assert {p["mixup_alpha"] for _, _, p in rows} == {0.0, 0.1, 0.2, 0.4}
    # A range written in the recipe stays a float range (the choices only replace the preset's range).
    sampled, _ = space.resolve(*_sections(_recipe(overrides={"mixup_alpha": {"low": 0, "high": 1}})))
    assert (sampled["mixup_alpha"].kind, sampled["mixup_alpha"].low, sampled["mixup_alpha"].high) == ("float", 0, 1)


def test_label_smoothing_is_sampled_only_with_cross_entropy():
    rows = _ask(_recipe(overrides={"loss": ["ce", "focal"]}), n=30)
    assert {p["loss"] for _, _, p in rows} == {"ce", "focal"}
    for _, hp, p in rows:
        assert ("label_smoothing" in p) == (p["loss"] == "ce")
        if p["loss"] == "focal":
            assert hp.label_smoothing == 0.0
    focal = _recipe(train={"loss": "focal"})
    assert "label_smoothing" not in _reachable(focal)


@pytest.mark.parametrize(
    "train, overrides, message",
    [
        (
            {"loss": "focal", "label_smoothing": 0.1},
            {},
            "recipe: train.label_smoothing: 0.1 has no effect with train.loss: focal (the focal loss takes no label "
            "smoothing); remove it or use loss: ce",
        ),
        (
            {"loss": "focal"},
            {"label_smoothing": 0.05},
            "recipe: space.overrides.label_smoothing: 0.05 has no effect with train.loss: focal",
        ),
        (
            {"epochs": 3},
            {"lp_epochs": {"low": 1, "high": 5}},
            "recipe: space.overrides.lp_epochs: 5 >= train.epochs 3: the backbone would never be unfrozen; "
            "keep lp_epochs below 3",
        ),
        (
            {"epochs": 3, "finetune": "lp_ft", "lp_epochs": 3},
            {"finetune": None, "lp_epochs": None},
            "recipe: train.finetune: 'lp_ft' has no effect with train.lp_epochs 3 >= train.epochs 3 (the backbone "
            "would never be unfrozen); set lp_epochs below 3",
        ),
        (
            {"epochs": 8, "schedule": "step", "step_size": 8},
            {"schedule": None, "step_size": None},
            "recipe: train.schedule: 'step' has no effect with train.step_size 8 >= train.epochs 8 (the learning rate "
            "would never decay); set step_size below 8",
        ),
        (
            {"epochs": 2},
            {"schedule": ["cosine", "step"]},
            "recipe: space.overrides.schedule: 'step' has no effect with train.step_size 10 >= train.epochs 2",
        ),
        ({"epochs": 6}, {"step_size": [2, 6]}, "recipe: space.overrides.step_size: 6 >= train.epochs 6"),
    ],
)
def test_settings_without_effect_are_refused_in_one_line(train, overrides, message):
    from search.errors import SearchError

    with pytest.raises(SearchError) as e:
        _recipe(overrides=overrides, train=train)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("epochs", [1, 2, 3, 6])
def test_the_preset_keeps_epoch_counts_below_the_epochs(epochs):
    r = _recipe(train={"epochs": epochs})
    sampled, _ = space.resolve(*_sections(r))
    if epochs > 2:
        assert (sampled["lp_epochs"].low, sampled["lp_epochs"].high) == (1, epochs - 1)
        assert (sampled["step_size"].low, sampled["step_size"].high) == (2, epochs - 1)
        assert "lp_ft" in sampled["finetune"].choices and "step" in sampled["schedule"].choices
    if epochs == 2:  # one frozen epoch fits, a step at epoch 2 does not
        assert (sampled["lp_epochs"].low, sampled["lp_epochs"].high) == (1, 1)
        assert "step_size" not in sampled and sampled["schedule"].choices == ("cosine", "plateau", "constant")
    if epochs == 1:
        assert "lp_epochs" not in sampled and sampled["finetune"].choices == ("full", "linear_probe")
    for _, hp, _ in _ask(r, n=40):
        assert hp.schedule != "step" or hp.step_size < epochs
        assert hp.finetune != "lp_ft" or hp.lp_epochs < epochs


def _on(dataset: str, **kw) -> object:
    return recipe_from_dict(
        tiny_recipe(
            pool=["resnet_18", "mini_cnn"],
            data={"dataset": dataset},
            space={"preset": "quick", "overrides": {"channel_reduce": ["mean", "sum"]}},
            **kw,
        )
    )


def test_channel_reduce_is_sampled_only_for_gray_data():
    assert "channel_reduce" in _reachable(_on("digits"))
    assert "channel_reduce" not in _reachable(_on("cifar10"))
    assert "channel_reduce" not in _reachable(_on("pathmnist_64"))  # RGB histology
    assert "channel_reduce" in _reachable(_on("organamnist_64"))  # gray CT
    rows = _ask(_on("cifar10"), n=10)
    assert all("channel_reduce" not in p and hp.channel_reduce == "mean" for _, hp, p in rows)
    gray = _ask(_on("digits"), n=40)
    assert {p.get("channel_reduce") for e, _, p in gray if e.pretrained} == {"mean", "sum"}
    assert all("channel_reduce" not in p for e, _, p in gray if not e.pretrained)


def test_a_fixed_channel_reduce_on_rgb_data_is_refused(tmp_path):
    from search.errors import SearchError

    with pytest.raises(
        SearchError,
        match=r"^recipe: train.channel_reduce: 'sum' has no effect on cifar10, whose "
        r"images have 3 channels \(only 1-channel data reduces a pretrained RGB "
        r"stem\); remove it$",
    ):
        recipe_from_dict(tiny_recipe(pool=["resnet_18"], data={"dataset": "cifar10"}, train={"channel_reduce": "sum"}))
    assert recipe_from_dict(tiny_recipe(data={"dataset": "digits"}, train={"channel_reduce": "sum"}))
    folder = recipe_from_dict(tiny_recipe(data={"dataset": f"folder:{tmp_path}"}, train={"channel_reduce": "sum"}))
    assert folder.train.channel_reduce == "sum"  # unknown channels before decoding: left to the data
