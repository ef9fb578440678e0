"""Pool entries: parse what a recipe writes, give each a stable label, a weight
source and an ImageNet-overlap class.

    resnet_18                                   built-in, torchvision ImageNet-1k weights
    {model: resnet_18, pretrained: false}       built-in from scratch (label resnet_18-scratch)
    vit_tiny.augreg_in21k                       built-in with one of its weight variants
    timm/convnext_tiny.fb_in22k                 any timm model with its pretrained tag
    {model: timm/vit_small_patch14_dinov2.lvd142m, resolution: 224}
    {model: resnet_18, weights: ssl.safetensors, source: ssl}   your own weights file (label resnet_18+ssl)

The source/overlap table follows the model specification: supervised
ImageNet-1k overlaps fully, ImageNet-21k partially (superset labels), SSL/SWSL
pretraining followed by an ImageNet-1k fine-tune is low, CLIP and DINOv2 none,
and scratch none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from search.builtins import BUILTINS
from search.errors import SearchError, did_you_mean, one_of
from search.section import Section

SOURCES = ("in1k", "in21k", "in21k_ft_in1k", "ssl", "swsl", "clip", "dinov2", "none")
OVERLAPS = ("full", "partial", "low", "none")
IMAGENET_SOURCES = ("in1k", "in21k", "in21k_ft_in1k")  # supervised on ImageNet labels


# Overlap with ImageNet implied by each source.
OVERLAP_OF = {
    "in1k": "full",
    "in21k": "partial",
    "in21k_ft_in1k": "full",
    "ssl": "low",
    "swsl": "low",
    "clip": "none",
    "dinov2": "none",
    "none": "none",
}


MAX_RESOLUTION = 1024  # px, as search.data.MAX_RESOLUTION (a test holds them equal)


class PoolEntryCfg(Section):
    """A pool entry written as a mapping (the recipe's `pool` section; a string entry is the name alone)."""

    model: str
    pretrained: bool | None = None  # None: the builder's default
    # Bounded as data.resolution (search.data.MAX_RESOLUTION, a layer above): an entry's input
    # size sets the memory of every batch it trains on.
    resolution: int | None = Field(None, ge=8, le=MAX_RESOLUTION)
    label: str | None = None
    source: str | None = None  # weight source, for timm tags the classifier does not know
    weights: str | None = None  # a local weights file (.safetensors, .pt, .pth, .bin) instead of published ones


@dataclass(frozen=True)
class PoolEntry:
    label: str  # the categorical choice stored in the study
    model: str  # as written, without the tag: 'resnet_18' or 'timm/convnext_tiny'
    arch: str  # built-in name or timm architecture
    tag: str | None  # weight tag (None: scratch)
    builtin: bool
    pretrained: bool
    source: str  # one of SOURCES
    overlap: str  # one of OVERLAPS
    resolution: int | None  # input size override; None: the builder decides
    weights: str | None = None  # a local weights file in place of the published ones (`own_weights`)

    @property
    def timm_name(self) -> str:
        """'arch.tag' for timm (a timm-built built-in maps to its timm architecture)."""
        arch = (BUILTINS[self.arch].timm if self.builtin else None) or self.arch
        return f"{arch}.{self.tag}" if self.tag else arch

    def attrs(self) -> dict[str, Any]:
        """What every trial records about its entry."""
        return {
            "pool_label": self.label,
            "arch": self.arch,
            "tag": self.tag or "",
            "weight_source": self.source,
            "imagenet_overlap": self.overlap,
            **({"weights_file": self.weights} if self.weights else {}),
        }


def check_timm_name(entry: PoolEntry) -> None:
    """The architecture and tag exist in timm's registry (else a close-match error)."""
    import timm

    arch = entry.timm_name.split(".")[0]
    if arch not in timm.list_models():
        raise SearchError(f"'{entry.model}': timm has no model '{arch}'{did_you_mean(arch, timm.list_models())}")
    if entry.tag and entry.timm_name not in timm.list_pretrained(f"{arch}.*"):
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        raise SearchError(
            f"'{entry.model}.{entry.tag}': timm has no weights '{entry.tag}' for {arch}"
            f"{did_you_mean(entry.tag, tags)}; available: {', '.join(tags) or 'none'}"
        )


def _timm_tags(arch: str) -> list[str]:
    import timm

    return [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]


def classify_tag(arch: str, tag: str | None) -> tuple[str, str]:
    """(weight source, ImageNet overlap) of a timm `arch.tag`.

    Raises SearchError for tags whose pretraining data is not recognised, so a
    trial is never mislabelled; such entries can state `source:` themselves.
    """
    if not tag:
        return "none", "none"
    t, a = tag.lower(), arch.lower()
    if "dinov2" in a or "lvd142m" in t or "dinov3" in t:  # DINO self-supervision on curated LVD data
        src = "dinov2"
    elif (
        "clip" in a or "siglip" in a or any(k in t for k in ("openai", "laion", "datacomp", "metaclip", "dfn", "webli"))
    ):
        src = "clip"
    elif "swsl" in t or "wsl" in t:
        src = "swsl"
    elif "ssl" in t or any(k in t for k in ("mae", "dino", "mim_", "beit", "ibot")):
        src = "ssl"
    elif any(k in t for k in ("in22k", "in21k", "in12k")):
        src = "in21k_ft_in1k" if "in1k" in t else "in21k"  # pretrained on 21k, then tuned on 1k
    elif "in1k" in t:
        src = "in1k"
    else:
        raise SearchError(
            f"cannot tell the weight source of '{arch}.{tag}'; write the entry as a mapping "
            f"with source: one of {one_of(SOURCES)}"
        )
    overlap = OVERLAP_OF[src]
    if src == "clip" and ("in1k" in t or "in12k" in t or "in22k" in t):
        overlap = "low"  # contrastive pretraining, then an ImageNet fine-tune
    return src, overlap


def _split(model: str) -> tuple[str, str, str | None, bool]:
    """'timm/convnext_tiny.fb_in22k' -> (model, arch, tag, is_builtin)."""
    if model.startswith("timm/"):
        name = model[len("timm/") :]
        arch, _, tag = name.partition(".")
        if not arch:
            raise SearchError(f"'{model}': expected timm/<architecture>[.<tag>]")
        return f"timm/{arch}", arch, tag or None, False
    arch, _, tag = model.partition(".")
    if arch not in BUILTINS:
        raise SearchError(
            f"unknown model '{model}'{did_you_mean(arch, BUILTINS)}; built-ins: {one_of(BUILTINS)}, "
            "or any timm model as timm/<name>"
        )
    return arch, arch, tag or None, True


def parse_entry(spec: Any) -> PoolEntry:
    """A recipe's pool entry (string or mapping) -> PoolEntry."""
    if hasattr(spec, "model_dump"):
        spec = {k: v for k, v in spec.model_dump().items() if v is not None}
    if isinstance(spec, str):
        spec = {"model": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), str):
        raise SearchError(f"expected a model name or a mapping with 'model', got {spec!r}")
    written = spec["model"].strip()
    model, arch, tag, builtin = _split(written)
    if spec.get("weights") is not None:
        return own_weights(spec, written, model, arch, tag, builtin)
    pretrained = spec.get("pretrained")
    resolution = spec.get("resolution")
    source = spec.get("source")

    if builtin:
        b = BUILTINS[arch]
        if tag is not None and tag not in b.weights:
            allowed = one_of(b.weights) or "none (scratch only)"
            raise SearchError(f"'{written}': unknown weights '{tag}'{did_you_mean(tag, b.weights)}; allowed: {allowed}")
        if pretrained is None:
            pretrained = b.default_tag is not None
        if pretrained and b.default_tag is None:
            raise SearchError(f"'{arch}' has no pretrained weights; remove 'pretrained: true'")
        tag = (tag or b.default_tag) if pretrained else None
        source = source or (b.weights[tag].source if tag else "none")
    else:
        if pretrained is None and tag is None:  # scratch or a forgotten tag: the user says which
            tags = _timm_tags(arch)
            some = ", ".join(tags[:3]) + (", ..." if len(tags) > 3 else "") if tags else "none in timm"
            raise SearchError(
                f"'{written}': no pretrained tag; name the weights as timm/{arch}.<tag> ({some}) "
                f"or write {{model: {written}, pretrained: false}} for scratch"
            )
        if pretrained is None:
            pretrained = tag is not None
        if pretrained and tag is None:
            raise SearchError(
                f"'{written}': name the pretrained weights as timm/{arch}.<tag>, or set pretrained: false"
            )
        if not pretrained:
            tag = None
        check_timm_name(PoolEntry(written, model, arch, tag, False, bool(pretrained), "none", "none", None))
        if source is None:
            source = classify_tag(arch, tag)[0]
    if source not in SOURCES:
        raise SearchError(f"'{written}': source '{source}' is not one of {one_of(SOURCES)}")
    if not pretrained and source != "none":
        raise SearchError(f"'{written}': a model without pretrained weights has source 'none'")
    overlap = OVERLAP_OF[source] if builtin or spec.get("source") else classify_tag(arch, tag)[1]

    label = spec.get("label")
    if label is None:
        label = written
        if builtin and not pretrained and BUILTINS[arch].default_tag is not None:
            label = f"{arch}-scratch"
        elif not builtin and not pretrained:
            label = f"{model}-scratch"  # as the built-ins: a label says when there are no weights
        if resolution:
            label += f"@{resolution}"
    return PoolEntry(
        label=label,
        model=model,
        arch=arch,
        tag=tag,
        builtin=builtin,
        pretrained=bool(pretrained),
        source=source,
        overlap=overlap,
        resolution=resolution,
    )


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def own_weights(spec: dict[str, Any], written: str, model: str, arch: str, tag: str | None, builtin: bool) -> PoolEntry:
    """`{model: ARCH, weights: FILE, source: SOURCE}`: the architecture with the tensors of a local file.

    The file is read as published weights are (search.weights: safetensors or weights-only torch.load,
    stem and position embeddings morphed, the head dropped); the label names the file, so two files
    of one architecture are two entries.
    """
    file, source = spec["weights"], spec.get("source")
    where = f"'{written}' weights"
    if not isinstance(file, str) or Path(file).suffix.lower() not in WEIGHT_SUFFIXES:
        raise SearchError(f"{where}: expected a file ending in {one_of(WEIGHT_SUFFIXES)}, got {file!r}")
    if tag is not None or spec.get("pretrained") is False:
        raise SearchError(
            f"{where}: a weights file replaces the published weights; write the model without a tag "
            f"and without pretrained: false, e.g. {{model: {model}, weights: {file}, source: ssl}}"
        )
    if source not in SOURCES or source == "none":
        raise SearchError(
            f"{where}: say where the file's weights come from with source: one of "
            f"{one_of(s for s in SOURCES if s != 'none')} (got {source!r})"
        )
    if not builtin:
        check_timm_name(PoolEntry(written, model, arch, None, False, False, "none", "none", None))
    resolution = spec.get("resolution")
    label = spec.get("label") or f"{model}+{Path(file).stem}" + (f"@{resolution}" if resolution else "")
    return PoolEntry(label, model, arch, None, builtin, True, source, OVERLAP_OF[source], resolution, file)


def parse_pool(specs: Sequence[Any]) -> list[PoolEntry]:
    """All entries with unique labels; errors name the entry's position (pool[i])."""
    if not specs:
        raise SearchError("pool: is empty; list at least one model, e.g. pool: [mini_cnn]")
    entries: list[PoolEntry] = []
    seen: dict[str, int] = {}  # label -> position
    for i, spec in enumerate(specs):
        try:
            entry = parse_entry(spec)
        except SearchError as e:
            raise SearchError(f"pool[{i}]: {e}") from None
        if entry.label in seen:
            raise SearchError(
                f"pool[{i}]: duplicate label '{entry.label}' (also pool[{seen[entry.label]}]); "
                "give one of them a distinct 'label:'"
            )
        seen[entry.label] = i
        entries.append(entry)
    return entries
