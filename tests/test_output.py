"""What the CLI prints fits 100 columns: every table, with long pool labels, shortened so that
they stay distinct; `--wide` prints them in full and CSV carries the exact values."""

from __future__ import annotations

import csv
import io

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from search import confirm, text
from search import study as st
from search.models import build_model
from search.recipe import recipe_from_dict
from tests.conftest import pool_trial, run_inline, tiny_recipe, write_recipe

WIDTH = 100
LONG = "mini_cnn_with_a_label_long_enough_to_overflow_any_leaderboard_column"
POOL = [
    "mini_cnn",
    {"model": "mini_cnn", "label": LONG},
    {"model": "timm/convnext_tiny", "pretrained": False, "resolution": 224},
    {"model": "timm/convnext_small", "pretrained": False, "resolution": 224},
    {"model": "timm/vit_base_patch16_clip_224", "pretrained": False, "resolution": 224},
]
LABELS = [
    "mini_cnn",
    LONG,
    "timm/convnext_tiny-scratch@224",
    "timm/convnext_small-scratch@224",
    "timm/vit_base_patch16_clip_224-scratch@224",
]
HP = {
    "lr": FloatDistribution(1e-4, 1e-1, log=True),
    "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
    "batch_size": CategoricalDistribution([32, 64, 128]),
    "dropout": FloatDistribution(0.0, 0.5),
    "label_smoothing": FloatDistribution(0.0, 0.2),
    "step_size": IntDistribution(2, 20),
}


def _params(i: int) -> dict:
    return {
        "model": LABELS[i % len(LABELS)],
        "lr": 1e-3 * (1 + i) / 3,
        "weight_decay": 1.234567e-5 * (1 + i),
        "batch_size": 32,
        "dropout": 0.0123456 * i,
        "label_smoothing": 0.1,
        "step_size": 3 + i,
    }


def _add(study, i, values):
    params = _params(i)
    attrs = {"weight_source": "none", "imagenet_overlap": "none", "params": 123_456_789 * (i + 1)}
    attrs |= {"epochs": 2, "sec_per_epoch": 1234.5, "best_epoch": 2}
    pool_trial(
        study,
        values,
        params["model"],
        params=params,
        dists={"model": CategoricalDistribution(LABELS), **HP},
        attrs=attrs,
    )


@pytest.fixture(scope="module")
def wide_studies(tmp_path_factory):
    """Two studies with long labels: one objective (with confirmation runs and a stored rank) and two
    objectives (a Pareto front), made with Optuna's create_trial (no training)."""
    cwd = tmp_path_factory.mktemp("wide")
    one = recipe_from_dict(tiny_recipe("wide", pool=POOL, study={"storage": f"sqlite:///{cwd}/studies/wide.db"}))
    (cwd / "studies").mkdir()
    study = st.open_study(one)
    for i in range(10):
        _add(study, i, [0.5 + 0.04 * i])
    comp = confirm.create_companion(study)
    for n in (7, 8, 9):
        for k in (1, 2):
            comp.add_trial(
                create_trial(
                    value=0.5 + 0.04 * n - 0.01 * k,
                    params=_params(n),
                    distributions={"model": CategoricalDistribution(LABELS), **HP},
                    user_attrs={"confirms": n, "seed_index": k},
                )
            )
    rows = [
        {
            "entry": e,
            "status": "ok",
            "logme": 0.1 * i,
            "probe": 0.5,
            "knn": 0.4,
            "note": "",
            "dim": 512,
            "seconds": 1.0,
            "cached": False,
        }
        for i, e in enumerate(LABELS[1:])
    ]
    rows.append(
        {
            "entry": "mini_cnn",
            "status": "scratch",
            "logme": None,
            "probe": None,
            "knn": None,
            "note": "scratch: not rankable " + "and a long reason " * 6,
            "dim": None,
            "seconds": None,
            "cached": False,
        }
    )
    study.set_user_attr(
        "rank",
        {
            "rows": rows,
            "by": "logme",
            "keep": None,
            "order": LABELS[1:] + ["mini_cnn"],
            "dropped": [],
            "unranked": {"mini_cnn": rows[-1]["note"]},
        },
    )
    two = recipe_from_dict(
        tiny_recipe(
            "wide2",
            pool=POOL,
            study={
                "storage": f"sqlite:///{cwd}/studies/wide2.db",
                "objectives": ["accuracy", "latency_ms"],
                "pruner": "none",
            },
        )
    )
    study2 = st.open_study(two)
    for i in range(10):
        _add(study2, i, [0.5 + 0.04 * i, 10.0 + 3 * i])
    return cwd


def _assert_fits(out: str, what: str) -> None:
    long = [(len(line), line) for line in out.splitlines() if len(line) > WIDTH]
    assert not long, f"{what}: lines over {WIDTH} columns: {long}"


