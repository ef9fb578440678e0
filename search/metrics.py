"""Classification metrics as pure functions of (logits, targets).

All macro averages are over the classes present in `targets` (scikit-learn's
convention for recall; for F1 a class predicted but absent counts with F1 0).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NAMES = ("loss", "accuracy", "balanced_accuracy", "f1", "auc")  # what a study may monitor: search.recipe.METRICS


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows = true class, columns = predicted."""
    idx = target.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(cm: torch.Tensor) -> float:
    """Fraction correct."""
    return int(cm.diag().sum()) / max(1, int(cm.sum()))


def balanced_accuracy(cm: torch.Tensor) -> float:
    """Mean recall over the classes present in the targets."""
    cm = cm.double()  # float32 would round the ratios at the 8th digit
    support = cm.sum(1)
    present = support > 0
    return float((cm.diag()[present] / support[present]).mean())


def macro_f1(cm: torch.Tensor) -> float:
    """Mean F1 over the classes in the targets or the predictions (2 TP / (support + predicted))."""
    tp = cm.diag().double()
    support, predicted = cm.sum(1).double(), cm.sum(0).double()
    used = (support + predicted) > 0  # classes seen in targets or predictions
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    return float(f1[used].mean())


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """Ranks 1..n of s; tied values share their average rank."""
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first occurrence
    return (first + (counts + 1) / 2)[inverse]


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos * n_neg)); nan if one class is missing."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auc(probs: torch.Tensor, target: torch.Tensor) -> float:
    """One-vs-rest macro AUC over the classes present; binary tasks use the positive class."""
    p = probs.double().cpu().numpy()
    t = target.cpu().numpy()
    if p.shape[1] == 2:
        return binary_auc(p[:, 1], t == 1)
    aucs = [binary_auc(p[:, c], t == c) for c in np.unique(t)]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def evaluate(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """All metrics of NAMES from raw logits (N, K) and integer targets (N,)."""
    logits, target = logits.float().cpu(), target.cpu()
    cm = confusion(logits.argmax(1), target, logits.shape[1])
    return {
        "loss": float(F.cross_entropy(logits, target)),
        "accuracy": accuracy(cm),
        "balanced_accuracy": balanced_accuracy(cm),
        "f1": macro_f1(cm),
        "auc": macro_auc(logits.softmax(1), target),
    }
