"""Hostile and odd data, in real files: decompression bombs, malformed images, 16-bit pixels, splits
that would be empty, labels out of range, folders of large photos. Each refusal is one line naming
the file (or the dataset and split) and the fix; through the CLI it is exit 2 with nothing created."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from search import data
from search.data import carve, load_data, load_raw, split_sizes
from search.data.splits import Raw, Split
from search.datasets import DataCfg
from search.errors import SearchError
from search.recipe import MAX_WORKERS, recipe_from_dict
from tests import test_data
from tests.conftest import ROOT, run_inline, tiny_recipe, write_recipe
from tests.test_checks import in_process, left_behind
from tests.test_data import write_folder, write_medmnist

published, offline_network = test_data.published, test_data.offline_network  # the fixtures, shared

# ---------------------------------------------------------------------------
# writers of hostile and odd files


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` gray pixels: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def noise(fmt: str, size: int = 200) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(b, fmt)
    return b.getvalue()


def broken_png_chunk() -> bytes:
    """A PNG whose second IDAT chunk has a garbage type: PIL reads the header, then fails mid-decode."""
    png = noise("PNG")
    second = png.index(b"IDAT", png.index(b"IDAT") + 4)
    return png[:second] + b"\x00\x01\x02\x03" + png[second + 4 :]


def truncated_ihdr() -> bytes:
    body = struct.pack(">II", 10, 10)  # width and height, without depth and colour type
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 8) + b"IHDR" + body + struct.pack(">I", zlib.crc32(b"IHDR" + body))


def one_error(fn) -> str:
    with pytest.raises(SearchError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message
    return message


def fcfg(path: Path, **kw) -> DataCfg:
    return DataCfg(dataset=f"folder:{path}", **kw)


@pytest.fixture(autouse=True)
def decoded_afresh():
    """Every test decodes its own folder (the per-process decode cache is keyed by path and size)."""
    data._raw.cache_clear()
    yield
    data._raw.cache_clear()


# ---------------------------------------------------------------------------
# decompression bombs and malformed files


@pytest.mark.parametrize(
    "width, height, shown",
    [
        (10000, 10000, "10000x10000 = 100000000 pixels"),  # PIL only warns: refused here
        (20000, 20000, "400000000 pixels"),  # over twice PIL's limit: PIL refuses, named here
    ],
)
def test_a_decompression_bomb_is_refused_with_its_pixel_count(tmp_path, width, height, shown):
    write_folder(tmp_path, n=3)
    bomb = tmp_path / "cat" / "bomb.png"
    bomb.write_bytes(png_claiming(width, height))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # no warning besides the refusal
        message = one_error(lambda: load_data(fcfg(tmp_path)))
    assert f"{bomb} has {shown}, over the limit of 89478485" in message
    assert "decompression bombs; remove it from the folder or re-save it smaller" in message


@pytest.mark.parametrize(
    "file, content, error",
    [
        ("notes.jpg", b"not an image at all", "UnidentifiedImageError"),
        ("cut.jpg", noise("JPEG")[:2000], "OSError: image file is truncated"),
        ("chunk.png", broken_png_chunk(), "SyntaxError: broken PNG file"),
        ("ihdr.png", truncated_ihdr(), "ValueError: Truncated IHDR chunk"),
    ],
)
def test_a_malformed_image_is_one_line_naming_it(tmp_path, file, content, error):
    write_folder(tmp_path, n=3)
    (tmp_path / "dog" / file).write_bytes(content)
    message = one_error(lambda: load_data(fcfg(tmp_path, resolution=8)))
    assert message.startswith(f"data.dataset 'folder:{tmp_path}': cannot decode {tmp_path / 'dog' / file} ({error}")
    assert message.endswith("remove it from the folder or re-save it (PNG or JPEG)")


def test_hidden_files_beside_the_images_are_skipped(tmp_path):
    write_folder(tmp_path, n=3)
    (tmp_path / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    assert len(load_raw(fcfg(tmp_path)).train) == 6


# ---------------------------------------------------------------------------
# 16- and 32-bit pixels

SIXTEEN = np.array([[0, 128, 129, 257, 1000, 32768, 65534, 65535]], dtype=np.uint16)
EIGHT = [0, 0, 1, 1, 4, 128, 255, 255]  # v * 255 / 65535, rounded


def gray_folder(root: Path, odd: Image.Image, name: str = "odd.png", rgb: bool = False) -> Path:
    """Two classes of three 8x1 images; cat's third is `odd` (a class's files load in name order)."""
    write_folder(root, n=2, size=(8, 1), mode="L")
    odd.save(root / "cat" / name)
    Image.new("RGB" if rgb else "L", (8, 1)).save(root / "dog" / "2.png")
    return root


def test_sixteen_bit_pngs_are_scaled_not_clipped(tmp_path):
    assert np.rint(SIXTEEN[0].astype(float) * 255 / 65535).tolist() == EIGHT
    png = Image.fromarray(SIXTEEN)
    assert png.mode == "I;16"
    raw = load_raw(fcfg(gray_folder(tmp_path / "gray", png)))
    assert raw.train.x.shape == (6, 1, 1, 8) and raw.train.x[2, 0, 0].tolist() == EIGHT
    assert raw.train.x[1, 0, 0].tolist() == [1] * 8  # the 8-bit images beside it as they are

    mixed = load_raw(fcfg(gray_folder(tmp_path / "mixed", png, rgb=True)))  # an RGB image: gray replicated
    assert mixed.train.x.shape == (6, 3, 1, 8) and mixed.train.x[2, :, 0].tolist() == [EIGHT] * 3

    flat = Image.fromarray(np.full((30, 40), 1000, dtype=np.uint16))  # resized in 16 bits, then scaled
    resized = load_raw(fcfg(gray_folder(tmp_path / "resized", flat), resolution=8))
    assert resized.train.x[2].unique().tolist() == [4]


@pytest.mark.parametrize(
    "pixels",
    [SIXTEEN.astype(">u2"), SIXTEEN.astype(np.int32)],  # big-endian 16-bit TIFF; 32-bit TIFF of 16-bit data
    ids=["I;16B", "I"],
)
def test_sixteen_bit_data_in_other_tiff_modes_scales_the_same(tmp_path, pixels):
    tiff = Image.fromarray(pixels)
    assert tiff.mode == ("I;16B" if pixels.dtype == np.dtype(">u2") else "I")
    raw = load_raw(fcfg(gray_folder(tmp_path, tiff, "odd.tif")))
    assert raw.train.x[2, 0, 0].tolist() == EIGHT


def test_pixels_without_an_eight_bit_meaning_are_refused(tmp_path):
    wide = Image.fromarray(np.array([[-5, 0, 7, 70000, 1, 2, 3, 4]], dtype=np.int32))
    message = one_error(lambda: load_raw(fcfg(gray_folder(tmp_path / "wide", wide, "odd.tif"))))
    assert f"{tmp_path / 'wide' / 'cat' / 'odd.tif'} holds 32-bit pixels from -5 to 70000, outside" in message
    assert "re-save it with 8- or 16-bit pixels" in message

    floats = Image.fromarray(np.linspace(0, 1, 8, dtype=np.float32)[None])
    message = one_error(lambda: load_raw(fcfg(gray_folder(tmp_path / "float", floats, "odd.tif"))))
    assert f"{tmp_path / 'float' / 'cat' / 'odd.tif'} holds 32-bit float pixels" in message


# ---------------------------------------------------------------------------
# splits that would be empty, labels out of range


def test_two_images_per_class_are_refused_before_any_decoding(tmp_path, monkeypatch):
    write_folder(tmp_path, n=2)
    want = (
        f"data.dataset 'folder:{tmp_path}': the val split carved from train would be empty (train 2, val 0, "
        "test 2 images of 2 classes; at most 2 images in a class); add images (a class needs 3 to give one to "
        "each split), or split the folder yourself: PATH/train/CLASS and PATH/val/CLASS"
    )
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("decoded an image"))
    assert one_error(lambda: data.check(fcfg(tmp_path))) == want  # what `validate` and `run` check first
    monkeypatch.undo()
    assert one_error(lambda: load_data(fcfg(tmp_path))) == want


def test_empty_splits_name_their_counts_and_fix(tmp_path):
    write_folder(tmp_path / "given" / "train", n=1)
    write_folder(tmp_path / "given" / "val", n=1)  # test carved from 1 image per class: none
    message = one_error(lambda: load_data(fcfg(tmp_path / "given")))
    assert "the test split carved from train would be empty (train 2, val 2, test 0 images of 2 classes" in message
    assert "a class needs 2 to give one to each split" in message and "PATH/test/CLASS" in message

    (tmp_path / "hollow" / "val" / "cat").mkdir(parents=True)
    write_folder(tmp_path / "hollow" / "train", n=3)
    message = one_error(lambda: data.check(fcfg(tmp_path / "hollow")))
    assert "val/ holds no images (train 4, val 0, test 2 images of 2 classes)" in message

    write_folder(tmp_path / "many", classes=tuple(f"c{i}" for i in range(12)), n=3)  # 1 train image per class
    message = one_error(lambda: load_data(fcfg(tmp_path / "many", max_samples=10)))
    assert message.startswith("data.max_samples 10: the stratified subsample of the 12 train images would be empty")
    assert message.endswith("raise data.max_samples to 12 or remove it")

    high = fcfg(tmp_path / "many", test_split=0.9, val_split=0.9)  # test takes 14 of 16, val 1 of 2
    assert "add images (a class needs 16 to give one to each split)" in one_error(lambda: data.check(high))
    higher = fcfg(tmp_path / "many", test_split=0.99)  # test takes all but one of up to 150
    assert "lower data.test_split (0.99) and data.val_split (0.15)" in one_error(lambda: data.check(higher))


@pytest.mark.parametrize("official", [(), ("val",), ("test",), ("val", "test")])
@pytest.mark.parametrize("fractions", [(0.15, 0.15), (0.5, 0.3), (0.9, 0.05)])
def test_split_sizes_are_what_carving_gives(official, fractions):
    counts = np.array([0, 1, 2, 3, 4, 5, 7, 10, 31])
    labels = torch.from_numpy(np.repeat(np.arange(len(counts)), counts))
    split = Split(torch.zeros(len(labels), 1, 1, 1, dtype=torch.uint8), labels)
    given = {p: split if p in official else None for p in ("val", "test")}
    raw = Raw(split, given["val"], given["test"], tuple(map(str, range(len(counts)))), "unknown")
    cfg = DataCfg(val_split=fractions[0], test_split=fractions[1])
    want = split_sizes({"train": counts, **dict.fromkeys(official, counts)}, cfg)
    for seed in (0, 1):
        for part, got in zip(("train", "val", "test"), carve(raw, cfg, seed), strict=True):
            assert np.bincount(got.y.numpy(), minlength=len(counts)).tolist() == want[part].tolist(), part


def test_labels_out_of_range_are_refused_at_load(tmp_path, offline_network, published):
    path = tmp_path / "pathmnist.npz"
    arrays = write_medmnist(path, 28, 3, 9)
    arrays["val_labels"][3] = 9  # pathmnist has 9 classes: 0..8
    np.savez_compressed(path, **arrays)
    published("pathmnist", path)
    message = one_error(lambda: load_data(DataCfg(dataset="pathmnist", root=str(tmp_path))))
    assert message.startswith("data.dataset 'pathmnist': val label 9 is outside 0..8 (its 9 classes); the files")
    assert message.endswith("delete them and run `python -m search prefetch RECIPE`")


# ---------------------------------------------------------------------------
# bounds


def test_resolution_and_workers_are_bounded():
    message = one_error(lambda: recipe_from_dict(tiny_recipe(data={"resolution": 4096})))
    assert message == "recipe: data.resolution: Input should be less than or equal to 1024 (got 4096)"
    message = one_error(lambda: recipe_from_dict(tiny_recipe(hardware={"workers": MAX_WORKERS + 1})))
    assert message == f"recipe: hardware.workers: Input should be less than or equal to {MAX_WORKERS} (got 257)"
    assert recipe_from_dict(tiny_recipe(data={"resolution": 1024}, hardware={"workers": MAX_WORKERS}))


# ---------------------------------------------------------------------------
# through the CLI: exit 2, one line, nothing created


def refused(monkeypatch, capsys, tmp_path: Path, command: str, recipe: dict) -> str:
    """`python -m search COMMAND` on `recipe` in this process: its one error line, once checked
    that it exited 2 and left nothing in its working directory."""
    cwd = tmp_path / "work"
    cwd.mkdir(exist_ok=True)
    write_recipe(cwd / "r.yaml", recipe)
    code, _, err = in_process(monkeypatch, capsys, tmp_path, cwd, command, "r.yaml")
    assert code == 2 and left_behind(cwd) == [], err
    (line,) = err.strip().splitlines()
    return line


def test_bad_data_is_refused_by_validate_and_run_before_a_study_exists(
    tmp_path, monkeypatch, capsys, offline_network, published
):
    few = tmp_path / "few"
    write_folder(few, n=2)
    for command in ("validate", "run"):
        line = refused(monkeypatch, capsys, tmp_path, command, tiny_recipe(data={"dataset": f"folder:{few}"}))
        assert line.startswith(f"error: data.dataset 'folder:{few}': the val split carved from train would be empty")

    cut = tmp_path / "cut"
    write_folder(cut, n=3)
    (cut / "dog" / "cut.jpg").write_bytes(noise("JPEG")[:2000])
    recipe = tiny_recipe(data={"dataset": f"folder:{cut}", "resolution": 16})
    line = refused(monkeypatch, capsys, tmp_path, "run", recipe)
    assert line.startswith(f"error: data.dataset 'folder:{cut}': cannot decode {cut / 'dog' / 'cut.jpg'} (OSError")

    path = tmp_path / "data" / "pathmnist.npz"  # the data root in_process sets
    path.parent.mkdir()
    arrays = write_medmnist(path, 28, 3, 9)
    arrays["train_labels"][0] = 200
    np.savez_compressed(path, **arrays)
    published("pathmnist", path)
    line = refused(monkeypatch, capsys, tmp_path, "run", tiny_recipe(data={"dataset": "pathmnist"}))
    assert line.startswith("error: data.dataset 'pathmnist': train label 200 is outside 0..8 (its 9 classes)")


@pytest.mark.slow
def test_a_decompression_bomb_stops_run_with_exit_2_and_no_study(tmp_path):
    images, cwd = tmp_path / "images", tmp_path / "work"
    write_folder(images, n=3)
    (images / "dog" / "bomb.png").write_bytes(png_claiming(30000, 30000))
    cwd.mkdir()
    write_recipe(cwd / "r.yaml", tiny_recipe(data={"dataset": f"folder:{images}", "resolution": 32}))
    proc = run_inline("run", "r.yaml", cwd=cwd)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: data.dataset 'folder:{images}': {images / 'dog' / 'bomb.png'} has 900000000 pixels, over the "
        "limit of 89478485 that guards against decompression bombs; remove it from the folder or re-save it smaller"
    ]
    assert left_behind(cwd) == []  # no studies/, no database


# ---------------------------------------------------------------------------
# a folder of large photos

MEASURE = """
import json, resource, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
from search.data import folder, load_data, load_raw
from search.datasets import DataCfg

