"""Seconds, CPU time and peak memory of `rank` for a five-entry pool, next to fine-tuning epochs.

    PYTHONPATH=. python scripts/bench_rank.py [--images 2000] [--size 64] [--device cpu] [--old | --batch N]

Measured in one process, each phase with its wall, user and system seconds, its peak resident
memory (VmHWM, reset before the phase) and the load average: (1) `rank_pool` of resnet_18 (32 px,
the data's size), efficientnet_b0, convnext_tiny, vit_tiny and timm/resnet18.a1_in1k (224 px each,
or `--size` px) on a stratified sample of `--images` train images and the val split, features not
cached; (2) the same again, from the feature cache; (3) one epoch of `fit` (train defaults, full
fine-tuning) of the entry that was cheapest to rank, on the same train split: today's ratio, rank
against that one epoch; (4) the fair ratio: rank against what it replaces, one fine-tuning epoch of
every entry at its own resolution, each measured on `--ft-steps` steps of `--ft-batch` images (the
first step, warm-up, left out) plus a warm validation pass, and scaled to the train and val splits.

Forward passes for features and validation are batched by measured memory (`search.infer`);
`--batch N` fixes N images per forward instead, and `--old` runs rank as it ran before: 256
images per forward, the CPU in the contiguous layout and the C allocator's default (every freed
batch handed back to the system); validation in `fit` then takes 512 images per forward. Run old
and new alternately to compare them on a shared machine. `--rank-only` skips (3) and (4).

THE WEIGHTS ARE RANDOM-INITIALISED, written (by a child process, so that building them does not
count in this process's memory) into temporary torchvision and Hugging Face caches in the real
layouts (no network here): the timings are those of real weights, the scores are meaningless.
The data is a generated image folder: scikit-learn's 8x8 digits enlarged to 32x32 RGB with random
colour, shift and noise, 10 classes.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

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


class Phase:
    """Wall, user and system seconds, peak resident memory and load average of a block of this process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.wall = self.user = self.sys = 0.0
        self.peak_mb = 0.0
        self.load = (0.0, 0.0)

    def line(self) -> str:
        return (
            f"{self.name}: wall {self.wall:.1f} s, user {self.user:.1f} s, sys {self.sys:.1f} s "
            f"({100 * self.sys / max(self.user, 1e-9):.0f} % of user), peak RSS {self.peak_mb / 1024:.2f} GB, "
            f"load average {self.load[0]:.1f} -> {self.load[1]:.1f}"
        )


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _hwm_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _reset_hwm() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        print("(peak RSS not reset: /proc/self/clear_refs not writable; the process's peak so far counts)")


@contextmanager
def measured(name: str, phases: list[Phase]):
    """Measure the block; its peak RSS counts from the resident memory at its start (Linux clear_refs 5)."""
    _reset_hwm()
    ENTRY_PEAKS.clear()
    ph = Phase(name)
    r0, t0, l0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), _load()
    yield ph
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    ph.wall, ph.load = time.perf_counter() - t0, (l0, _load())
    ph.user, ph.sys = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    ph.peak_mb = max([_hwm_mb(), *ENTRY_PEAKS])
    phases.append(ph)
    print(ph.line(), flush=True)


@contextmanager
def old_rank(on: bool):
    """Rank as before search.infer: contiguous CPU layout, the C allocator's default (256 images per
    forward come from the recipe). `fit` turns on reuse_host_memory at its start, as it always did."""
    from search import rank, train

    if not on:
        yield
        return
    layout, reused = rank.CHANNELS_LAST, train._HOST_MEMORY_REUSED
    rank.CHANNELS_LAST, train._HOST_MEMORY_REUSED = False, False  # host_memory() then does nothing
    try:
        yield
    finally:
        rank.CHANNELS_LAST = layout
        train._HOST_MEMORY_REUSED = None if reused is None else reused


def finetune_epoch(spec: Any, data: Any, recipe: Any, device: Any, batch: int, steps: int) -> tuple[float, float]:
    """(train, validation) seconds of one fine-tuning epoch of `spec` at its resolution on the whole
    splits, scaled from `steps` training steps of `batch` images (the first left out) and a second
    validation pass over `batch` val images."""
    import torch

    from search.models import build_model, info_of, input_resolution
    from search.pool import parse_entry
    from search.train import EVAL_BATCH, fit, predict

    entry = parse_entry(spec)
    model = build_model(
        entry, num_classes=data.num_classes, in_chans=data.in_chans, resolution=input_resolution(entry, data.resolution)
    )
    n_val = min(batch, len(data.val))
    sub = replace(data, train=data.train.take(torch.arange(batch * steps)), val=data.val.take(torch.arange(n_val)))
    stamps: list[float] = [time.perf_counter()]
    hp = recipe.train.model_copy(update={"epochs": 1, "batch_size": batch})
    fit(model, sub, hp, device=device, seed=0, keep_best=False, on_step=lambda *a: stamps.append(time.perf_counter()))
    step = statistics.median(b - a for a, b in zip(stamps[1:-1], stamps[2:], strict=True))
    info = info_of(model)
    t0 = time.perf_counter()
    predict(model, sub.val.x, info.resolution, info.mean, info.std, device, None, device.type == "cuda", EVAL_BATCH)
    val = time.perf_counter() - t0
    return step / batch * len(data.train), val / n_val * len(data.val)


