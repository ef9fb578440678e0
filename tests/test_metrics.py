"""Metrics against scikit-learn on fixed inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from search import metrics


def fixed(num_classes: int, n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits correlated with the targets (so metrics are far from chance) with some exact ties."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    logits = torch.randn(n, num_classes, generator=g)
    logits[torch.arange(n), y] += 2.0
    logits[: n // 10] = logits[n // 10 : 2 * (n // 10)]  # duplicated rows: tied scores in the AUC ranks
    return logits.round(decimals=1), y


@pytest.mark.parametrize("num_classes", [2, 3, 10])
def test_evaluate_matches_sklearn(num_classes):
    logits, y = fixed(num_classes)
    got = metrics.evaluate(logits, y)
    pred, t, probs = logits.argmax(1).numpy(), y.numpy(), logits.softmax(1).double().numpy()
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(t, pred), abs=1e-12)
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(t, pred), abs=1e-12)
    assert got["f1"] == pytest.approx(skm.f1_score(t, pred, average="macro"), abs=1e-12)
    if num_classes == 2:
        want_auc = skm.roc_auc_score(t, probs[:, 1])
    else:
        want_auc = skm.roc_auc_score(t, probs, multi_class="ovr", average="macro")
    assert got["auc"] == pytest.approx(want_auc, abs=1e-12)
    assert got["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)
    assert 0.5 < got["accuracy"] < 1.0  # the inputs are informative but not perfect


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_f1_counts_a_predicted_but_absent_class_as_zero():
    y = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])  # class 2 is predicted once but never true
    cm = metrics.confusion(pred, y, 3)
    want = skm.f1_score(y.numpy(), pred.numpy(), average="macro")
    assert metrics.macro_f1(cm) == pytest.approx(want)
    assert metrics.balanced_accuracy(cm) == pytest.approx(skm.balanced_accuracy_score(y.numpy(), pred.numpy()))


def test_average_ranks_with_ties():
    s = np.array([3.0, 1.0, 3.0, 2.0, 3.0])
    assert metrics._average_ranks(s).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]


def test_binary_auc_single_class_is_nan():
    assert np.isnan(metrics.binary_auc(np.array([0.1, 0.9]), np.array([True, True])))
    assert metrics.binary_auc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
