"""Model builders: the five built-ins and any timm model, with pretrained
weights morphed to the data (channels, resolution, classes).

`build_model` returns an `nn.Module` carrying `model.info` (`ModelInfo`): the
input resolution, the normalisation of its weights, and the names of its stem
and its new classifier head, which training uses for the transfer-learning
modes. The head is always freshly initialised for `num_classes`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from search import morph, weights
from search.errors import SearchError
from search.pool import BUILTINS, PoolEntry, parse_entry

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCRATCH_MEAN, SCRATCH_STD = (0.5,), (0.25,)
SMALL_STEM_MAX = 32  # ResNet-18 switches to the 3x3 stride-1 stem at or below this size


@dataclass(frozen=True)
class ModelInfo:
    label: str
    resolution: int  # input size (square)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stem: str  # module name of the first conv (channel-reduced for gray input)
    head: tuple[str, ...]  # module names of the new classifier (trains at the base lr)
    pretrained: bool
    channel_reduce: str
    params: int


class MiniCNN(nn.Module):
    """3 conv blocks + global average pooling + dropout + linear (~95K parameters).

    Pools twice then adapts, so it runs at any size: 28 -> 14 -> 7 -> 1, 64 -> 32 -> 16 -> 1.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, dropout: float = 0.0):
        super().__init__()

        def block(i: int, o: int, pool: bool) -> list[nn.Module]:
            layers = [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
            return layers + ([nn.MaxPool2d(2)] if pool else [])

        self.features = nn.Sequential(*block(in_chans, 32, True), *block(32, 64, True), *block(64, 128, False))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(self.features(x)).flatten(1)))


def _dropout_linear(linear: nn.Linear, num_classes: int, p: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(p), nn.Linear(linear.in_features, num_classes))


def _resnet_18(num_classes: int, in_chans: int, res: int, p: float) -> tuple[nn.Module, str, tuple[str, ...]]:
    import torchvision.models as tvm

    m = tvm.resnet18()
    if res <= SMALL_STEM_MAX:  # keep the full resolution into stage 1
        m.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        m.maxpool = nn.Identity()
    elif in_chans != 3:
        m.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
    m.fc = _dropout_linear(m.fc, num_classes, p)
    return m, "conv1", ("fc",)


def _efficientnet_b0(num_classes: int, in_chans: int, res: int, p: float) -> tuple[nn.Module, str, tuple[str, ...]]:
    import torchvision.models as tvm

    m = tvm.efficientnet_b0(num_classes=num_classes, dropout=p)
    if in_chans != 3:
        m.features[0][0] = nn.Conv2d(in_chans, 32, 3, stride=2, padding=1, bias=False)
    return m, "features.0.0", ("classifier",)


def _convnext_tiny(num_classes: int, in_chans: int, res: int, p: float) -> tuple[nn.Module, str, tuple[str, ...]]:
    import torchvision.models as tvm

    m = tvm.convnext_tiny()
    if in_chans != 3:
        m.features[0][0] = nn.Conv2d(in_chans, 96, 4, stride=4)
    m.classifier[2] = _dropout_linear(m.classifier[2], num_classes, p)
    return m, "features.0.0", ("classifier.2",)


def _mini_cnn(num_classes: int, in_chans: int, res: int, p: float) -> tuple[nn.Module, str, tuple[str, ...]]:
    return MiniCNN(num_classes, in_chans, p), "features.0", ("fc",)


TORCHVISION_BUILDERS: dict[str, Callable[..., tuple[nn.Module, str, tuple[str, ...]]]] = {
    "mini_cnn": _mini_cnn,
    "resnet_18": _resnet_18,
    "efficientnet_b0": _efficientnet_b0,
    "convnext_tiny": _convnext_tiny,
}


def _timm_arch(entry: PoolEntry) -> str:
    return entry.timm_name.split(".")[0]


def _timm_default_resolution(entry: PoolEntry) -> int:
    import timm

    cfg = timm.models.get_pretrained_cfg(entry.timm_name) if entry.tag else None
    if cfg is None:
        cfg = timm.models.get_pretrained_cfg(_timm_arch(entry))
    return int(cfg.input_size[-1]) if cfg is not None else 224


def input_resolution(entry: PoolEntry, data_resolution: int | None) -> int:
    """The entry's input size: its override, else the builder's fixed size, else the data's."""
    if entry.resolution:
        return entry.resolution
    if entry.builtin:
        fixed = BUILTINS[entry.arch].resolution
        return fixed or data_resolution or 32
    return _timm_default_resolution(entry)


