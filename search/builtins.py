"""The built-in architectures' constructors: torch modules built for the data's classes, channels
and input size. What each built-in is (weights, sources, input size, the timm architecture of a
timm-built one) is plain data in `search.archs`; a built-in without a timm architecture is built
here, by its entry in BUILDERS.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from search.archs import SMALL_STEM_MAX

# (num_classes, in_chans, input size, dropout) -> (model, stem module name, head module names)
Builder = Callable[[int, int, int, float], tuple[nn.Module, str, tuple[str, ...]]]


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


# The constructor of every built-in that timm does not build (search.archs: `Builtin.timm` is None).
BUILDERS: dict[str, Builder] = {
    "mini_cnn": _mini_cnn,
    "resnet_18": _resnet_18,
    "efficientnet_b0": _efficientnet_b0,
    "convnext_tiny": _convnext_tiny,
}
