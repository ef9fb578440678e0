"""The built-in architectures: one record each, which pool parsing, model building and weight
loading all read.

A record names its builder (or the timm architecture that builds it), its published
weights (tag -> source, and the torchvision weight enum member where torchvision hosts
them), its fixed input size if it has one, and the stem rule of ResNet's small inputs.
Registering a name twice raises; `tests/test_builtins.py` checks every record against
the libraries (enum members exist, parameter counts match the published weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

# (num_classes, in_chans, input size, dropout) -> (model, stem module name, head module names)
Builder = Callable[[int, int, int, float], tuple[nn.Module, str, tuple[str, ...]]]

SMALL_STEM_MAX = 32  # ResNet-18 switches to the 3x3 stride-1 stem at or below this size


@dataclass(frozen=True)
class Weights:
    """One published set of a built-in's weights."""

    source: str  # one of pool.SOURCES
    torchvision: str | None = None  # the weight enum member, e.g. 'ResNet18_Weights.IMAGENET1K_V1'; None: timm's


@dataclass(frozen=True)
class Builtin:
    """What a built-in architecture is: how it is built, its weights and its input size."""

    default_tag: str | None  # None: scratch only
    weights: dict[str, Weights] = field(default_factory=dict)  # tag -> weights
    resolution: int | None = None  # fixed input size; None: follows the data's resolution
    build: Builder | None = None  # None: timm builds `timm`
    timm: str | None = None  # the timm architecture of a timm-built built-in
    small_stem: int | None = None  # inputs at or below this size get a 3x3 stride-1 stem, kernels resized
    note: str = ""

    def __post_init__(self) -> None:
        if (self.build is None) == (self.timm is None):
            raise ValueError(
                f"a built-in is built by its builder or by timm, got build={self.build} and timm={self.timm!r}"
            )
        if self.default_tag is not None and self.default_tag not in self.weights:
            raise ValueError(
                f"expected the default tag among the weights {list(self.weights)}, got '{self.default_tag}'"
            )
        if self.timm and any(w.torchvision for w in self.weights.values()):
            raise ValueError(f"timm-built '{self.timm}' cannot load torchvision weights")


BUILTINS: dict[str, Builtin] = {}


def register(name: str, builtin: Builtin) -> Builtin:
    """Add a built-in; a name is registered once."""
    if name in BUILTINS:
        raise ValueError(f"built-in '{name}' is registered already; pick another name")
    BUILTINS[name] = builtin
    return builtin


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


def _mini_cnn(num_classes: int, in_chans: int, res: int, p: float) -> tuple[nn.Module, str, tuple[str, ...]]:
    return MiniCNN(num_classes, in_chans, p), "features.0", ("fc",)


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


register("mini_cnn", Builtin(None, build=_mini_cnn, note="3 conv blocks + global pooling, trained from scratch"))
register(
    "resnet_18",
    Builtin(
        "tv_in1k",
        {"tv_in1k": Weights("in1k", "ResNet18_Weights.IMAGENET1K_V1")},
        build=_resnet_18,
        small_stem=SMALL_STEM_MAX,
        note="3x3 stride-1 stem without max-pool at <= 32 px",
    ),
)
register(
    "efficientnet_b0",
    Builtin(
        "tv_in1k", {"tv_in1k": Weights("in1k", "EfficientNet_B0_Weights.IMAGENET1K_V1")}, 224, build=_efficientnet_b0
    ),
)
register(
    "convnext_tiny",
    Builtin("tv_in1k", {"tv_in1k": Weights("in1k", "ConvNeXt_Tiny_Weights.IMAGENET1K_V1")}, 224, build=_convnext_tiny),
)
register(
    "vit_tiny",
    Builtin(
        "augreg_in21k_ft_in1k",
        {"augreg_in21k_ft_in1k": Weights("in21k_ft_in1k"), "augreg_in21k": Weights("in21k")},
        224,
        timm="vit_tiny_patch16_224",
        note="timm has no ImageNet-1k-only ViT-Tiny: the bare name is augreg_in21k_ft_in1k",
    ),
)
