"""`folder:PATH`: an image folder, one sub-folder per class, or train/ (val/, test/) each with class folders.

Decoded once with PIL into memory-mappable .npy files under the data root, keyed
by a digest of the folder's file names, sizes and mtimes, so later processes
skip PIL and an edited folder is decoded afresh.

Decoding streams: a first pass reads only each file's header (size, mode) to
choose the channels and the array's shape, a second decodes one image at a time
straight into its row of the preallocated array (JPEGs at a reduced scale where
the target size allows), so a folder of 12-megapixel photos needs the memory of
its resized array plus one photo. Every way a file can fail (not an image,
truncated, malformed, a decompression bomb, pixels with no 8-bit meaning) is
one `SearchError` naming the file.

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
import re
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from search.augment import AugmentCfg
from search.data.cache import derived_dir, discard, read_cached, recorded_dir
from search.data.splits import Raw, Split, read_splits, write_splits
from search.errors import SearchError, one_of

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})  # 16-bit gray, as 16-bit PNG and TIFF open
# Modes decoded to one channel; a folder is gray only if every image is.
GRAY_MODES = frozenset({"1", "L", "I", *SIXTEEN_BIT})
# PIL's default decompression-bomb limit (Image.MAX_IMAGE_PIXELS, about 9459 x 9459), held here so
# that a process which lifted PIL's global still refuses such files, with the file named.
MAX_PIXELS = 89_478_485
# What PIL's plugins raise for a malformed file (besides OSError, which covers unreadable,
# truncated and unidentified files); anything else is a bug and keeps its traceback.
MALFORMED = (OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError)


def _classes(name: str, folder: Path, classes: tuple[str, ...] | None) -> tuple[str, ...]:
    """The class folders of one part; val/ and test/ may only hold train's classes."""
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
    return classes


