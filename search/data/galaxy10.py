"""`galaxy10`: Galaxy10 DECals (astroNN), 17,736 RGB 256x256 galaxies in 10 classes, one .h5 file.

There is no official split: train/val/test are stratified seeded carve-outs,
kept as memory-mapped files beside the decoded images (`carved_splits`). The
decoded .npy directory is a derived cache (`search.data.cache.derived_dir`):
another machine's is checked against the .h5 before use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from search.data.cache import Download, Remote, derived_dir, fetch, mmap_tensor, source_key, unreadable
from search.data.splits import Raw, Split
from search.datasets import AugmentCfg

GALAXY10 = Remote(
    "https://www.astro.utoronto.ca/~hleung/shared/Galaxy10/Galaxy10_DECals.h5",
    "Galaxy10_DECals.h5",
    sha256="19aefc477c41bb7f77ff07599a6b82a038dc042f889a111b0d4d98bb755c1571",
)
CLASSES = (
    "Disturbed",
    "Merging",
    "Round Smooth",
    "In-between Round Smooth",
    "Cigar Shaped Smooth",
    "Barred Spiral",
    "Unbarred Tight Spiral",
    "Unbarred Loose Spiral",
    "Edge-on without Bulge",
    "Edge-on with Bulge",
)


def _h5_to_npy(name: str, h5: Path, out: Path) -> None:
    import h5py

    try:
        with h5py.File(h5, "r") as f:
            images, ans = f["images"], f["ans"]
            n = images.shape[0]
            if images.ndim != 4 or images.shape[3] != 3 or len(ans) != n:
                raise ValueError(f"expected images (N, H, W, 3) and ans (N,), got {images.shape} and {ans.shape}")
            dst = np.lib.format.open_memmap(
                out / "images.npy", mode="w+", dtype=np.uint8, shape=(n, 3, images.shape[1], images.shape[2])
            )
            for i in range(0, n, 512):
                dst[i : i + 512] = np.asarray(images[i : i + 512], dtype=np.uint8).transpose(0, 3, 1, 2)
            dst.flush()
            del dst
            np.save(out / "labels.npy", np.asarray(ans[:], dtype=np.int64))
    except (OSError, KeyError, ValueError) as e:
        raise unreadable(name, h5, e) from None


def load(name: str, root: Path, resolution: int | None) -> Raw:
    """Galaxy10 DECals, decoded once into memory-mappable .npy files (checked against the .h5 where
    this machine did not decode them: `derived_dir`); all of it is train."""
    cache = root / "Galaxy10_DECals.npy"
    if not cache.is_dir():
        fetch(name, GALAXY10, root)  # before anything is written: a refused load leaves the data root as it was
    derived_dir(
        name, cache, lambda tmp: _h5_to_npy(name, fetch(name, GALAXY10, root, for_dir=cache), tmp), source_key(GALAXY10)
    )
    x = mmap_tensor(cache / "images.npy")
    y = torch.from_numpy(np.load(cache / "labels.npy", allow_pickle=False))
    # Galaxies have no up, left or right: flips and any rotation keep the class.
    return Raw(
        Split(x, y), None, None, CLASSES, "none", AugmentCfg(crop="pad", flip=True, rotate=180.0, jitter=0.1), cache
    )


def downloads(name: str, root: Path) -> list[Download]:
    return [Download(GALAXY10, root / "Galaxy10_DECals.npy", 17_736 * 256 * 256 * 3, bound=True)]
