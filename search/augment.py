"""Batched, on-device augmentation and input preparation.

A training batch arrives as uint8 (B, C, H, W) on the training device and
leaves as float (B, C, size, size), normalised, in two steps:

1. geometry: a zero-padded random crop with optional flip is a pure uint8
   gather (no float copy of the padded input, no interpolation); a random
   resized crop and/or rotation is one `grid_sample` per batch that also
   resamples to the model's input size (after an antialiased shrink where
   the images are much larger than that: `shrink_size`);
2. values: brightness/contrast jitter, the 1/255 scaling and the weights'
   mean/std as one multiply-add (plus a clamp when jittering) that writes
   `channels_last` directly.

All random draws are made for the whole batch first. On a GPU both steps
then run once over the batch; on a CPU they run over slices whose float
working set fits the cache (`chunk_size`), which at 224 px is ~1.7x faster
than streaming whole-batch intermediates through memory. No per-sample
Python, no PIL. `scripts/bench_pipeline.py` compares this with a per-sample
PIL + torchvision.transforms.v2 + DataLoader pipeline.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from search.datasets import AugmentCfg


def _rand(n: int, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device)


def _flip_signs(n: int, cfg: AugmentCfg, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if not cfg.flip:
        return torch.ones(n, device=device)
    return torch.where(_rand(n, gen, device) < 0.5, -1.0, 1.0)


def shift_flip(x: torch.Tensor, pad: int, cfg: AugmentCfg, gen: torch.Generator | None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> same shape: a random crop of the zero-padded image, optionally flipped.

    Output pixel (i, j) is input pixel (i + dy, j + dx), zero outside the image,
    with dy, dx uniform integers in [-pad, pad]; a flipped sample reads column
    W - 1 - j of that window. One uint8 gather with clamped indices plus a
    zero fill: padding the batch first (`F.pad`) costs more than both.
    """
    b, c, h, w = x.shape
    dev = x.device
    dy = torch.randint(-pad, pad + 1, (b,), generator=gen, device=dev)
    dx = torch.randint(-pad, pad + 1, (b,), generator=gen, device=dev)
    rows = dy[:, None] + torch.arange(h, device=dev)
    cols = dx[:, None] + torch.arange(w, device=dev)
    if cfg.flip:
        flipped = _rand(b, gen, dev) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    idx = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
    out = x.reshape(b, c, h * w).gather(2, idx.view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)
    if pad:
        outside = ((rows < 0) | (rows >= h))[:, :, None] | ((cols < 0) | (cols >= w))[:, None, :]
        out.masked_fill_(outside[:, None], 0)
    return out


def sampling_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """`F.affine_grid(theta, (B, C, size, size), align_corners=False)` as one broadcast add.

    affine_grid builds the grid with a batched matmul against a (size*size, 3)
    base, which on a CPU costs about as much as the sampling itself.
    """
    base = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1
    from_cols = base[None, :, None] * theta[:, None, :, 0]  # (B, size, 2): x-dependence
    from_rows = base[None, :, None] * theta[:, None, :, 1] + theta[:, None, :, 2]  # (B, size, 2)
    return from_cols[:, None, :, :] + from_rows[:, :, None, :]


