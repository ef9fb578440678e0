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

from search.augment import AugmentCfg
from search.data.cache import mmap_tensor


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
