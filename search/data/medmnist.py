"""MedMNIST 2-D sets (v3 record on Zenodo) at 28, 64, 128 and 224 px: `pathmnist`, `pathmnist_64`, ...

The official .npz is fetched and verified once, then streamed into uncompressed
memory-mappable .npy files (the 224 px sets are ~16 GB decompressed); the
official train/val/test splits are used as they are. Only the six official
arrays are unpacked, under their own names; the .npy directory is a derived
cache (`search.data.cache.derived_dir`): another machine's is checked against
the .npz before use. The catalog of sets (classes, checksums, sizes) is `search.datasets`,
which a recipe is checked against without torch.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import IO

import numpy as np
import torch

from search.data.cache import Download, Remote, derived_dir, fetch, mmap_tensor, source_key, unreadable
from search.data.splits import Raw, Split
from search.datasets import MEDMNIST, MULTI_LABEL, SIZES, AugmentCfg, medmnist_parts
from search.errors import SearchError, one_of

URL = "https://zenodo.org/records/10519652/files/{file}?download=1"


def npz_file(name: str) -> str:
    """'pathmnist' -> 'pathmnist.npz', 'pathmnist_224' -> 'pathmnist_224.npz' (the official names)."""
    return f"{name}.npz"


# The arrays of an official .npz, by member name: the only names ever written out.
MEMBERS = tuple(f"{part}_{kind}.npy" for part in ("train", "val", "test") for kind in ("images", "labels"))


def _members(name: str, npz: Path, z: zipfile.ZipFile) -> list[str]:
    """The archive's members, refused unless exactly the official arrays: a member's name becomes an
    output path, so `../x.npy` or `/etc/x.npy` must never get that far."""
    names = z.namelist()
    fix = "not the official file: delete it and run `python -m search prefetch RECIPE`"
    for member in names:
        if member not in MEMBERS:
            raise SearchError(
                f"data.dataset '{name}': {npz} holds a member {member!r}, and an official MedMNIST .npz holds "
                f"only {one_of(MEMBERS)}; {fix}"
            )
    odd = [m for m in MEMBERS if names.count(m) != 1]
    if odd:
        raise SearchError(
            f"data.dataset '{name}': {npz} lacks or repeats {one_of(odd)}, and an official MedMNIST .npz holds "
            f"each of {one_of(MEMBERS)} once; {fix}"
        )
    return names


def _npz_to_npy(name: str, npz: Path, out: Path) -> None:
    """Stream every array of the .npz into an uncompressed (N, C, H, W) .npy, chunk by chunk.

    The 224 px sets are ~16 GB decompressed: never hold one in memory.
    """
    try:
        with zipfile.ZipFile(npz) as z:
            for member in _members(name, npz, z):
                with z.open(member) as f:
                    _member_to_npy(member, f, out)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as e:
        raise unreadable(name, npz, e) from None


def _member_to_npy(member: str, f: IO[bytes], out: Path) -> None:
    """One array of the .npz, read from `f` as published, written to OUT/KEY.npy in 64 MB chunks."""
    key = member.removesuffix(".npy")
    version = np.lib.format.read_magic(f)
    shape, fortran, dtype = (
        np.lib.format.read_array_header_1_0(f) if version == (1, 0) else np.lib.format.read_array_header_2_0(f)
    )
    images = key.endswith("_images")
    if fortran:
        raise ValueError(f"{member} is Fortran-ordered")
    if (dtype != np.uint8) if images else (dtype.kind not in "iu"):  # as published
        raise ValueError(f"{member} holds {dtype}, not {'uint8' if images else 'integers'}")
    if len(shape) not in ((3, 4) if images else (1, 2)) or images and shape[3:] not in ((), (3,)):
        raise ValueError(f"{member} has shape {shape}")
    target = (shape[0], 1, *shape[1:3]) if images and len(shape) == 3 else shape
    if images and len(shape) == 4:
        target = (shape[0], shape[3], shape[1], shape[2])
    dst = np.lib.format.open_memmap(out / f"{key}.npy", mode="w+", dtype=dtype, shape=target)
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    per = max(1, (64 << 20) // max(row, 1))
    for i in range(0, shape[0], per):
        k = min(per, shape[0] - i)
        buf = f.read(k * row)
        if len(buf) != k * row:
            raise EOFError(f"{member} ends after {i + len(buf) // row} of {shape[0]} rows")
        a = np.frombuffer(buf, dtype=dtype).reshape(k, *shape[1:])
        if images and len(shape) == 4:
            a = a.transpose(0, 3, 1, 2)
        elif images:
            a = a[:, None]
        dst[i : i + k] = a
    dst.flush()
    del dst


def remote(name: str) -> Remote:
    """The official .npz of a MedMNIST set at its size, with its published md5."""
    flag, size = medmnist_parts(name)
    return Remote(URL.format(file=npz_file(name)), npz_file(name), md5=MEDMNIST[flag].md5[SIZES.index(size)])


def load(name: str, root: Path, resolution: int | None) -> Raw:
    """A MedMNIST 2-D set from its official .npz, unpacked once into memory-mappable .npy files
    (checked against the .npz where this machine did not unpack them: `derived_dir`)."""
    s = MEDMNIST[medmnist_parts(name)[0]]
    cache = root / f"{name}.npy"
    r = remote(name)
    if not cache.is_dir():
        fetch(name, r, root)  # before anything is written: a refused load leaves the data root as it was
    derived_dir(name, cache, lambda tmp: _npz_to_npy(name, fetch(name, r, root, for_dir=cache), tmp), source_key(r))
    splits: dict[str, Split] = {}
    for part in ("train", "val", "test"):
        xi, yi = cache / f"{part}_images.npy", cache / f"{part}_labels.npy"
        if not (xi.is_file() and yi.is_file()):
            raise SearchError(
                f"data.dataset '{name}': {cache} has no {part}_images/{part}_labels; delete {cache} "
                "so that it is rebuilt from the .npz"
            )
        x = mmap_tensor(xi)
        labels = np.load(yi, allow_pickle=False)
        if labels.ndim == 2 and labels.shape[1] > 1:
            raise SearchError(
                f"data.dataset '{name}': labels are multi-label ({labels.shape[1]} per image); "
                "only single-label classification is supported"
            )
        splits[part] = Split(x, torch.from_numpy(labels.reshape(-1).astype(np.int64)))
    aug = AugmentCfg(crop="pad", flip=s.flip, rotate=10.0, jitter=0.1)
    return Raw(splits["train"], splits["val"], splits["test"], s.classes, "none", aug)


def refuse_multi_label(name: str, root: Path, resolution: int | None) -> Raw:
    """The loader of a multi-label set: a refusal that names the single-label choices."""
    flag, _ = medmnist_parts(name)
    raise SearchError(
        f"data.dataset '{name}': {flag} is multi-label ({MULTI_LABEL[flag]}), and this harness trains "
        f"single-label classifiers; pick a single-label MedMNIST set ({one_of(MEDMNIST)}) or relabel it as "
        "folder:PATH"
    )


def downloads(name: str, root: Path) -> list[Download]:
    flag, size = medmnist_parts(name)
    if flag not in MEDMNIST:
        return []
    s = MEDMNIST[flag]
    return [Download(remote(name), root / f"{name}.npy", s.images * (size * size * s.channels + 1), bound=True)]
