"""Every built-in record checked against the libraries it names (like torchvision's model-schema
tests): weights exist where the record says, the builder builds what the weights were made for,
the stem and head it names are the modules that the transfer morphs and replaces."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search.archs import BUILTINS, Builtin, Weights, register
from search.builtins import BUILDERS
from search.models import build_model, input_resolution
from search.pool import OVERLAP_OF, SOURCES, parse_entry


@pytest.mark.parametrize("name", BUILTINS)
def test_record_fields(name):
    b = BUILTINS[name]
    assert isinstance(b, Builtin) and name.isidentifier()
    assert (b.default_tag is None) == (not b.weights)  # scratch-only exactly when there are no weights
    assert (name in BUILDERS) != (b.timm is not None)  # built by its constructor or by timm
    for tag, w in b.weights.items():
        assert isinstance(w, Weights) and w.source in SOURCES and w.source != "none", tag
    assert b.resolution is None or b.resolution >= 8
    assert b.small_stem is None or (name in BUILDERS and b.resolution is None)


@pytest.mark.parametrize("name", [n for n, b in BUILTINS.items() for w in b.weights.values() if w.torchvision])
def test_torchvision_weights_exist_and_fit_the_builder(name):
    """The weight enum member exists, and the builder at 1000 classes has exactly its parameter count."""
    from torchvision.models import get_weight

    b = BUILTINS[name]
    for tag, w in b.weights.items():
        enum = get_weight(w.torchvision)
        assert enum.url.startswith("https://download.pytorch.org/models/"), tag
        model, _, _ = BUILDERS[name](1000, 3, b.resolution or 224, 0.0)
        assert sum(p.numel() for p in model.parameters()) == enum.meta["num_params"], tag
        assert len(enum.meta["categories"]) == 1000


@pytest.mark.parametrize("name", [n for n, b in BUILTINS.items() if b.timm])
def test_timm_weights_exist_at_the_fixed_resolution(name):
    import timm

    b = BUILTINS[name]
    assert b.timm in timm.list_models()
    for tag in b.weights:
        cfg = timm.models.get_pretrained_cfg(f"{b.timm}.{tag}", allow_unregistered=False)
        assert cfg is not None and cfg.hf_hub_id, tag  # hosted on the Hugging Face hub: the HF cache holds it
        assert cfg.input_size[-1] == b.resolution, tag


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_parsed_and_built_as_the_record_says(name, in_chans):
    b = BUILTINS[name]
    e = parse_entry(name)
    assert (e.builtin, e.arch, e.tag, e.pretrained) == (True, name, b.default_tag, b.default_tag is not None)
    source = b.weights[b.default_tag].source if b.default_tag else "none"
    assert (e.source, e.overlap) == (source, OVERLAP_OF[source])
    res = input_resolution(e, 32)
    assert res == (b.resolution or 32)
    m = build_model({"model": name, "pretrained": False}, num_classes=5, in_chans=in_chans, resolution=res)
    modules = dict(m.named_modules())
    stem = modules[m.info.stem]
    assert isinstance(stem, nn.Conv2d) and stem.in_channels == in_chans
    heads = [modules[h] for h in m.info.head]
    linears = [x for h in heads for x in ([h] if isinstance(h, nn.Linear) else h.modules()) if isinstance(x, nn.Linear)]
    assert linears and linears[-1].out_features == 5
    assert m(torch.zeros(2, in_chans, res, res)).shape == (2, 5)


def test_every_constructor_builds_a_builtin():
    assert set(BUILDERS) == {n for n, b in BUILTINS.items() if b.timm is None}


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="built-in 'resnet_18' is registered already"):
        register("resnet_18", Builtin(None))
    assert BUILTINS["resnet_18"].default_tag == "tv_in1k"


def test_contradictory_records_are_refused():
    with pytest.raises(ValueError, match="small_stem needs a constructor"):
        Builtin(None, timm="vit_tiny_patch16_224", small_stem=32)
    with pytest.raises(ValueError, match=r"expected the default tag among the weights \['a'\], got 'b'"):
        Builtin("b", {"a": Weights("in1k")})
    with pytest.raises(ValueError, match="cannot load torchvision weights"):
        Builtin("a", {"a": Weights("in1k", "ResNet18_Weights.IMAGENET1K_V1")}, timm="vit_tiny_patch16_224")
