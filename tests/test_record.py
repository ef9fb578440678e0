"""The trial and study records: a real study stores only declared attributes, read and written
through search.record alone, wrong types read as absent; versions stamped."""

from __future__ import annotations

import ast
import logging
import typing
from pathlib import Path

import optuna
import pytest
import torch

from search import artifacts, record, storage
from tests.conftest import run_inline

ROOT = Path(record.__file__).parent
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


# ---------------------------------------------------------------------------
# every attribute goes through search.record

RAW = {
    "user_attrs",
    "system_attrs",
    "set_user_attr",
    "set_system_attr",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "set_study_user_attr",
    "set_study_system_attr",
}
BUILDERS = {"new_attrs", "new_system_attrs"}


def raw_access(source: str) -> list[str]:
    """`line: what` for each attribute read or written past search.record: `x.user_attrs` (so also
    `.get(` and `[...]` on it), `set_user_attr(` and the storage's setters, and `user_attrs=` /
    `system_attrs=` given anything but a record builder."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in RAW:
            out.append(f"{node.lineno}: .{node.attr}")
        if isinstance(node, ast.keyword) and node.arg in ("user_attrs", "system_attrs"):
            call = node.value
            name = call.func.id if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) else None
            if name not in BUILDERS:
                out.append(f"{node.value.lineno}: {node.arg}=")
    return sorted(out, key=lambda hit: int(hit.split(":")[0]))


def test_the_check_sees_every_raw_form():
    source = (
        "a = t.user_attrs.get('seed')\nb = t.user_attrs['seed']\nt.set_user_attr('seed', 1)\n"
        "s.set_trial_user_attr(1, 'x', 2)\nc = t.system_attrs.get('deaths')\n"
        "optuna.create_trial(user_attrs={'seed': 1})\noptuna.create_trial(user_attrs=new_attrs(seed=1))\n"
    )
    assert raw_access(source) == [
        "1: .user_attrs",
        "2: .user_attrs",
        "3: .set_user_attr",
        "4: .set_trial_user_attr",
        "5: .system_attrs",
        "6: user_attrs=",
    ]


def test_no_module_but_record_touches_attributes_raw():
    found = {
        str(path.relative_to(ROOT.parent)): hits
        for path in sorted(ROOT.rglob("*.py"))
        if path.name != "record.py" and (hits := raw_access(path.read_text()))
    }
    assert found == {}


# ---------------------------------------------------------------------------
# reading checks the types; writing takes declared names only


@pytest.fixture
def study():
    return optuna.create_study(storage=optuna.storages.InMemoryStorage(), study_name="rec")


def test_a_value_of_the_wrong_type_reads_as_absent_with_one_warning(study, caplog):
    t = study.ask()
    t.set_user_attr("seed", "seven")  # written by hand or by another version
    t.set_user_attr("epochs", 3)
    t.set_user_attr("status", "melted")  # not one of the FitStatus values
    t.set_user_attr("sec_per_epoch", 2)  # an int is a float
    t.set_user_attr("best_epoch", True)  # a bool is no int
    t.set_user_attr("mine", [1])  # undeclared: kept as written
    with caplog.at_level(logging.WARNING, logger="search"):
        a = record.attrs(t)
        again = record.attrs(t)
    assert a == again == {"epochs": 3, "sec_per_epoch": 2, "mine": [1]}
    assert a.get("seed", 11) == 11
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 3, warned
    assert f"trial {t.number}: attribute 'seed' holds 'seven' (str), not int; read as absent" in warned


def test_system_attrs_and_study_attrs_are_checked_too(study, caplog):
    ok = optuna.create_trial(
        state=optuna.trial.TrialState.WAITING,
        system_attrs=record.new_system_attrs(failed_trial=2, retry_history=[2, 5], deaths=1),
    )
    bad = optuna.create_trial(
        state=optuna.trial.TrialState.WAITING,
        system_attrs={"failed_trial": 2, "retry_history": ["2"], "deaths": 1.5, "other": 1},
    )
    study.add_trials([ok, bad])
    first, second = study.get_trials()
    assert record.system_attrs(first) == {"failed_trial": 2, "retry_history": [2, 5], "deaths": 1}
    with caplog.at_level(logging.WARNING, logger="search"):
        assert record.system_attrs(second) == {"failed_trial": 2}
    study.set_user_attr("deadline", "tomorrow")
    study.set_user_attr("memory_probe:resnet_18@32px:b64:fp32", "big")
    record.set_study_attrs(study, baselines_enqueued=True)
    assert record.study_attrs(study) == {"baselines_enqueued": True}
    assert record.memory_probe(study, "memory_probe:resnet_18@32px:b64:fp32") is None
    record.set_memory_probe(study, "memory_probe:x", 1234)
    assert record.memory_probe(study, "memory_probe:x") == 1234
    assert len(caplog.records) == 4 and "'retry_history' holds ['2'] (list), not list[int]" in caplog.text
    assert "study rec: attribute 'deadline' holds 'tomorrow' (str), not float | None" in caplog.text


def test_a_name_chosen_at_run_time_is_checked_when_written(study):
    t = study.ask()
    record.set_attr(t, "flops", 12_000)
    record.set_attr(t, "best_accuracy", 0.5)
    with pytest.raises(TypeError, match="'best_acuracy' = 0.5: not declared"):
        record.set_attr(t, "best_acuracy", 0.5)
    with pytest.raises(TypeError, match="'flops' = 'many'"):
        record.set_attr(t, "flops", "many")
    with pytest.raises(TypeError, match="starts with 'memory_probe:'"):
        record.set_memory_probe(study, "x", 1)
    a = record.attrs(t)
    assert record.number(a, "flops") == 12_000 and record.number(a, "best_accuracy") == 0.5
    assert record.number(a, "latency_ms") is None
    assert record.omit(a, ["flops"]) == {"best_accuracy": 0.5}
    assert record.new_attrs(a, flops=1) == {"flops": 1, "best_accuracy": 0.5}
