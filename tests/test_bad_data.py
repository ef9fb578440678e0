"""Hostile and odd data, in real files: decompression bombs, malformed images, 16-bit pixels, splits
that would be empty, labels out of range, folders of large photos. Each refusal is one line naming
the file (or the dataset and split) and the fix; through the CLI it is exit 2 with nothing created."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search import data
from search.data import DataCfg
from search.errors import SearchError
from tests.conftest import ROOT


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
# a folder of large photos

MEASURE = """
import json, resource, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
from search.data import DataCfg, folder, load_data, load_raw

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