def _image_files(folder: Path, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    """(file, label) of every image, by class then name. Hidden files are skipped: `._IMG.jpg` is the
    resource fork macOS leaves beside IMG.jpg on a copy, not an image."""
    out = []
    for k, c in enumerate(classes):
        d = folder / c
        for p in sorted(d.iterdir()) if d.is_dir() else []:
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
                out.append((p, k))
    return out


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def _undecodable(name: str, path: Path, e: BaseException) -> SearchError:
    return SearchError(
        f"data.dataset '{name}': cannot decode {path} ({type(e).__name__}: {_one_line(e)}); "
        "remove it from the folder or re-save it (PNG or JPEG)"
    )


def _too_large(name: str, path: Path, pixels: str) -> SearchError:
    return SearchError(
        f"data.dataset '{name}': {path} has {pixels} pixels, over the limit of {MAX_PIXELS} that guards "
        "against decompression bombs; remove it from the folder or re-save it smaller"
    )


@contextmanager
def _opened(name: str, path: Path) -> Iterator[Image.Image]:
    """`Image.open(path)` (which reads the header only), refused above MAX_PIXELS; what PIL raises
    for a malformed file, here or while decoding in the block, becomes one SearchError naming it."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Refused below with the file named, instead of PIL's warning for 1-2x its limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise _too_large(name, path, f"{w}x{h} = {w * h}")
                yield im
    except Image.DecompressionBombError as e:  # over twice PIL's limit: refused by Image.open itself
        counted = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(name, path, counted.group(1) if counted else "too many") from None
    except MALFORMED as e:
        raise _undecodable(name, path, e) from None


EXIF_ORIENTATION = 0x0112
TURNED = (5, 6, 7, 8)  # orientations that turn the image by 90 or 270 degrees (width and height swap)


def _header(name: str, path: Path) -> tuple[tuple[int, int], str]:
    """(size, mode) from the file's header, without decoding its pixels."""
    with _opened(name, path) as im:
        size, mode = im.size, im.mode
        if im.getexif().get(EXIF_ORIENTATION) in TURNED:  # shown turned by a quarter: as decoded below
            size = size[::-1]
    if mode == "F":
        raise SearchError(
            f"data.dataset '{name}': {path} holds 32-bit float pixels, which have no fixed range to map to "
            "8 bits; remove it from the folder or re-save it with 8- or 16-bit pixels"
        )
    return size, mode


def _scaled(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """The size with the shorter side at `resolution`, the aspect ratio kept."""
    w, h = size
    s = resolution / min(w, h)
    return max(resolution, round(w * s)), max(resolution, round(h * s))


def _fit(im: Image.Image, resolution: int | None) -> Image.Image:
    """Shorter side to `resolution`, then a centre crop: square images without distortion."""
    from PIL import Image

    if resolution is None:
        return im
    im = im.resize(_scaled(im.size, resolution), Image.Resampling.BILINEAR)
    w, h = im.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return im.crop((left, top, left + resolution, top + resolution))


def _wide_gray(name: str, path: Path, im: Image.Image, resolution: int | None) -> np.ndarray:
    """A 16- or 32-bit gray image as uint8 (H, W): v * 255 / 65535, rounded, never clipped.

    Mode "I" (32-bit integers, as some TIFF writers store 16-bit data) is read
    on the same 16-bit scale, so such a copy of a 16-bit image decodes to the
    same pixels; values outside 0..65535 have no such meaning and are refused.
    """
    wide = im if im.mode == "I" else im.convert("I")  # exact: 16-bit values in 32-bit integers
    lo, hi = cast("tuple[int, int]", wide.getextrema())  # one band: (min, max)
    if lo < 0 or hi > 65535:
        raise SearchError(
            f"data.dataset '{name}': {path} holds 32-bit pixels from {lo} to {hi}, outside the 16-bit range "
            "0..65535 that is scaled to 8 bits; remove it from the folder or re-save it with 8- or 16-bit pixels"
        )
    # Fitted before scaling: one rounding, of the small image. 255 / 65535 = 1 / 257.
    return ((np.asarray(_fit(wide, resolution), dtype=np.int64) + 128) // 257).astype(np.uint8)


def _decoded(name: str, path: Path, mode: str, resolution: int | None) -> np.ndarray:
    """One image as uint8 (C, H, W) in `mode` ("L" or "RGB"), upright by its EXIF orientation,
    fitted to `resolution`."""
    from PIL import ImageOps

    with _opened(name, path) as im:
        if resolution is not None:
            # A JPEG decodes at 1/2, 1/4 or 1/8 scale where that still covers the fitted size:
            # a 12-megapixel photo fitted to 64 px decodes to 1/64 of its pixels.
            im.draft(None, _scaled(im.size, resolution))
        im.load()
        # As the photo is shown: a camera held upright stores landscape pixels and an EXIF
        # orientation; decoding the pixels alone would train on images lying on their side.
        im = ImageOps.exif_transpose(im)
        if im.mode in SIXTEEN_BIT or im.mode == "I":
            gray = _wide_gray(name, path, im, resolution)
            return np.repeat(gray[None], 1 if mode == "L" else 3, axis=0)
        pixels = np.asarray(_fit(im if im.mode == mode else im.convert(mode), resolution), dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _split(
    name: str, folder: Path, classes: tuple[str, ...] | None, resolution: int | None
) -> tuple[Split, tuple[str, ...]]:
    classes = _classes(name, folder, classes)
    files = _image_files(folder, classes)
    if not files:
        raise SearchError(f"data.dataset '{name}': no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    # Pass 1, headers only: the channels and the shape, before any pixel is decoded.
    headers = [_header(name, p) for p, _ in files]
    mode = "L" if all(m in GRAY_MODES for _, m in headers) else "RGB"
    if resolution is None:
        sizes = {s for s, _ in headers}
        if len(sizes) > 1:
            a, b = sorted(sizes)[:2]
            raise SearchError(
                f"data.dataset '{name}': images under {folder} differ in size ({a[0]}x{a[1]}, "
                f"{b[0]}x{b[1]}, ...); set data.resolution to resize them to one square size"
            )
        w, h = headers[0][0]
    else:
        w = h = resolution
    # Pass 2: one image decoded at a time, straight into its row.
    x = np.empty((len(files), 1 if mode == "L" else 3, h, w), dtype=np.uint8)
    for i, (p, _) in enumerate(files):
        pixels = _decoded(name, p, mode, resolution)
        if pixels.shape != x.shape[1:]:  # a header that lied about the size
            raise SearchError(
                f"data.dataset '{name}': {p} decodes to {pixels.shape[2]}x{pixels.shape[1]} pixels but its header "
                f"says {w}x{h}; remove it from the folder or re-save it"
            )
        x[i] = pixels
    labels = torch.tensor([k for _, k in files], dtype=torch.int64)
    return Split(torch.from_numpy(x), labels), classes


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
    h = hashlib.sha256(b"v2")  # v2: EXIF orientation applied (v1 copies decoded without it)
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


def check(name: str) -> dict[str, np.ndarray]:
    """Images per class of each part (train; val/ and test/ where given), reading no image.

    Refuses a folder that is not there, has fewer than two classes, or whose
    val/ or test/ hold classes that train/ lacks.
    """
    parts = folder_parts(name, Path(name.removeprefix("folder:")).expanduser().resolve())
    classes = _classes(name, parts["train"], None)
    counts = {}
    for part, folder in parts.items():
        labels = [k for _, k in _image_files(folder, _classes(name, folder, classes))]
        counts[part] = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    return counts
