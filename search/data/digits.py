"""`digits`: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), the offline demo set.

Read straight from the CSV file scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`, 64
pixel values 0-16 and the label per row, what `load_digits` parses): importing scikit-learn
itself costs every worker process more than a second, and the demo's trials a few seconds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from search.data.splits import Raw, Split
from search.datasets import AugmentCfg


def csv_file() -> Path | None:
    """The bundled file, located without importing scikit-learn (None if its layout changed)."""
    spec = importlib.util.find_spec("sklearn")
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = Path(base) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def read(path: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) in 0..16, labels) from the bundled CSV, or from `load_digits`."""
    if path is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    rows = np.loadtxt(path, delimiter=",")
    return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(np.int64)


def load(name: str, root: Path, resolution: int | None) -> Raw:
    """The whole set as train (val and test are carved); no network, no data root needed."""
    images, target = read(csv_file())
    x = torch.from_numpy(np.clip(images * 16, 0, 255).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(target.astype(np.int64))
    return Raw(
        Split(x, y),
        None,
        None,
        tuple(str(i) for i in range(10)),
        "none",
        AugmentCfg(crop="pad", flip=False, rotate=10.0, jitter=0.0),
    )
