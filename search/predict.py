"""`search predict MODEL IMAGES_OR_FOLDER`: the top-k classes of image files, by onnxruntime alone.

MODEL is a `search export` output (model.onnx, or its directory). Everything the images need
comes from the ONNX file's metadata: the channels (gray or RGB), the decoding of the image-folder
source (shorter side to `fit` pixels, bilinear, centre crop), the resize to the model's input size
(bilinear, antialiased when shrinking: Pillow's filter, which PyTorch's antialiased resize
follows), the scale and the normalisation. A folder is searched recursively, so the image-folder
layout (class folders, or train/ val/ test/ with class folders) works as it is.

This module imports numpy, Pillow and onnxruntime, never torch: a deployment needs no PyTorch.
"""

from __future__ import annotations

import csv
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from search.errors import SearchError
from search.files import replacing

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # the image folder's
MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit, held here as the image folder holds it
EXTRA = "pip install 'search[export]'"
BATCH = 64


@dataclass(frozen=True)
class Prediction:
    path: Path
    top: list[tuple[str, float]]  # (class, probability), most probable first


def _onnxruntime() -> Any:
    try:
        return importlib.import_module("onnxruntime")
    except ImportError:
        raise SearchError(f"onnxruntime is not installed; predict needs it: {EXTRA}") from None


def open_model(model: str | Path) -> tuple[Any, dict[str, Any]]:
    """(onnxruntime session, the export's metadata) of model.onnx or a directory holding one."""
    path = Path(model)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise SearchError(f"no ONNX model at {path}; give the model.onnx (or the directory) `search export` wrote")
    ort = _onnxruntime()
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors are of its own types
        raise SearchError(f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e)[:120]})") from None
    meta = sess.get_modelmeta().custom_metadata_map.get("search")
    if meta is None:
        raise SearchError(f"{path} has no `search` metadata; export the model with `search export`")
    return sess, json.loads(meta)


def image_files(targets: list[str]) -> list[Path]:
    """The image files named, and those under the folders named (recursively, sorted; hidden skipped)."""
    out: list[Path] = []
    for t in targets:
        p = Path(t)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and not f.name.startswith(".")
            )
            if not found:
                raise SearchError(f"{p} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise SearchError(f"{p}: no such image file or folder")
    return out


def _fit(im: Any, size: int) -> Any:
    """Shorter side to `size` (bilinear), then a centre crop: the image-folder source's decoding."""
    from PIL import Image

    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BILINEAR)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def pixels(path: Path, channels: int, fit: int | None) -> np.ndarray:
    """An image file as uint8 (C, H, W) as the image-folder source decodes it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise SearchError(f"{path} has {im.size[0]}x{im.size[1]} pixels, over the limit of {MAX_PIXELS}")
            im.load()
            upright = ImageOps.exif_transpose(im)  # by its EXIF orientation, as training decoded it
            if upright.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit gray: v * 255 / 65535, rounded
                wide = upright if upright.mode == "I" else upright.convert("I")
                gray = ((np.asarray(_fit(wide, fit) if fit else wide, dtype=np.int64) + 128) // 257).astype(np.uint8)
                return np.repeat(gray[None], channels, axis=0)
            mode = "L" if channels == 1 else "RGB"
            plain = upright if upright.mode == mode else upright.convert(mode)
            arr = np.asarray(_fit(plain, fit) if fit else plain, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise SearchError(f"cannot decode {path} ({type(e).__name__}: {e}); give PNG or JPEG images") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def model_input(x: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """uint8 (C, H, W) -> float32 (C, S, S): resized to the model's size, scaled and normalised."""
    from PIL import Image

    inp = meta["input"]
    size = int(inp["size"])
    xf = x.astype(np.float32)
    if xf.shape[1:] != (size, size):
        resized = [Image.fromarray(c).resize((size, size), Image.Resampling.BILINEAR) for c in xf]
        xf = np.stack([np.asarray(c, dtype=np.float32) for c in resized])
    mean = np.asarray(inp["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(inp["std"], dtype=np.float32)[:, None, None]
    return ((xf * np.float32(1 / 255) - mean) / std).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def predict(model: str | Path, targets: list[str], top_k: int = 5) -> list[Prediction]:
    """The top_k classes (with probabilities) of every image file named or under a folder named."""
    sess, meta = open_model(model)
    classes, inp = meta["classes"], meta["input"]
    k = max(1, min(top_k, len(classes)))
    files = image_files(targets)
    out: list[Prediction] = []
    for i in range(0, len(files), BATCH):
        chunk = files[i : i + BATCH]
        x = np.stack([model_input(pixels(f, int(inp["channels"]), inp.get("fit")), meta) for f in chunk])
        probs = softmax(sess.run([meta["output"]["name"]], {inp["name"]: x})[0])
        for f, p in zip(chunk, probs, strict=True):
            order = np.argsort(-p, kind="stable")[:k]
            out.append(Prediction(f, [(classes[j], float(p[j])) for j in order]))
    return out


def write_csv(rows: list[Prediction], path: Path) -> Path:
    """One row per image: path, top1, p1, top2, p2, ..."""
    k = max((len(r.top) for r in rows), default=1)
    header = ["path"] + [f"{c}{i}" for i in range(1, k + 1) for c in ("top", "p")]
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([str(r.path)] + [v for c, p in r.top for v in (c, f"{p:.6f}")])
    return path


def lines(rows: list[Prediction]) -> list[str]:
    """One line per image: the path, then class (probability), most probable first."""
    return [f"{r.path}  " + "  ".join(f"{c} {p:.3f}" for c, p in r.top) for r in rows]