def affine(n: int, cfg: AugmentCfg, in_size: int, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(n, 2, 3) matrices mapping output to input coordinates (normalised to [-1, 1])."""
    sx = torch.ones(n, device=device)
    sy = torch.ones(n, device=device)
    tx = torch.zeros(n, device=device)
    ty = torch.zeros(n, device=device)
    if cfg.crop == "pad":
        # Integer pixel shifts in [-pad, pad], like a zero-padded random crop.
        pad = pad_pixels(cfg, in_size)
        if pad:
            shift = torch.randint(-pad, pad + 1, (2, n), generator=gen, device=device).float()
            tx, ty = shift * (2.0 / in_size)
    elif cfg.crop == "resized":
        # torchvision's RandomResizedCrop: area fraction and log-uniform aspect ratio 3/4..4/3.
        area = cfg.min_scale + (1 - cfg.min_scale) * _rand(n, gen, device)
        log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * _rand(n, gen, device)
        ratio = torch.exp(log_r)
        sx = torch.sqrt(area * ratio).clamp(max=1.0)
        sy = torch.sqrt(area / ratio).clamp(max=1.0)
        tx = (1 - sx) * (2 * _rand(n, gen, device) - 1)
        ty = (1 - sy) * (2 * _rand(n, gen, device) - 1)
    sx = sx * _flip_signs(n, cfg, gen, device)
    if cfg.rotate:
        angle = (2 * _rand(n, gen, device) - 1) * math.radians(cfg.rotate)
    else:
        angle = torch.zeros(n, device=device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack(
        [
            torch.stack([sx * cos, -sy * sin, tx], dim=1),
            torch.stack([sx * sin, sy * cos, ty], dim=1),
        ],
        dim=1,
    )


def pad_pixels(cfg: AugmentCfg, in_size: int) -> int:
    """Pixels of zero padding for the 'pad' crop at this input size (at least 1 when enabled)."""
    return max(1, round(cfg.pad_fraction * in_size)) if cfg.pad_fraction > 0 else 0


CPU_CHUNK_BYTES = 16 << 20  # float working set per CPU chunk: stays in a server's L3 cache


def chunk_size(n: int, c: int, in_size: int, size: int, device: torch.device) -> int:
    """Images per geometry + value pass: the whole batch on a GPU, a cache-sized slice on a CPU.

    On a CPU every pass over a 256-image 224 px batch streams ~150 MB through
    memory; slices whose float input, sampling grid and output fit in the
    cache make the same passes about 1.7x faster (scripts/bench_pipeline.py).
    """
    if device.type != "cpu":
        return n
    per_image = 4 * (c * in_size * in_size + 2 * size * size + c * size * size)
    return max(1, min(n, CPU_CHUNK_BYTES // per_image))


def shrink_size(cfg: AugmentCfg, size: int) -> int:
    """Where to shrink (antialiased) images before grid_sample resamples them to `size`.

    As small as possible, for antialiasing: grid_sample then shrinks any crop
    by at most 2x. But never below size / (smallest crop side), so even the
    smallest random resized crop keeps the detail of the original.
    """
    side = math.sqrt(cfg.min_scale * 3 / 4) if cfg.crop == "resized" else 1.0  # aspect ratios 3/4..4/3
    return max(2 * size, math.ceil(size / max(side, 1e-6)))


def augment(
    x: torch.Tensor,
    cfg: AugmentCfg,
    size: int,
    gen: torch.Generator | None = None,
    *,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float (B, C, size, size), randomly augmented.

    Values are in [0, 1], or `(v - mean) / std` per channel when the weights'
    `mean` and `std` are given (one multiply-add for jitter, 1/255 and the
    normalisation together). `gen` (a generator on x's device) makes the
    result reproducible; every call draws new crops, flips, angles and jitter
    factors from it, all before any pixel is touched, so the result does not
    depend on `chunk_size`.
    """
    n, c, h, w = x.shape
    dev = x.device
    exact = cfg.crop != "resized" and not cfg.rotate
    if exact:
        # Exact integer crop and flip on uint8; float only at the input size.
        pad = pad_pixels(cfg, w) if cfg.crop == "pad" else 0
        x = shift_flip(x, pad, cfg, gen) if pad or cfg.flip else x
    else:
        theta = affine(n, cfg, w, gen, dev)
        shrink = shrink_size(cfg, size)
    if cfg.jitter:
        # torchvision semantics: brightness x*b, then contrast around the (per-image) mean:
        # b*(c*x + (1-c)*mean) = (b*c) * x + b*(1-c)*mean.
        bright = 1 + cfg.jitter * (2 * torch.rand(n, 1, 1, 1, generator=gen, device=dev) - 1)
        contrast = 1 + cfg.jitter * (2 * torch.rand(n, 1, 1, 1, generator=gen, device=dev) - 1)
    out = torch.empty((n, c, size, size), device=dev, memory_format=_layout(channels_last))
    step = chunk_size(n, c, w, size, dev)
    for i in range(0, n, step):
        j = min(n, i + step)
        xf = x[i:j].float()
        if exact:
            xf = resize(xf, size)
        else:
            if shrink < w:  # grid_sample does not antialias: shrink first, with a filter
                xf = resize(xf, shrink)
            xf = F.grid_sample(
                xf, sampling_grid(theta[i:j], size), mode="bilinear", padding_mode="zeros", align_corners=False
            )
        # xf holds 0..255 here (bilinear weights sum to at most 1), so only jitter needs a clamp.
        scale: torch.Tensor | float = 1 / 255
        shift: torch.Tensor | float = 0.0
        if cfg.jitter:
            b, k = bright[i:j], contrast[i:j]
            scale, shift = b * k / 255, b * (1 - k) * xf.mean(dim=(1, 2, 3), keepdim=True) / 255
        scale_shift(xf, scale, shift, mean, std, clamp=bool(cfg.jitter), out=out[i:j])
    return out


def _layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


@lru_cache(maxsize=32)
def _stats(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """mean, std and the normalised images of 0 and 1 as (1, C, 1, 1) tensors on the device, made once:
    a copy to a GPU per batch would wait for it."""
    m = torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype).view(1, -1, 1, 1)
    return tuple(t.to(device) for t in (m, s, -m / s, (1 - m) / s))


def scale_shift(
    xf: torch.Tensor,
    scale: torch.Tensor | float,
    shift: torch.Tensor | float,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    *,
    clamp: bool,
    out: torch.Tensor,
) -> torch.Tensor:
    """out = (v - mean) / std per channel, v = scale * xf + shift (clamped to [0, 1] if `clamp`).

    One multiply-add plus, with `clamp`, one clamp to the normalised images
    of 0 and 1: std > 0, so clamping before normalising equals clamping after
    to those bounds. `scale`/`shift` broadcast against (B, 1, 1, 1); mean/std
    None is (0, 1). `out` may be xf itself.
    """
    c = xf.shape[1]
    mean = (0.0,) * c if mean is None else tuple(mean)
    std = (1.0,) * c if std is None else tuple(std)
    if len(mean) != c or len(std) != c:
        raise ValueError(f"normalize: {c} channels but mean/std have {len(mean)}/{len(std)} values")
    m, s, lo, hi = _stats(mean, std, xf.device, xf.dtype)
    torch.addcmul((shift - m) / s, xf, scale / s, out=out)
    if clamp:
        out.clamp_min_(lo).clamp_max_(hi)
    return out


def resize(xf: torch.Tensor, size: int) -> torch.Tensor:
    """Float (B, C, H, W) -> (B, C, size, size); antialiased when shrinking."""
    if xf.shape[-1] == size and xf.shape[-2] == size:
        return xf
    shrink = size < xf.shape[-1]
    return F.interpolate(xf, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def _output(xf: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return torch.empty_like(xf, memory_format=_layout(channels_last))


def eval_input(
    x: torch.Tensor,
    size: int,
    *,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float at the model's size, no randomness: in [0, 1], or normalised."""
    xf = resize(x.float(), size)
    own = xf is not x and xf.is_contiguous(memory_format=_layout(channels_last))  # a copy made here: write in place
    return scale_shift(xf, 1 / 255, 0.0, mean, std, clamp=False, out=xf if own else _output(xf, channels_last))
