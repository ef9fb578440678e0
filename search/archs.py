"""The built-in architectures as data: one record each, which pool parsing, model building and
weight loading all read, and a recipe is checked against without torch.

A record names its published weights (tag -> source, and the torchvision weight enum member
where torchvision hosts them), its fixed input size if it has one, the stem rule of ResNet's
small inputs, and the timm architecture of a timm-built built-in; the others are built by their
constructor in `search.builtins`. Registering a name twice raises; `tests/test_builtins.py`
checks every record against the libraries (enum members exist, parameter counts match the
published weights, a constructor for each built-in that timm does not build).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SMALL_STEM_MAX = 32  # ResNet-18 switches to the 3x3 stride-1 stem at or below this size


@dataclass(frozen=True)
class Weights:
    """One published set of a built-in's weights."""

    source: str  # one of pool.SOURCES
    torchvision: str | None = None  # the weight enum member, e.g. 'ResNet18_Weights.IMAGENET1K_V1'; None: timm's


@dataclass(frozen=True)
class Builtin:
    """What a built-in architecture is: its weights, its input size and who builds it."""

    default_tag: str | None  # None: scratch only
    weights: dict[str, Weights] = field(default_factory=dict)  # tag -> weights
    resolution: int | None = None  # fixed input size; None: follows the data's resolution
    timm: str | None = None  # the timm architecture of a timm-built built-in; None: search.builtins builds it
    small_stem: int | None = None  # inputs at or below this size get a 3x3 stride-1 stem, kernels resized
    note: str = ""

    def __post_init__(self) -> None:
        if self.default_tag is not None and self.default_tag not in self.weights:
            raise ValueError(
                f"expected the default tag among the weights {list(self.weights)}, got '{self.default_tag}'"
            )
        if self.timm and any(w.torchvision for w in self.weights.values()):
            raise ValueError(f"timm-built '{self.timm}' cannot load torchvision weights")
        if self.timm and self.small_stem is not None:
            raise ValueError(f"timm-built '{self.timm}' keeps timm's stem; small_stem needs a constructor")


BUILTINS: dict[str, Builtin] = {}


def register(name: str, builtin: Builtin) -> Builtin:
    """Add a built-in; a name is registered once."""
    if name in BUILTINS:
        raise ValueError(f"built-in '{name}' is registered already; pick another name")
    BUILTINS[name] = builtin
    return builtin


register("mini_cnn", Builtin(None, note="3 conv blocks + global pooling, trained from scratch"))
register(
    "resnet_18",
    Builtin(
        "tv_in1k",
        {"tv_in1k": Weights("in1k", "ResNet18_Weights.IMAGENET1K_V1")},
        small_stem=SMALL_STEM_MAX,
        note="3x3 stride-1 stem without max-pool at <= 32 px",
    ),
)
register(
    "efficientnet_b0", Builtin("tv_in1k", {"tv_in1k": Weights("in1k", "EfficientNet_B0_Weights.IMAGENET1K_V1")}, 224)
)
register("convnext_tiny", Builtin("tv_in1k", {"tv_in1k": Weights("in1k", "ConvNeXt_Tiny_Weights.IMAGENET1K_V1")}, 224))
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
