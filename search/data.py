"""Datasets as uint8 tensors (N, C, H, W) with integer labels, decoded once per
process and split without ever touching the official test split for selection.

A loader returns `Raw` (official splits it has, class names, ImageNet overlap,
augmentation defaults); `load_data` adds the seeded stratified carve-outs and
the `max_samples` subsample and returns `Data`, which training consumes.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from search.augment import AugmentCfg
from search.errors import SearchError, did_you_mean, one_of
from search.net import Missing
from search.net import network_up as _network_up
from search.net import offline as _offline
from search.recipe import DataCfg

log = logging.getLogger(__name__)

OVERLAPS = ("semantic", "none", "unknown")  # a dataset's declared overlap with ImageNet


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
    overlap: str  # one of OVERLAPS
    augment: AugmentCfg = field(default_factory=AugmentCfg)
    cache: Path | None = None  # the .npy directory behind it, where carve-outs are kept too


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
# fetching: official URL, checksum, retries, atomic rename

RETRIES = 3
CHUNK = 1 << 20


@dataclass(frozen=True)
class Remote:
    """One official download: URL, the file name it gets under the data root, and its checksum."""

    url: str
    file: str
    md5: str | None = None
    sha256: str | None = None


def _open_url(url: str, timeout: float = 60.0) -> Any:
    """The network (tests replace this)."""
    req = urllib.request.Request(url, headers={"User-Agent": "search-harness"})
    return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - fixed https URLs


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _checksum(remote: Remote) -> tuple[str, str] | None:
    if remote.sha256:
        return "sha256", remote.sha256.lower()
    if remote.md5:
        return "md5", remote.md5.lower()
    return None


def missing_error(name: str, path: Path, why: str) -> SearchError:
    return SearchError(
        f"data.dataset '{name}': {path} is missing ({why}); on a machine with internet run "
        f"`python -m search prefetch RECIPE` and copy {path.parent} over, or point data.root / $SEARCH_DATA "
        "at a directory that has it"
    )


def fetch(name: str, remote: Remote, root: Path) -> Path:
    """The file under `root`, verified (once) or downloaded first if missing: checksum-verified,
    retried, renamed into place, with a progress bar on a terminal."""
    path = root / remote.file
    if path.is_file():
        verify(name, remote, path)
        return path
    host = urllib.parse.urlparse(remote.url).hostname or ""
    if _offline():
        raise missing_error(name, path, "offline mode: SEARCH_OFFLINE is set")
    if not _network_up(host):
        raise missing_error(name, path, f"no network: {host} unreachable")
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    check = _checksum(remote)
    last: Exception | None = None
    for attempt in range(1, RETRIES + 1):
        try:
            h = hashlib.new(check[0]) if check else None
            with _open_url(remote.url) as resp, open(tmp, "wb") as out, _progress(resp, remote.file) as bar:
                for block in iter(lambda: resp.read(CHUNK), b""):
                    out.write(block)
                    bar.update(len(block))
                    if h:
                        h.update(block)
        except OSError as e:  # URLError, timeouts, resets: try again
            last = e
            tmp.unlink(missing_ok=True)
            log.warning("download of %s failed (attempt %d/%d): %s", remote.url, attempt, RETRIES, e)
            time.sleep(min(2**attempt, 10) if attempt < RETRIES else 0)
            continue
        if check and h is not None and h.hexdigest() != check[1]:
            tmp.unlink(missing_ok=True)
            raise SearchError(
                f"data.dataset '{name}': {remote.url} has {check[0]} {h.hexdigest()}, expected {check[1]}; "
                f"the download was discarded and {path} not written; retry `python -m search prefetch RECIPE`, "
                "or place a good copy there"
            )
        os.replace(tmp, path)  # atomic: readers see no file or the whole verified file
        if check:
            _record(path, *check)
        return path
    raise missing_error(name, path, f"download failed {RETRIES} times: {last}")


def _progress(resp: Any, label: str) -> Any:
    """A byte progress bar for a download on a terminal (tqdm stays silent in logs and pipes)."""
    from tqdm import tqdm

    total = getattr(resp, "headers", {}).get("Content-Length") if hasattr(resp, "headers") else None
    return tqdm(total=int(total) if total else None, unit="B", unit_scale=True, desc=label, disable=None,
                leave=False)


def _record_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified")


def _record(path: Path, algo: str, digest: str) -> None:
    """Note that `path`, at its present size and mtime, has this digest (best effort: a read-only
    data root only means the next process hashes the file again)."""
    st = path.stat()
    rec = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, algo: digest}
    tmp = _record_file(path).with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, _record_file(path))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.debug("verification record of %s not written: %s", path, e)


def _recorded(path: Path, algo: str, digest: str) -> bool:
    """Whether a verification record vouches for the file as it is now (same size and mtime)."""
    try:
        rec = json.loads(_record_file(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns and rec.get(algo) == digest


def verify(name: str, remote: Remote, path: Path, aside: bool = True) -> None:
    """Check a local file against its published checksum before its first use.

    Hashing a 16 GB file takes minutes, so a good result is recorded beside it
    (`.FILE.verified`: size, mtime, digest) and later processes trust the record
    while the file is unchanged. A bad file is refused (and, with `aside`, renamed
    to FILE.corrupt so that the next prefetch downloads it again); it is never used.
    """
    check = _checksum(remote)
    if check is None or _recorded(path, *check):
        return
    got = file_digest(path, check[0])
    if got == check[1]:
        _record(path, *check)
        return
    fix = "delete it and run `python -m search prefetch RECIPE` to download it again"
    if aside:
        bad = path.with_name(path.name + ".corrupt")
        os.replace(path, bad)
        fix = f"moved it to {bad}; run `python -m search prefetch RECIPE` to download it again"
    raise SearchError(
        f"data.dataset '{name}': {path} has {check[0]} {got}, expected {check[1]} (the published checksum): "
        f"not the official file; {fix}"
    )


def _unreadable(name: str, path: Path, e: Exception) -> SearchError:
    return SearchError(
        f"data.dataset '{name}': cannot read {path} ({type(e).__name__}: {e}); the file is damaged or not "
        "the official one: delete it and run `python -m search prefetch RECIPE`"
    )


@contextmanager
def _build_lock(final: Path) -> Iterator[None]:
    """One process builds `final` while the others on the machine (or sharing the filesystem) wait.

    An advisory lock on a hidden file beside it; where there is no `fcntl`
    (Windows) or the filesystem refuses locks, everyone builds and the first
    rename wins, as without a lock.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(final.parent / f".{final.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def _atomic_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory under a temporary name, then rename it into place: readers see all of it or nothing."""
    if final.is_dir():
        return final
    with _build_lock(final):
        if final.is_dir():  # built by the process that held the lock
            return final
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", suffix=".tmp", dir=final.parent))
        try:
            build(tmp)
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _discard(folder: Path) -> None:
    """Remove a cache directory: renamed aside first, so nobody ever reads it half-deleted."""
    gone = folder.with_name(f"{folder.name}.{os.getpid()}.gone.tmp")
    try:
        os.replace(folder, gone)
    except OSError:
        return  # gone already
    shutil.rmtree(gone, ignore_errors=True)


def _read_cached(folder: Path, read: Callable[[], Any]) -> Any:
    """`read()` of a built cache directory; None when it is damaged, after removing it under its lock.

    Missing or malformed files mean damage (a half-finished removal, a hand edit); a
    process that finds it so takes the build lock, tries again (another may have
    rebuilt it meanwhile) and discards it if it is still unreadable. Other
    errors (no memory, too many open files) are raised: the directory is fine.
    """
    try:
        return read()
    except (FileNotFoundError, ValueError, EOFError):
        pass
    with _build_lock(folder):
        try:
            return read()
        except (FileNotFoundError, ValueError, EOFError):
            _discard(folder)
            return None


def _mmap_tensor(path: Path) -> torch.Tensor:
    """A .npy file as a tensor backed by the page cache: nothing is read until it is used."""
    return torch.from_numpy(np.load(path, mmap_mode="c"))  # copy-on-write: writable view, file untouched


# ---------------------------------------------------------------------------
# loaders: (name, root, resolution) -> Raw


def _digits(name: str, root: Path, resolution: int | None) -> Raw:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): no network needed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.clip(d.images * 16, 0, 255).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    return Raw(Split(x, y), None, None, tuple(str(i) for i in range(10)), "none",
               AugmentCfg(crop="pad", flip=False, rotate=10.0, jitter=0.0))


