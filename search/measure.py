"""What a model costs, measured with what torch provides: parameters, FLOPs, latency, throughput.

All are properties of the architecture at its input size, not of the trained weights, so a trial
measures them right after building the model, before training: a pruned trial has them too, and
constraints on them are known for every trial. Latency is batch-1 inference on the trial's device
after warm-up, the median of repeats (the median, because a shared machine's outliers are one-sided).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

WARMUP, REPEATS = 5, 30  # latency: untimed calls first (allocator, kernels), then the timed ones
THROUGHPUT_BATCH, THROUGHPUT_REPEATS = 64, 5


def _input(in_chans: int, resolution: int, batch: int, device: torch.device) -> torch.Tensor:
    # Its own generator: measuring leaves the trial's random streams as they were.
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, in_chans, resolution, resolution, generator=g).to(device)


def _sync(device: torch.device) -> Callable[[], None]:
    # A CUDA forward returns before the kernels finish: the clock stops only after a sync.
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops(model: nn.Module, in_chans: int, resolution: int) -> int:
    """Floating-point operations of one batch-1 forward (torch.utils.flop_counter; a multiply-add is 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(_input(in_chans, resolution, 1, dev))
    model.train(was)
    return int(counter.get_total_flops())


def _timed(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` forwards of x after `warmup` untimed ones."""
    sync = _sync(x.device)
    was = model.training
    model.eval()
    out = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        sync()
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            sync()
            out.append(time.perf_counter() - t0)
    model.train(was)
    return out


def latency_ms(
    model: nn.Module, in_chans: int, resolution: int, *, warmup: int = WARMUP, repeats: int = REPEATS
) -> float:
    """Median milliseconds of a batch-1 forward on the model's device, after warm-up."""
    dev = next(model.parameters()).device
    return 1000 * statistics.median(_timed(model, _input(in_chans, resolution, 1, dev), warmup, repeats))


def throughput(
    model: nn.Module,
    in_chans: int,
    resolution: int,
    *,
    batch: int = THROUGHPUT_BATCH,
    repeats: int = THROUGHPUT_REPEATS,
) -> float:
    """Images per second of batched inference (batch `batch`, median of repeats) on the model's device."""
    dev = next(model.parameters()).device
    return batch / statistics.median(_timed(model, _input(in_chans, resolution, batch, dev), 2, repeats))


def measure(
    model: nn.Module, names: list[str], in_chans: int, resolution: int, device: torch.device
) -> dict[str, float]:
    """The static measures among `names` (params always), the model moved to `device` for timing."""
    model.to(device)
    out: dict[str, float] = {"params": params(model)}
    builders: dict[str, Callable[[], float]] = {
        "flops": lambda: flops(model, in_chans, resolution),
        "latency_ms": lambda: latency_ms(model, in_chans, resolution),
        "throughput": lambda: throughput(model, in_chans, resolution),
    }
    for name in names:
        if name in builders:
            out[name] = builders[name]()
    return out
