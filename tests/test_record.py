"""The trial and study records: a real study stores only declared attributes; versions stamped."""

from __future__ import annotations

import typing

import optuna
import pytest
import torch

from search import artifacts, record, storage
from tests.conftest import run_inline

METRIC_KEYS = {"best_accuracy", "best_balanced_accuracy", "best_f1", "best_auc", "best_loss"}


@pytest.mark.slow
def test_every_attribute_of_a_real_study_is_declared_in_the_record(demo_study):
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{demo_study}/studies/tiny.db")
    declared = set(typing.get_type_hints(record.TrialAttrs))
    assert METRIC_KEYS <= declared
    for t in study.get_trials():
        assert set(t.user_attrs) <= declared, set(t.user_attrs) - declared
    assert {k for k in study.user_attrs if not k.startswith("memory_probe:")} <= set(
        typing.get_type_hints(record.StudyAttrs)
    )
    v = study.user_attrs["versions"]
    assert v["torch"] == torch.__version__.split("+")[0] or v["torch"] == torch.__version__
    assert v["optuna"] == optuna.__version__ and set(v) >= {"search", "torch", "torchvision", "timm", "optuna"}


@pytest.mark.slow
def test_checkpoints_carry_the_versions_and_device_and_report_shows_the_study_s(demo_study):
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{demo_study}/studies/tiny.db")
    best = study.best_trial
    store = artifacts.store_for(storage.dir_of(study))
    with store.open_reader(best.user_attrs["checkpoint"]) as f:
        ckpt = torch.load(f, weights_only=True)
    assert ckpt["versions"]["device"] == "cpu" and ckpt["versions"]["optuna"] == optuna.__version__
    out = run_inline("report", "tiny", cwd=demo_study)
    assert out.returncode == 0, out.stderr
    assert f"created with search {study.user_attrs['versions']['search']}, torch " in out.stdout
