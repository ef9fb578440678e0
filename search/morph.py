"""Weight morphing: pure tensor -> tensor functions that adapt pretrained
weights to the data (channels, kernel size, resolution). Each checks shapes and
follows the model specification's formulas exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum")


def reduce_channels(w: torch.Tensor, in_chans: int, mode: str = "mean") -> torch.Tensor:
    """Conv weight (O, 3, kh, kw) -> (O, in_chans, kh, kw).

    For 1 channel: `mean` is the specification's W_gray = (1/3) sum_c W[:, c]
    (keeps the filter's spatial pattern); `sum` keeps the activation scale for a
    gray image replicated to RGB (what timm does). 3 channels pass through.
    """
    if w.ndim != 4:
        raise ValueError(f"expected a conv weight (O, I, kh, kw), got shape {tuple(w.shape)}")
    if mode not in REDUCTIONS:
        raise ValueError(f"channel reduction must be one of {REDUCTIONS}, got {mode!r}")
    if in_chans == w.shape[1]:
        return w
    if w.shape[1] != 3 or in_chans != 1:
        raise ValueError(f"can reduce 3 input channels to 1, not {w.shape[1]} to {in_chans}")
    return w.mean(dim=1, keepdim=True) if mode == "mean" else w.sum(dim=1, keepdim=True)


def resize_kernel(w: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Conv weight (O, I, kh, kw) -> (O, I, *size) by bicubic interpolation."""
    if w.ndim != 4:
        raise ValueError(f"expected a conv weight (O, I, kh, kw), got shape {tuple(w.shape)}")
    if tuple(w.shape[-2:]) == tuple(size):
        return w
    out = F.interpolate(w.float(), size=size, mode="bicubic", align_corners=False)
    return out.to(w.dtype)


def resnet_small_stem(w: torch.Tensor, in_chans: int, mode: str = "mean") -> torch.Tensor:
    """ResNet-18 <= 32 px stem: channel reduce first, then 7x7 -> 3x3 bicubic."""
    if tuple(w.shape[-2:]) != (7, 7):
        raise ValueError(f"expected 7x7 stem kernels, got {tuple(w.shape[-2:])}")
    return resize_kernel(reduce_channels(w, in_chans, mode), (3, 3))


def resize_pos_embed(pos: torch.Tensor, new_grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """ViT position embeddings (1, prefix + H*W, D) -> (1, prefix + h*w, D).

    The prefix tokens (class/register) keep their embeddings; the patch grid is
    resampled bicubically, as timm and DeiT do when fine-tuning at a new size.
    """
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise ValueError(f"expected position embeddings (1, N, D), got {tuple(pos.shape)}")
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"{grid.shape[1]} patch embeddings do not form a square grid")
    if (old, old) == tuple(new_grid):
        return pos
    d = grid.shape[-1]
    img = grid.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=new_grid, mode="bicubic", align_corners=False)
    grid = img.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)
