"""`digits`: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), the offline demo set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from search.augment import AugmentCfg
from search.data.splits import Raw, Split


def load(name: str, root: Path, resolution: int | None) -> Raw:
    """The whole set as train (val and test are carved); no network, no data root needed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.clip(d.images * 16, 0, 255).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    return Raw(
        Split(x, y),
        None,
        None,
        tuple(str(i) for i in range(10)),
        "none",
        AugmentCfg(crop="pad", flip=False, rotate=10.0, jitter=0.0),
    )