# CIFAR: the official python-format archives (what torchvision also downloads).
CIFAR = {
    "cifar10": (Remote("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                       md5="c58f30108f718f92721af3b95e74349a"),
                "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", b"labels", b"label_names"),
    "cifar100": (Remote("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz",
                        md5="eb9058c3a382ffc7106e4002c42a8d85"),
                 "cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}
CIFAR_AUGMENT = AugmentCfg(crop="pad", flip=True, rotate=0.0, jitter=0.0)


def _unpickle(name: str, path: Path) -> dict:
    if not path.is_file():
        raise SearchError(f"data.dataset '{name}': {path} is missing from {path.parent}; delete that folder and "
                          "run `python -m search prefetch RECIPE` to unpack the archive again")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")  # noqa: S301 - the official CIFAR format is pickle
    except Exception as e:  # noqa: BLE001 - any decoding failure means a damaged file
        raise _unreadable(name, path, e) from None


def _cifar_split(name: str, folder: Path, files: list[str], label_key: bytes) -> Split:
    xs, ys = [], []
    for f in files:
        d = _unpickle(name, folder / f)
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))


def _cifar(name: str, root: Path, resolution: int | None) -> Raw:
    """CIFAR-10/100 from the official python batches; the official test split, val carved from train."""
    remote, folder_name, train_files, test_files, meta_file, label_key, names_key = CIFAR[name]
    folder = root / folder_name
    if not folder.is_dir():
        archive = fetch(name, remote, root)  # verified against the published md5

        def unpack(tmp: Path) -> None:
            try:
                with tarfile.open(archive) as tar:
                    tar.extractall(tmp / "archive", filter="data")
            except (tarfile.TarError, OSError, EOFError) as e:
                raise _unreadable(name, archive, e) from None
            inner = tmp / "archive" / folder_name
            if not inner.is_dir():
                raise _unreadable(name, archive, FileNotFoundError(f"no {folder_name}/ inside"))
            for f in inner.iterdir():
                os.replace(f, tmp / f.name)
            shutil.rmtree(tmp / "archive")

        _atomic_dir(folder, unpack)
    meta = _unpickle(name, folder / meta_file)
    classes = tuple(c.decode() for c in meta[names_key])
    train = _cifar_split(name, folder, train_files, label_key)
    test = _cifar_split(name, folder, test_files, label_key)
    return Raw(train, None, test, classes, "semantic", CIFAR_AUGMENT)


# MedMNIST 2-D (v3 record on Zenodo): per set, class names, md5 per size (28, 64, 128, 224), default flip.
# Flips are off where left and right are anatomy (CT organs, chest X-rays) or the scan has an up.
MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{file}?download=1"
MEDMNIST_SIZES = (28, 64, 128, 224)
# The three organ sets (axial, coronal, sagittal CT views) share their classes.
ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
          "lung-left", "lung-right", "pancreas", "spleen")
