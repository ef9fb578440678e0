"""Datasets as uint8 tensors (N, C, H, W) with integer labels, decoded once per
process and split without ever touching the official test split for selection.

A loader returns `Raw` (official splits it has, class names, ImageNet overlap,
augmentation defaults); `load_data` adds the seeded stratified carve-outs and
the `max_samples` subsample and returns `Data`, which training consumes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from search.augment import AugmentCfg
from search.errors import SearchError, did_you_mean, one_of
from search.recipe import DataCfg

OVERLAPS = ("semantic", "none", "unknown")  # a dataset's declared overlap with ImageNet


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: torch.Tensor | np.ndarray) -> Split:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Split(self.x[idx], self.y[idx])


@dataclass(frozen=True)
class Raw:
    """What a loader returns: the official splits it has."""

    train: Split
    val: Split | None
    test: Split | None
    classes: tuple[str, ...]
    overlap: str  # one of OVERLAPS
    augment: AugmentCfg = field(default_factory=AugmentCfg)


@dataclass(frozen=True)
class Data:
    name: str
    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]
    overlap: str
    augment: AugmentCfg
    resolution: int  # what data-following models see (the native size unless the recipe says)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.train.x.shape[1])

    def summary(self) -> str:
        return (f"{self.name}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test, "
                f"{self.num_classes} classes, {self.in_chans}x{self.train.x.shape[2]}x{self.train.x.shape[3]} "
                f"-> {self.resolution} px")


def data_root(cfg: DataCfg) -> Path:
    """Recipe `data.root`, else $SEARCH_DATA, else the user cache directory."""
    if cfg.root:
        return Path(cfg.root).expanduser()
    if os.environ.get("SEARCH_DATA"):
        return Path(os.environ["SEARCH_DATA"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "search" / "data"


def stratified_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, out): `fraction` of every class goes out, seeded, classes with 1 sample stay."""
    rng = np.random.default_rng(seed)
    labels = y.numpy()
    keep, out = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_out = int(round(fraction * len(idx))) if len(idx) > 1 else 0
        n_out = min(max(n_out, 1 if len(idx) > 1 else 0), len(idx) - 1)
        out.append(idx[:n_out])
        keep.append(idx[n_out:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(out))


# ---------------------------------------------------------------------------
# loaders: (DataCfg, root) -> Raw


def _digits(cfg: DataCfg, root: Path) -> Raw:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): no network needed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.clip(d.images * 16, 0, 255).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    return Raw(Split(x, y), None, None, tuple(str(i) for i in range(10)), "none",
               AugmentCfg(crop="pad", flip=False, rotate=10.0, jitter=0.0))


LOADERS: dict[str, Callable[[DataCfg, Path], Raw]] = {
    "digits": _digits,
}


def dataset_names() -> list[str]:
    return [*LOADERS, "folder:PATH"]


def loader_for(name: str) -> Callable[[DataCfg, Path], Raw]:
    key = "folder" if name.startswith("folder:") else name
    if key not in LOADERS:
        raise SearchError(
            f"data.dataset: unknown dataset '{name}'{did_you_mean(name, LOADERS)}; allowed: {one_of(dataset_names())}"
        )
    return LOADERS[key]


@lru_cache(maxsize=4)
def _raw(cfg: DataCfg) -> Raw:
    """Decode once per process: every trial of this worker reuses the tensors."""
    return loader_for(cfg.dataset)(cfg, data_root(cfg))


def load_data(cfg: DataCfg, seed: int = 0) -> Data:
    """The dataset with train/val/test splits: official ones where they exist, else stratified carve-outs."""
    raw = _raw(cfg)
    train, val, test = raw.train, raw.val, raw.test
    if test is None:
        keep, out = stratified_split(train.y, cfg.test_split, seed)
        train, test = train.take(keep), train.take(out)
    if val is None:
        keep, out = stratified_split(train.y, cfg.val_split, seed + 1)
        train, val = train.take(keep), train.take(out)
    if cfg.max_samples and cfg.max_samples < len(train):
        _, sub = stratified_split(train.y, cfg.max_samples / len(train), seed + 2)
        train = train.take(sub)
    aug = raw.augment
    overrides = {k: getattr(cfg, k) for k in ("crop", "flip", "rotate", "jitter") if getattr(cfg, k) is not None}
    aug = replace(aug, **overrides)
    resolution = cfg.resolution or int(train.x.shape[-1])
    return Data(cfg.dataset, train, val, test, raw.classes, raw.overlap, aug, resolution)
