"""Model building: the built-ins (search.builtins) and any timm model, with pretrained
weights morphed to the data (channels, resolution, classes).

`build_model` returns an `nn.Module` carrying `model.info` (`ModelInfo`): the
input resolution, the normalisation of its weights, and the names of its stem
and its new classifier head, which training uses for the transfer-learning
modes. The head is always freshly initialised for `num_classes`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from search import morph, weights
from search.builtins import BUILTINS
from search.errors import SearchError
from search.pool import PoolEntry, parse_entry

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCRATCH_MEAN, SCRATCH_STD = (0.5,), (0.25,)


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


def _timm_arch(entry: PoolEntry) -> str:
    return entry.timm_name.split(".")[0]


def _pretrained_cfg(entry: PoolEntry) -> Any:
    """timm's pretrained config of the entry's weights: its tag's, else the architecture's default."""
    import timm

    cfg = timm.models.get_pretrained_cfg(entry.timm_name) if entry.tag else None
    return cfg or timm.models.get_pretrained_cfg(_timm_arch(entry))


def _timm_default_resolution(entry: PoolEntry) -> int:
    cfg = _pretrained_cfg(entry)
    return int(cfg.input_size[-1]) if cfg is not None else 224


def input_resolution(entry: PoolEntry, data_resolution: int | None) -> int:
    """The entry's input size: its override, else the builder's fixed size, else the data's."""
    if entry.resolution:
        return entry.resolution
    if entry.builtin:
        fixed = BUILTINS[entry.arch].resolution
        return fixed or data_resolution or 32
    return _timm_default_resolution(entry)


def _build_timm(
    entry: PoolEntry, num_classes: int, in_chans: int, res: int, p: float
) -> tuple[nn.Module, str, tuple[str, ...], Any]:
    import timm

    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans, "drop_rate": p}
    pretrained_cfg = _pretrained_cfg(entry)
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        # Position embeddings or attention windows are sized by the input: timm's builders of such
        # models take img_size (and timm passes it to every fixed_input_size model itself).
        kwargs["img_size"] = res
    m = timm.create_model(_timm_arch(entry), pretrained=False, **kwargs)
    cfg: dict[str, Any] = m.pretrained_cfg  # type: ignore[assignment]  # a dict timm sets on its models
    if entry.tag:
        cfg = pretrained_cfg.to_dict()  # the tag's own
    head = cfg.get("classifier") or "head"
    head = (head,) if isinstance(head, str) else tuple(head)
    stem = cfg.get("first_conv") or ""
    stem = stem if isinstance(stem, str) else stem[0]
    return m, stem, head, cfg


def _timm_filter(model: nn.Module) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
    """timm's checkpoint filter of the model's family, bound to the model, or None where it has none.

    timm adapts a checkpoint to a model built at another size with the `checkpoint_filter_fn`
    of the model's module (what `create_model(pretrained=True)` applies); it has no public
    registry of them, so the function is looked up in the module that defines the class.
    """
    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return None
    return lambda state: fn(dict(state), model)


def transfer(
    src: dict[str, torch.Tensor],
    model: nn.Module,
    *,
    stem: str,
    head: tuple[str, ...],
    in_chans: int,
    channel_reduce: str,
    small_stem: bool = False,
    adapt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Load `src` (a published checkpoint) into `model`, morphing what differs.

    The stem is channel-reduced (and resized to 3x3 for ResNet's small stem),
    position embeddings are resampled to the model's grid, the head stays fresh.
    Other tensors that a new input size changes (Swin's relative position tables)
    come from `adapt`, the model family's own checkpoint filter, where it makes
    them fit. Any other difference is a bug and raises.
    """
    target = model.state_dict()
    in_head = lambda k: any(k == h or k.startswith(h + ".") for h in head)  # noqa: E731
    new, missing = {}, []
    adapted: dict[str, torch.Tensor] | None = None
    for key, want in target.items():
        if in_head(key):
            continue
        if key not in src:
            missing.append(key)
            continue
        w = src[key]
        if key == f"{stem}.weight":
            # A file trained at a small size already has the 3x3 stem (an own weights file): reduced only.
            w = (
                morph.resnet_small_stem(w, in_chans, channel_reduce)
                if small_stem and tuple(w.shape[-2:]) == (7, 7)
                else morph.reduce_channels(w, in_chans, channel_reduce)
            )
        elif key.endswith("pos_embed") and w.shape != want.shape:
            num_prefix = getattr(model, "num_prefix_tokens", 1) if not getattr(model, "no_embed_class", False) else 0
            patch_embed: Any = model.patch_embed  # timm's PatchEmbed
            grid = tuple(patch_embed.grid_size)
            w = morph.resize_pos_embed(w, grid, num_prefix)
        elif w.shape != want.shape and adapt is not None:
            adapted = adapt(src) if adapted is None else adapted  # once, and only when something differs
            w = adapted.get(key, w)
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

    builtin = BUILTINS[entry.arch] if entry.builtin else None
    adapt = None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    if builtin is not None and builtin.build is not None:
        model, stem, head = builtin.build(num_classes, in_chans, res, dropout)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if pretrained else (SCRATCH_MEAN * 3, SCRATCH_STD * 3)
    else:
        model, stem, head, cfg = _build_timm(entry, num_classes, in_chans, res, dropout)
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        adapt = _timm_filter(model)
    if pretrained:
        small = builtin is not None and builtin.small_stem is not None and res <= builtin.small_stem
        transfer(
            weights.source_state(entry),
            model,
            stem=stem,
            head=head,
            in_chans=in_chans,
            channel_reduce=channel_reduce,
            small_stem=small,
            adapt=adapt,
        )
    if in_chans == 1:  # gray input: the average of the RGB statistics
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    model.info = ModelInfo(  # type: ignore[assignment]  # a plain attribute; Module's typing expects tensors
        label=entry.label,
        resolution=res,
        mean=tuple(mean[:in_chans]),
        std=tuple(std[:in_chans]),
        stem=stem,
        head=head,
        pretrained=bool(pretrained),
        channel_reduce=channel_reduce,
        params=sum(p.numel() for p in model.parameters()),
    )
    return model


def info_of(model: nn.Module) -> ModelInfo:
    """`model.info` as set by build_model (typed: nn.Module's own attribute lookup says Tensor | Module)."""
    return cast(ModelInfo, model.info)