MEDMNIST: dict[str, tuple[tuple[str, ...], tuple[str, str, str, str], bool]] = {
    "pathmnist": (("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                   "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
                  ("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
                   "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec"), True),
    "dermamnist": (("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                    "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                    "vascular lesions"),
                   ("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
                    "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d"), True),
    "octmnist": (("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
                 ("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
                  "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3"), False),
    "pneumoniamnist": (("normal", "pneumonia"),
                       ("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
                        "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1"), False),
    "retinamnist": (("0", "1", "2", "3", "4"),
                    ("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
                     "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348"), False),
    "breastmnist": (("malignant", "normal, benign"),
                    ("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
                     "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b"), True),
    "bloodmnist": (("basophil", "eosinophil", "erythroblast",
                    "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
                    "monocyte", "neutrophil", "platelet"),
                   ("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
                    "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601"), True),
    "tissuemnist": (("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                     "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes", "Podocytes",
                     "Proximal Tubule Segments", "Thick Ascending Limb"),
                    ("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
                     "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c"), True),
    "organamnist": (ORGANS,
                    ("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
                     "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170"), False),
    "organcmnist": (ORGANS,
                    ("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
                     "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1"), False),
    "organsmnist": (ORGANS,
                    ("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
                     "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1"), False),
}
MULTI_LABEL = {"chestmnist": "14 findings per chest X-ray"}


def medmnist_file(name: str) -> str:
    """'pathmnist' -> 'pathmnist.npz', 'pathmnist_224' -> 'pathmnist_224.npz' (the official names)."""
    return f"{name}.npz"


def _medmnist_parts(name: str) -> tuple[str, int]:
    flag, _, size = name.partition("_")
    return flag, int(size) if size else 28


def _npz_to_npy(name: str, npz: Path, out: Path) -> None:
    """Stream every array of the .npz into an uncompressed (N, C, H, W) .npy, chunk by chunk.

    The 224 px sets are ~16 GB decompressed: never hold one in memory.
    """
    try:
        with zipfile.ZipFile(npz) as z:
            for member in z.namelist():
                key = member.removesuffix(".npy")
                with z.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                             else np.lib.format.read_array_header_2_0(f))
                    if fortran:
                        raise ValueError(f"{member} is Fortran-ordered")
                    images = key.endswith("_images")
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
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as e:
        raise _unreadable(name, npz, e) from None


# Images per set and channels (medmnist.com), for the offline checklist's size bound.
MEDMNIST_SHAPES = {"pathmnist": (107_180, 3), "dermamnist": (10_015, 3), "octmnist": (109_309, 1),
                   "pneumoniamnist": (5_856, 1), "retinamnist": (1_600, 3), "breastmnist": (780, 1),
                   "bloodmnist": (17_092, 3), "tissuemnist": (236_386, 1), "organamnist": (58_830, 1),
                   "organcmnist": (23_583, 1), "organsmnist": (25_211, 1)}


def medmnist_remote(name: str) -> Remote:
    """The official .npz of a MedMNIST set at its size, with its published md5."""
    flag, size = _medmnist_parts(name)
    return Remote(MEDMNIST_URL.format(file=medmnist_file(name)), medmnist_file(name),
                  md5=MEDMNIST[flag][1][MEDMNIST_SIZES.index(size)])


def _medmnist(name: str, root: Path, resolution: int | None) -> Raw:
    """A MedMNIST 2-D set from its official .npz, unpacked once into memory-mappable .npy files."""
    flag, _ = _medmnist_parts(name)
    classes, _, flip = MEDMNIST[flag]
    remote = medmnist_remote(name)
    cache = root / f"{name}.npy"
    if not cache.is_dir():
        npz = fetch(name, remote, root)
        _atomic_dir(cache, lambda tmp: _npz_to_npy(name, npz, tmp))
    splits: dict[str, Split] = {}
    for part in ("train", "val", "test"):
        xi, yi = cache / f"{part}_images.npy", cache / f"{part}_labels.npy"
        if not (xi.is_file() and yi.is_file()):
            raise SearchError(f"data.dataset '{name}': {cache} has no {part}_images/{part}_labels; delete {cache} "
                              "so that it is rebuilt from the .npz")
        x = _mmap_tensor(xi)
        labels = np.load(yi)
        if labels.ndim == 2 and labels.shape[1] > 1:
            raise SearchError(f"data.dataset '{name}': labels are multi-label ({labels.shape[1]} per image); "
                              "only single-label classification is supported")
        splits[part] = Split(x, torch.from_numpy(labels.reshape(-1).astype(np.int64)))
    aug = AugmentCfg(crop="pad", flip=flip, rotate=10.0, jitter=0.1)
    return Raw(splits["train"], splits["val"], splits["test"], classes, "none", aug)


def _multi_label(name: str, root: Path, resolution: int | None) -> Raw:
    flag, _ = _medmnist_parts(name)
    raise SearchError(
        f"data.dataset '{name}': {flag} is multi-label ({MULTI_LABEL[flag]}), and this harness trains "
        f"single-label classifiers; pick a single-label MedMNIST set ({one_of(MEDMNIST)}) or relabel it as "
        "folder:PATH"
    )


# Galaxy10 DECals (astroNN): 17,736 RGB 256x256 galaxies in 10 classes, one file, no official split.
GALAXY10 = Remote("https://www.astro.utoronto.ca/~hleung/shared/Galaxy10/Galaxy10_DECals.h5",
                  "Galaxy10_DECals.h5",
                  sha256="19aefc477c41bb7f77ff07599a6b82a038dc042f889a111b0d4d98bb755c1571")
GALAXY10_CLASSES = ("Disturbed", "Merging", "Round Smooth", "In-between Round Smooth", "Cigar Shaped Smooth",
                    "Barred Spiral", "Unbarred Tight Spiral", "Unbarred Loose Spiral", "Edge-on without Bulge",
                    "Edge-on with Bulge")


def _h5_to_npy(name: str, h5: Path, out: Path) -> None:
    import h5py

    try:
        with h5py.File(h5, "r") as f:
            images, ans = f["images"], f["ans"]
            n = images.shape[0]
            if images.ndim != 4 or images.shape[3] != 3 or len(ans) != n:
                raise ValueError(f"expected images (N, H, W, 3) and ans (N,), got {images.shape} and {ans.shape}")
            dst = np.lib.format.open_memmap(out / "images.npy", mode="w+", dtype=np.uint8,
                                            shape=(n, 3, images.shape[1], images.shape[2]))
            for i in range(0, n, 512):
                dst[i : i + 512] = np.asarray(images[i : i + 512], dtype=np.uint8).transpose(0, 3, 1, 2)
            dst.flush()
            del dst
            np.save(out / "labels.npy", np.asarray(ans[:], dtype=np.int64))
    except (OSError, KeyError, ValueError) as e:
        raise _unreadable(name, h5, e) from None


def _galaxy10(name: str, root: Path, resolution: int | None) -> Raw:
    """Galaxy10 DECals; train/val/test are stratified seeded carve-outs (load_data)."""
    cache = root / "Galaxy10_DECals.npy"
    if not cache.is_dir():
        h5 = fetch(name, GALAXY10, root)
        _atomic_dir(cache, lambda tmp: _h5_to_npy(name, h5, tmp))
    x = _mmap_tensor(cache / "images.npy")
    y = torch.from_numpy(np.load(cache / "labels.npy"))
    # Galaxies have no up, left or right: flips and any rotation keep the class.
    return Raw(Split(x, y), None, None, GALAXY10_CLASSES, "none",
               AugmentCfg(crop="pad", flip=True, rotate=180.0, jitter=0.1), cache)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _folder_split(name: str, folder: Path, classes: tuple[str, ...] | None,
                  resolution: int | None) -> tuple[Split, tuple[str, ...]]:
    from PIL import Image

    found = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise SearchError(f"data.dataset '{name}': {folder} has class folders {unknown} that train/ lacks; "
                          f"classes are {one_of(classes)}")
    if len(classes) < 2:
        raise SearchError(f"data.dataset '{name}': {folder} needs one sub-folder per class (at least 2), "
                          f"found {len(classes)}")
    images, labels, files = [], [], []
    for k, c in enumerate(classes):
        d = folder / c
        for p in sorted(d.iterdir()) if d.is_dir() else []:
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(p) as im:
                    im.load()
                    images.append(im.copy())
            except OSError as e:
                raise _unreadable(name, p, e) from None
            labels.append(k)
            files.append(p)
    if not images:
        raise SearchError(f"data.dataset '{name}': no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    gray = all(im.mode in ("L", "1", "I;16", "I") for im in images)
    mode = "L" if gray else "RGB"
    if resolution is None:
        sizes = {im.size for im in images}
        if len(sizes) > 1:
            a, b = sorted(sizes)[:2]
            raise SearchError(f"data.dataset '{name}': images under {folder} differ in size ({a[0]}x{a[1]}, "
                              f"{b[0]}x{b[1]}, ...); set data.resolution to resize them to one square size")
    arrays = []
    for im in images:
        im = im.convert(mode)
        if resolution is not None:
            # Shorter side to `resolution`, then a centre crop: square images without distortion.
            w, h = im.size
            s = resolution / min(w, h)
            im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
        a = np.asarray(im, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(arrays))
    return Split(x, torch.tensor(labels, dtype=torch.int64)), classes


def _folder_parts(name: str, path: Path) -> dict[str, Path]:
    if not path.is_dir():
        raise SearchError(f"data.dataset '{name}': {path} is not a directory; expected PATH/CLASS/IMAGE files "
                          "or PATH/train/CLASS/IMAGE (optionally val/ and test/)")
    if not (path / "train").is_dir():
        return {"train": path}
    return {part: path / part for part in ("train", "val", "test") if (path / part).is_dir()}


def folder_signature(parts: dict[str, Path]) -> str:
    """Digest of what decoding reads: each class folder's file names, sizes and mtimes."""
    h = hashlib.sha256(b"v1")
    for part, folder in parts.items():
        for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for f in sorted(d.iterdir()):
                st = f.stat()
                h.update(f"{part}/{d.name}/{f.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _write_folder_cache(splits: dict[str, Split], classes: tuple[str, ...], out: Path) -> None:
    _write_splits(splits, out)
    (out / "classes.json").write_text(json.dumps(list(classes)))


def _folder(name: str, root: Path, resolution: int | None) -> Raw:
    """`folder:PATH`: one sub-folder per class, or train/ (val/, test/) each with class sub-folders.

    Decoded once into memory-mappable .npy files under the data root
    (`folders/NAME-PATHHASH-rRES-DIGEST.npy/`), so later processes and runs
    skip PIL; the digest covers file names, sizes and mtimes, so an edited
    folder is decoded afresh (and the stale copy at that resolution removed).
    """
    path = Path(name.removeprefix("folder:")).expanduser().resolve()
    parts = _folder_parts(name, path)
    key = f"{path.name or 'root'}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}-r{resolution or 'native'}"
    cache = root / "folders" / f"{key}-{folder_signature(parts)}.npy"
    # Unknown content: mild geometry, flips on (the common case for photos); recipes can switch them off.
    aug = AugmentCfg(crop="pad", flip=True, rotate=0.0, jitter=0.0)
    if cache.is_dir():
        read = _read_cached(cache, lambda: (json.loads((cache / "classes.json").read_text()),
                                            _read_splits(cache, tuple(parts))))
        if read is not None:
            classes, got = tuple(read[0]), read[1]
            return Raw(got["train"], got.get("val"), got.get("test"), classes, "unknown", aug, cache)
        log.warning("data.dataset '%s': decoded copy %s was damaged; decoding the folder again", name, cache)
    train, classes = _folder_split(name, parts["train"], None, resolution)
    splits = {"train": train}
    for part in ("val", "test"):
        if part in parts:
            splits[part] = _folder_split(name, parts[part], classes, resolution)[0]
    if "val" in splits and train.x.shape[1:] != splits["val"].x.shape[1:]:
        raise SearchError(f"data.dataset '{name}': train images are {tuple(train.x.shape[1:])} but val images "
                          f"{tuple(splits['val'].x.shape[1:])}; set data.resolution to resize all to one size")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        _atomic_dir(cache, lambda tmp: _write_folder_cache(splits, classes, tmp))
        for stale in cache.parent.glob(f"{glob.escape(key)}-*.npy"):
            if stale != cache and len(stale.name) == len(cache.name):
                _discard(stale)
    except OSError as e:
        log.warning("data.dataset '%s': decoded images not cached under %s (%s); every process decodes them again",
                    name, cache.parent, e)
        cache = None
    return Raw(train, splits.get("val"), splits.get("test"), classes, "unknown", aug, cache)


LOADERS: dict[str, Callable[[str, Path, int | None], Raw]] = {
    "digits": _digits,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "galaxy10": _galaxy10,
    "folder": _folder,
    **{flag if size == 28 else f"{flag}_{size}": _medmnist for flag in MEDMNIST for size in MEDMNIST_SIZES},
    **{flag if size == 28 else f"{flag}_{size}": _multi_label for flag in MULTI_LABEL for size in MEDMNIST_SIZES},
}


def dataset_names() -> list[str]:
    """Every name `data.dataset` accepts, MedMNIST sizes folded (`pathmnist[_64|_128|_224]`)."""
    sizes = "[" + "|".join(f"_{s}" for s in MEDMNIST_SIZES[1:]) + "]"
    plain = [k for k in LOADERS if k != "folder" and _medmnist_parts(k)[0] not in {**MEDMNIST, **MULTI_LABEL}]
    return [*plain, *(f"{flag}{sizes}" for flag in MEDMNIST), "folder:PATH"]


def loader_for(name: str) -> Callable[[str, Path, int | None], Raw]:
    key = "folder" if name.startswith("folder:") else name
    if key not in LOADERS:
        raise SearchError(
            f"data.dataset: unknown dataset '{name}'{did_you_mean(name, LOADERS)}; allowed: {one_of(dataset_names())}"
        )
    return LOADERS[key]


@lru_cache(maxsize=4)
def _raw(name: str, root: Path, resolution: int | None) -> Raw:
    """Decode once per process: every trial of this worker reuses the tensors."""
    return loader_for(name)(name, root, resolution)


def load_raw(cfg: DataCfg) -> Raw:
    """The loader's official splits, fetched and unpacked on first use (what `prefetch` calls)."""
    folder = cfg.dataset.startswith("folder:")
    # Only image folders are decoded at a chosen size; other sets ignore data.resolution here.
    return _raw(cfg.dataset, data_root(cfg), cfg.resolution if folder else None)


# ---------------------------------------------------------------------------
# checks that read no images: for `validate`, `prefetch` and before a study is created

CIFAR_BYTES = {"cifar10": 170_498_071, "cifar100": 169_001_437}  # the archives' published sizes


def _remotes(name: str, root: Path) -> list[tuple[Remote, Path, int | None, bool]]:
    """(download, the directory it is unpacked into, size in bytes, size is only a bound) of a set."""
    if name in CIFAR:
        return [(CIFAR[name][0], root / CIFAR[name][1], CIFAR_BYTES[name], False)]
    if name == "galaxy10":
        return [(GALAXY10, root / "Galaxy10_DECals.npy", 17_736 * 256 * 256 * 3, True)]
    flag, size = _medmnist_parts(name)
    if flag in MEDMNIST:
        n, c = MEDMNIST_SHAPES[flag]
        return [(medmnist_remote(name), root / f"{name}.npy", n * (size * size * c + 1), True)]
    return []


def check(cfg: DataCfg, verify_files: bool = True) -> list[Missing]:
    """Everything about `data` that needs no decoding; returns the files still to fetch.

    Refuses unknown and multi-label sets and image folders that are not there;
    verifies present official files against their checksums (once: recorded),
    without moving a bad one (this is a check, not a use).
    """
    name = cfg.dataset
    loader = loader_for(name)
    if loader is _multi_label:
        loader(name, data_root(cfg), None)  # raises its refusal
    if name.startswith("folder:"):
        path = Path(name.removeprefix("folder:")).expanduser().resolve()
        train = _folder_parts(name, path)["train"]
        classes = [d for d in train.iterdir() if d.is_dir() and not d.name.startswith(".")]
        if len(classes) < 2:
            raise SearchError(f"data.dataset '{name}': {train} needs one sub-folder per class (at least 2), "
                              f"found {len(classes)}")
        return []
    out = []
    root = data_root(cfg)
    for remote, unpacked, size, bound in _remotes(name, root):
        path = root / remote.file
        if unpacked.is_dir():
            continue  # unpacked from a verified file already
        if path.is_file():
            if verify_files:
                verify(name, remote, path, aside=False)
            continue
        out.append(Missing(f"data {name}", path, remote.url, size, bound=bound))
    return out


TEST_SEED = 0  # a carved test split is the same for every study of a dataset: results stay comparable


def carve(raw: Raw, cfg: DataCfg, seed: int) -> tuple[Split, Split, Split]:
    """train/val/test: the official splits, and stratified carve-outs of train for the missing ones.

    A carved test split depends only on the data and `test_split` (TEST_SEED),
    so studies with different seeds hold out the same images; val is carved
    from the rest with the study's seed.
    """
    train, val, test = raw.train, raw.val, raw.test
    if test is None:
        keep, out = stratified_split(train.y, cfg.test_split, TEST_SEED)
        train, test = train.take(keep), train.take(out)
    if val is None:
        keep, out = stratified_split(train.y, cfg.val_split, seed + 1)
        train, val = train.take(keep), train.take(out)
    return train, val, test


def _write_splits(splits: dict[str, Split], out: Path) -> None:
    for part, split in splits.items():
        np.save(out / f"{part}_images.npy", split.x.numpy())
        np.save(out / f"{part}_labels.npy", split.y.numpy())


def _read_splits(folder: Path, parts: tuple[str, ...]) -> dict[str, Split]:
    return {part: Split(_mmap_tensor(folder / f"{part}_images.npy"), torch.from_numpy(np.load(folder / f"{part}_labels.npy")))
            for part in parts}


KEEP_CARVED = 4  # carve-out directories kept per dataset, most recently used first (each is a full copy)


def _prune_carved(folder: Path, keep: Path) -> None:
    """Leave `keep` and the KEEP_CARVED - 1 most recently used other carve-outs; a process still
    using a removed one keeps its mapping, a new one carves again."""
    built = []
    for d in folder.glob("carved-*"):
        if d.name.endswith(".gone.tmp"):  # left by a removal that was cut short
            shutil.rmtree(d, ignore_errors=True)
        elif d != keep and not d.name.endswith(".tmp"):  # .tmp: being built
            with contextlib.suppress(OSError):  # removed meanwhile by another process
                built.append((d.stat().st_mtime, d.name, d))
    built.sort(reverse=True)
    for _, _, old in built[KEEP_CARVED - 1 :]:
        _discard(old)


def carved_splits(raw: Raw, cfg: DataCfg, seed: int) -> tuple[Split, Split, Split]:
    """`carve`, kept as memory-mapped .npy files next to a file-backed dataset (Galaxy10, image folders).

    Each worker process then maps the same files (one copy in the page cache)
    instead of holding its own copy of the carved train split (~2.5 GB for
    Galaxy10). One directory per seed and fractions, written once under a
    lock; the KEEP_CARVED most recently used are kept.
    """
    if raw.cache is None or (raw.val is not None and raw.test is not None):
        return carve(raw, cfg, seed)
    where = raw.cache / f"carved-testseed{TEST_SEED}-seed{seed}-val{cfg.val_split!r}-test{cfg.test_split!r}"
    parts = ("train", "val", "test")
    read = None
    try:
        for _ in range(2):  # a damaged directory is removed by _read_cached and built once more
            _atomic_dir(where, lambda tmp: _write_splits(dict(zip(parts, carve(raw, cfg, seed), strict=True)), tmp))
            read = _read_cached(where, lambda: _read_splits(where, parts))
            if read is not None:
                break
    except OSError as e:  # unwritable or full data root
        log.warning("data: carve-outs not kept under %s (%s); this process holds its own copy", where, e)
    if read is None:
        return carve(raw, cfg, seed)
    with contextlib.suppress(OSError):  # a read-only data root: use what is there, as it is
        os.utime(where)  # most recently used
        _prune_carved(raw.cache, keep=where)
    return read["train"], read["val"], read["test"]


def load_data(cfg: DataCfg, seed: int = 0) -> Data:
    """The dataset with train/val/test splits: official ones where they exist, else stratified carve-outs."""
    raw = load_raw(cfg)
    train, val, test = carved_splits(raw, cfg, seed)
    if cfg.max_samples and cfg.max_samples < len(train):
        _, sub = stratified_split(train.y, cfg.max_samples / len(train), seed + 2)
        train = train.take(sub)
    aug = raw.augment
    overrides = {k: getattr(cfg, k) for k in ("crop", "flip", "rotate", "jitter") if getattr(cfg, k) is not None}
    aug = replace(aug, **overrides)
    resolution = cfg.resolution or int(train.x.shape[-1])
    return Data(cfg.dataset, train, val, test, raw.classes, raw.overlap, aug, resolution)
