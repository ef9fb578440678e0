"""Batched, on-device augmentation and input preparation.

A training batch (uint8, on the training device) gets one random affine
transform per sample -- crop offset (zero-padded crop) or scale/aspect/offset
(random resized crop), horizontal flip, small rotation -- applied in a single
`grid_sample` that also resamples to the model's input size. Then brightness and
contrast jitter, normalisation with the weights' mean/std, and `channels_last`.
No per-sample Python, no PIL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentCfg:
    crop: str = "pad"  # 'pad': shift by up to 1/8 of the size (zero fill); 'resized': scale 0.35-1; 'none'
    flip: bool = True
    rotate: float = 0.0  # max degrees either way
    jitter: float = 0.0  # brightness/contrast strength (0.2 = +-20 %)
    pad_fraction: float = 0.125
    min_scale: float = 0.35  # random resized crop: smallest area fraction

    def scaled(self, s: float) -> AugmentCfg:
        """The same switches at strength `s` (1 = as configured)."""
        return AugmentCfg(
            self.crop, self.flip, self.rotate * s, min(self.jitter * s, 1.0),
            self.pad_fraction * s, 1 - (1 - self.min_scale) * min(s, 1 / (1 - self.min_scale)),
        )


def _affine(n: int, cfg: AugmentCfg, in_size: int, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(n, 2, 3) matrices mapping output to input coordinates (normalised to [-1, 1])."""
    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, device=device)

    sx = torch.ones(n, device=device)
    sy = torch.ones(n, device=device)
    tx = torch.zeros(n, device=device)
    ty = torch.zeros(n, device=device)
    if cfg.crop == "pad":
        # Integer pixel shifts in [-pad, pad] like a zero-padded random crop.
        pad = max(1, round(cfg.pad_fraction * in_size)) if cfg.pad_fraction > 0 else 0
        if pad:
            shift = torch.randint(-pad, pad + 1, (2, n), generator=gen, device=device).float()
            tx, ty = shift * (2.0 / in_size)
    elif cfg.crop == "resized":
        area = cfg.min_scale + (1 - cfg.min_scale) * rand(n)
        log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rand(n)
        ratio = torch.exp(log_r)
        sx = torch.sqrt(area * ratio).clamp(max=1.0)
        sy = torch.sqrt(area / ratio).clamp(max=1.0)
        tx = (1 - sx) * (2 * rand(n) - 1)
        ty = (1 - sy) * (2 * rand(n) - 1)
    if cfg.flip:
        sx = sx * torch.where(rand(n) < 0.5, -1.0, 1.0)
    angle = (2 * rand(n) - 1) * math.radians(cfg.rotate) if cfg.rotate else torch.zeros(n, device=device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([sx * cos, -sy * sin, tx], dim=1),
        torch.stack([sx * sin, sy * cos, ty], dim=1),
    ], dim=1)
    return theta


def augment(x: torch.Tensor, cfg: AugmentCfg, size: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float (B, C, size, size) in [0, 1], randomly augmented."""
    xf = x.float().div_(255)
    n = xf.shape[0]
    if cfg.crop != "none" or cfg.flip or cfg.rotate:
        theta = _affine(n, cfg, xf.shape[-1], gen, xf.device)
        grid = F.affine_grid(theta, [n, xf.shape[1], size, size], align_corners=False)
        xf = F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    elif xf.shape[-1] != size:
        xf = resize(xf, size)
    if cfg.jitter:
        b = 1 + cfg.jitter * (2 * torch.rand(n, 1, 1, 1, generator=gen, device=xf.device) - 1)
        c = 1 + cfg.jitter * (2 * torch.rand(n, 1, 1, 1, generator=gen, device=xf.device) - 1)
        mean = xf.mean(dim=(1, 2, 3), keepdim=True)
        xf = ((xf - mean) * c + mean * b).clamp_(0, 1)
    return xf


def resize(xf: torch.Tensor, size: int) -> torch.Tensor:
    """Float (B, C, H, W) -> (B, C, size, size); antialiased when shrinking."""
    if xf.shape[-1] == size and xf.shape[-2] == size:
        return xf
    shrink = size < xf.shape[-1]
    return F.interpolate(xf, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def normalize(xf: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], channels_last: bool) -> torch.Tensor:
    m = torch.tensor(mean, device=xf.device, dtype=xf.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=xf.device, dtype=xf.dtype).view(1, -1, 1, 1)
    out = (xf - m) / s
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def eval_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [0, 1] at the model's size, no randomness."""
    return resize(x.float().div_(255), size)
