"""Batched augmentation: what it must keep (order, labels, range, shapes, seeds) and what it must change."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from search import augment as augment_module
from search.augment import (
    augment,
    eval_input,
    sampling_grid,
    scale_shift,
    shift_flip,
    shrink_size,
)
from search.datasets import AugmentCfg


def normalize(xf: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The formula: (x - mean) / std per channel."""
    return (xf - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


CFGS = {
    "pad": AugmentCfg(crop="pad", flip=True),
    "pad_rotate_jitter": AugmentCfg(crop="pad", flip=True, rotate=15, jitter=0.3),
    "resized": AugmentCfg(crop="resized", flip=True, rotate=10, jitter=0.2),
    "none": AugmentCfg(crop="none", flip=False),
}


def images(n: int = 16, c: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CFGS)
@pytest.mark.parametrize("c, size, out", [(3, 32, 32), (1, 28, 64), (3, 40, 24)])
def test_shapes_range_and_seeded_determinism(name, c, size, out):
    x = images(c=c, size=size)
    a = augment(x, CFGS[name], out, torch.Generator().manual_seed(1))
    b = augment(x, CFGS[name], out, torch.Generator().manual_seed(1))
    assert a.shape == (16, c, out, out) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)
    if name != "none":
        assert not torch.equal(a, augment(x, CFGS[name], out, torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("name", CFGS)
def test_cpu_slices_give_the_batch_result(name, monkeypatch):
    # Every random draw is made for the whole batch first: slicing the pixel work changes nothing.
    x = images(n=10, size=40)
    whole = augment(x, CFGS[name], 24, torch.Generator().manual_seed(5), mean=(0.4,) * 3, std=(0.2,) * 3)
    monkeypatch.setattr(augment_module, "CPU_CHUNK_BYTES", 3 * 4 * (3 * 40 * 40 + 2 * 24 * 24 + 3 * 24 * 24))
    assert augment_module.chunk_size(10, 3, 40, 24, torch.device("cpu")) == 3  # slices of 3, 3, 3, 1
    sliced = augment(x, CFGS[name], 24, torch.Generator().manual_seed(5), mean=(0.4,) * 3, std=(0.2,) * 3)
    assert torch.equal(whole, sliced)
    assert augment_module.chunk_size(10, 3, 40, 24, torch.device("cuda")) == 10  # one pass on a GPU


@pytest.mark.parametrize("name", ["pad", "pad_rotate_jitter", "resized"])
def test_two_epochs_see_different_crops(name):
    x = images()
    gen = torch.Generator().manual_seed(0)
    first, second = augment(x, CFGS[name], 32, gen), augment(x, CFGS[name], 32, gen)
    differs = (first - second).abs().flatten(1).amax(1) > 0
    assert differs.float().mean() > 0.8


def test_sample_order_and_so_labels_are_kept():
    # Constant images whose value encodes the label: the centre pixel survives any crop, flip, small rotation.
    labels = torch.arange(10)
    x = (labels * 25).to(torch.uint8).view(10, 1, 1, 1).expand(10, 3, 32, 32).contiguous()
    for cfg in CFGS.values():
        out = augment(x, AugmentCfg(cfg.crop, cfg.flip, cfg.rotate, 0.0), 32, torch.Generator().manual_seed(0))
        centre = (out[:, 0, 16, 16] * 255).round().long()
        assert centre.tolist() == (labels * 25).tolist()


def test_pad_crop_is_an_exact_integer_shift():
    x = images(n=6, size=16)
    cfg = AugmentCfg(crop="pad", flip=False, pad_fraction=0.125)  # pad 2
    out = shift_flip(x, 2, cfg, torch.Generator().manual_seed(3))
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(6):
        windows = [padded[i, :, dy : dy + 16, dx : dx + 16] for dy, dx in itertools.product(range(5), range(5))]
        assert any(torch.equal(out[i], w) for w in windows)
    # And through augment: the same pixels, scaled to [0, 1].
    a = augment(x, cfg, 16, torch.Generator().manual_seed(3))
    assert torch.equal(a, out.float() / 255) or torch.allclose(a, out.float() / 255, atol=1e-7)


def test_flip_mirrors_about_half_the_batch():
    x = images(n=64, size=8)
    out = shift_flip(x, 0, AugmentCfg(crop="none", flip=True), torch.Generator().manual_seed(0))
    same = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 16 < sum(mirrored) < 48


def test_no_flip_when_switched_off():
    x = images(n=32, size=8)
    out = augment(x, AugmentCfg(crop="none", flip=False), 8)
    assert torch.allclose(out, x.float() / 255, atol=1e-7, rtol=0)


def test_jitter_is_brightness_times_value_on_flat_images():
    # On a constant image contrast has no effect: the output is brightness * value, brightness in [1-j, 1+j].
    x = torch.full((200, 1, 4, 4), 100, dtype=torch.uint8)
    out = augment(x, AugmentCfg(crop="none", flip=False, jitter=0.4), 4, torch.Generator().manual_seed(0))
    factor = out * 255 / 100
    assert torch.allclose(factor, factor[:, :, :1, :1].expand_as(factor), atol=1e-5)  # one factor per image
    assert 0.6 - 1e-5 <= factor.min() < 0.7 and 1.3 < factor.max() <= 1.4 + 1e-5


def test_strong_downscale_is_antialiased():
    # Noise at 128 px into a 16 px model: a filtered shrink averages it out, point sampling would keep it.
    x = images(n=8, size=128)
    cfg = AugmentCfg(crop="resized", flip=False, min_scale=1.0, rotate=1e-3)
    out = augment(x, cfg, 16, torch.Generator().manual_seed(0))
    assert out.std() < 0.1  # uniform noise has std 0.29; bilinear point sampling leaves about 0.2
    assert abs(out.mean() - 0.5) < 0.02


def test_shrink_keeps_the_detail_of_the_smallest_crop():
    # Shifted crops: down to 2x the output. Resized crops: never below size / (smallest side), where the
    # smallest side is sqrt(min_scale * 3/4) (area min_scale at aspect ratio 3/4).
    assert shrink_size(AugmentCfg(crop="pad"), 16) == 32
    assert shrink_size(AugmentCfg(crop="resized", min_scale=0.35), 112) == max(
        224, math.ceil(112 / math.sqrt(0.35 * 0.75))
    )
    assert shrink_size(AugmentCfg(crop="resized", min_scale=0.025), 112) == math.ceil(112 / math.sqrt(0.025 * 0.75))
    assert shrink_size(AugmentCfg(crop="resized", min_scale=0.0), 112) > 10**7  # no shrink at all


def test_sampling_grid_matches_affine_grid():
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    for size in (7, 32):
        want = F.affine_grid(theta, [5, 3, size, size], align_corners=False)
        assert torch.allclose(sampling_grid(theta, size), want, atol=1e-6)


def test_scale_shift_formula_and_memory_format():
    x = torch.rand(2, 3, 5, 5)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    out = scale_shift(x, 1.0, 0.0, mean, std, clamp=False, out=torch.empty_like(x, memory_format=torch.channels_last))
    want = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(out, want, atol=1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last)
    scaled = scale_shift(x * 255, 1 / 255, 0.1, mean, std, clamp=False, out=torch.empty_like(x))
    assert scaled.is_contiguous() and torch.allclose(scaled, normalize(x + 0.1, mean, std), atol=1e-5)
    with pytest.raises(ValueError, match="3 channels but mean/std have 1/1"):
        scale_shift(x, 1.0, 0.0, (0.5,), (0.5,), clamp=False, out=torch.empty_like(x))


@pytest.mark.parametrize("name", CFGS)
def test_normalising_in_augment_equals_normalize_after(name):
    # One multiply-add (and clamp) for jitter, 1/255 and mean/std == augment to [0, 1], then normalize.
    x = images(size=24)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    fused = augment(x, CFGS[name], 32, torch.Generator().manual_seed(4), mean=mean, std=std, channels_last=True)
    want = normalize(augment(x, CFGS[name], 32, torch.Generator().manual_seed(4)), mean, std)
    assert fused.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(fused, want, atol=1e-5, rtol=0)


def test_jitter_clamps_before_normalising():
    # A bright flat image pushed past 1 by the brightness factor is clamped to (1 - mean) / std, not beyond.
    x = torch.full((64, 3, 4, 4), 250, dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.5, 2.0)
    out = augment(
        x, AugmentCfg(crop="none", flip=False, jitter=0.5), 4, torch.Generator().manual_seed(0), mean=mean, std=std
    )
    hi = (1 - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(out.amax(dim=(0, 2, 3)), hi, atol=1e-6)  # some images saturate ...
    assert (out.amin(dim=(2, 3)) < hi - 0.1).any()  # ... and darker ones do not


def test_eval_input_is_deterministic_and_resized():
    x = images(n=4, size=28)
    a = eval_input(x, 32)
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, eval_input(x, 32))
    assert torch.equal(eval_input(x, 28), x.float() / 255) or torch.allclose(eval_input(x, 28), x.float() / 255)
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.5, 2.0)
    assert torch.allclose(eval_input(x, 32, mean=mean, std=std), normalize(a, mean, std), atol=1e-6)


def test_scaled_strength():
    cfg = AugmentCfg(crop="resized", flip=True, rotate=20, jitter=0.4, min_scale=0.5)
    zero = cfg.scaled(0)
    assert (zero.rotate, zero.jitter, zero.pad_fraction, zero.min_scale) == (0, 0, 0, 1)
    assert cfg.scaled(1) == cfg
    assert cfg.scaled(2).rotate == 40 and cfg.scaled(2).min_scale == 0.0


def test_inputs_are_never_written():
    # The value pass works in place on the float copy it makes, never on a caller's float tensor.
    x = images(size=32).float()
    before = x.clone()
    augment(x, CFGS["none"], 32, mean=(0.5,) * 3, std=(0.25,) * 3)
    eval_input(x, 32, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert torch.equal(x, before)
