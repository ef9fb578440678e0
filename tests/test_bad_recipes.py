"""A corpus of bad recipes and storages: each is one line naming the key, exit 2, and no
study is created or changed. Extends tests/test_recipe.py's cases, which are not repeated."""

from __future__ import annotations

import optuna
import pytest

from search import study as st
from search.errors import SearchError
from search.recipe import recipe_from_dict
from tests.conftest import run_inline, tiny_recipe, write_recipe

RECIPES = [
    ({"study": {"n_trials": 0}}, r"study.n_trials: .*greater than or equal to 1"),
    ({"study": {"timeout": -1}}, r"study.timeout: .*greater than 0"),
    ({"study": {"heartbeat": 0}}, r"study.heartbeat: .*greater than or equal to 1"),
    ({"study": {"pruner": "medain"}}, r"study.pruner.name: 'medain' is not allowed \(did you mean 'median'\?\)"),
    ({"study": {"pruner": {"name": "percentile", "percentile": 150}}}, r"study.pruner.percentile: .*less than 100"),
    ({"study": {"pruner": {"name": "hyperband", "reduction_factor": 1}}}, r"study.pruner.reduction_factor"),
    (
        {"study": {"pruner": {"name": "hyperband", "compare": "compute"}}},
        r"study.pruner: compare: compute works with the median and percentile pruners, not 'hyperband'",
    ),
    (
        {"study": {"sampler": {"name": "qmc", "qmc_type": "lattice"}}},
        r"study.sampler.qmc_type: 'lattice' is not allowed",
    ),
    (
        {"study": {"sampler": {"name": "tpe", "n_startup": 3}}},
        r"study.sampler: unknown key 'n_startup' \(did you mean 'n_startup_trials'\?\)",
    ),
    ({"study": {"name": "bad name!"}}, r"study.name: .*pattern"),
    ({"hardware": {"device": "tpu"}}, r"hardware.device: .*pattern"),
    ({"hardware": {"workers": 0}}, r"hardware.workers: .*greater than or equal to 1"),
    (
        {"hardware": {"trials_per_gpu": 0}},
        r"hardware.trials_per_gpu: expected auto .*, a whole number >= 1 .* \(got 0\)",
    ),
    ({"hardware": {"trials_per_gpu": "many"}}, r"hardware.trials_per_gpu: expected auto .*or null \(off\)"),
    ({"space": {"preset": "huge"}}, r"space.preset: 'huge' is not allowed; allowed: quick, full, none"),
    ({"space": {"overrides": {"lr": {"low": 0.1}}}}, r"space.overrides.lr: a range needs both low and high"),
    ({"space": {"overrides": {"batch_size": {"choices": []}}}}, r"choices is empty"),
    (
        {"space": {"overrides": {"step_size": {"low": 1.5, "high": 3}}}},
        r"space.overrides.step_size: an integer range needs whole numbers",
    ),
    ({"space": {"overrides": {"lr": {"choices": [0.1], "low": 0.1}}}}, r"either choices or low/high, not both"),
    ({"space": {"overrides": {"momentum": 1.5}}}, r"space.overrides.momentum: 1.5 is not a valid value"),
    (
        {"space": {"overrides": {"dropout": {"low": -0.1, "high": 0.2}}}},
        r"space.overrides.dropout: -0.1 is not a valid value",
    ),
    ({"data": {"val_split": 1.5}}, r"data.val_split: .*less than 1"),
    ({"pool": [{"model": "mini_cnn", "pretrained": True}]}, r"'mini_cnn' has no pretrained weights"),
    ({"pool": [{"model": "mini_cnn", "resolution": 4}]}, r"pool\[0\].resolution: .*greater than or equal to 8"),
    ({"pool": [{"model": "mini_cnn", "resolution": 100000}]}, r"pool\[0\].resolution: .*less than or equal to 1024"),
    ({"data": {"resolution": 100000}}, r"data.resolution: .*less than or equal to 1024"),
    ({"train": {"optimizer": "adam"}}, r"train.optimizer: 'adam' is not allowed"),
    (
        {"study": {"metric": "acc"}},
        r"study.metric: 'acc' is not allowed \(did you mean 'auc'\?\)|study.metric: 'acc' is not allowed",
    ),
]