def _build_timm(entry: PoolEntry, num_classes: int, in_chans: int, res: int, p: float) -> tuple[nn.Module, str, tuple[str, ...], Any]:
    import timm

    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans, "drop_rate": p}
    try:  # models with fixed-size position embeddings take the input size
        m = timm.create_model(_timm_arch(entry), pretrained=False, img_size=res, **kwargs)
    except TypeError:
        m = timm.create_model(_timm_arch(entry), pretrained=False, **kwargs)
    cfg = m.pretrained_cfg
    if entry.tag:
        cfg = timm.models.get_pretrained_cfg(entry.timm_name).to_dict()
    head = cfg.get("classifier") or "head"
    head = (head,) if isinstance(head, str) else tuple(head)
    stem = cfg.get("first_conv") or ""
    stem = stem if isinstance(stem, str) else stem[0]
    return m, stem, head, cfg


def transfer(
    src: dict[str, torch.Tensor],
    model: nn.Module,
    *,
    stem: str,
    head: tuple[str, ...],
    in_chans: int,
    channel_reduce: str,
    small_stem: bool = False,
) -> None:
    """Load `src` (a published checkpoint) into `model`, morphing what differs.

    The stem is channel-reduced (and resized to 3x3 for ResNet's small stem),
    position embeddings are resampled to the model's grid, the head stays fresh.
    Any other difference is a bug and raises.
    """
    target = model.state_dict()
    in_head = lambda k: any(k == h or k.startswith(h + ".") for h in head)  # noqa: E731
    new, missing = {}, []
    for key, want in target.items():
        if in_head(key):
            continue
        if key not in src:
            missing.append(key)
            continue
        w = src[key]
        if key == f"{stem}.weight":
            w = morph.resnet_small_stem(w, in_chans, channel_reduce) if small_stem else morph.reduce_channels(w, in_chans, channel_reduce)
        elif key.endswith("pos_embed") and w.shape != want.shape:
            num_prefix = getattr(model, "num_prefix_tokens", 1) if not getattr(model, "no_embed_class", False) else 0
            grid = tuple(model.patch_embed.grid_size)
            w = morph.resize_pos_embed(w, grid, num_prefix)
        if w.shape != want.shape:
            raise RuntimeError(f"pretrained tensor {key} has shape {tuple(w.shape)}, model wants {tuple(want.shape)}")
        new[key] = w
    if missing:
        raise RuntimeError(f"checkpoint lacks {len(missing)} tensors of the model, e.g. {missing[:3]}")
    unexpected = [k for k in src if k not in target and not in_head(k)]
    if unexpected:
        log.warning("ignored %d checkpoint tensors not in the model: %s", len(unexpected), unexpected[:5])
    model.load_state_dict(new, strict=False)


def build_model(
    spec: Any,
    *,
    num_classes: int,
    in_chans: int,
    resolution: int | None = None,
    pretrained: bool | None = None,
    dropout: float = 0.0,
    channel_reduce: str = "mean",
) -> nn.Module:
    """Build a pool entry's model for the data; see the module docstring."""
    entry = spec if isinstance(spec, PoolEntry) else parse_entry(spec)
    if in_chans not in (1, 3):
        raise SearchError(f"{entry.label}: input must have 1 or 3 channels, got {in_chans}")
    if channel_reduce not in morph.REDUCTIONS:
        raise SearchError(f"channel_reduce '{channel_reduce}' is not one of {', '.join(morph.REDUCTIONS)}")
    if pretrained is None:
        pretrained = entry.pretrained
    if pretrained and not entry.pretrained:
        entry = parse_entry({"model": entry.model, "pretrained": True})
    res = resolution or input_resolution(entry, None)

    if entry.builtin and entry.arch != "vit_tiny":
        model, stem, head = TORCHVISION_BUILDERS[entry.arch](num_classes, in_chans, res, dropout)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if pretrained else (SCRATCH_MEAN * 3, SCRATCH_STD * 3)
    else:
        model, stem, head, cfg = _build_timm(entry, num_classes, in_chans, res, dropout)
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    if pretrained:
        small = entry.arch == "resnet_18" and res <= SMALL_STEM_MAX
        transfer(weights.source_state(entry), model, stem=stem, head=head, in_chans=in_chans,
                 channel_reduce=channel_reduce, small_stem=small)
    if in_chans == 1:  # gray input: the average of the RGB statistics
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    model.info = ModelInfo(
        label=entry.label, resolution=res, mean=tuple(mean[:in_chans]), std=tuple(std[:in_chans]),
        stem=stem, head=head, pretrained=bool(pretrained), channel_reduce=channel_reduce,
        params=sum(p.numel() for p in model.parameters()),
    )
    return model
