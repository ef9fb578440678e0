"""MedMNIST 2-D sets (v3 record on Zenodo) at 28, 64, 128 and 224 px: `pathmnist`, `pathmnist_64`, ...

The official .npz is fetched and verified once, then streamed into uncompressed
memory-mappable .npy files (the 224 px sets are ~16 GB decompressed); the
official train/val/test splits are used as they are. Only the six official
arrays are unpacked, under their own names; the .npy directory is a derived
cache (`search.data.cache.derived_dir`): another machine's is checked against
the .npz before use.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from search.augment import AugmentCfg
from search.data.cache import Download, Remote, derived_dir, fetch, mmap_tensor, source_key, unreadable
from search.data.splits import Raw, Split
from search.errors import SearchError, one_of

URL = "https://zenodo.org/records/10519652/files/{file}?download=1"
SIZES = (28, 64, 128, 224)


@dataclass(frozen=True)
class MedSet:
    """One MedMNIST 2-D set: what the harness needs to know before and after downloading it."""

    classes: tuple[str, ...]
    md5: tuple[str, str, str, str]  # the published md5 of the .npz at each of SIZES
    flip: bool  # default augmentation: off where left and right are anatomy or the scan has an up
    images: int  # across the official splits (medmnist.com), for the offline checklist's size bound
    channels: int


# The three organ sets (axial, coronal, sagittal CT views) share their classes.
ORGANS = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)
MEDMNIST: dict[str, MedSet] = {
    "pathmnist": MedSet(
        (
            "adipose",
            "background",
            "debris",
            "lymphocytes",
            "mucus",
            "smooth muscle",
            "normal colon mucosa",
            "cancer-associated stroma",
            "colorectal adenocarcinoma epithelium",
        ),
        (
            "a8b06965200029087d5bd730944a56c1",
            "55aa9c1e0525abe5a6b9d8343a507616",
            "ac42d08fb904d92c244187169d1fd1d9",
            "2c51a510bcdc9cf8ddb2af93af1eadec",
        ),
        True,
        107_180,
        3,
    ),
    "dermamnist": MedSet(
        (
            "actinic keratoses and intraepithelial carcinoma",
            "basal cell carcinoma",
            "benign keratosis-like lesions",
            "dermatofibroma",
            "melanoma",
            "melanocytic nevi",
            "vascular lesions",
        ),
        (
            "0744692d530f8e62ec473284d019b0c7",
            "b70a2f5635c6199aeaa28c31d7202e1f",
            "2defd784463fa5243564e855ed717de1",
            "8974907d8e169bef5f5b96bc506ae45d",
        ),
        True,
        10_015,
        3,
    ),
    "octmnist": MedSet(
        ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        (
            "c68d92d5b585d8d81f7112f81e2d0842",
            "e229e9440236b774d9f0dfef9d07bdaf",
            "0a97e76651ace45c5d943ee3f65b63ae",
            "abc493b6d529d5de7569faaef2773ba3",
        ),
        False,
        109_309,
        1,
    ),
    "pneumoniamnist": MedSet(
        ("normal", "pneumonia"),
        (
            "28209eda62fecd6e6a2d98b1501bb15f",
            "8f4eceb4ccffa70c672198ea285246c6",
            "05b46931834c231683c68f40c47b2971",
            "d6a3c71de1b945ea11211b03746c1fe1",
        ),
        False,
        5_856,
        1,
    ),
    "retinamnist": MedSet(
        ("0", "1", "2", "3", "4"),
        (
            "bd4c0672f1bba3e3a89f0e4e876791e4",
            "afda852cc34dcda56f86ad2b2457dbcc",
            "e48e916a24454daf90583d4e6efb1a18",
            "eae7e3b6f3fcbda4ae613ebdcbe35348",
        ),
        False,
        1_600,
        3,
    ),
    "breastmnist": MedSet(
        ("malignant", "normal, benign"),
        (
            "750601b1f35ba3300ea97c75c52ff8f6",
            "742edef2a1fd1524b2efff4bd7ba9364",
            "363e4b3f8d712e9b5de15470a2aaadf1",
            "b56378a6eefa9fed602bb16d192d4c8b",
        ),
        True,
        780,
        1,
    ),
    "bloodmnist": MedSet(
        (
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        ),
        (
            "7053d0359d879ad8a5505303e11de1dc",
            "2b94928a2ae4916078ca51e05b6b800b",
            "adace1e0ed228fccda1f39692059dd4c",
            "b718ff6835fcbdb22ba9eacccd7b2601",
        ),
        True,
        17_092,
        3,
    ),
    "tissuemnist": MedSet(
        (
            "Collecting Duct, Connecting Tubule",
            "Distal Convoluted Tubule",
            "Glomerular endothelial cells",
            "Interstitial endothelial cells",
            "Leukocytes",
            "Podocytes",
            "Proximal Tubule Segments",
            "Thick Ascending Limb",
        ),
        (
            "ebe78ee8b05294063de985d821c1c34b",
            "123ece2eba09d0aa5d698fda57103344",
            "61b955355d7425a89687b06cca3ce0c2",
            "b077128c4a949f0a4eb01517f9037b9c",
        ),
        True,
        236_386,
        1,
    ),
    "organamnist": MedSet(
        ORGANS,
        (
            "68e3f8846a6bd62f0c9bf841c0d9eacc",
            "2dcccc29b88e6da5a01161ef20cda288",
            "eeae80d0a227a8d099027e1b3cfd3b60",
            "50747347e05c87dd3aaf92c49f9f3170",
        ),
        False,
        58_830,
        1,
    ),
    "organcmnist": MedSet(
        ORGANS,
        (
            "b9ceb9546e10131b32923c5bbeaea2b1",
            "3ce34a8724ea6f548e6db4744d03b6a9",
            "773c1f009daa3fe5d9a2a201b2a7ed94",
            "050f5e875dc056f6768abf94ec9995d1",
        ),
        False,
        23_583,
        1,
    ),
    "organsmnist": MedSet(
        ORGANS,
        (
            "9ab87b696fb54e2a387ebe992d6ed5f1",
            "53a6d115339d874c25e309a994ff46d3",
            "ded0c5fa01a95dc4978b956f613e9b8e",
            "b354719e553fbbb2513d5533f52a4cb1",
        ),
        False,
        25_211,
        1,
    ),
}
MULTI_LABEL = {"chestmnist": "14 findings per chest X-ray"}  # known, and refused with a reason


def names() -> list[str]:
    """Every dataset name of this source, multi-label ones included: `flag` (28 px) and `flag_SIZE`."""
    return [flag if size == 28 else f"{flag}_{size}" for flag in (*MEDMNIST, *MULTI_LABEL) for size in SIZES]


def npz_file(name: str) -> str:
    """'pathmnist' -> 'pathmnist.npz', 'pathmnist_224' -> 'pathmnist_224.npz' (the official names)."""
    return f"{name}.npz"


def parts(name: str) -> tuple[str, int]:
    """'pathmnist_64' -> ('pathmnist', 64); a bare flag is the 28 px set."""
    flag, _, size = name.partition("_")
    return flag, int(size) if size else 28


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
    flag, size = parts(name)
    return Remote(URL.format(file=npz_file(name)), npz_file(name), md5=MEDMNIST[flag].md5[SIZES.index(size)])


def load(name: str, root: Path, resolution: int | None) -> Raw:
    """A MedMNIST 2-D set from its official .npz, unpacked once into memory-mappable .npy files
    (checked against the .npz where this machine did not unpack them: `derived_dir`)."""
    s = MEDMNIST[parts(name)[0]]
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
    flag, _ = parts(name)
    raise SearchError(
        f"data.dataset '{name}': {flag} is multi-label ({MULTI_LABEL[flag]}), and this harness trains "
        f"single-label classifiers; pick a single-label MedMNIST set ({one_of(MEDMNIST)}) or relabel it as "
        "folder:PATH"
    )


def downloads(name: str, root: Path) -> list[Download]:
    flag, size = parts(name)
    if flag not in MEDMNIST:
        return []
    s = MEDMNIST[flag]
    return [Download(remote(name), root / f"{name}.npy", s.images * (size * size * s.channels + 1), bound=True)]