STORAGES = [
    ("ftp://host/x", r"unsupported URL 'ftp://host/x'; use sqlite:///PATH.db"),
    ("studies/x.db", r"unsupported URL 'studies/x.db'"),
    ("journal:", r"'journal:' needs a file"),
    ("sqlite:///${SEARCH_TEST_UNSET_VARIABLE}/x.db", r"environment variable SEARCH_TEST_UNSET_VARIABLE .* is not set"),
    (
        "postgresql+psycopg://u:s3cret@127.0.0.1:1/x",
        r"cannot open postgresql\+psycopg://u:\*\*\*@127.0.0.1:1/x: .*check the URL",
    ),
    ("mysql+pymysql://root@127.0.0.1:1/x", r"cannot open mysql\+pymysql://root@127.0.0.1:1/x"),
    ("redis://127.0.0.1:1/0", r"cannot open redis://127.0.0.1:1/0"),
]


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    """A study that bad recipes must leave alone: (url, stored recipe, trial count)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('existing')}/studies/tiny.db"
    recipe = recipe_from_dict(tiny_recipe(study={"storage": url}))
    study = st.open_study(recipe, url)
    study.enqueue_trial({"model": "mini_cnn"})
    return url, study.user_attrs["recipe"], len(study.get_trials())


def _unchanged(url, stored, n):
    summaries = optuna.get_all_study_summaries(url)
    assert [s.study_name for s in summaries] == ["tiny"]
    study = optuna.load_study(study_name="tiny", storage=url)
    assert study.user_attrs["recipe"] == stored and len(study.get_trials()) == n


@pytest.mark.parametrize("over, expected", RECIPES, ids=[f"recipe{i}" for i in range(len(RECIPES))])
def test_bad_recipe_is_one_line_and_touches_no_study(over, expected, existing):
    url, stored, n = existing
    raw = tiny_recipe(**over)
    raw["study"] = {"storage": url, **raw["study"]}
    with pytest.raises(SearchError, match=expected) as e:
        st.open_study(recipe_from_dict(raw, source="bad.yaml"), url)
    assert "\n" not in str(e.value) and str(e.value).startswith("bad.yaml: ")
    _unchanged(url, stored, n)


@pytest.mark.parametrize("url, expected", STORAGES, ids=[f"storage{i}" for i in range(len(STORAGES))])
def test_bad_storage_is_one_line_and_creates_nothing(url, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEARCH_TEST_UNSET_VARIABLE", raising=False)
    recipe = recipe_from_dict(tiny_recipe(study={"storage": url}))
    with pytest.raises(SearchError, match=expected) as e:
        st.open_study(recipe, url)
    assert "\n" not in str(e.value) and "s3cret" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_changed_recipe_is_refused_and_the_study_kept(existing):
    url, stored, n = existing
    changed = recipe_from_dict(tiny_recipe(study={"storage": url}, train={"epochs": 5}))
    with pytest.raises(SearchError, match=r"different recipe \(train.epochs: 2 -> 5\); .*--force"):
        st.open_study(changed, url)
    _unchanged(url, stored, n)


def test_cli_bad_recipes_exit_2_with_one_line(tmp_path):
    write_recipe(tmp_path / "ok.yaml", tiny_recipe())
    write_recipe(tmp_path / "bad.yaml", tiny_recipe(study={"name": "tiny", "pruner": "medain"}))
    cases = [
        (("run", "bad.yaml"), "bad.yaml: study.pruner.name: 'medain' is not allowed"),
        (("run", "ok.yaml", "--set", "study.storage=ftp://x"), "unsupported URL 'ftp://x'"),
        (("worker", "--storage", f"sqlite:///{tmp_path}/none.db", "--study", "nope"), "no study database at"),
        (("run", "ok.yaml", "--workers", "-1"), "--workers"),
        (("run", "ok.yaml", "--workers", "300"), "run --workers 300: give 0 (only create the study) to 256"),
        (("run", "ok.yaml", "--workers", "abc"), "run --workers: 'abc' is not a whole number; e.g. --workers 4"),
        (("rn", "ok.yaml"), "unknown command 'rn' (did you mean 'run'?); allowed: run, validate,"),
        (("report", "../../tmp/x"), "report study: '../../tmp/x' is not a study name"),
        (("worker", "--study", "a/b", "--storage", "sqlite:///x.db"), "--study: 'a/b' is not a study name"),
        (("best", "nosuch"), "no study database at studies/nosuch.db"),
        (("run", "ok.yaml", "--set", "study.origin=../../x"), "study.origin: String should match pattern"),
    ]
    for args, key in cases:
        proc = run_inline(*args, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and key in lines[0], (args, proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "ok.yaml"]  # no study, no database


def test_a_pool_entry_is_bounded_as_the_data_is():
    from search import datasets, pool

    assert pool.PoolEntryCfg.model_fields["resolution"].metadata[-1].le == datasets.MAX_RESOLUTION
