"""Forward passes without gradients over many images, in batches sized by memory.

`forward_batches` runs a model over uint8 images (N, C, H, W) under `inference_mode`, each batch
resized and normalised on the device, and yields the outputs batch by batch. A batch holds as many
images as keep the forward's live tensors within a byte budget: the peak bytes per image of the
model's forward at its input size are measured once (on the first batch, PROBE_IMAGES images,
whose outputs are kept) and remembered per model, input size, device, precision and layout.

Live tensors are counted by a dispatch mode: every storage an operator returns counts until it is
freed. That is the same on every device, and it leaves the CUDA allocator's peak statistics alone
(`fit` reports them per epoch); workspaces an operator frees before it returns (oneDNN's, cuDNN's)
are not seen, which the budgets leave room for.

- CPU: the budget is CPU_BUDGET. Measured with scripts/bench_rank.py on a 2-core CPU, 256-image
  batches of EfficientNet-B0 at 224 px hold 2.5 GB of activations at once, and glibc hands every
  freed allocation over 32 MiB back to the system, to be faulted in again by the next batch:
  half as much system time as user time. With batches within the budget, and freed memory kept
  for the next batch (`search.train.host_memory`, which the callers hold), that is gone. The
  resident memory grows by about twice the counted bytes (measured: ConvNeXt-Tiny at 224 px,
  12.6 MB counted per image, batches of 21 grew it by 430-540 MB): oneDNN's scratch space and
  the gaps between freed blocks of the heap. On a 2-core CPU whose cores other processes
  also use, OpenMP's spinning threads make every operator cost a scheduler slice or so, which
  favours large batches; with OMP_WAIT_POLICY=PASSIVE batches of 8 images ran as fast as 64, and
  rank of the benchmark's pool took 173 s at 64 MB, 189-245 s at 128 MB (peak RSS 1.16 vs 1.30-1.66 GB).
- CUDA: the budget is GPU_SHARE of the free memory when the batch size is chosen.

A fixed `batch` (a number of images) skips the measurement: the behaviour of a fixed batch size.
Outputs do not depend on the batch size beyond float rounding (tests/test_infer.py).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode  # the public way to see every operator's output
from torch.utils._pytree import tree_flatten

from search import augment

MIB = 2**20
CPU_BUDGET = 64 * MIB  # live bytes of one CPU forward: the process grows by about twice that (see above)
GPU_SHARE = 0.5  # of the free GPU memory one forward may take
PROBE_IMAGES = 4  # images of the measured first batch
MAX_BATCH = 1024  # images per forward, whatever the budget

# per model: {(input size, device, dtype, channels_last): peak live bytes per image}
_PER_IMAGE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], int]] = weakref.WeakKeyDictionary()


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages that operators return while they live; `peak` is the most at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._seen:  # a view of a counted storage
                continue
            self._seen.add(key)
            self.live += nbytes
            weakref.finalize(storage, self._freed, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def budget_bytes(device: torch.device) -> int:
    """Live bytes one forward may hold on `device`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(GPU_SHARE * free)
    return CPU_BUDGET


def batch_for(per_image: int, budget: int) -> int:
    """Images per forward: as many as fit `budget` at `per_image` bytes each, 1 to MAX_BATCH."""
    return max(1, min(MAX_BATCH, budget // max(per_image, 1)))


def _prepare(
    x: torch.Tensor,
    size: int,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    device: torch.device,
    channels_last: bool,
) -> torch.Tensor:
    return augment.eval_input(x.to(device, non_blocking=True), size, mean=mean, std=std, channels_last=channels_last)


def _measured(
    model: nn.Module, xb: torch.Tensor, device: torch.device, amp_dtype: torch.dtype | None
) -> tuple[torch.Tensor, int]:
    """The model's output for the batch xb and the peak live bytes of its forward, input included."""
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None), LiveBytes() as live:
        out = model(xb)
    return out, live.peak + xb.nbytes


@torch.inference_mode()
def forward_batches(
    model: nn.Module,
    x: torch.Tensor,
    size: int,
    *,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    batch: int | None = None,
) -> Iterator[torch.Tensor]:
    """The model's outputs for uint8 images x (N, C, H, W), one tensor per batch, in order.

    Batches hold `batch` images, or (None) as many as the memory budget allows, measured on the
    first batch unless this model was measured before at this size, device, precision and layout.
    """
    model.eval()
    key = (size, str(device), amp_dtype, channels_last)
    known = _PER_IMAGE.setdefault(model, {})
    start = 0
    if batch is None and key not in known and len(x):
        first = x[:PROBE_IMAGES]
        out, peak = _measured(model, _prepare(first, size, mean, std, device, channels_last), device, amp_dtype)
        known[key] = -(-peak // len(first))  # rounded up
        start = len(first)
        yield out
    if start >= len(x):
        return
    step = batch or batch_for(known[key], budget_bytes(device))
    for i in range(start, len(x), step):
        xb = _prepare(x[i : i + step], size, mean, std, device, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(xb)
        del xb  # the next batch's input may take its memory
        yield out


def per_image_bytes(model: nn.Module) -> dict[tuple[Any, ...], int]:
    """What was measured of this model: {(size, device, dtype, channels_last): live bytes per image}."""
    return dict(_PER_IMAGE.get(model, {}))
