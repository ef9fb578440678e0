"""Datasets in their real on-disk formats, written tiny, loaded through search.data; only the network is mocked."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import shutil
import sqlite3
import struct
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from search import data, datasets
from search.data import cache, cifar, galaxy10, load_data, medmnist
from search.data.cache import Remote
from search.datasets import DataCfg
from search.errors import SearchError
from tests.conftest import fake_network, run_inline, write_recipe

# ---------------------------------------------------------------------------
# writers of the official formats


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2 and its numpy did, which wrote the official batches: strings as Python 2
    strings (Python 3's protocol 2 calls `_codecs.encode` for bytes, a global the official files never
    name) and numpy's array reconstruction under its old name, `numpy.core.multiarray`."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes | str) -> None:
        raw = obj.encode("ascii") if isinstance(obj, str) else obj
        n = len(raw)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_cifar10(root: Path, per_batch: int = 20, test: int = 30, seed: int = 0) -> Path:
    """cifar-10-batches-py/ as in the official archive: dicts with bytes keys, pickled by Python 2."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    for i, n in enumerate([per_batch] * 5 + [test]):
        d = {
            b"batch_label": b"x",
            b"labels": [int(v) for v in np.arange(n) % 10],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"f.png"] * n,
        }
        (folder / (f"data_batch_{i + 1}" if i < 5 else "test_batch")).write_bytes(py2_pickle(d))
    meta = {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    return folder


def write_cifar100(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in (("train", n_train), ("test", n_test)):
        d = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": [int(v) for v in np.arange(n) % 100],
            b"coarse_labels": [0] * n,
        }
        (folder / name).write_bytes(py2_pickle(d))
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": [b"x"] * 20}
    (folder / "meta").write_bytes(py2_pickle(meta))
    return folder


def write_medmnist(path: Path, size: int, channels: int, classes: int, counts=(30, 10, 12)) -> dict:
    """An official-style .npz: uint8 images (N, H, W[, 3]) and labels (N, 1)."""
    rng = np.random.default_rng(2)
    arrays = {}
    for part, n in zip(("train", "val", "test"), counts, strict=True):
        shape = (n, size, size, 3) if channels == 3 else (n, size, size)
        arrays[f"{part}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{part}_labels"] = (np.arange(n) % classes).astype(np.uint8)[:, None]
    np.savez_compressed(path, **arrays)
    return arrays


def write_galaxy10(path: Path, per_class: int = 10, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(3)
    n = 10 * per_class
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    with h5py.File(path, "w") as f:
        f["images"] = images
        f["ans"] = (np.arange(n) % 10).astype(np.uint8)
        f["ra"] = np.zeros(n)
    return images


def write_folder(root: Path, classes=("cat", "dog"), n=4, size=(12, 10), mode="RGB") -> None:
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(n):
            value = 40 * k + i
            Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(root / c / f"{i}.png")


def visible(folder: Path) -> list[Path]:
    """A directory's entries without the hidden build locks, sorted."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def cfg(name: str, root: Path, **kw) -> DataCfg:
    return DataCfg(dataset=name, root=str(root), **kw)


def refusal(name: str, root: Path) -> str:
    """The message of the SearchError loading dataset `name` from `root` raises."""
    with pytest.raises(SearchError) as e:
        load_data(cfg(name, root))
    return str(e.value)


@pytest.fixture
def published(monkeypatch):
    """`published(name, path)`: the file just written becomes the official one (its checksum the
    published checksum), as the real files are too large for tests."""

    def publish(name: str, path: Path) -> None:
        blob = path.read_bytes()
        if name == "galaxy10":
            g = galaxy10.GALAXY10
            monkeypatch.setattr(galaxy10, "GALAXY10", Remote(g.url, g.file, sha256=hashlib.sha256(blob).hexdigest()))
            return
        flag, size = datasets.medmnist_parts(name)
        md5s = list(datasets.MEDMNIST[flag].md5)
        md5s[datasets.SIZES.index(size)] = hashlib.md5(blob).hexdigest()
        monkeypatch.setitem(datasets.MEDMNIST, flag, replace(datasets.MEDMNIST[flag], md5=tuple(md5s)))

    return publish


@pytest.fixture
def offline_network(monkeypatch):
    """No network at all: a download attempt is a test failure."""
    monkeypatch.setattr(cache, "_network_up", lambda host: False)
    monkeypatch.setattr(cache, "_open_url", lambda url, timeout=60.0: pytest.fail(f"tried to download {url}"))


# ---------------------------------------------------------------------------
# loaders


def test_cifar10_official_batches(tmp_path, offline_network):
    folder = write_cifar10(tmp_path)
    d = load_data(cfg("cifar10", tmp_path, val_split=0.2), seed=0)
    assert d.classes[:3] == ("airplane", "automobile", "bird") and d.num_classes == 10
    assert d.overlap == "semantic"
    assert d.train.x.dtype == torch.uint8 and d.train.x.shape[1:] == (3, 32, 32)
    assert len(d.test) == 30  # the official test batch, untouched
    assert len(d.train) + len(d.val) == 100 and len(d.val) == 20
    assert torch.bincount(d.val.y, minlength=10).tolist() == [2] * 10  # stratified
    batch = pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")
    assert torch.equal(d.test.x[5], torch.from_numpy(batch[b"data"][5].reshape(3, 32, 32)))
    assert d.test.y.tolist() == batch[b"labels"]
    assert (d.augment.crop, d.augment.flip) == ("pad", True)


def test_cifar100_fine_labels(tmp_path, offline_network):
    write_cifar100(tmp_path, n_train=200)  # 2 per class: 1 carved into val
    d = load_data(cfg("cifar100", tmp_path), seed=0)
    assert d.num_classes == 100 and d.classes[7] == "c7"
    assert len(d.test) == 20 and d.test.y.tolist() == list(range(20))


class Runs:
    """Unpickled, runs a shell command: what a swapped batch file can hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("victim", ["batches.meta", "data_batch_1"])
def test_a_crafted_cifar_pickle_is_refused_before_anything_in_it_runs(tmp_path, offline_network, victim):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "MARKER"
    key = b"label_names" if victim == "batches.meta" else b"data"
    (folder / victim).write_bytes(py2_pickle({key: Runs(f"touch {marker}"), b"labels": [0]}))
    assert refusal("cifar10", tmp_path) == (
        f"data.dataset 'cifar10': {folder / victim} is not an official CIFAR batch: it asks for "
        f"{os.system.__module__}.system, which an official batch never does, and was refused before anything in "
        f"it ran; delete {folder} and run `python -m search prefetch RECIPE` to fetch the official archive"
    )
    assert not marker.exists() and [p.name for p in visible(tmp_path)] == ["cifar-10-batches-py"]


@pytest.mark.parametrize(
    "batch, found",
    [
        (
            {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},
            "b'data' must be uint8 (N, 3072), found float32",
        ),
        (
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
            "b'labels' must be 2 ints in 0..9, found int 10",
        ),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "b'labels' must be 2 ints in 0..9, found 1 of them"),
    ],
)
def test_a_cifar_batch_of_another_form_is_refused(tmp_path, offline_network, batch, found):
    folder = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(py2_pickle(batch))
    with pytest.raises(
        SearchError, match=rf"{folder / 'test_batch'} is not an official CIFAR batch \({re.escape(found)}"
    ):
        load_data(cfg("cifar10", tmp_path))


def test_cifar_batches_are_read_once_then_only_the_npy_files(tmp_path, offline_network, machine):
    folder = write_cifar10(tmp_path)
    first = load_data(cfg("cifar10", tmp_path), seed=0)
    cache_dir = tmp_path / "cifar10.npy"
    assert [p.name for p in visible(cache_dir)] == [
        "classes.json",
        "test_images.npy",
        "test_labels.npy",
        "train_images.npy",
        "train_labels.npy",
    ]
    images = np.load(cache_dir / "train_images.npy", allow_pickle=False)
    assert images.shape == (100, 3, 32, 32) and images.dtype == np.uint8
    assert np.load(cache_dir / "test_labels.npy", allow_pickle=False).dtype == np.int64
    shutil.rmtree(folder)  # the pickles are never opened again
    data._raw.cache_clear()
    again = load_data(cfg("cifar10", tmp_path), seed=0)
    assert again.classes == first.classes and torch.equal(again.train.x, first.train.x)
    assert torch.equal(again.test.y, first.test.y)
    machine()  # another machine cannot check the cache without a source: refused, naming the archive
    with pytest.raises(SearchError, match=r"cifar-10-python.tar.gz is missing .*cifar10.npy, which was not built"):
        load_data(cfg("cifar10", tmp_path), seed=0)


@pytest.mark.parametrize("name, size, channels, flip", [("pathmnist", 28, 3, True), ("organamnist_64", 64, 1, False)])
def test_medmnist_npz_official_splits_and_mmap_cache(tmp_path, offline_network, published, name, size, channels, flip):
    classes = 9 if name == "pathmnist" else 11
    arrays = write_medmnist(tmp_path / f"{name}.npz", size, channels, classes)
    published(name, tmp_path / f"{name}.npz")
    d = load_data(cfg(name, tmp_path), seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (30, 10, 12)
    assert d.train.x.shape == (30, channels, size, size) and d.train.x.dtype == torch.uint8
    want = arrays["val_images"].transpose(0, 3, 1, 2) if channels == 3 else arrays["val_images"][:, None]
    assert np.array_equal(d.val.x.numpy(), want)
    assert d.test.y.tolist() == arrays["test_labels"][:, 0].tolist()
    assert d.num_classes == classes and d.overlap == "none" and d.augment.flip is flip
    if name == "pathmnist":
        assert d.classes[0] == "adipose"
    # Unpacked once into uncompressed .npy files that later processes map instead of decompressing.
    cache = tmp_path / f"{name}.npy"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{k}.npy" for k in arrays)
    assert isinstance(np.load(cache / "train_images.npy", mmap_mode="r"), np.memmap)


def test_medmnist_multi_label_is_refused(tmp_path):
    with pytest.raises(SearchError, match=r"chestmnist_224'.*multi-label \(14 findings.*single-label.*pathmnist"):
        load_data(cfg("chestmnist_224", tmp_path))


def test_truncated_npz_names_the_file_and_the_fix(tmp_path, offline_network, published):
    write_medmnist(tmp_path / "bloodmnist.npz", 28, 3, 8)
    blob = (tmp_path / "bloodmnist.npz").read_bytes()
    (tmp_path / "bloodmnist.npz").write_bytes(blob[: len(blob) // 2])
    published("bloodmnist", tmp_path / "bloodmnist.npz")  # damaged at the source: the checksum cannot tell
    with pytest.raises(
        SearchError, match=r"cannot read .*bloodmnist.npz.*delete it and run `python -m search prefetch"
    ):
        load_data(cfg("bloodmnist", tmp_path))
    assert not (tmp_path / "bloodmnist.npy").exists()  # no half-built cache left behind


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_medmnist_members_other_than_the_official_arrays_are_refused(tmp_path, offline_network, published):
    arrays = write_medmnist(tmp_path / "src.npz", 28, 3, 9)
    root = tmp_path / "root"
    root.mkdir()
    npz = root / "pathmnist.npz"
    with zipfile.ZipFile(npz, "w") as z:
        for key, a in arrays.items():
            z.writestr(f"{key}.npy", npy_bytes(a))
        z.writestr("../escape.npy", npy_bytes(np.zeros(3, dtype=np.uint8)))  # a name that is a path out
    published("pathmnist", npz)  # even a file with the published checksum
    assert refusal("pathmnist", root) == (
        f"data.dataset 'pathmnist': {npz} holds a member '../escape.npy', and an official MedMNIST .npz holds "
        f"only {', '.join(medmnist.MEMBERS)}; not the official file: delete it and run "
        "`python -m search prefetch RECIPE`"
    )
    assert not list(tmp_path.rglob("escape.npy")) and [p.name for p in visible(root)] == ["pathmnist.npz"]


def test_medmnist_file_with_a_wrong_checksum_is_refused_before_decoding(tmp_path, offline_network, monkeypatch):
    write_medmnist(tmp_path / "pathmnist.npz", 28, 3, 9)  # the right format, not the official file
    monkeypatch.setattr(medmnist, "_npz_to_npy", lambda *a: pytest.fail("decoded an unverified file"))
    with pytest.raises(
        SearchError,
        match=r"pathmnist.npz has md5 [0-9a-f]{32}, expected a8b06965200029087d5bd730944a56c1 "
        r"\(the published checksum\): not the official file; moved it to .*pathmnist.npz.corrupt",
    ):
        load_data(cfg("pathmnist", tmp_path))
    assert [p.name for p in visible(tmp_path)] == ["pathmnist.npz.corrupt"]


def test_a_verified_file_is_not_hashed_again_until_it_changes(tmp_path, offline_network, published, monkeypatch):

    npz = tmp_path / "bloodmnist.npz"
    write_medmnist(npz, 28, 3, 8)
    published("bloodmnist", npz)
    hashed = []
    real = cache.file_digest
    monkeypatch.setattr(cache, "file_digest", lambda path, algo: hashed.append(path) or real(path, algo))
    remote = medmnist.remote("bloodmnist")
    cache.verify("bloodmnist", remote, npz)
    assert hashed == [npz] and [p.name for p in visible(tmp_path)] == ["bloodmnist.npz"]  # recorded elsewhere
    cache.verify("bloodmnist", remote, npz)  # another process: the record vouches for it
    assert hashed == [npz]
    os.utime(npz, ns=(0, 0))  # touched (or replaced): hashed again, and still good
    cache.verify("bloodmnist", remote, npz)
    assert hashed == [npz, npz]
    npz.write_bytes(npz.read_bytes()[:-1])  # changed: refused, without moving it (a check, not a use)
    with pytest.raises(SearchError, match=r"bloodmnist.npz has md5 .*delete it and run"):
        cache.verify("bloodmnist", remote, npz, aside=False)
    assert npz.is_file()


def test_galaxy10_h5_stratified_seeded_splits(tmp_path, offline_network, published):
    images = write_galaxy10(tmp_path / "Galaxy10_DECals.h5")
    published("galaxy10", tmp_path / "Galaxy10_DECals.h5")
    c = cfg("galaxy10", tmp_path, val_split=0.2, test_split=0.2)
    a, b, other = load_data(c, seed=0), load_data(c, seed=0), load_data(c, seed=5)
    assert a.classes[2] == "Round Smooth" and a.overlap == "none" and a.augment.rotate == 180.0
    assert (len(a.train), len(a.val), len(a.test)) == (60, 20, 20)
    for split in (a.train, a.val, a.test):
        counts = torch.bincount(split.y, minlength=10)
        assert counts.min() == counts.max()  # every class in the same share
    assert torch.equal(a.val.x, b.val.x) and not torch.equal(a.val.x, other.val.x)
    assert torch.equal(a.test.x, other.test.x)  # one held-out test set for every study of the dataset
    # Pixels survive the (N, H, W, 3) -> (N, 3, H, W) cache: find a val image in the source.
    src = torch.from_numpy(images).permute(0, 3, 1, 2)
    assert any(torch.equal(a.val.x[0], s) for s in src)
    assert not set(map(bytes, a.test.x.numpy())) & set(map(bytes, a.train.x.numpy()))


def test_max_samples_subsamples_stratified(tmp_path, offline_network, published):
    write_galaxy10(tmp_path / "Galaxy10_DECals.h5", per_class=20)
    published("galaxy10", tmp_path / "Galaxy10_DECals.h5")
    d = load_data(cfg("galaxy10", tmp_path, max_samples=50), seed=0)
    assert len(d.train) == 50 and torch.bincount(d.train.y).tolist() == [5] * 10


def test_image_folder_with_splits(tmp_path):
    write_folder(tmp_path / "train", n=5)
    write_folder(tmp_path / "val", n=2)
    write_folder(tmp_path / "test", n=1)
    d = load_data(DataCfg(dataset=f"folder:{tmp_path}"), seed=0)
    assert d.classes == ("cat", "dog") and d.overlap == "unknown"
    assert d.train.x.shape == (10, 3, 10, 12) and (len(d.val), len(d.test)) == (4, 2)  # given splits kept
    assert d.val.y.tolist() == [0, 0, 1, 1]
    assert d.train.x[5, :, 0, 0].tolist() == [40, 0, 215]  # dog/0.png's colour


def test_image_folder_flat_gray_and_resized(tmp_path):
    write_folder(tmp_path, classes=("a", "b", "c"), n=6, size=(20, 16), mode="L")
    d = load_data(DataCfg(dataset=f"folder:{tmp_path}", resolution=8), seed=0)
    assert d.in_chans == 1 and d.train.x.shape[1:] == (1, 8, 8)
    assert len(d.train) + len(d.val) + len(d.test) == 18


def test_image_folder_mixed_sizes_need_a_resolution(tmp_path):
    write_folder(tmp_path, classes=("a", "b"), n=2)
    Image.new("RGB", (30, 30)).save(tmp_path / "a" / "big.png")
    with pytest.raises(SearchError, match=r"differ in size.*set data.resolution"):
        load_data(DataCfg(dataset=f"folder:{tmp_path}"))


def _sideways(path: Path, upright: bool = False) -> None:
    """A 16x24 photo, red on top and blue below as shown. `upright`: stored so, with no EXIF; else
    stored lying on its side (24x16, red on the left) with EXIF orientation 6 (turn clockwise
    to show), as a camera held upright writes it."""
    red, blue = (255, 0, 0), (0, 0, 255)
    if upright:
        im = Image.new("RGB", (16, 24), blue)
        im.paste(red, (0, 0, 16, 12))
        im.save(path, quality=95)
        return
    im = Image.new("RGB", (24, 16), blue)
    im.paste(red, (0, 0, 12, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, exif=exif, **({"quality": 95} if path.suffix == ".jpg" else {}))


def test_image_folder_applies_the_exif_orientation(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(4):
            _sideways(tmp_path / c / f"{i}.jpg")
            _sideways(tmp_path / c / f"{i}.png")
            _sideways(tmp_path / c / f"up{i}.jpg", upright=True)
    with Image.open(tmp_path / "a" / "0.png") as im:  # the PNG carries the tag (eXIf chunk) as the JPEG does
        assert im.size == (24, 16) and im.getexif()[0x0112] == 6
    d = load_data(DataCfg(dataset=f"folder:{tmp_path}"), seed=0)
    x = torch.cat([d.train.x, d.val.x, d.test.x]).int()
    assert x.shape == (24, 3, 24, 16)  # (N, C, H, W): upright, as the upright copies are
    top, bottom = x[:, :, :10], x[:, :, 14:]
    assert (top[:, 0] > 200).all() and (top[:, 2] < 60).all()  # red on top in every image
    assert (bottom[:, 2] > 200).all() and (bottom[:, 0] < 60).all()
    d = load_data(DataCfg(dataset=f"folder:{tmp_path}", resolution=8), seed=0)  # decoded at a reduced scale
    x = torch.cat([d.train.x, d.val.x, d.test.x]).int()
    assert (x[:, 0, :2] > 200).all() and (x[:, 2, -2:] > 200).all()


def test_unknown_dataset_suggests_a_name():
    with pytest.raises(
        SearchError, match=r"unknown dataset 'cifar-10'.*allowed: .*pathmnist\[_64\|_128\|_224\].*folder:PATH"
    ):
        load_data(DataCfg(dataset="cifar-10"))


# ---------------------------------------------------------------------------
# fetching: missing, offline, checksums, retries


def cifar_archive(tmp_path: Path) -> bytes:
    src = tmp_path / "src"
    write_cifar10(src, per_batch=10, test=10)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, file", [("pathmnist_224", "pathmnist_224.npz"), ("cifar100", "cifar-100-python.tar.gz")]
)
def test_missing_dataset_offline_names_path_and_prefetch(tmp_path, monkeypatch, name, file):
    monkeypatch.setenv("SEARCH_OFFLINE", "1")
    monkeypatch.setattr(cache, "_network_up", lambda host: pytest.fail("probed the network in offline mode"))
    root = tmp_path / "root"
    msg = refusal(name, root)
    assert str(root / file) in msg and "python -m search prefetch RECIPE" in msg
    assert "\n" not in msg
    assert not root.exists()  # refused before anything was written


def test_missing_dataset_without_network(tmp_path, offline_network):
    with pytest.raises(
        SearchError, match=r"Galaxy10_DECals.h5 is missing \(no network: www.astro.utoronto.ca unreachable\)"
    ):
        load_data(cfg("galaxy10", tmp_path))


def test_download_checksum_retry_and_read_in_place(tmp_path, monkeypatch):
    blob = cifar_archive(tmp_path)
    remote = cifar.CIFAR["cifar10"].remote
    good = Remote(remote.url, remote.file, md5=hashlib.md5(blob).hexdigest())
    monkeypatch.setitem(cifar.CIFAR, "cifar10", replace(cifar.CIFAR["cifar10"], remote=good))
    calls = fake_network(monkeypatch, blob, fail_first=2)
    root = tmp_path / "root"
    d = load_data(cfg("cifar10", root), seed=0)
    assert calls == [remote.url] * 3  # two failures retried
    assert len(d.test) == 10 and len(d.train) + len(d.val) == 50
    assert (root / "cifar-10-python.tar.gz").read_bytes() == blob
    assert [p.name for p in visible(root)] == ["cifar-10-python.tar.gz", "cifar10.npy"]  # read, not unpacked


def test_download_with_wrong_checksum_is_discarded(tmp_path, monkeypatch):
    fake_network(monkeypatch, b"not the archive")
    root = tmp_path / "root"
    with pytest.raises(
        SearchError,
        match=r"has md5 [0-9a-f]{32}, expected c58f30108f718f92721af3b95e74349a; the download was discarded",
    ):
        load_data(cfg("cifar10", root))
    assert visible(root) == []  # neither the file nor a temporary one (only the hidden lock)


def test_corrupt_local_archive_is_moved_aside(tmp_path, offline_network):
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(
        SearchError,
        match=r"cifar-100-python.tar.gz has md5 .* expected eb9058c3a382ffc7106e4002c42a8d85 .*moved it to .*\.corrupt",
    ):
        load_data(cfg("cifar100", tmp_path))
    assert not (tmp_path / "cifar-100-python.tar.gz").exists()
    assert (tmp_path / "cifar-100-python.tar.gz.corrupt").exists()


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCH_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data.data_root(DataCfg(root=str(tmp_path / "r"))) == tmp_path / "r"
    assert data.data_root(DataCfg()) == tmp_path / "env"
    monkeypatch.delenv("SEARCH_DATA")
    assert data.data_root(DataCfg()) == tmp_path / "cache" / "search" / "data"


# ---------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_one_trial_on_tiny_cifar10_through_the_cli(tmp_path):
    write_cifar10(tmp_path / "data", per_batch=16, test=20)
    recipe = {
        "study": {"name": "tinycifar", "n_trials": 1, "sampler": {"name": "random"}, "pruner": "none"},
        "data": {"dataset": "cifar10", "root": str(tmp_path / "data")},
        "pool": ["mini_cnn"],
        "space": {"overrides": {"batch_size": [16], "lr": 0.003, "optimizer": "adamw"}},
        "train": {"epochs": 1},
        "hardware": {"device": "cpu"},
    }
    write_recipe(tmp_path / "r.yaml", recipe)
    proc = run_inline("run", "r.yaml", cwd=tmp_path, env={"SEARCH_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "cifar10: " in proc.stdout
    with sqlite3.connect(tmp_path / "studies" / "tinycifar.db") as db:
        states = [s for (s,) in db.execute("select state from trials")]
    assert states == ["COMPLETE"]


def test_image_folder_is_decoded_once_then_memory_mapped(tmp_path, monkeypatch):
    write_folder(tmp_path / "imgs" / "train", n=3)
    write_folder(tmp_path / "imgs" / "val", n=2)
    name, root = f"folder:{tmp_path / 'imgs'}", tmp_path / "root"
    first = load_data(cfg(name, root), seed=0)
    caches = visible(root / "folders")
    assert len(caches) == 1 and caches[0].name.startswith("imgs-") and "-rnative-" in caches[0].name
    assert [p.name for p in visible(caches[0])] == [
        "carved-testseed0-seed0-val0.15-test0.15",  # no test/ folder: the test carve-out is kept beside the images
        "classes.json",
        "train_images.npy",
        "train_labels.npy",
        "val_images.npy",
        "val_labels.npy",
    ]

    data._raw.cache_clear()  # a new process: PIL must not be needed any more
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("decoded the folder again"))
    again = load_data(cfg(name, root), seed=0)
    assert again.classes == first.classes and torch.equal(again.train.x, first.train.x)
    assert torch.equal(again.val.y, first.val.y) and torch.equal(again.test.x, first.test.x)
    monkeypatch.undo()

    # An added image changes the digest: decoded afresh, the stale copy removed.
    Image.new("RGB", (12, 10), (1, 2, 3)).save(tmp_path / "imgs" / "train" / "dog" / "new.png")
    data._raw.cache_clear()
    grown = load_data(cfg(name, root, val_split=0.1), seed=0)
    assert len(grown.train) + len(grown.test) == 7
    assert [p.name for p in visible(root / "folders")] != [caches[0].name]
    assert len(visible(root / "folders")) == 1


def test_image_folder_loads_when_the_data_root_is_not_writable(tmp_path, caplog):
    write_folder(tmp_path / "imgs", n=3)
    blocker = tmp_path / "root"
    blocker.write_text("a file where the data root should be")
    d = load_data(cfg(f"folder:{tmp_path / 'imgs'}", blocker), seed=0)
    assert len(d.train) + len(d.val) + len(d.test) == 6
    assert "not cached" in caplog.text and "every process decodes them again" in caplog.text


def test_galaxy10_carve_outs_are_written_once_and_memory_mapped(tmp_path, offline_network, published):
    write_galaxy10(tmp_path / "Galaxy10_DECals.h5", per_class=20)
    published("galaxy10", tmp_path / "Galaxy10_DECals.h5")
    c = cfg("galaxy10", tmp_path)
    first = load_data(c, seed=3)
    kept = tmp_path / "Galaxy10_DECals.npy" / "carved-testseed0-seed3-val0.15-test0.15"
    assert [p.name for p in visible(kept)] == sorted(
        f"{part}_{k}.npy" for part in ("train", "val", "test") for k in ("images", "labels")
    )
    in_memory = data.carve(data.load_raw(c), c, 3)  # what the files must hold
    for split, want in zip((first.train, first.val, first.test), in_memory, strict=True):
        assert torch.equal(split.x, want.x) and torch.equal(split.y, want.y)
    assert np.load(kept / "train_images.npy", mmap_mode="r").shape == tuple(first.train.x.shape)
    data._raw.cache_clear()  # another process, another seed: its own directory
    assert len(load_data(c, seed=4).test) == len(first.test)
    assert (tmp_path / "Galaxy10_DECals.npy" / "carved-testseed0-seed4-val0.15-test0.15").is_dir()


def test_image_folder_caches_per_resolution_side_by_side(tmp_path):
    write_folder(tmp_path / "imgs", n=3, size=(20, 16))
    root = tmp_path / "root"
    small = load_data(cfg(f"folder:{tmp_path / 'imgs'}", root, resolution=8), seed=0)
    large = load_data(cfg(f"folder:{tmp_path / 'imgs'}", root, resolution=16), seed=0)
    assert small.train.x.shape[-1] == 8 and large.train.x.shape[-1] == 16
    assert sorted(p.name.split("-")[2] for p in visible(root / "folders")) == ["r16", "r8"]


def test_only_the_most_recently_used_carve_outs_are_kept(tmp_path, offline_network, published, monkeypatch):

    write_galaxy10(tmp_path / "Galaxy10_DECals.h5", per_class=10)
    published("galaxy10", tmp_path / "Galaxy10_DECals.h5")
    monkeypatch.setattr(data, "KEEP_CARVED", 2)
    c = cfg("galaxy10", tmp_path)
    for i, seed in enumerate((1, 2, 1, 3)):  # seed 1 is used again after 2: 2 is the oldest when 3 comes
        load_data(c, seed=seed)
        kept = tmp_path / "Galaxy10_DECals.npy" / f"carved-testseed0-seed{seed}-val0.15-test0.15"
        os.utime(kept, (1000 + i, 1000 + i))  # distinct times, whatever the clock's resolution
    names = [p.name for p in visible(tmp_path / "Galaxy10_DECals.npy") if p.name.startswith("carved-")]
    assert names == ["carved-testseed0-seed1-val0.15-test0.15", "carved-testseed0-seed3-val0.15-test0.15"]


def test_a_damaged_carve_out_is_rebuilt_and_a_read_only_one_still_used(
    tmp_path, offline_network, published, monkeypatch
):
    write_galaxy10(tmp_path / "Galaxy10_DECals.h5", per_class=10)
    published("galaxy10", tmp_path / "Galaxy10_DECals.h5")
    c = cfg("galaxy10", tmp_path)
    first = load_data(c, seed=2)
    kept = tmp_path / "Galaxy10_DECals.npy" / "carved-testseed0-seed2-val0.15-test0.15"
    (kept / "train_images.npy").unlink()  # a removal cut short
    again = load_data(c, seed=2)
    assert (kept / "train_images.npy").is_file() and torch.equal(again.train.x, first.train.x)

    def read_only(*args, **kw):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(data.os, "utime", read_only)
    monkeypatch.setattr(data, "carve", lambda *a: pytest.fail("carved again although the files are there"))
    assert torch.equal(load_data(c, seed=2).val.x, first.val.x)


def test_a_damaged_folder_cache_is_decoded_again(tmp_path):
    write_folder(tmp_path / "imgs", n=3)
    root = tmp_path / "root"
    first = load_data(cfg(f"folder:{tmp_path / 'imgs'}", root), seed=0)
    (cache,) = visible(root / "folders")
    (cache / "classes.json").unlink()
    data._raw.cache_clear()
    again = load_data(cfg(f"folder:{tmp_path / 'imgs'}", root), seed=0)
    assert again.classes == first.classes and (cache / "classes.json").is_file()
    assert torch.equal(again.train.x, first.train.x)


# ---------------------------------------------------------------------------
# derived caches: trusted only as this machine built or checked them


@pytest.fixture
def machine(tmp_path_factory, monkeypatch):
    """`machine()`: from now on, another machine sharing the data root (its own, empty, records)."""

    def switch() -> None:
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
        data._raw.cache_clear()

    switch()
    return switch


def inodes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in visible(folder)}


def test_a_swapped_file_in_an_unpacked_cache_is_refused(tmp_path, offline_network, published, machine):
    arrays = write_medmnist(tmp_path / "pathmnist.npz", 28, 3, 9)
    published("pathmnist", tmp_path / "pathmnist.npz")
    load_data(cfg("pathmnist", tmp_path))
    labels = tmp_path / "pathmnist.npy" / "train_labels.npy"
    np.save(labels, np.roll(arrays["train_labels"], 1))  # other labels, same shape and dtype
    data._raw.cache_clear()  # a new process of the same machine: its record no longer vouches for it
    assert refusal("pathmnist", tmp_path) == (
        f"data.dataset 'pathmnist': {labels} differs from what pathmnist.npz (md5 "
        f"{medmnist.remote('pathmnist').md5}) gives (it was not built on this machine, or was changed since); "
        f"nothing of it was used: delete {tmp_path / 'pathmnist.npy'} so that it is built again"
    )
    assert np.array_equal(np.load(labels, allow_pickle=False), np.roll(arrays["train_labels"], 1))  # left alone
    assert [p.name for p in visible(tmp_path)] == ["pathmnist.npy", "pathmnist.npz"]  # no check directory left


def test_another_machines_cache_is_checked_against_the_source_and_never_replaced(
    tmp_path, offline_network, published, machine, monkeypatch
):
    write_medmnist(tmp_path / "bloodmnist.npz", 28, 3, 8)
    published("bloodmnist", tmp_path / "bloodmnist.npz")
    first = load_data(cfg("bloodmnist", tmp_path))
    cache_dir = tmp_path / "bloodmnist.npy"
    built = inodes(cache_dir)
    machine()  # a machine that did not build it: unpacks the .npz beside it and compares
    again = load_data(cfg("bloodmnist", tmp_path))
    assert torch.equal(again.train.x, first.train.x) and inodes(cache_dir) == built  # read, not replaced
    assert [p.name for p in visible(tmp_path)] == ["bloodmnist.npy", "bloodmnist.npz"]
    # Recorded now: the next process of that machine reads the cache alone, even after a touch.
    data._raw.cache_clear()
    os.utime(cache_dir / "val_images.npy")
    monkeypatch.setattr(medmnist, "_npz_to_npy", lambda *a: pytest.fail("unpacked the .npz again"))
    assert torch.equal(load_data(cfg("bloodmnist", tmp_path)).val.x, first.val.x)
    # A third machine without the .npz cannot check the cache: refused, naming the file to copy.
    (tmp_path / "bloodmnist.npz").unlink()
    machine()
    assert refusal("bloodmnist", tmp_path) == (
        f"data.dataset 'bloodmnist': {tmp_path / 'bloodmnist.npz'} is missing (no network: zenodo.org "
        f"unreachable), and {cache_dir}, which was not built on this machine, is only used once checked against "
        f"it; on a machine with internet run `python -m search prefetch RECIPE` and copy {tmp_path} over, or "
        "point data.root / $SEARCH_DATA at a directory that has it"
    )
    # The offline checklist lists the file too, rather than trusting the directory.
    assert [m.path for m in data.check(cfg("bloodmnist", tmp_path))] == [tmp_path / "bloodmnist.npz"]


def test_a_folder_cache_that_differs_is_left_alone_and_not_used(tmp_path, machine, caplog):
    write_folder(tmp_path / "imgs", n=3)
    name, root = f"folder:{tmp_path / 'imgs'}", tmp_path / "root"
    first = load_data(cfg(name, root), seed=0)
    (cache_dir,) = visible(root / "folders")
    x = np.load(cache_dir / "train_images.npy", allow_pickle=False)
    np.save(cache_dir / "train_images.npy", 255 - x)  # another machine's (or a hostile) copy
    machine()
    again = load_data(cfg(name, root), seed=0)
    assert torch.equal(again.train.x, first.train.x)  # this process's own decoding, not the copy
    assert np.array_equal(np.load(cache_dir / "train_images.npy", allow_pickle=False), 255 - x)  # left alone
    assert f"{cache_dir / 'train_images.npy'} differs from what the images under" in caplog.text
    assert "this process uses its own copy" in caplog.text


def test_a_swapped_carve_out_is_not_used(tmp_path, offline_network, published, machine, caplog):
    write_galaxy10(tmp_path / "Galaxy10_DECals.h5", per_class=10)
    published("galaxy10", tmp_path / "Galaxy10_DECals.h5")
    c = cfg("galaxy10", tmp_path)
    first = load_data(c, seed=1)
    kept = tmp_path / "Galaxy10_DECals.npy" / "carved-testseed0-seed1-val0.15-test0.15"
    y = np.load(kept / "test_labels.npy", allow_pickle=False)
    np.save(kept / "test_labels.npy", (y + 1) % 10)
    data._raw.cache_clear()
    again = load_data(c, seed=1)
    assert torch.equal(again.test.y, first.test.y)  # carved again in memory
    assert f"{kept / 'test_labels.npy'} differs" in caplog.text


def test_digits_read_from_the_bundled_file_equal_scikit_learns_loader():
    from search.data import digits

    path = digits.csv_file()
    assert path is not None and path.name == "digits.csv.gz"
    images, labels = digits.read(path)
    ref_images, ref_labels = digits.read(None)  # sklearn.datasets.load_digits
    assert images.shape == (1797, 8, 8) and np.array_equal(images, ref_images)
    assert np.array_equal(labels, ref_labels) and sorted(set(labels.tolist())) == list(range(10))


def test_every_name_the_recipe_accepts_has_a_loader():
    """`search.datasets` (checked without torch) and the loaders here name the same sets."""
    assert set(data.LOADERS) == {*datasets.names(), "folder"}
    assert set(data.DOWNLOADS) <= set(datasets.names())
