"""What every dataset source returns: `Split` (uint8 images, int64 labels) and `Raw` (the official
splits a source has), the seeded stratified split, and the .npy layout of decoded splits.

Kept apart from the package's top so that the source modules can use them without
importing the registry that imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from search.data.cache import mmap_tensor
from search.datasets import AugmentCfg


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: torch.Tensor | np.ndarray) -> Split:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Split(self.x.index_select(0, idx), self.y.index_select(0, idx))  # row copies: far faster than [idx]


@dataclass(frozen=True)
class Raw:
    """What a loader returns: the official splits it has."""

    train: Split
    val: Split | None
    test: Split | None
    classes: tuple[str, ...]
    overlap: str  # declared overlap with ImageNet: semantic, none or unknown
    augment: AugmentCfg = field(default_factory=AugmentCfg)
    cache: Path | None = None  # the .npy directory behind it, where carve-outs are kept too


def n_out(n: int, fraction: float) -> int:
    """How many of a class's `n` samples `stratified_split` moves out: `fraction` of them rounded,
    at least one and at most all but one; none of a class with fewer than two. Seed-free, so split
    sizes are known from class counts alone (`search.data.split_sizes`)."""
    return 0 if n < 2 else min(max(int(round(fraction * n)), 1), n - 1)


def stratified_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, out): `fraction` of every class goes out, seeded, classes with 1 sample stay."""
    rng = np.random.default_rng(seed)
    labels = y.numpy()
    keep, out = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = n_out(len(idx), fraction)
        out.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(out))


def write_splits(splits: dict[str, Split], out: Path) -> None:
    for part, split in splits.items():
        np.save(out / f"{part}_images.npy", split.x.numpy())
        np.save(out / f"{part}_labels.npy", split.y.numpy())


def read_splits(folder: Path, parts: tuple[str, ...]) -> dict[str, Split]:
    return {
        part: Split(
            mmap_tensor(folder / f"{part}_images.npy"),
            torch.from_numpy(np.load(folder / f"{part}_labels.npy", allow_pickle=False)),
        )
        for part in parts
    }
