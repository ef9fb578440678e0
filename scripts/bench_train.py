"""Seconds per epoch of `search.train.fit` against a minimal hand-written loop.

Both loops get the same model (same initial weights), the same uint8 data
already in memory (on the GPU when training there), the same batch size,
AdamW at the same lr and weight decay, the same precision (bf16 autocast +
channels_last on CUDA; on the CPU each --formats entry, default float32
NCHW), the same batched augmentation
(`search.augment.augment`, or none with --aug off) and one validation pass per
epoch. `fit` additionally does what a trial needs: warm-up/cosine schedule,
parameter groups, per-epoch metrics (accuracy, balanced accuracy, F1, AUC),
records and the divergence check. Runs are interleaved (fit, minimal, fit,
...) and the medians compared.

    python scripts/bench_train.py                          # mini_cnn and resnet_18 at 32 px on the CPU
    python scripts/bench_train.py --scale 4 --runs 5       # more images per epoch, more runs
    python scripts/bench_train.py --formats nchw channels_last bf16 channels_last_bf16   # CPU formats
    python scripts/bench_train.py --formats nchw channels_last bf16 channels_last_bf16 --probe 20   # probe steps
    python scripts/bench_train.py --device cuda --models resnet_18 --n 50000 --val 10000 --batch-size 512

Acceptance: fit / minimal <= 1.10 for both models (<= 1.02 on an idle CPU), in every format.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from search import augment, cpu_format  # noqa: E402
from search.data import Data, Split  # noqa: E402
from search.datasets import AugmentCfg  # noqa: E402
from search.hparams import TrainCfg  # noqa: E402
from search.models import build_model  # noqa: E402
from search.train import fit  # noqa: E402

CPU_FORMATS = ("nchw", "channels_last", "bf16", "channels_last_bf16")


def normalize(xb: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], channels_last: bool) -> torch.Tensor:
    """(x - mean) / std per channel into a new tensor: the minimal loop's own value pass."""
    out = torch.empty_like(xb, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return augment.scale_shift(xb, 1.0, 0.0, mean, std, clamp=False, out=out)


# images per epoch on the CPU: ResNet-18 at 32 px costs about 1 s per 64-image step on 2 cores
DEFAULT_N = {"mini_cnn": 1024, "resnet_18": 256}
NUM_CLASSES = 10
RES = 32


def random_data(n: int, n_val: int, aug: bool, seed: int = 0) -> Data:
    """CIFAR-shaped random uint8 images (3 x 32 x 32) with 10 classes."""
    g = torch.Generator().manual_seed(seed)

    def split(k: int) -> Split:
        return Split(
            torch.randint(0, 256, (k, 3, RES, RES), dtype=torch.uint8, generator=g),
            torch.randint(0, NUM_CLASSES, (k,), generator=g),
        )

    cfg = AugmentCfg(crop="pad", flip=True) if aug else AugmentCfg(crop="none", flip=False)
    return Data("random", split(n), split(n_val), split(16), tuple(map(str, range(NUM_CLASSES))), "none", cfg, RES)


def minimal_loop(model: nn.Module, data: Data, hp: TrainCfg, dev: torch.device, cpu_format: str = "nchw") -> float:
    """What one writes by hand: shuffle, augment, forward, cross-entropy, AdamW, then a validation pass.

    Returns the validation accuracy of the last epoch (read once, like fit's single sync per epoch).
    On the CPU, `cpu_format` sets the layout and precision as it does for `fit`.
    """
    cuda = dev.type == "cuda"
    torch.backends.cudnn.benchmark = cuda
    last = cuda or cpu_format.startswith("channels_last")
    model.to(dev, memory_format=torch.channels_last if last else torch.preserve_format)
    info = model.info
    x, y = data.train.x.to(dev), data.train.y.to(dev)
    xv, yv = data.val.x.to(dev), data.val.y.to(dev)
    amp = torch.bfloat16 if cuda or cpu_format.endswith("bf16") else None
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=cuda or None)
    bs = hp.batch_size
    steps = len(y) // bs
    plain = data.augment.crop == "none" and not data.augment.flip
    acc = 0.0
    for _ in range(hp.epochs):
        model.train()
        perm = torch.randperm(len(y), device=dev)
        for i in range(steps):
            idx = perm[i * bs : (i + 1) * bs]
            xb = x[idx].float().div_(255) if plain else augment.augment(x[idx], data.augment, info.resolution)
            xb = normalize(xb, info.mean, info.std, last)
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                out = model(xb)
            loss = F.cross_entropy(out.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        correct = torch.zeros((), device=dev, dtype=torch.long)
        with torch.inference_mode():
            for i in range(0, len(yv), 512):
                xb = normalize(augment.eval_input(xv[i : i + 512], info.resolution), info.mean, info.std, last)
                with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                    correct += (model(xb).argmax(1) == yv[i : i + 512]).sum()
        acc = correct.item() / len(yv)
    return acc


CLOCK = time.perf_counter  # --clock cpu: time.process_time, the CPU seconds of this process


def timed(fn, dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = CLOCK()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return CLOCK() - t


def bench(name: str, n: int, n_val: int, args: argparse.Namespace, dev: torch.device) -> float:
    """Each format's fit and minimal loop, interleaved run by run; the worst fit / minimal ratio."""
    data = random_data(n, n_val, args.aug == "on")
    if dev.type == "cuda":  # both loops start from data already on the device
        data = Data(
            data.name,
            Split(data.train.x.to(dev), data.train.y.to(dev)),
            Split(data.val.x.to(dev), data.val.y.to(dev)),
            data.test,
            data.classes,
            data.overlap,
            data.augment,
            data.resolution,
        )
    torch.manual_seed(0)
    proto = build_model({"model": name, "pretrained": False}, num_classes=NUM_CLASSES, in_chans=3, resolution=RES)
    hp = TrainCfg(epochs=args.epochs, batch_size=args.batch_size, optimizer="adamw", lr=1e-3, weight_decay=5e-4)
    formats = args.formats if dev.type == "cpu" else ["nchw"]
    fit_ips: dict[str, list[float]] = {f: [] for f in formats}

    def run_fit(cfg: TrainCfg, fmt: str) -> None:
        res = fit(copy.deepcopy(proto), data, cfg, device=dev, seed=0, compile=args.compile, cpu_format=fmt)
        fit_ips[fmt].append(statistics.mean(r["images_per_s"] for r in res.history))

    def run_minimal(cfg: TrainCfg, fmt: str) -> None:
        m = copy.deepcopy(proto)
        if args.compile:
            m = torch.compile(m, dynamic=False)
            m.info = proto.info
        minimal_loop(m, data, cfg, dev, fmt)

    warm = hp.model_copy(update={"epochs": 1})  # kernels, allocator, autotuning (and compile) outside the timing
    for fmt in formats:
        run_fit(warm, fmt)
        run_minimal(warm, fmt)
        fit_ips[fmt].clear()
    t_fit: dict[str, list[float]] = {f: [] for f in formats}
    t_min: dict[str, list[float]] = {f: [] for f in formats}
    for _ in range(args.runs):  # interleaved: every format's fit and minimal loop once per round
        for fmt in formats:
            t_fit[fmt].append(timed(functools.partial(run_fit, hp, fmt), dev) / hp.epochs)
            t_min[fmt].append(timed(functools.partial(run_minimal, hp, fmt), dev) / hp.epochs)
    images = (n // min(args.batch_size, n)) * min(args.batch_size, n)
    base = statistics.median(t_fit[formats[0]])
    worst = 0.0
    for fmt in formats:
        f, m = statistics.median(t_fit[fmt]), statistics.median(t_min[fmt])
        worst = max(worst, f / m)
        print(
            f"{name:<10} {fmt:<18} {n:>6} {args.batch_size:>5} {f:>8.3f} {m:>8.3f} {images / f:>8.0f} "
            f"{images / m:>8.0f} {f / m:>6.3f} {base / f:>7.3f}   runs fit {[round(t, 3) for t in t_fit[fmt]]} "
            f"minimal {[round(t, 3) for t in t_min[fmt]]}; fit's train-only images/s "
            f"{statistics.median(fit_ips[fmt]):.0f}",
            flush=True,
        )
    return worst


def probe_steps(name: str, args: argparse.Namespace) -> None:
    """The probe's view (search.cpu_format.step_times): one forward/backward of the model per format,
    `--probe` rounds interleaved; the fastest and the median step of each, and the speed-up over the first."""
    torch.manual_seed(0)
    proto = build_model({"model": name, "pretrained": False}, num_classes=NUM_CLASSES, in_chans=3, resolution=RES)
    step = cpu_format.training_step(proto, 3, RES, args.batch_size, NUM_CLASSES)
    times: dict[str, list[float]] = {f: [] for f in args.formats}

    def timer_of(fmt: str) -> None:
        t0 = CLOCK()
        step(fmt)
        times[fmt].append(CLOCK() - t0)

    cpu_format.step_times(step, args.formats, steps=1)  # warm-up
    for _ in range(args.probe):
        for fmt in args.formats:
            timer_of(fmt)
    first = min(times[args.formats[0]])
    for fmt in args.formats:
        best, med = min(times[fmt]), statistics.median(times[fmt])
        print(
            f"probe {name:<10} {fmt:<18} batch {args.batch_size}: fastest {best * 1e3:8.1f} ms "
            f"({args.batch_size / best:6.0f} im/s), median {med * 1e3:8.1f} ms, speed-up {first / best:5.2f}",
            flush=True,
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["mini_cnn", "resnet_18"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (cuda falls back to cpu with a warning)")
    p.add_argument("--n", type=int, default=None, help=f"training images (default per model: {DEFAULT_N})")
    p.add_argument("--val", type=int, default=None, help="validation images (default n / 4)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the default image counts")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="epochs per timed run")
    p.add_argument("--runs", type=int, default=5, help="interleaved runs per loop (the median is reported)")
    p.add_argument("--aug", choices=["on", "off"], default="on", help="batched pad-crop + flip in both loops")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in both loops")
    p.add_argument(
        "--formats",
        nargs="+",
        choices=CPU_FORMATS,
        default=["nchw"],
        help="CPU formats to compare, each in both loops; 'vs first' is the first format's fit time over "
        "this one's (nchw first: the speed-up over the float32 NCHW loop). Ignored on CUDA",
    )
    p.add_argument(
        "--probe",
        type=int,
        default=0,
        help="instead of the loops: this many interleaved forward/backward steps per format (the probe's step)",
    )
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: time by the CPU seconds of this process (with --threads 1, little moved by other work on "
        "a busy machine; images/s are then per CPU second)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-ratio", type=float, default=1.10, help="exit 1 when a ratio is above this")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.process_time
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn("no CUDA device visible: running on the CPU instead", stacklevel=1)
        dev = torch.device("cpu")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {name}; torch {torch.__version__}; "
        f"precision: {'bf16 autocast' if dev.type == 'cuda' else 'per format'}; "
        f"augmentation: {args.aug}; compile: {args.compile}; clock: {args.clock}; "
        f"epochs per run: {args.epochs}; runs: {args.runs}; "
        f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"{'model':<10} {'format':<18} {'images':>6} {'batch':>5} {'fit s/ep':>8} {'min s/ep':>8} "
        f"{'fit im/s':>8} {'min im/s':>8} {'ratio':>6} {'vs first':>7}"
    )
    if args.probe:
        for model in args.models:
            probe_steps(model, args)
        print(f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return 0
    worst = 0.0
    for model in args.models:
        n = args.n or math.ceil(DEFAULT_N.get(model, 512) * args.scale)
        worst = max(worst, bench(model, n, args.val or max(16, n // 4), args, dev))
    print(
        f"worst fit / minimal ratio {worst:.3f} (acceptance <= {args.max_ratio}); load average now "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    return 0 if worst <= args.max_ratio else 1


if __name__ == "__main__":
    raise SystemExit(main())
