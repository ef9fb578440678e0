"""Images/s of the batched input pipeline vs a per-sample PIL pipeline, side by side.

    .venv/bin/python scripts/bench_pipeline.py            # 32 px and 224 px, CPU
    .venv/bin/python scripts/bench_pipeline.py --device cuda

Both pipelines read the same uint8 images and apply the same augmentations,
then normalize:

- batched (`search.augment`): a shuffled batch is gathered from the uint8
  tensor (N, C, H, W) on the device and augmented there in one go;
- per-sample: the same images as PIL images, `torchvision.transforms.v2`
  (RandomCrop with padding or RandomResizedCrop, RandomHorizontalFlip,
  RandomRotation, ColorJitter, ToImage, ToDtype, Normalize) in a `DataLoader`
  with worker processes, as a typical training script does.

On the CPU both run with `fit`'s allocator setting (`reuse_host_memory`:
freed batch tensors are reused instead of page-faulted in again each batch);
`--default-malloc` measures without it. The images are random uint8 arrays:
both pipelines' costs do not depend on the pixel values. The ratio is what to read; absolute figures move with the
machine's load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from search.augment import augment
from search.datasets import AugmentCfg
from search.train import reuse_host_memory

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# name: (source px, output px, augmentations)
CASES = {
    "32px crop+flip+jitter": (32, 32, AugmentCfg(crop="pad", flip=True, jitter=0.2)),
    "32px resized+flip+rot+jitter": (32, 32, AugmentCfg(crop="resized", flip=True, rotate=15, jitter=0.2)),
    "224px from 32 crop+flip+jitter": (32, 224, AugmentCfg(crop="pad", flip=True, jitter=0.2)),
    "224px resized+flip+rot+jitter": (256, 224, AugmentCfg(crop="resized", flip=True, rotate=15, jitter=0.2)),
}


def torchvision_transform(cfg: AugmentCfg, src: int, size: int) -> v2.Compose:
    """The per-sample equivalent of `cfg` at output size `size`."""
    steps: list[v2.Transform] = []
    if cfg.crop == "pad":
        pad = max(1, round(cfg.pad_fraction * src))
        steps.append(v2.RandomCrop(src, padding=pad))
        if size != src:
            steps.append(v2.Resize(size))
    else:
        steps.append(v2.RandomResizedCrop(size, scale=(cfg.min_scale, 1.0)))
    if cfg.flip:
        steps.append(v2.RandomHorizontalFlip())
    if cfg.rotate:
        steps.append(v2.RandomRotation(cfg.rotate))
    if cfg.jitter:
        steps.append(v2.ColorJitter(brightness=cfg.jitter, contrast=cfg.jitter))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(steps)


class PILSet(Dataset):
    def __init__(self, images: list[Image.Image], labels: np.ndarray, transform: v2.Compose) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


def per_sample(x: np.ndarray, y: np.ndarray, cfg: AugmentCfg, size: int, batch: int, workers: int) -> float:
    """Images/s of one epoch through PIL + transforms.v2 + DataLoader (workers already started)."""
    images = [Image.fromarray(a) for a in x.transpose(0, 2, 3, 1)]
    ds = PILSet(images, y, torchvision_transform(cfg, x.shape[-1], size))
    loader = DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0
    )
    for _ in zip(range(2), loader, strict=False):  # start the workers outside the timing
        pass
    n, t0 = 0, time.perf_counter()
    for xb, _yb in loader:
        n += len(xb)
    return n / (time.perf_counter() - t0)


def batched(x: np.ndarray, y: np.ndarray, cfg: AugmentCfg, size: int, batch: int, device: torch.device) -> float:
    """Images/s of one epoch through search.augment on `device`."""
    xt = torch.from_numpy(x).to(device)
    yt = torch.from_numpy(y).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    channels_last = device.type == "cuda"

    def epoch(limit: int | None = None) -> int:
        order = torch.randperm(len(yt), generator=gen, device=device)
        n = 0
        for i in range(len(yt) // batch if limit is None else limit):
            idx = order[i * batch : (i + 1) * batch]
            xb = augment(xt.index_select(0, idx), cfg, size, gen, mean=MEAN, std=STD, channels_last=channels_last)
            _ = yt[idx]
            n += len(xb)
        return n

    epoch(limit=2)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = epoch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--n32", type=int, default=10240, help="images in the 32 px cases")
    p.add_argument("--n224", type=int, default=1536, help="images in the 224 px case")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the per-sample pipeline")
    p.add_argument("--repeat", type=int, default=3, help="interleaved runs per case; medians are printed")
    p.add_argument("--only", choices=list(CASES), action="append", help="run only these cases")
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave the C allocator as it is (fit's CPU setting, reuse_host_memory, is off)",
    )
    args = p.parse_args()
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    # As in fit on the CPU; set before the DataLoader workers fork, so both pipelines run with it.
    reuse = device.type == "cpu" and not args.default_malloc and reuse_host_memory()
    print(
        f"device {device}, {torch.get_num_threads()} torch threads, per-sample pipeline with {args.workers} workers, "
        f"freed host memory {'reused' if reuse else 'returned to the system (default malloc)'}; "
        f"medians of {args.repeat} interleaved runs"
    )
    print(f"{'case':<32} {'images':>7} {'batched img/s':>14} {'per-sample img/s':>17} {'ratio':>7}")
    for name, (src, size, cfg) in CASES.items():
        if args.only and name not in args.only:
            continue
        n = args.n32 if size <= 64 else args.n224
        x = rng.integers(0, 256, (n, 3, src, src), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.int64)
        runs = [
            (batched(x, y, cfg, size, args.batch, device), per_sample(x, y, cfg, size, args.batch, args.workers))
            for _ in range(args.repeat)
        ]
        fast, slow = (statistics.median(r) for r in zip(*runs, strict=True))
        print(f"{name:<32} {n:>7} {fast:>14,.0f} {slow:>17,.0f} {fast / slow:>6.1f}x", flush=True)


if __name__ == "__main__":
    main()
