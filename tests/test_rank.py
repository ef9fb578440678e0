"""Rank scores against plain references, their invariances, and the ranking of known-quality weights."""

from __future__ import annotations

import numpy as np
import pytest

from search import rank


def _evidence_on(t: np.ndarray, f: np.ndarray, y: np.ndarray, lam: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The paper's log evidence / n term by term at each alpha / beta = t, beta optimal for t:
    m = (F^T F + t I)^-1 F^T y (= beta A^-1 F^T y with A = alpha I + beta F^T F), beta = n / E with
    E = |F m - y|^2 + t |m|^2, then n/2 log beta + d/2 log alpha - n/2 log 2 pi - beta/2 |F m - y|^2
    - alpha/2 |m|^2 - 1/2 log |A|."""
    n, d = f.shape
    m = v @ ((v.T @ (f.T @ y))[:, None] / (lam[:, None] + t))  # (d, len(t))
    fit2 = ((f @ m - y[:, None]) ** 2).sum(0)
    m2 = (m**2).sum(0)
    beta = n / (fit2 + t * m2)
    alpha = t * beta
    logdet = np.log(alpha[:, None] + beta[:, None] * lam).sum(1)
    ev = n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
    return (ev - beta / 2 * fit2 - alpha / 2 * m2 - logdet / 2) / n


def grid_logme(f: np.ndarray, labels: np.ndarray) -> float:
    """Brute force: the evidence of each one-hot column on a grid of log(alpha / beta) from 25
    decades below to 12 above the largest eigenvalue of F^T F (1,500 points), then a 1,001-point grid
    two steps either side of the best; its maximum or the limit alpha / beta -> infinity (where F
    carries nothing of y: the evidence of y ~ N(0, |y|^2 / n)), averaged over classes."""
    f = f.astype(np.float64)
    n, _ = f.shape
    lam, v = np.linalg.eigh(f.T @ f)
    lam = lam.clip(min=0)
    coarse = np.linspace(np.log(lam.max()) - 25 * np.log(10), np.log(lam.max()) + 12 * np.log(10), 1500)
    step = coarse[1] - coarse[0]
    out = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)
        ev = _evidence_on(np.exp(coarse), f, y, lam, v)
        at = coarse[np.nanargmax(ev)]
        fine = _evidence_on(np.exp(np.linspace(at - 2 * step, at + 2 * step, 1001)), f, y, lam, v)
        limit = (-n / 2 * np.log(y @ y / n) - n / 2 * (1 + np.log(2 * np.pi))) / n
        out.append(max(float(np.nanmax(fine)), float(np.nanmax(ev)), limit))
    return float(np.mean(out))


def structured(n: int, d: int, classes: int, seed: int, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Class means plus Gaussian noise: features that carry the labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centres = rng.normal(size=(classes, d)) * 2
    return centres[y] + noise * rng.normal(size=(n, d)), y


def features(kind: str, n: int, d: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if kind == "random":  # labels independent of the features, uneven dimension scales
        rng = np.random.default_rng(seed)
        return rng.normal(size=(n, d)) * rng.uniform(0.1, 3, size=d), rng.integers(0, classes, n)
    return structured(n, d, classes, seed=seed)  # separable class means


@pytest.mark.parametrize("n,d,classes", [(40, 80, 3), (30, 200, 5), (200, 16, 2), (150, 64, 10)])
@pytest.mark.parametrize("kind", ["separable", "random"])
@pytest.mark.parametrize("seed", [0, 1, 80])
def test_logme_is_the_maximum_evidence_at_every_scale(n, d, classes, kind, seed):
    f, y = features(kind, n, d, classes, seed)
    best = grid_logme(f, y)
    for c in (1e-3, 0.5, 1, 2, 10, 1e3):  # a global scale is absorbed by alpha: one maximum for all
        assert rank.logme(c * f, y) == pytest.approx(best, rel=1e-6)


def test_logme_finds_the_maximum_the_fixed_point_iteration_misses():
    """n < d, separable classes: the paper's iteration from alpha = beta = 1 stops at a lower
    stationary point for some feature scales; the maximum is the same at every scale."""
    f, y = structured(40, 80, 3, seed=80)
    best = grid_logme(f, y)
    assert best == pytest.approx(0.7916878858766015, rel=1e-6)
    for c in (0.5, 1, 2, 10):
        assert rank.logme(c * f + 1e-6 * np.random.default_rng(0).normal(size=f.shape), y) == pytest.approx(best)


def test_logme_degenerate_inputs():
    f, y = structured(60, 12, 3, seed=3)
    base = rank.logme(f, y)
    # a constant feature and a copy of a column add no rank: the spectrum, and the score, are unchanged
    wider = np.hstack([f, np.zeros((60, 1)), f[:, :1]])
    assert np.isfinite(rank.logme(wider, y))
    assert rank.logme(np.hstack([f, np.zeros((60, 3))]), y) == pytest.approx(base, rel=1e-9)
    # features that carry nothing: the limit alpha / beta -> infinity, the evidence of N(0, |y|^2 / n)
    n, fraction = 60, np.bincount(y) / 60
    limit = np.mean([(-n / 2 * np.log(p) - n / 2 * (1 + np.log(2 * np.pi))) / n for p in fraction])
    assert rank.logme(np.zeros((60, 12)), y) == pytest.approx(limit, rel=1e-12)
    # one class: a constant column, finite
    assert np.isfinite(rank.logme(f, np.zeros(60, dtype=int)))
    with pytest.raises(ValueError, match="n >= 2"):
        rank.logme(f[:1], y[:1])


def test_logme_invariances():
    f, y = structured(240, 24, 4, seed=1)
    base = rank.logme(f, y)
    perm = np.array([2, 0, 3, 1])
    assert rank.logme(f, perm[y]) == pytest.approx(base, rel=1e-9)  # class names do not matter
    for c in (1e-3, 0.5, 7.0, 1e3):  # a global scale of the features is absorbed by alpha
        assert rank.logme(c * f, y) == pytest.approx(base, rel=1e-6)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(24, 24)))
    assert rank.logme(f @ q, y) == pytest.approx(base, rel=1e-6)  # the isotropic prior sees no direction
    order = np.random.default_rng(1).permutation(len(y))
    assert rank.logme(f[order], y[order]) == pytest.approx(base, rel=1e-9)
    # ...but it is not invariant to scaling single dimensions (the prior is isotropic)
    scaled = f * np.linspace(0.01, 10, 24)
    assert abs(rank.logme(scaled, y) - base) > 1e-3


def test_logme_prefers_informative_features():
    good, y = structured(300, 32, 5, seed=2, noise=0.5)
    bad = np.random.default_rng(3).normal(size=good.shape)
    assert rank.logme(good, y) > rank.logme(bad, y) + 0.1


def reference_knn(tr, ytr, va, yva, k):
    out = []
    for v in va:
        sims = np.array([v @ t / np.linalg.norm(v) / np.linalg.norm(t) for t in tr])
        nn = np.argsort(-sims, kind="stable")[:k]
        votes = {}
        for i in nn:
            cnt, s = votes.get(ytr[i], (0, 0.0))
            votes[ytr[i]] = (cnt + 1, s + sims[i])
        out.append(max(votes, key=lambda c: votes[c]))
    return float(np.mean(np.array(out) == yva))


@pytest.mark.parametrize("k", [1, 5, 10])
def test_knn_matches_a_plain_vote(k):
    f, y = structured(260, 12, 4, seed=4, noise=3.0)
    tr, ytr, va, yva = f[:200], y[:200], f[200:], y[200:]
    got = rank.knn_accuracy(tr, ytr, va, yva, k)
    assert got == pytest.approx(reference_knn(tr, ytr, va, yva, k))
    assert rank.knn_accuracy(tr * 5, ytr, va * 0.1, yva, k) == got  # cosine: per-image scale is ignored


def test_knn_ties_are_decided_the_same_way_everywhere():
    tr = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # two identical images, different labels
    va = np.array([[2.0, 0.0]])
    assert rank.knn_accuracy(tr, np.array([1, 0, 0]), va, np.array([1]), k=1) == 1.0  # the earlier one
    assert rank.knn_accuracy(tr, np.array([0, 1, 0]), va, np.array([0]), k=1) == 1.0
    # k=2: one vote each, equal similarity: the smaller label
    assert rank.knn_accuracy(tr, np.array([1, 0, 0]), va, np.array([0]), k=2) == 1.0
    # similarities equal up to rounding are equal
    nudged = tr + np.array([[0.0, 1e-15], [0.0, 0.0], [0.0, 0.0]])
    assert rank.knn_accuracy(nudged, np.array([1, 0, 0]), va, np.array([1]), k=1) == 1.0


def test_linear_probe_on_degenerate_inputs():
    f, y = structured(40, 80, 4, seed=7)  # n < d
    tr, ytr, va, yva = f[:30], y[:30], f[30:], y[30:]
    acc = rank.linear_probe(tr, ytr, va, yva)
    assert acc >= 0.9  # separable class means: a strong enough ridge still finds them
    wide = np.hstack([tr, np.ones((30, 5)), tr[:, :3]])  # constant and duplicate columns
    assert rank.linear_probe(wide, ytr, np.hstack([va, np.ones((10, 5)), va[:, :3]]), yva) >= 0.9
    assert rank.linear_probe(np.vstack([tr, tr]), np.hstack([ytr, ytr]), va, yva) >= 0.9  # duplicate rows
    assert rank.linear_probe(tr, np.zeros(30, dtype=int), va, np.zeros(10, dtype=int)) == 1.0  # one class


def test_linear_probe_is_deterministic_and_scale_free():
    f, y = structured(400, 20, 5, seed=5, noise=2.0)
    tr, ytr, va, yva = f[:300], y[:300], f[300:], y[300:]
    acc = rank.linear_probe(tr, ytr, va, yva)
    assert 0.5 < acc <= 1.0
    scale = np.linspace(0.1, 100, 20)  # standardised first: per-dimension scales do not matter
    assert rank.linear_probe(tr * scale, ytr, va * scale, yva) == pytest.approx(acc)
    noise = np.random.default_rng(6).normal(size=f.shape)
    assert rank.linear_probe(noise[:300], ytr, noise[300:], yva) < acc - 0.3


def test_order_and_decision_keep_unranked_entries():
    rows = [
        {"entry": "a", "status": "ok", "logme": 0.1, "note": ""},
        {"entry": "b", "status": "scratch", "logme": None, "note": "scratch: not rankable"},
        {"entry": "c", "status": "ok", "logme": 0.5, "note": ""},
        {"entry": "d", "status": "failed", "logme": None, "note": "weights missing"},
        {"entry": "e", "status": "ok", "logme": 0.3, "note": ""},
    ]
    ranked = rank.sort_rows(rows, "logme")
    assert [r["entry"] for r in ranked] == ["c", "e", "a", "b", "d"]
    d = rank.decide(ranked, keep=2, by="logme")
    assert d["order"] == ["c", "e", "b", "d"] and d["dropped"] == ["a"]
    assert d["unranked"] == {"b": "scratch: not rankable", "d": "weights missing"}
    text = rank.decision_text(d)
    assert "dropped a" in text and "d kept unranked (weights missing)" in text


# ---------------------------------------------------------------------------
# checkpoints of known quality in the real caches: the same architecture trained on the task


# epochs trained on digits; 0 is the random initialisation, saved as it is
KNOWN = {"timm/resnet18.a1_in1k": 3, "timm/resnet18.a2_in1k": 1, "timm/resnet18.a3_in1k": 0}
RES = 16
N_TRAIN = 600  # images the checkpoints are trained on and ranked with


def _train(epochs: int, data, seed: int = 0):
    """timm ResNet-18 at 16 px on digits (gray replicated to RGB, as a published 3-channel checkpoint)."""
    import torch

    from search.augment import eval_input
    from search.models import IMAGENET_MEAN, IMAGENET_STD, build_model

    torch.manual_seed(seed)
    model = build_model(
        {"model": "timm/resnet18.a1_in1k", "pretrained": False}, num_classes=10, in_chans=3, resolution=RES
    )
    x = eval_input(data.train.x.expand(-1, 3, -1, -1), RES, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    x, y = x[:N_TRAIN], data.train.y[:N_TRAIN]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.fc = torch.nn.Linear(512, 1000)  # a published checkpoint has its ImageNet head
    return model


@pytest.fixture(scope="session")
def known_caches(tmp_path_factory):
    """HF caches holding the 3-, 1- and 0-epoch checkpoints under three timm tags of one architecture
    (trained once per run, whichever test process asks first)."""
    from search.data import load_data
    from search.recipe import DataCfg
    from tests.conftest import built_once
    from tests.weights_cache import hf_checkpoint

    def build(root):
        data = load_data(DataCfg(dataset="digits"), 0)
        for name, epochs in KNOWN.items():
            hf_checkpoint(root / "hf", name, _train(epochs, data, seed=1))

    return built_once(tmp_path_factory, "known-quality-caches", build)


def _known_recipe(name: str, **over) -> dict:
    from tests.conftest import tiny_recipe

    base = {
        "pool": [{"model": m, "resolution": RES} for m in KNOWN] + ["mini_cnn"],
        "rank": {"max_images": N_TRAIN},
        "train": {"channel_reduce": "sum"},
        "data": {"max_samples": None},
    }
    for key, value in over.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return tiny_recipe(name, **base)


def _env(root, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
def test_scores_rank_checkpoints_of_known_quality(known_caches, monkeypatch, tmp_path):
    from search.recipe import recipe_from_dict

    _env(known_caches, monkeypatch)
    monkeypatch.setenv("SEARCH_DATA", str(tmp_path / "data"))
    recipe = recipe_from_dict(_known_recipe("known"))
    rows = rank.rank_pool(recipe)
    by = {r["entry"]: r for r in rows}
    labels = [f"{m}@{RES}" for m in KNOWN]
    assert all(by[x]["status"] == "ok" and by[x]["dim"] == 512 for x in labels), [r["note"] for r in rows]
    assert by["mini_cnn"]["status"] == "scratch"
    for score in rank.SCORES:
        values = [by[x][score] for x in labels]
        assert values[0] > values[1] > values[2], (score, values)
    assert [r["entry"] for r in rows] == [*labels, "mini_cnn"]
    # a second rank reads the cached features: the same scores
    again = {r["entry"]: r for r in rank.rank_pool(recipe)}
    assert all(again[x]["cached"] and again[x]["logme"] == by[x]["logme"] for x in labels)
    files = sorted((tmp_path / "data" / "rank-features" / "digits").glob("*.npz"))
    assert len(files) == 3


@pytest.mark.slow
def test_cli_rank_table_and_missing_weights(known_caches, tmp_path):
    from tests.conftest import run_inline, write_recipe

    env = {
        "HF_HUB_CACHE": str(known_caches / "hf"),
        "TORCH_HOME": str(known_caches / "torch"),
        "HF_HUB_OFFLINE": "1",
        "SEARCH_DATA": str(tmp_path / "data"),
    }
    write_recipe(tmp_path / "r.yaml", _known_recipe("cli", rank={"max_images": 300, "by": "knn"}))
    proc = run_inline("rank", "r.yaml", "-q", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert all(len(line) <= 100 for line in lines if "rank-features" not in line)
    table = [line for line in lines if line[:2].strip() in ("1", "2", "3", "4", "-")]
    assert table[0].split()[1] == f"timm/resnet18.a1_in1k@{RES}"
    assert "mini_cnn" in table[-1] and "scratch: not rankable" in table[-1]
    assert "ranked by knn on 300 train" in proc.stdout
    write_recipe(tmp_path / "bad.yaml", _known_recipe("cli", pool=["resnet_18"]))
    proc = run_inline("rank", "bad.yaml", cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "resnet18-f37072fd.pth" in proc.stderr and "prefetch" in proc.stderr


@pytest.mark.slow
def test_study_rank_keep_2_end_to_end(known_caches, tmp_path):
    """study.rank {keep: 2, order: true}: the worst entry is never sampled, the two kept ones are
    trained first in rank order, and the report sets the scores against the fine-tuned results."""
    import json
    import uuid

    import optuna

    from tests.conftest import run_inline, write_recipe

    env = {
        "HF_HUB_CACHE": str(known_caches / "hf"),
        "TORCH_HOME": str(known_caches / "torch"),
        "HF_HUB_OFFLINE": "1",
        "SEARCH_DATA": str(tmp_path / "data"),
    }
    name = f"keep2-{uuid.uuid4().hex[:8]}"
    labels = [f"{m}@{RES}" for m in KNOWN]
    write_recipe(
        tmp_path / "r.yaml",
        _known_recipe(
            name,
            pool=[{"model": m, "resolution": RES} for m in KNOWN],
            study={"n_trials": 3, "rank": {"keep": 2, "order": True}},
            data={"max_samples": 300},
            rank={"max_images": 300},
            train={"epochs": 1},
        ),
    )
    proc = run_inline("run", "r.yaml", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"rank: keeping {labels[0]}, {labels[1]}; dropped {labels[2]}" in proc.stdout
    assert "Kendall's tau with the fine-tuned ranking (2 entries)" in proc.stdout
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/studies/{name}.db")
    trials = study.get_trials()
    assert [t.user_attrs["pool_label"] for t in trials[:2]] == labels[:2]  # enqueued in rank order
    assert {t.params["model"] for t in trials} <= set(labels[:2])
    stored = study.user_attrs["rank"]
    assert stored["order"] == labels[:2] and stored["dropped"] == [labels[2]] and stored["by"] == "logme"
    assert [r["entry"] for r in stored["rows"]] == labels
    # a second run reads the stored decision: nothing is ranked again
    again = run_inline("run", "r.yaml", cwd=tmp_path, env=env)
    assert again.returncode == 0 and "ranking 3 pool entries" not in again.stdout
    assert f"dropped {labels[2]}" in again.stdout
    rep = run_inline("report", name, cwd=tmp_path, env=env)
    assert rep.returncode == 0, rep.stderr
    lines = rep.stdout.splitlines()
    row = next(line for line in lines if line.startswith(" 3  "))
    assert labels[2] in row and "dropped" in row
    assert any(line.startswith(" 1  " + labels[0]) for line in lines)
    out = tmp_path / "studies" / name / "report"
    assert (out / "rank.png").stat().st_size > 10_000
    csv_rows = (out / "rank.csv").read_text().splitlines()
    assert csv_rows[0].startswith("entry,rank,logme,probe,knn,kept,fine_tuned_best") and len(csv_rows) == 4
    assert "Rank scores against fine-tuned results" in (out / "leaderboard.md").read_text()
    assert json.dumps(stored)  # plain JSON in the study


def test_report_tau_matches_scipy_and_direction():
    """Kendall's tau of the stored scores against fine-tuned bests, through a study with no model."""
    import optuna
    from scipy.stats import kendalltau

    from search import report
    from search.recipe import recipe_from_dict
    from tests.conftest import tiny_recipe

    for direction, metric in (("maximize", "accuracy"), ("minimize", "loss")):
        recipe = recipe_from_dict(tiny_recipe("tau", pool=["mini_cnn"], study={"metric": metric}))
        study = optuna.create_study(direction=direction)
        rows = [
            {"entry": e, "status": "ok", "logme": lg, "probe": p, "knn": k, "note": ""}
            for e, lg, p, k in (("a", 0.9, 0.8, 0.7), ("b", 0.5, 0.9, 0.6), ("c", 0.1, 0.3, 0.8))
        ]
        study.set_user_attr(
            "rank", {"rows": rows, "by": "logme", "keep": None, "order": ["a", "b", "c"], "dropped": [], "unranked": {}}
        )
        best = {"a": 0.95, "b": 0.90, "c": 0.40}
        for e, v in best.items():
            study.add_trial(
                optuna.trial.create_trial(
                    params={},
                    distributions={},
                    value=v if direction == "maximize" else -v,
                    user_attrs={"pool_label": e},
                )
            )
        taus = report.rank_tau(study, recipe)
        sign = 1 if direction == "maximize" else -1
        for k in ("logme", "probe", "knn"):
            want = kendalltau(
                [r[k] for r in rows], [sign * (best[r["entry"]] if sign > 0 else -best[r["entry"]]) for r in rows]
            ).statistic
            assert taus[k] == (pytest.approx(want), 3)
        assert taus["logme"][0] == pytest.approx(1.0)  # logme orders a > b > c, as fine-tuning did
        text = report.rank_text(study, recipe)
        assert "Kendall's tau with the fine-tuned ranking (3 entries): logme +1.00" in text
        assert all(len(line) <= 100 for line in text.splitlines())