def fair_epochs(specs: list, data: Any, recipe: Any, device: Any, batch: int, steps: int) -> float:
    total = 0.0
    for spec in specs:
        train_s, val_s = finetune_epoch(spec, data, recipe, device, batch, steps)
        label = spec if isinstance(spec, str) else f"{spec['model']}@{spec['resolution']}"
        print(f"  fine-tuning epoch of {label}: {train_s:.1f} s train + {val_s:.1f} s validation (scaled)", flush=True)
        total += train_s + val_s
    return total


ENTRY_PEAKS: list[float] = []  # peak RSS (MB) of each ranked entry, VmHWM reset after each


def _print_row(r: dict) -> None:
    ENTRY_PEAKS.append(_hwm_mb())
    _reset_hwm()
    print(f"  {r['entry']}: {r['status']} {r['seconds']:.1f} s, peak RSS {ENTRY_PEAKS[-1] / 1024:.2f} GB", flush=True)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="train images ranked (default 2000)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=None, help="input size of the four 224-px entries (default 224)")
    p.add_argument("--batch", type=int, default=None, help="images per forward (default: sized by memory)")
    p.add_argument("--old", action="store_true", help="rank and validate as before: 256 / 512 images per forward")
    p.add_argument("--budget-mb", type=int, default=None, help="CPU bytes of activations per forward (search.infer)")
    p.add_argument("--rank-only", action="store_true", help="skip the fine-tuning epochs (no ratios)")
    p.add_argument("--ft-batch", type=int, default=16, help="images per step of the measured fine-tuning")
    p.add_argument("--ft-steps", type=int, default=3, help="steps of each entry's measured fine-tuning")
    p.add_argument("--write-weights", type=Path, default=None, help=argparse.SUPPRESS)  # the child's job
    return p.parse_args()


def main() -> int:
    args = _args()
    if args.write_weights:
        write_random_weights(args.write_weights / "torch", args.write_weights / "hf")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="bench-rank-"))
    try:
        return run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # about 250 MB of weights, images and features


def run(args: argparse.Namespace, tmp: Path) -> int:
    subprocess.run([sys.executable, __file__, "--write-weights", str(tmp)], check=True)
    os.environ.update(
        TORCH_HOME=str(tmp / "torch"),
        HF_HUB_CACHE=str(tmp / "hf"),
        HF_HUB_OFFLINE="1",
        SEARCH_OFFLINE="1",
        SEARCH_DATA=str(tmp / "data"),
    )
    import torch

    from search import infer, rank, train
    from search.data import load_data
    from search.models import build_model, input_resolution
    from search.pool import parse_entry
    from search.recipe import recipe_from_dict

    batch = 256 if args.old else args.batch
    if args.budget_mb:
        infer.CPU_BUDGET = args.budget_mb * 2**20
    train.EVAL_BATCH = 512 if args.old else args.batch
    per_class = int(np.ceil(args.images / 0.7 / 10)) + 2  # 15 % val and 15 % test are carved out
    folder = write_folder(tmp, per_class)
    recipe = recipe_from_dict(
        {
            "study": {"name": "bench-rank"},
            "data": {"dataset": f"folder:{folder}"},
            "pool": pool(args.size),
            "rank": {"max_images": args.images, "batch_size": batch},
            "train": {"epochs": 1},
            "hardware": {"device": args.device},
        }
    )
    data = load_data(recipe.data, recipe.study.seed)
    device = torch.device(args.device)
    mode = f"batch {batch or f'by memory, {infer.CPU_BUDGET >> 20} MB on the CPU'}"
    mode = "old: 256 images per forward, contiguous, default malloc" if args.old else mode
    print(f"{torch.__version__=} threads={torch.get_num_threads()} device={args.device} ({mode})")
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"{data.summary()}\nweights: RANDOM-INITIALISED files in the real cache layouts", flush=True)
    phases: list[Phase] = []
    with measured("rank (features computed)", phases) as cold, old_rank(args.old):
        rows = rank.rank_pool(recipe, data, on_row=_print_row)
    with measured("rank again (features cached)", phases), old_rank(args.old):
        rank.rank_pool(recipe, data)
    n_train = min(len(data.train), args.images)
    print(rank.table(rows, "logme", n_train, len(data.val)))
    print(f"\nrank of {len(rows)} entries, {n_train} train + {len(data.val)} val images: {cold.wall:.1f} s")
    if args.rank_only:
        return 0
    cheapest = min((r for r in rows if r["status"] == "ok"), key=lambda r: r["seconds"])["entry"]
    entry = parse_entry(next(e for e in pool(args.size) if parse_entry(e).label == cheapest))
    model = build_model(
        entry, num_classes=data.num_classes, in_chans=data.in_chans, resolution=input_resolution(entry, data.resolution)
    )
    with measured(f"one fine-tuning epoch of {cheapest}", phases) as today:
        result = train.fit(model, data, recipe.train, device=device, seed=0, keep_best=False)
    epoch = result.history[0]["seconds"]
    with measured("fine-tuning epochs of every entry (measured on a subset)", phases):
        fair = fair_epochs(pool(args.size), data, recipe, device, args.ft_batch, args.ft_steps)
    print(
        f"\none fine-tuning epoch of the cheapest entry ({cheapest}, {len(data.train)} train images, "
        f"batch {recipe.train.batch_size}): {epoch:.1f} s (its phase: {today.wall:.1f} s with validation)"
    )
    print(f"one fine-tuning epoch of every entry at its resolution (scaled from {args.ft_steps} steps): {fair:.1f} s")
    print(f"today's ratio: rank of the whole pool = {cold.wall / epoch:.2f} epochs of the cheapest trial")
    print(f"fair ratio: rank of the whole pool = {cold.wall / fair:.2f} of one fine-tuning epoch of every entry")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