@pytest.mark.slow
def test_report_tables_fit_100_columns_and_names_stay_distinct(wide_studies):
    proc = run_inline("report", "wide", cwd=wide_studies)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    _assert_fits(out, "report")
    for head in (
        "leaderboard (validation accuracy)",
        "top 3 trials:",
        "confirmed over seeds",
        "rank before the search",
        "parameter importances",
    ):
        assert head in out
    board = out[: out.index("compute per pool entry")]  # the table, then the lines under it
    entries = [line.split("  ")[1].strip() for line in board.splitlines() if line.startswith("  ")][2:]
    assert len(entries) == 5 and len(set(entries)) == 5, entries  # shortened, still told apart
    assert any(e.startswith("mini_cnn") and "…" in e for e in entries), board
    hp_lines = out[out.index("top 3 trials:") : out.index("confirmed over seeds")].splitlines()
    assert any(line.startswith(" " * 20) and "step_size=" in line for line in hp_lines)  # wrapped, not cut

    wide = run_inline("report", "wide", "--wide", cwd=wide_studies)
    assert wide.returncode == 0, wide.stderr
    assert LONG in wide.stdout and "123,456,789" in wide.stdout and "…" not in wide.stdout
    assert max(len(line) for line in wide.stdout.splitlines()) > WIDTH

    with (wide_studies / "studies" / "wide" / "report" / "leaderboard.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["entry"] for r in rows} == set(LABELS) and {r["params"] for r in rows} >= {"123456789"}


@pytest.mark.slow
def test_pareto_front_and_best_refusal_fit(wide_studies):
    proc = run_inline("report", "wide2", cwd=wide_studies)
    assert proc.returncode == 0, proc.stderr
    _assert_fits(proc.stdout, "report of two objectives")
    assert "Pareto front: 10 trials" in proc.stdout
    best = run_inline("best", "wide2", cwd=wide_studies)
    assert best.returncode == 2
    _assert_fits("\n".join(best.stderr.splitlines()[:-1]), "best's Pareto table")  # the last: the error line


@pytest.mark.slow
def test_best_confirm_models_and_validate_fit(wide_studies, tmp_path):
    best = run_inline("best", "wide", "--out", "b.yaml", cwd=wide_studies)
    assert best.returncode == 0, best.stderr
    _assert_fits(best.stdout, "best")
    _assert_fits((wide_studies / "b.yaml").read_text(), "best.yaml")

    models = run_inline("models", cwd=tmp_path)
    assert models.returncode == 0, models.stderr
    _assert_fits(models.stdout, "models")
    lines = models.stdout.splitlines()
    header = lines[0]
    rows = [line for line in lines[2:] if line and not line[0].isspace() and not line.startswith("params:")]
    assert len(rows) == 9
    # aligned: every row's params column ends where the header's does
    end = header.index("params") + len("params")
    assert all(r[end - 1] != " " and r[end : end + 2] in ("  ", "") for r in rows), rows
    assert "params: counted with an ImageNet head (1,000 classes; mini_cnn 10)" in models.stdout

    name = "timm/mobilenetv3_large_100.ra4_e3600_r224_in1k"
    one = run_inline("models", name, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    _assert_fits(one.stdout, "models NAME")
    [row] = [line for line in one.stdout.splitlines() if line.startswith("timm/")]
    assert "…" in row and row.split()[1:4] == ["ra4_e3600_r224_in1k", "in1k", "full"]  # the tag stays readable
    wide = run_inline("models", name, "--wide", cwd=tmp_path)
    assert name in wide.stdout and "5,483,032" in wide.stdout

    as_csv = run_inline("models", "--csv", cwd=tmp_path)
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    mini = build_model({"model": "mini_cnn", "pretrained": False}, num_classes=10, in_chans=3, resolution=224)
    assert len(rows) == 9 and rows[0]["label"] == "mini_cnn"
    assert int(rows[0]["params"]) == sum(p.numel() for p in mini.parameters())

    f = write_recipe(tmp_path / "long.yaml", tiny_recipe("long", pool=POOL))
    val = run_inline("validate", str(f), cwd=tmp_path)
    assert val.returncode == 0, val.stderr
    _assert_fits(val.stdout, "validate")
    assert "timm/vit_base_patch16_clip_224-scratch@224" in val.stdout  # the pool table: all fit whole


def test_shorten_all_tells_names_apart():
    names = ["timm/convnext_tiny.fb_in22k_ft_in1k", "timm/convnext_small.fb_in22k_ft_in1k", "mini_cnn"]
    short = text.shorten_all(names, 20)
    assert all(len(v) <= 20 for v in short.values()) and len(set(short.values())) == 3
    assert short["mini_cnn"] == "mini_cnn"
    assert text.shorten("abcdefghij", 5) == "ab…ij" and text.shorten("abc", 5) == "abc"
    lines = text.table(
        ["name", "n", "notes"], [[n, i, "word " * 30] for i, n in enumerate(names)], right=[False, True], wrap=True
    )
    assert max(map(len, lines)) <= WIDTH and sum(line.startswith(" ") for line in lines) >= 3


@pytest.mark.slow
def test_running_study_state_counts_and_empty_top(tmp_path):
    """No complete trial: the report says so, with the states, instead of an empty 'top 3 trials:'."""
    recipe = recipe_from_dict(tiny_recipe("empty", study={"storage": f"sqlite:///{tmp_path}/e.db"}))
    study = st.open_study(recipe)
    pool_trial(study, None, state=TrialState.PRUNED, intermediate_values={1: 0.3})
    proc = run_inline("report", "empty", "--storage", f"sqlite:///{tmp_path}/e.db", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "top trials: none yet, no trial has completed (1 pruned)" in proc.stdout
    assert "top 3 trials:" not in proc.stdout
    _assert_fits(proc.stdout, "empty report")
