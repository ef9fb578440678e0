"""`cifar10`, `cifar100`: the official python-format batches (what torchvision also downloads).

The batches are pickles, and unpickling can run any code the file names, so
they are read once, by an unpickler that resolves only what the official
batches hold (numpy's array reconstruction; dicts, lists, bytes, strings and
ints need no lookup) and refuses any other name before anything runs. What
they hold is then checked (uint8 images (N, 3072), labels in range of the
class names) and written as .npy files (`cifar10.npy/`: images (N, 3, 32, 32)
uint8, labels int64, classes.json); from then on only those are read, with
`allow_pickle=False`.

The source is the archive, verified against its published md5 and read in
place (not unpacked), or, where there is none, an unpacked folder
(`cifar-10-batches-py/`, `cifar-100-python/`, as torchvision leaves it): it has
no published checksums, so it is only read safely, and the cache stands for
what it holds. The .npy directory is a derived cache
(`search.data.cache.derived_dir`): another machine's is checked against the
source before use. The official test batch is the test split; val is carved
from train.
"""

from __future__ import annotations

import json
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from search.data.cache import Download, Remote, derived_dir, fetch, source_key, unreadable
from search.data.splits import Raw, Split, read_splits, write_splits
from search.datasets import AugmentCfg
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
    classes: int


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
        10,
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
        100,
    ),
}
AUGMENT = AugmentCfg(crop="pad", flip=True, rotate=0.0, jitter=0.0)

try:  # numpy >= 2; `numpy.core` still answers there, with a deprecation warning
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]


class _Refused(pickle.UnpicklingError):
    """A pickle named something an official CIFAR batch never does."""


class _Batch(pickle.Unpickler):
    """An unpickler that resolves only what the official batches name (numpy arrays, as pickled by
    Python 2 and by later numpy versions): any other global, the one way a pickle runs code, is refused
    before it is imported or called."""

    def find_class(self, module: str, name: str) -> Any:
        # Resolved here, never by importing the names the file gives: the official files (Python 2)
        # name `numpy.core.multiarray`, later numpy `numpy._core.multiarray`.
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")):
            return _reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise _Refused(f"{module}.{name}")


def _unpickle(name: str, where: Path | str, f: IO[bytes], fix: str) -> Any:
    try:
        return _Batch(f, encoding="bytes").load()  # Python 2's str is bytes, as the official files hold
    except _Refused as e:
        raise SearchError(
            f"data.dataset '{name}': {where} is not an official CIFAR batch: it asks for {e}, which an "
            f"official batch never does, and was refused before anything in it ran; {fix}"
        ) from None
    except Exception as e:  # noqa: BLE001 - any decoding failure means a damaged file
        raise unreadable(name, Path(where), e) from None


def _not_official(name: str, where: Path | str, why: str, fix: str) -> SearchError:
    return SearchError(f"data.dataset '{name}': {where} is not an official CIFAR batch ({why}); {fix}")


def _images_labels(name: str, where: Path | str, batch: Any, s: CifarSet, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """A batch's images (N, 3, 32, 32) uint8 and labels int64, refused unless it has the official form."""
    if not isinstance(batch, dict):
        raise _not_official(name, where, f"a {type(batch).__name__}, not a dict", fix)
    x, y = batch.get(b"data"), batch.get(s.label_key)
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3 * 32 * 32):
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise _not_official(name, where, f"b'data' must be uint8 (N, 3072), found {got}", fix)
    if not isinstance(y, list):
        found = type(y).__name__
    elif len(y) != len(x):
        found = f"{len(y)} of them"
    else:
        bad = [v for v in y if type(v) is not int or not 0 <= v < s.classes][:1]
        found = f"{type(bad[0]).__name__} {bad[0]!r}"[:80] if bad else ""
    if found:
        raise _not_official(
            name, where, f"{s.label_key!r} must be {len(x)} ints in 0..{s.classes - 1}, found {found}", fix
        )
    return x.reshape(-1, 3, 32, 32), np.asarray(y, dtype=np.int64)


