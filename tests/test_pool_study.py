"""The model pool inside a study: mixed resolutions, recorded attributes, leakage guard, `models`."""

from __future__ import annotations

import json

import optuna
import pytest
import torch

from search import cli
from search.data import Data, Split
from search.pool import parse_pool
from search.recipe import recipe_from_dict
from search.study import leakage_warning, open_study, work
from tests.conftest import tiny_recipe
from tests.test_models import _vit_checkpoint


@pytest.mark.slow
def test_mixed_resolution_pool_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _vit_checkpoint(tmp_path)
    raw = tiny_recipe(
        name="mixed",
        # the two baselines: each entry once, at its own resolution
        study={"name": "mixed", "n_trials": 2, "storage": f"sqlite:///{tmp_path}/mixed.db", "baselines": True},
        data={"dataset": "digits", "max_samples": 120, "resolution": 32},
        pool=["mini_cnn", {"model": "vit_tiny", "resolution": 64}],
        train={"epochs": 1, "channel_reduce": "sum"},
    )
    recipe = recipe_from_dict(raw)
    study = open_study(recipe)
    work(recipe, study, quiet=True)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    seen = {t.user_attrs["pool_label"]: t.user_attrs for t in trials}
    assert set(seen) == {"mini_cnn", "vit_tiny@64"}  # baselines: every entry at least once
    vit, cnn = seen["vit_tiny@64"], seen["mini_cnn"]
    assert (vit["input_resolution"], cnn["input_resolution"]) == (64, 32)
    assert (vit["weight_source"], vit["imagenet_overlap"], vit["tag"]) == (
        "in21k_ft_in1k",
        "full",
        "augreg_in21k_ft_in1k",
    )
    assert (cnn["weight_source"], cnn["imagenet_overlap"]) == ("none", "none")
    assert vit["arch"] == "vit_tiny" and vit["channel_reduce"] == "sum"
    assert 5_000_000 < vit["params"] < 6_000_000 and 90_000 < cnn["params"] < 100_000


def _data(overlap: str) -> Data:
    s = Split(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
    from search.datasets import AugmentCfg

    return Data("cifar10", s, s, s, ("a", "b"), overlap, AugmentCfg(), 8)


def test_leakage_guard_names_entries_and_fair_choices():
    entries = parse_pool(
        [
            "resnet_18",
            {"model": "resnet_18", "pretrained": False},
            "timm/convnext_tiny.fb_in22k",
            "timm/resnet50.fb_ssl_yfcc100m_ft_in1k",
        ]
    )
    msg = leakage_warning(entries, _data("semantic"))
    assert "resnet_18, timm/convnext_tiny.fb_in22k." in msg
    assert "resnet_18-scratch" not in msg and "fb_ssl" not in msg.split("fairer")[0]
    assert "pretrained: false" in msg and "CLIP" in msg and "DINOv2" in msg and "SSL" in msg
    assert leakage_warning(entries, _data("none")) is None
    assert "may overlap" in leakage_warning(entries, _data("unknown"))
    assert leakage_warning(parse_pool(["mini_cnn"]), _data("semantic")) is None


def test_models_command_lists_builtins_and_classifies_timm(capsys):
    assert cli.main(["models", "--json"]) == 0
    rows = {r["label"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["resnet_18"]["source"] == "in1k" and rows["resnet_18"]["resolution"] == "data"
    assert rows["vit_tiny"]["weights"] == "augreg_in21k_ft_in1k" and rows["vit_tiny"]["resolution"] == 224
    assert rows["mini_cnn"]["source"] == "none" and 90_000 < rows["mini_cnn"]["params"] < 100_000
    assert rows["convnext_tiny-scratch"]["overlap"] == "none"
    assert cli.main(["models", "timm/vit_small_patch14_dinov2.lvd142m"]) == 0
    out = capsys.readouterr().out
    assert "dinov2" in out and "518" in out
    assert cli.main(["models", "timm/resnet50.bogus"]) == 2