def peak_rss():
    # This process's own peak (VmHWM), not ru_maxrss: on Linux that also counts the parent forked from.
    status = Path("/proc/self/status")
    if status.exists():
        return int(status.read_text().split("VmHWM:")[1].split()[0]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes

imported = peak_rss()
start = time.perf_counter()
cfg = DataCfg(dataset="folder:" + sys.argv[1], root=sys.argv[2], resolution=64)
d = load_data(cfg)
seconds = time.perf_counter() - start
peak = peak_rss()
# After the peak is taken: the first photo decoded at full size, the reference for the reduced-scale decode.
with Image.open(sys.argv[3]) as im:
    ref = np.asarray(folder._fit(im.convert("RGB"), 64)).transpose(2, 0, 1).astype(int)
diff = np.abs(load_raw(cfg).train.x[0].numpy().astype(int) - ref)
n = len(d.train) + len(d.val) + len(d.test)
diff = [float(diff.mean()), int(diff.max())]
print(json.dumps(dict(n=n, shape=list(d.train.x.shape[1:]), imported=imported, peak=peak, seconds=seconds, diff=diff)))
"""


@pytest.mark.slow
def test_a_folder_of_large_photos_loads_in_little_memory(tmp_path):
    """200 photos of 12 megapixels (36 MB each decoded) at data.resolution 64: one decoded photo at a
    time, JPEGs at 1/8 scale, so the peak stays near what the imports take (it was about 10 GB)."""
    w, h = 4000, 3000
    x, y = np.linspace(0, 255, w)[None, :], np.linspace(0, 255, h)[:, None]
    pixels = np.stack(np.broadcast_arrays(x, y, (x + y) / 2), axis=-1).astype(np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, "JPEG", quality=90)
    photos = tmp_path / "photos"
    for c in ("a", "b"):
        (photos / c).mkdir(parents=True)
    for i in range(200):  # decoding is what is measured: one photo, written 200 times
        (photos / "ab"[i % 2] / f"{i:03}.jpg").write_bytes(jpeg.getvalue())
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(photos), str(tmp_path / "root"), str(photos / "a" / "000.jpg")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["n"] == 200 and got["shape"] == [3, 64, 64]
    mib = {k: round(got[k] / 2**20) for k in ("imported", "peak")}
    assert got["peak"] < 2**30, f"peak RSS {mib['peak']} MiB ({mib['imported']} MiB after the imports)"
    assert got["diff"][0] < 2 and got["diff"][1] < 16, got["diff"]  # 1/8-scale decode: close to the full one
