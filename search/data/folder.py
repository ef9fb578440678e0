"""`folder:PATH`: an image folder, one sub-folder per class, or train/ (val/, test/) each with class folders.

Decoded once with PIL into memory-mappable .npy files under the data root, keyed
by a digest of the folder's file names, sizes and mtimes, so later processes
skip PIL and an edited folder is decoded afresh.

The decoded copy is a derived cache (`search.data.cache.derived_dir`), trusted
only as this machine built or checked it. One it has no record of (another
machine's, on a shared root) is checked against this process's own decoding,
which the folder always allows and which costs what the cache saves once;
where they differ (another Pillow, a changed file) the copy is left alone for
its owner, this process uses its own decoding, and a warning says so. Nothing
is refused: the images under PATH are the user's own data.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from search.augment import AugmentCfg
from search.data.cache import derived_dir, discard, read_cached, recorded_dir, unreadable
from search.data.splits import Raw, Split, read_splits, write_splits
from search.errors import SearchError, one_of

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _split(
    name: str, folder: Path, classes: tuple[str, ...] | None, resolution: int | None
) -> tuple[Split, tuple[str, ...]]:
    from PIL import Image

    found = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise SearchError(
            f"data.dataset '{name}': {folder} has class folders {unknown} that train/ lacks; "
            f"classes are {one_of(classes)}"
        )
    if len(classes) < 2:
        raise SearchError(
            f"data.dataset '{name}': {folder} needs one sub-folder per class (at least 2), found {len(classes)}"
        )
    images: list[Image.Image] = []
    labels, files = [], []
    for k, c in enumerate(classes):
        d = folder / c
        for p in sorted(d.iterdir()) if d.is_dir() else []:
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(p) as opened:
                    opened.load()
                    images.append(opened.copy())
            except OSError as e:
                raise unreadable(name, p, e) from None
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
            raise SearchError(
                f"data.dataset '{name}': images under {folder} differ in size ({a[0]}x{a[1]}, "
                f"{b[0]}x{b[1]}, ...); set data.resolution to resize them to one square size"
            )
    arrays = []
    for im in images:
        im = im.convert(mode)
        if resolution is not None:
            # Shorter side to `resolution`, then a centre crop: square images without distortion.
            w, h = im.size
            s = resolution / min(w, h)
            im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.Resampling.BILINEAR)
            w, h = im.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
        pixels = np.asarray(im, dtype=np.uint8)
        arrays.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(arrays))
    return Split(x, torch.tensor(labels, dtype=torch.int64)), classes


def folder_parts(name: str, path: Path) -> dict[str, Path]:
    if not path.is_dir():
        raise SearchError(
            f"data.dataset '{name}': {path} is not a directory; expected PATH/CLASS/IMAGE files "
            "or PATH/train/CLASS/IMAGE (optionally val/ and test/)"
        )
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


def _write_cache(splits: dict[str, Split], classes: tuple[str, ...], out: Path) -> None:
    write_splits(splits, out)
    (out / "classes.json").write_text(json.dumps(list(classes)))


def load(name: str, root: Path, resolution: int | None) -> Raw:
    """`folder:PATH`: one sub-folder per class, or train/ (val/, test/) each with class sub-folders.

    Decoded once into memory-mappable .npy files under the data root
    (`folders/NAME-PATHHASH-rRES-DIGEST.npy/`), so later processes and runs
    skip PIL; the digest covers file names, sizes and mtimes, so an edited
    folder is decoded afresh (and the stale copy at that resolution removed).
    """
    path = Path(name.removeprefix("folder:")).expanduser().resolve()
    parts = folder_parts(name, path)
    key = f"{path.name or 'root'}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}-r{resolution or 'native'}"
    signature = folder_signature(parts)
    cache = root / "folders" / f"{key}-{signature}.npy"
    source = f"the images under {path} ({signature})"
    # Unknown content: mild geometry, flips on (the common case for photos); recipes can switch them off.
    aug = AugmentCfg(crop="pad", flip=True, rotate=0.0, jitter=0.0)
    if cache.is_dir() and recorded_dir(cache, source):  # else decoded below, and checked against it
        read = read_cached(
            cache, lambda: (json.loads((cache / "classes.json").read_text()), read_splits(cache, tuple(parts)))
        )
        if read is not None:
            classes, got = tuple(read[0]), read[1]
            return Raw(got["train"], got.get("val"), got.get("test"), classes, "unknown", aug, cache)
        log.warning("data.dataset '%s': decoded copy %s was damaged; decoding the folder again", name, cache)
    train, classes = _split(name, parts["train"], None, resolution)
    splits = {"train": train}
    for part in ("val", "test"):
        if part in parts:
            splits[part] = _split(name, parts[part], classes, resolution)[0]
    if "val" in splits and train.x.shape[1:] != splits["val"].x.shape[1:]:
        raise SearchError(
            f"data.dataset '{name}': train images are {tuple(train.x.shape[1:])} but val images "
            f"{tuple(splits['val'].x.shape[1:])}; set data.resolution to resize all to one size"
        )
    kept: Path | None = cache
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        if derived_dir(name, cache, lambda tmp: _write_cache(splits, classes, tmp), source, strict=False):
            for stale in cache.parent.glob(f"{glob.escape(key)}-*.npy"):
                if stale != cache and len(stale.name) == len(cache.name):
                    discard(stale)
        else:  # not what this machine decodes: left alone, and this process keeps its own copy
            kept = None
    except OSError as e:
        log.warning(
            "data.dataset '%s': decoded images not cached under %s (%s); every process decodes them again",
            name,
            cache.parent,
            e,
        )
        kept = None
    return Raw(train, splits.get("val"), splits.get("test"), classes, "unknown", aug, kept)


def check(name: str) -> None:
    """Refuses a folder that is not there or has fewer than two classes, reading no image."""
    path = Path(name.removeprefix("folder:")).expanduser().resolve()
    train = folder_parts(name, path)["train"]
    classes = [d for d in train.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if len(classes) < 2:
        raise SearchError(
            f"data.dataset '{name}': {train} needs one sub-folder per class (at least 2), found {len(classes)}"
        )
