"""Seconds of `rank` for a five-entry pool on 2,000 train images, next to one fine-tuning epoch.

    PYTHONPATH=. python scripts/bench_rank.py [--images 2000] [--size 64] [--device cpu]

Measured in one run: (1) `rank_pool` of resnet_18 (32 px, the data's size), efficientnet_b0,
convnext_tiny, vit_tiny and timm/resnet18.a1_in1k (224 px each, or `--size` px) on a stratified sample of
`--images` train images and the val split, features not cached; (2) the same again, from the
feature cache; (3) one epoch of `fit` (train defaults, full fine-tuning) of the entry that
was cheapest to rank, on the same train split.

THE WEIGHTS ARE RANDOM-INITIALISED, written into temporary torchvision and Hugging Face caches
in the real layouts (no network here): the timings are those of real weights, the scores are
meaningless. The data is a generated image folder: scikit-learn's 8x8 digits enlarged to
32x32 RGB with random colour, shift and noise, 10 classes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pool(size: int | None) -> list:
    """resnet_18 at the data's 32 px; the four 224-px entries at `size` when given (their `resolution:`)."""
    big = ["efficientnet_b0", "convnext_tiny", "vit_tiny", "timm/resnet18.a1_in1k"]
    return ["resnet_18", *({"model": m, "resolution": size} if size else m for m in big)]


def write_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    """`per_class` 32x32 RGB PNGs per digit class under root/digits32/<class>/."""
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    d = load_digits()
    out = root / "digits32"
    for c in range(10):
        (out / str(c)).mkdir(parents=True, exist_ok=True)
        src = d.images[d.target == c]
        for i in range(per_class):
            img = np.kron(src[i % len(src)] / 16, np.ones((3, 3)))  # 24x24
            canvas = np.zeros((32, 32))
            dy, dx = rng.integers(0, 9, 2)
            canvas[dy : dy + 24, dx : dx + 24] = img
            rgb = canvas[..., None] * rng.uniform(0.4, 1, 3) + rng.normal(0, 0.08, (32, 32, 3))
            Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8)).save(out / str(c) / f"{i}.png")
    return out


def write_random_weights(torch_home: Path, hf: Path) -> None:
    import timm
    import torchvision.models as tvm

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from weights_cache import hf_checkpoint, torchvision_checkpoint

    torchvision_checkpoint(torch_home, "resnet18-f37072fd.pth", tvm.resnet18())
    torchvision_checkpoint(torch_home, "efficientnet_b0_rwightman-7f5810bc.pth", tvm.efficientnet_b0())
    torchvision_checkpoint(torch_home, "convnext_tiny-983f1562.pth", tvm.convnext_tiny())
    hf_checkpoint(hf, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", timm.create_model("vit_tiny_patch16_224"))
    hf_checkpoint(hf, "timm/resnet18.a1_in1k", timm.create_model("resnet18"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="train images ranked (default 2000)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=None, help="input size of the four 224-px entries (default 224)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-rank-"))
    os.environ.update(
        TORCH_HOME=str(tmp / "torch"),
        HF_HUB_CACHE=str(tmp / "hf"),
        HF_HUB_OFFLINE="1",
        SEARCH_OFFLINE="1",
        SEARCH_DATA=str(tmp / "data"),
    )
    import torch

    from search import rank
    from search.data import load_data
    from search.models import build_model, input_resolution
    from search.pool import parse_entry
    from search.recipe import recipe_from_dict
    from search.train import fit

    write_random_weights(tmp / "torch", tmp / "hf")
    per_class = int(np.ceil(args.images / 0.7 / 10)) + 2  # 15 % val and 15 % test are carved out
    folder = write_folder(tmp, per_class)
    recipe = recipe_from_dict(
        {
            "study": {"name": "bench-rank"},
            "data": {"dataset": f"folder:{folder}"},
            "pool": pool(args.size),
            "rank": {"max_images": args.images},
            "train": {"epochs": 1},
            "hardware": {"device": args.device},
        }
    )
    data = load_data(recipe.data, recipe.study.seed)
    print(f"{torch.__version__=} threads={torch.get_num_threads()} device={args.device}")
    print(f"{data.summary()}\nweights: RANDOM-INITIALISED files in the real cache layouts", flush=True)
    t0 = time.perf_counter()
    rows = rank.rank_pool(
        recipe, data, on_row=lambda r: print(f"  {r['entry']}: {r['status']} {r['seconds']:.1f} s", flush=True)
    )
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    rank.rank_pool(recipe, data)
    warm = time.perf_counter() - t0
    print(rank.table(rows, "logme", min(len(data.train), args.images), len(data.val)))
    cheapest = min((r for r in rows if r["status"] == "ok"), key=lambda r: r["seconds"])["entry"]
    entry = parse_entry(next(e for e in pool(args.size) if parse_entry(e).label == cheapest))
    model = build_model(
        entry, num_classes=data.num_classes, in_chans=data.in_chans, resolution=input_resolution(entry, data.resolution)
    )
    result = fit(model, data, recipe.train, device=torch.device(args.device), seed=0, keep_best=False)
    epoch = result.history[0]["seconds"]
    print(
        f"\nrank of {len(rows)} entries, {min(len(data.train), args.images)} train + {len(data.val)} val images: "
        f"{cold:.1f} s ({warm:.1f} s again, from the feature cache)"
    )
    print(
        f"one fine-tuning epoch of the cheapest entry ({cheapest}, {len(data.train)} train images, "
        f"batch {recipe.train.batch_size}): {epoch:.1f} s"
    )
    print(f"ratio: rank of the whole pool = {cold / epoch:.1f} epochs of the cheapest trial")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
