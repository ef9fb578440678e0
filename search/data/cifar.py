"""`cifar10`, `cifar100`: the official python-format archives (what torchvision also downloads).

The archive is fetched and verified once, unpacked once into the data root; the
official test batch is the test split and val is carved from train.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from search.augment import AugmentCfg
from search.data.cache import Download, Remote, atomic_dir, fetch, unreadable
from search.data.splits import Raw, Split
from search.errors import SearchError


@dataclass(frozen=True)
class CifarSet:
    """One CIFAR archive and the layout of the pickled batches inside it."""

    remote: Remote
    size: int  # the archive's published size in bytes
    folder: str  # the directory the archive unpacks into
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str  # holds the class names
    label_key: bytes  # labels in a batch
    names_key: bytes  # class names in the meta file


CIFAR = {
    "cifar10": CifarSet(
        Remote(
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "cifar-10-python.tar.gz",
            md5="c58f30108f718f92721af3b95e74349a",
        ),
        170_498_071,
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        b"labels",
        b"label_names",
    ),
    "cifar100": CifarSet(
        Remote(
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "cifar-100-python.tar.gz",
            md5="eb9058c3a382ffc7106e4002c42a8d85",
        ),
        169_001_437,
        "cifar-100-python",
        ("train",),
        ("test",),
        "meta",
        b"fine_labels",
        b"fine_label_names",
    ),
}
AUGMENT = AugmentCfg(crop="pad", flip=True, rotate=0.0, jitter=0.0)


def _unpickle(name: str, path: Path) -> dict:
    if not path.is_file():
        raise SearchError(
            f"data.dataset '{name}': {path} is missing from {path.parent}; delete that folder and "
            "run `python -m search prefetch RECIPE` to unpack the archive again"
        )
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")  # noqa: S301 - the official CIFAR format is pickle
    except Exception as e:  # noqa: BLE001 - any decoding failure means a damaged file
        raise unreadable(name, path, e) from None


def _split(name: str, folder: Path, files: tuple[str, ...], label_key: bytes) -> Split:
    xs, ys = [], []
    for f in files:
        d = _unpickle(name, folder / f)
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))


def load(name: str, root: Path, resolution: int | None) -> Raw:
    """CIFAR-10/100 from the official python batches; the official test split, val carved from train."""
    s = CIFAR[name]
    folder = root / s.folder
    if not folder.is_dir():
        archive = fetch(name, s.remote, root)  # verified against the published md5

        def unpack(tmp: Path) -> None:
            try:
                with tarfile.open(archive) as tar:
                    tar.extractall(tmp / "archive", filter="data")
            except (tarfile.TarError, OSError, EOFError) as e:
                raise unreadable(name, archive, e) from None
            inner = tmp / "archive" / s.folder
            if not inner.is_dir():
                raise unreadable(name, archive, FileNotFoundError(f"no {s.folder}/ inside"))
            for f in inner.iterdir():
                os.replace(f, tmp / f.name)
            shutil.rmtree(tmp / "archive")

        atomic_dir(folder, unpack)
    meta = _unpickle(name, folder / s.meta_file)
    classes = tuple(c.decode() for c in meta[s.names_key])
    train = _split(name, folder, s.train_files, s.label_key)
    test = _split(name, folder, s.test_files, s.label_key)
    return Raw(train, None, test, classes, "semantic", AUGMENT)


def downloads(name: str, root: Path) -> list[Download]:
    s = CIFAR[name]
    return [Download(s.remote, root / s.folder, s.size, bound=False)]
