from __future__ import annotations

import pytest

from search.errors import SearchError
from search.recipe import load_recipe, parse_override, recipe_from_dict
from tests.conftest import ROOT, tiny_recipe, write_recipe


def test_defaults_and_direction_follow_metric():
    r = recipe_from_dict(tiny_recipe())
    assert r.study.direction == "maximize"
    r = recipe_from_dict(tiny_recipe(study={"name": "x", "metric": "loss"}))
    assert r.study.direction == "minimize"
    assert r.model_config["frozen"]


def test_contradictory_direction_is_an_error():
    with pytest.raises(SearchError, match=r"study: direction 'minimize' contradicts metric 'accuracy'"):
        recipe_from_dict(tiny_recipe(study={"name": "x", "direction": "minimize"}))


@pytest.mark.parametrize(
    "text, path, value",
    [
        ("train.epochs=5", ["train", "epochs"], 5),
        ("train.lr=1e-3", ["train", "lr"], 1e-3),
        ("hardware.compile=true", ["hardware", "compile"], True),
        ("study.timeout=null", ["study", "timeout"], None),
        ("pool=[mini_cnn, resnet_18]", ["pool"], ["mini_cnn", "resnet_18"]),
        ("study.name=abc", ["study", "name"], "abc"),
    ],
)
def test_override_parsing(text, path, value):
    assert parse_override(text) == (path, value)


def test_overrides_apply_and_are_validated(tmp_path):
    f = write_recipe(tmp_path / "r.yaml", tiny_recipe())
    r = load_recipe(f, ["train.epochs=7", "study.sampler.name=qmc"])
    assert r.train.epochs == 7 and r.study.sampler.name == "qmc"
    with pytest.raises(SearchError, match=r"train.epochs: .*greater than or equal to 1"):
        load_recipe(f, ["train.epochs=0"])


@pytest.mark.parametrize(
    "over, expected",
    [
        (
            {"train": {"epoch": 3}},
            r"train: unknown key 'epoch' \(did you mean 'epochs'\?\); allowed keys: .*batch_size",
        ),
        ({"train": {"epochs": "many"}}, r"train.epochs: .*valid integer.*\"many\""),
        (
            {"study": {"name": "x", "sampler": "tpee"}},
            r"study.sampler.name: 'tpee' is not allowed \(did you mean 'tpe'\?\); allowed: tpe, nsga2, random, gp, "
            r"cmaes, qmc",
        ),
        ({"study": {"name": "x", "metric": "acc"}}, r"study.metric: 'acc' is not allowed.*allowed: accuracy"),
        ({"pool": []}, r"pool: .*at least 1 item"),
        ({"pool": ["resnet18"]}, r"pool\[0\]: unknown model 'resnet18' \(did you mean 'resnet_18'\?\)"),
        ({"pool": ["mini_cnn", "mini_cnn"]}, r"pool\[1\]: duplicate label 'mini_cnn'"),
        ({"space": {"overrides": {"lr": {"low": 1, "high": 0.1}}}}, r"space.overrides.lr: low 1.0 > high 0.1"),
        ({"space": {"overrides": {"lr": {"low": 0, "high": 0.1, "log": True}}}}, r"log range needs low > 0"),
        (
            {"space": {"overrides": {"lrr": {"low": 0.1, "high": 1}}}},
            r"unknown parameter 'lrr' \(did you mean 'lr'\?\)",
        ),
        ({"space": {"overrides": {"optimizer": "adam"}}}, r"space.overrides.optimizer: 'adam' is not a valid value"),
        ({"data": {"dataset": "cifar1O"}}, r"data.dataset: unknown dataset 'cifar1O' \(did you mean 'cifar10'\?\)"),
        (
            {"extra": 1},
            r"recipe: unknown key 'extra'; allowed keys: data, hardware, pool, rank, space, study, tracking, train",
        ),
    ],
)
def test_bad_recipes_give_one_line(over, expected):
    with pytest.raises(SearchError, match=expected) as e:
        recipe_from_dict(tiny_recipe(**over), source="r.yaml")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("r.yaml: ")


def test_normalized_recipe_round_trips():
    r = recipe_from_dict(tiny_recipe())
    again = recipe_from_dict(r.normalized())
    assert again == r


def test_shipped_recipes_validate():
    for f in sorted((ROOT / "recipes").glob("*.yaml")):
        load_recipe(f)
