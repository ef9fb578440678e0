"""Classification metrics as pure functions of (logits, targets).

All macro averages are over the classes present in `targets` (scikit-learn's
convention for recall; for F1 a class predicted but absent counts with F1 0).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NAMES = ("loss", "accuracy", "balanced_accuracy", "f1", "auc")


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows = true class, columns = predicted."""
    idx = target.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(cm: torch.Tensor) -> float:
    return float(cm.diag().sum() / cm.sum().clamp(min=1))


def balanced_accuracy(cm: torch.Tensor) -> float:
    support = cm.sum(1)
    present = support > 0
    return float((cm.diag()[present] / support[present]).mean())


def macro_f1(cm: torch.Tensor) -> float:
    tp = cm.diag().double()
    support, predicted = cm.sum(1).double(), cm.sum(0).double()
    used = (support + predicted) > 0  # classes seen in targets or predictions
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    return float(f1[used].mean())


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get their average rank."""
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


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
