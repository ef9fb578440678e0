"""Datasets as uint8 tensors (N, C, H, W) with integer labels, decoded once per
process and split without ever touching the official test split for selection.

A source module (`digits`, `cifar`, `medmnist`, `galaxy10`, `folder`) returns
`Raw` (official splits it has, class names, ImageNet overlap, augmentation
defaults); `load_data` adds the seeded stratified carve-outs and the
`max_samples` subsample and returns `Data`, which training consumes. Labels
outside the classes and splits that would be empty are refused at load, before
any trial (and, for image folders, by `check` from the file counts alone). The
file machinery the sources share (downloads, checksums, records of what was
checked, locks, atomic directories) is `search.data.cache`.
The names a recipe may give, the `data` section and `AugmentCfg` are
`search.datasets`, which a recipe is checked against without importing torch.

Carve-outs kept on disk (`carved_splits`) are derived caches like the
sources' .npy directories, trusted only as this machine built or checked
them; as carving again is cheap, one that differs from this process's own
carving is not refused but left alone (another machine may use it) and not
used: the process carves in memory, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from search.data import cifar, digits, folder, galaxy10, medmnist
from search.data.cache import Download, derived_dir, discard, read_cached, recorded_dir, source_key, verify
from search.data.splits import Raw, Split, n_out, read_splits, stratified_split, write_splits
from search.datasets import (
    CIFAR_SETS,
    FOLDER,
    MEDMNIST,
    AugmentCfg,
    DataCfg,
    check_name,
    medmnist_names,
    medmnist_parts,
)
from search.errors import SearchError
from search.reach import Missing

__all__ = [
    "Data",
    "Raw",
    "Split",
    "carve",
    "carved_splits",
    "check",
    "data_root",
    "load_data",
    "load_raw",
    "loader_for",
    "split_sizes",
    "stratified_split",
]

log = logging.getLogger(__name__)


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
        return (
            f"{self.name}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test, "
            f"{self.num_classes} classes, {self.in_chans}x{self.train.x.shape[2]}x{self.train.x.shape[3]} "
            f"-> {self.resolution} px"
        )


def data_root(cfg: DataCfg) -> Path:
    """Recipe `data.root`, else $SEARCH_DATA, else the user cache directory."""
    if cfg.root:
        return Path(cfg.root).expanduser()
    if os.environ.get("SEARCH_DATA"):
        return Path(os.environ["SEARCH_DATA"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "search" / "data"


Loader = Callable[[str, Path, int | None], Raw]  # (name, data root, resolution) -> Raw

LOADERS: dict[str, Loader] = {
    "digits": digits.load,
    **dict.fromkeys(CIFAR_SETS, cifar.load),
    "galaxy10": galaxy10.load,
    "folder": folder.load,
    **{
        name: medmnist.load if medmnist_parts(name)[0] in MEDMNIST else medmnist.refuse_multi_label
        for name in medmnist_names()
    },
}
# What `check` lists as still to fetch: the published files behind each set (none for digits, folders).
DOWNLOADS: dict[str, Callable[[str, Path], list[Download]]] = {
    **dict.fromkeys(CIFAR_SETS, cifar.downloads),
    "galaxy10": galaxy10.downloads,
    **dict.fromkeys(medmnist_names(), medmnist.downloads),
}


def loader_for(name: str) -> Loader:
    check_name(name)
    return LOADERS["folder" if name.startswith(FOLDER) else name]


PARTS = ("train", "val", "test")


def check_labels(name: str, raw: Raw, root: Path) -> None:
    """Refuses a label outside 0..classes-1 here, where a device would stop on an assert mid-trial."""
    n = len(raw.classes)
    for part, split in zip(PARTS, (raw.train, raw.val, raw.test), strict=True):
        if split is None or len(split) == 0:
            continue
        lo, hi = int(split.y.min()), int(split.y.max())
        if lo < 0 or hi >= n:
            raise SearchError(
                f"data.dataset '{name}': {part} label {lo if lo < 0 else hi} is outside 0..{n - 1} (its "
                f"{n} classes); the files under {raw.cache or root} are damaged or not the official ones: "
                "delete them and run `python -m search prefetch RECIPE`"
            )


@lru_cache(maxsize=4)
def _raw(name: str, root: Path, resolution: int | None) -> Raw:
    """Decode once per process: every trial of this worker reuses the tensors."""
    raw = loader_for(name)(name, root, resolution)
    check_labels(name, raw, root)
    return raw


def load_raw(cfg: DataCfg) -> Raw:
    """The loader's official splits, fetched and unpacked on first use (what `prefetch` calls);
    refused if `load_data` would split them into an empty train, val or test split."""
    is_folder = cfg.dataset.startswith("folder:")
    # Only image folders are decoded at a chosen size; other sets ignore data.resolution here.
    raw = _raw(cfg.dataset, data_root(cfg), cfg.resolution if is_folder else None)
    counts = {
        p: np.bincount(s.y.numpy(), minlength=len(raw.classes))
        for p, s in zip(PARTS, (raw.train, raw.val, raw.test), strict=True)
        if s is not None
    }
    check_split_sizes(cfg, counts)
    return raw


# ---------------------------------------------------------------------------
# checks that read no images: for `validate`, `prefetch` and before a study is created


def check(cfg: DataCfg, verify_files: bool = True) -> list[Missing]:
    """Everything about `data` that needs no decoding; returns the files still to fetch.

    Refuses unknown and multi-label sets, image folders that are not there and
    folders too small to split (from their file counts); verifies present
    official files against their checksums (once: recorded), without moving a
    bad one (this is a check, not a use). A directory built from a file stands
    in for it only where this machine's record vouches for it: one built
    elsewhere is checked against the file on first use, so the file is needed
    (and listed when missing).
    """
    name = cfg.dataset
    loader = loader_for(name)
    if loader is medmnist.refuse_multi_label:
        loader(name, data_root(cfg), None)  # raises its refusal
    if name.startswith("folder:"):
        check_split_sizes(cfg, folder.check(name))
        return []
    out = []
    root = data_root(cfg)
    downloads = DOWNLOADS.get(name)
    for d in downloads(name, root) if downloads else []:
        path = root / d.remote.file
        if d.unpacked.is_dir() and recorded_dir(d.unpacked, source_key(d.remote), rehash=verify_files):
            continue  # built (or checked) on this machine from the verified file
        if d.alt is not None and d.alt.is_dir():
            continue  # read in the file's place (CIFAR's unpacked batches)
        if path.is_file():
            if verify_files:
                verify(name, d.remote, path, aside=False)
            continue
        out.append(Missing(f"data {name}", path, d.remote.url, d.size, bound=d.bound))
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


def split_sizes(counts: dict[str, np.ndarray], cfg: DataCfg) -> dict[str, np.ndarray]:
    """Images per class of train, val and test as `carve` splits them, from the images per class of
    the official splits (`counts`: train, and val and test where given); no seed changes them."""
    train, sizes = counts["train"], dict(counts)
    for part, fraction in (("test", cfg.test_split), ("val", cfg.val_split)):  # carve's order
        if part not in counts:
            out = np.array([n_out(int(n), fraction) for n in train], dtype=np.int64)
            train, sizes[part] = train - out, out
    sizes["train"] = train
    return sizes


def _least_per_class(official: tuple[str, ...], cfg: DataCfg) -> int | None:
    """The fewest images a class needs for each carved split to get one of them (None: over 100,
    the fractions leave too little)."""
    given = {p: np.ones(1, dtype=np.int64) for p in official}
    for n in range(1, 101):
        if all(s[0] > 0 for s in split_sizes({**given, "train": np.array([n])}, cfg).values()):
            return n
    return None


def check_split_sizes(cfg: DataCfg, counts: dict[str, np.ndarray]) -> None:
    """Refuses a dataset that `load_data` would split into an empty train, val or test split (2 images
    per class leave val empty, and every trial fails), with the counts and what to change; from
    the counts alone, so `validate` checks an image folder without decoding it."""
    name, sizes = cfg.dataset, split_sizes(counts, cfg)
    totals = {p: int(sizes[p].sum()) for p in PARTS}
    found = ", ".join(f"{p} {totals[p]}" for p in PARTS) + f" images of {len(sizes['train'])} classes"
    is_folder = name.startswith("folder:")
    for part in PARTS:
        if totals[part]:
            continue
        if part in counts and is_folder:  # a val/ or test/ with class folders but no images
            raise SearchError(
                f"data.dataset '{name}': {part}/ holds no images ({found}); put images in its class folders, "
                "or remove it to carve that split from train"
            )
        if part in counts:
            raise SearchError(
                f"data.dataset '{name}': the official {part} split holds no images ({found}); the files under "
                f"{data_root(cfg)} are damaged or not the official ones: delete them and run "
                "`python -m search prefetch RECIPE`"
            )
        least = _least_per_class(tuple(p for p in ("val", "test") if p in counts), cfg)
        fix = (
            f"add images (a class needs {least} to give one to each split)"
            if least
            else f"lower data.test_split ({cfg.test_split}) and data.val_split ({cfg.val_split})"
        )
        if is_folder:
            fix += f", or split the folder yourself: PATH/train/CLASS and PATH/{part}/CLASS"
        raise SearchError(
            f"data.dataset '{name}': the {part} split carved from train would be empty ({found}; at most "
            f"{int(counts['train'].max(initial=0))} images in a class); {fix}"
        )
    if cfg.max_samples and cfg.max_samples < totals["train"]:
        sub = sum(n_out(int(n), cfg.max_samples / totals["train"]) for n in sizes["train"])
        if sub == 0:
            raise SearchError(
                f"data.max_samples {cfg.max_samples}: the stratified subsample of the {totals['train']} train "
                "images would be empty (no class has two of them, and a class with one is left out); "
                f"raise data.max_samples to {totals['train']} or remove it"
            )


KEEP_CARVED = 4  # carve-out directories kept per dataset, most recently used first (each is a full copy)


def _prune_carved(cache: Path, keep: Path) -> None:
    """Leave `keep` and the KEEP_CARVED - 1 most recently used other carve-outs; a process still
    using a removed one keeps its mapping, a new one carves again."""
    built = []
    for d in cache.glob("carved-*"):
        if d.name.endswith(".gone.tmp"):  # left by a removal that was cut short
            shutil.rmtree(d, ignore_errors=True)
        elif d != keep and not d.name.endswith(".tmp"):  # .tmp: being built
            with contextlib.suppress(OSError):  # removed meanwhile by another process
                built.append((d.stat().st_mtime, d.name, d))
    built.sort(reverse=True)
    for _, _, old in built[KEEP_CARVED - 1 :]:
        discard(old)


def carved_splits(raw: Raw, cfg: DataCfg, seed: int) -> tuple[Split, Split, Split]:
    """`carve`, kept as memory-mapped .npy files next to a file-backed dataset (Galaxy10, image folders).

    Each worker process then maps the same files (one copy in the page cache)
    instead of holding its own copy of the carved train split (~2.5 GB for
    Galaxy10). One directory per seed and fractions, written once under a
    lock; the KEEP_CARVED most recently used are kept.

    A carve-out is a derived cache (`search.data.cache.derived_dir`) of the
    dataset's own (checked) cache: one this machine has no record of is
    compared with this process's carving, which is cheap; one that differs is
    left alone (another machine's, perhaps another numpy) and this process
    keeps its own copy, with a warning; never refused.
    """
    if raw.cache is None or (raw.val is not None and raw.test is not None):
        return carve(raw, cfg, seed)
    where = raw.cache / f"carved-testseed{TEST_SEED}-seed{seed}-val{cfg.val_split!r}-test{cfg.test_split!r}"
    parts = ("train", "val", "test")
    source = f"the carving of {raw.cache}"

    def build(tmp: Path) -> None:
        write_splits(dict(zip(parts, carve(raw, cfg, seed), strict=True)), tmp)

    read = None
    try:
        for _ in range(2):  # a damaged directory is removed by read_cached and built once more
            if not derived_dir(cfg.dataset, where, build, source, strict=False):
                break  # not what this process carves: its own copy below
            read = read_cached(where, lambda: read_splits(where, parts))
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