def _classes(name: str, where: Path | str, meta: Any, s: CifarSet, fix: str) -> list[str]:
    names = meta.get(s.names_key) if isinstance(meta, dict) else None
    if not (isinstance(names, list) and len(names) == s.classes and all(isinstance(c, bytes) for c in names)):
        raise _not_official(name, where, f"{s.names_key!r} must be {s.classes} class names", fix)
    try:
        return [c.decode() for c in names]
    except UnicodeDecodeError as e:
        raise _not_official(name, where, f"class names: {e}", fix) from None


def _batches(name: str, s: CifarSet, root: Path, cache: Path) -> tuple[dict[str, tuple[str, Any]], str]:
    """Every file the set needs, read safely: {file: (where it was read, what it holds)}, and what to
    do about a bad one. From the verified archive where there is one, else from an unpacked folder."""
    folder, archive = root / s.folder, root / s.remote.file
    wanted = (s.meta_file, *s.train_files, *s.test_files)
    found: dict[str, tuple[str, Any]] = {}
    if folder.is_dir() and not archive.is_file():
        fix = f"delete {folder} and run `python -m search prefetch RECIPE` to fetch the official archive"
        for f in wanted:
            path = folder / f
            if not path.is_file():
                raise SearchError(f"data.dataset '{name}': {path} is missing from {folder}; {fix}")
            with open(path, "rb") as fh:
                found[f] = (str(path), _unpickle(name, path, fh, fix))
        return found, fix
    archive = fetch(name, s.remote, root, for_dir=cache)  # verified against the published md5
    fix = f"delete {archive} and run `python -m search prefetch RECIPE`"
    try:
        with tarfile.open(archive) as tar:
            for m in tar:  # one pass: a .tar.gz cannot seek back cheaply
                f = m.name.removeprefix(f"{s.folder}/")
                if f in wanted and m.name == f"{s.folder}/{f}" and m.isfile() and f not in found:
                    where = f"{archive} ({m.name})"
                    with tar.extractfile(m) as fh:  # type: ignore[union-attr]
                        found[f] = (where, _unpickle(name, where, fh, fix))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise unreadable(name, archive, e) from None
    for f in wanted:
        if f not in found:
            raise unreadable(name, archive, FileNotFoundError(f"no {s.folder}/{f} inside"))
    return found, fix


def _build(name: str, s: CifarSet, root: Path, cache: Path, out: Path) -> None:
    """The batches, read safely and checked, as .npy files and classes.json in `out`."""
    found, fix = _batches(name, s, root, cache)
    classes = _classes(name, *found[s.meta_file], s, fix)
    splits = {}
    for part, files in (("train", s.train_files), ("test", s.test_files)):
        xs, ys = zip(*(_images_labels(name, *found[f], s, fix) for f in files), strict=True)
        splits[part] = Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))
    write_splits(splits, out)
    (out / "classes.json").write_text(json.dumps(classes))


def load(name: str, root: Path, resolution: int | None) -> Raw:
    """CIFAR-10/100 from the official python batches, read once into .npy files that are memory-mapped
    from then on; the official test split, val carved from train."""
    s = CIFAR[name]
    cache = root / f"{name}.npy"
    if not cache.is_dir() and not (root / s.folder).is_dir():
        fetch(name, s.remote, root)  # before anything is written: a refused load leaves the data root as it was
    derived_dir(name, cache, lambda tmp: _build(name, s, root, cache, tmp), source_key(s.remote))
    try:
        got = read_splits(cache, ("train", "test"))
        classes = json.loads((cache / "classes.json").read_text())
        if not (isinstance(classes, list) and len(classes) == s.classes and all(isinstance(c, str) for c in classes)):
            raise ValueError(f"classes.json must list {s.classes} class names")
    except (OSError, ValueError) as e:
        raise SearchError(
            f"data.dataset '{name}': cannot read {cache} ({type(e).__name__}: {e}); delete it so that it is built again"
        ) from None
    return Raw(got["train"], None, got["test"], tuple(classes), "semantic", AUGMENT)


def downloads(name: str, root: Path) -> list[Download]:
    s = CIFAR[name]
    return [Download(s.remote, root / f"{name}.npy", s.size, bound=False, alt=root / s.folder)]
