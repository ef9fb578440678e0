from __future__ import annotations

import pytest
import timm

from search.errors import SearchError
from search.pool import OVERLAPS, SOURCES, classify_tag, parse_entry, parse_pool

# Every pretrained tag timm lists for the specification's families, its weight source and ImageNet
# overlap ("-": pretrained on data that cannot be placed, so the entry must state its source).
TABLE = """
resnet18.a1_in1k                                 in1k           full
resnet18.a2_in1k                                 in1k           full
resnet18.a3_in1k                                 in1k           full
resnet18.fb_ssl_yfcc100m_ft_in1k                 ssl            low
resnet18.fb_swsl_ig1b_ft_in1k                    swsl           low
resnet18.gluon_in1k                              in1k           full
resnet18.tv_in1k                                 in1k           full
resnet50.a1_in1k                                 in1k           full
resnet50.a1h_in1k                                in1k           full
resnet50.a2_in1k                                 in1k           full
resnet50.a3_in1k                                 in1k           full
resnet50.am_in1k                                 in1k           full
resnet50.b1k_in1k                                in1k           full
resnet50.b2k_in1k                                in1k           full
resnet50.bamboo                                  -              -
resnet50.bt_in1k                                 in1k           full
resnet50.c1_in1k                                 in1k           full
resnet50.c2_in1k                                 in1k           full
resnet50.d_in1k                                  in1k           full
resnet50.fb_ssl_yfcc100m_ft_in1k                 ssl            low
resnet50.fb_swsl_ig1b_ft_in1k                    swsl           low
resnet50.gluon_in1k                              in1k           full
resnet50.ra_in1k                                 in1k           full
resnet50.ram_in1k                                in1k           full
resnet50.tv2_in1k                                in1k           full
resnet50.tv_in1k                                 in1k           full
convnext_tiny.dinov3_lvd1689m                    dinov2         none
convnext_tiny.eupe_lvd1689m                      -              -
convnext_tiny.fb_in1k                            in1k           full
convnext_tiny.fb_in22k                           in21k          partial
convnext_tiny.fb_in22k_ft_in1k                   in21k_ft_in1k  full
convnext_tiny.fb_in22k_ft_in1k_384               in21k_ft_in1k  full
convnext_tiny.in12k                              in21k          partial
convnext_tiny.in12k_ft_in1k                      in21k_ft_in1k  full
convnext_tiny.in12k_ft_in1k_384                  in21k_ft_in1k  full
vit_tiny_patch16_224.augreg_in21k                in21k          partial
vit_tiny_patch16_224.augreg_in21k_ft_in1k        in21k_ft_in1k  full
vit_small_patch16_224.augreg_in1k                in1k           full
vit_small_patch16_224.augreg_in21k               in21k          partial
vit_small_patch16_224.augreg_in21k_ft_in1k       in21k_ft_in1k  full
vit_small_patch16_224.dino                       ssl            low
vit_base_patch16_224.augreg2_in21k_ft_in1k       in21k_ft_in1k  full
vit_base_patch16_224.augreg_in1k                 in1k           full
vit_base_patch16_224.augreg_in21k                in21k          partial
vit_base_patch16_224.augreg_in21k_ft_in1k        in21k_ft_in1k  full
vit_base_patch16_224.bamboo                      -              -
vit_base_patch16_224.dino                        ssl            low
vit_base_patch16_224.mae                         ssl            low
vit_base_patch16_224.orig_in21k                  in21k          partial
vit_base_patch16_224.orig_in21k_ft_in1k          in21k_ft_in1k  full
vit_base_patch16_224.sam_in1k                    in1k           full
efficientnet_b0.ra4_e3600_r224_in1k              in1k           full
efficientnet_b0.ra_in1k                          in1k           full
vit_base_patch16_clip_224.datacompxl             clip           none
vit_base_patch16_clip_224.dfn2b                  clip           none
vit_base_patch16_clip_224.laion2b                clip           none
vit_base_patch16_clip_224.laion2b_ft_in1k        clip           low
vit_base_patch16_clip_224.laion2b_ft_in12k       clip           low
vit_base_patch16_clip_224.laion2b_ft_in12k_in1k  clip           low
vit_base_patch16_clip_224.laion400m_e32          clip           none
vit_base_patch16_clip_224.metaclip_2pt5b         clip           none
vit_base_patch16_clip_224.metaclip_400m          clip           none
vit_base_patch16_clip_224.openai                 clip           none
vit_base_patch16_clip_224.openai_ft_in1k         clip           low
vit_base_patch16_clip_224.openai_ft_in12k        clip           low
vit_base_patch16_clip_224.openai_ft_in12k_in1k   clip           low
vit_small_patch14_dinov2.lvd142m                 dinov2         none
vit_base_patch14_dinov2.lvd142m                  dinov2         none
resnext101_32x8d.fb_ssl_yfcc100m_ft_in1k         ssl            low
resnext101_32x8d.fb_swsl_ig1b_ft_in1k            swsl           low
resnext101_32x8d.fb_wsl_ig1b_ft_in1k             swsl           low
resnext101_32x8d.tv2_in1k                        in1k           full
resnext101_32x8d.tv_in1k                         in1k           full
"""
EXPECTED = {
    name: None if source == "-" else (source, overlap)
    for name, source, overlap in (line.split() for line in TABLE.strip().splitlines())
}
FAMILIES = [
    "resnet18",
    "resnet50",
    "convnext_tiny",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "efficientnet_b0",
    "vit_base_patch16_clip_224",
    "vit_small_patch14_dinov2",
    "vit_base_patch14_dinov2",
    "resnext101_32x8d",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_timm_tag_of_the_families_is_classified(family):
    listed = timm.list_pretrained(f"{family}.*")
    assert listed, family
    for name in listed:
        assert name in EXPECTED, f"new timm tag {name}: add its expected source"
        arch, tag = name.split(".", 1)
        if EXPECTED[name] is None:  # pretrained on data we cannot place: the user must say
            with pytest.raises(SearchError, match="write the entry as a mapping with source:"):
                classify_tag(arch, tag)
            entry = parse_entry({"model": f"timm/{name}", "source": "in1k"})
            assert (entry.source, entry.overlap) == ("in1k", "full")
        else:
            assert classify_tag(arch, tag) == EXPECTED[name], name
            entry = parse_entry(f"timm/{name}")
            assert (entry.source, entry.overlap) == EXPECTED[name]
            assert entry.source in SOURCES and entry.overlap in OVERLAPS


@pytest.mark.parametrize(
    "spec, label, source, overlap, tag, pretrained",
    [
        ("mini_cnn", "mini_cnn", "none", "none", None, False),
        ("resnet_18", "resnet_18", "in1k", "full", "tv_in1k", True),
        ({"model": "resnet_18", "pretrained": False}, "resnet_18-scratch", "none", "none", None, False),
        ("efficientnet_b0", "efficientnet_b0", "in1k", "full", "tv_in1k", True),
        ("convnext_tiny", "convnext_tiny", "in1k", "full", "tv_in1k", True),
        ("vit_tiny", "vit_tiny", "in21k_ft_in1k", "full", "augreg_in21k_ft_in1k", True),
        ("vit_tiny.augreg_in21k", "vit_tiny.augreg_in21k", "in21k", "partial", "augreg_in21k", True),
        ("timm/convnext_tiny.fb_in22k", "timm/convnext_tiny.fb_in22k", "in21k", "partial", "fb_in22k", True),
        ({"model": "timm/resnet50", "pretrained": False}, "timm/resnet50-scratch", "none", "none", None, False),
        ({"model": "timm/resnet50.a1_in1k", "pretrained": False}, "timm/resnet50-scratch", "none", "none", None, False),
        (
            {"model": "timm/vit_small_patch14_dinov2.lvd142m", "resolution": 224},
            "timm/vit_small_patch14_dinov2.lvd142m@224",
            "dinov2",
            "none",
            "lvd142m",
            True,
        ),
        ({"model": "mini_cnn", "label": "small"}, "small", "none", "none", None, False),
    ],
)
def test_parse_entry(spec, label, source, overlap, tag, pretrained):
    e = parse_entry(spec)
    assert (e.label, e.source, e.overlap, e.tag, e.pretrained) == (label, source, overlap, tag, pretrained)


def test_vit_tiny_bare_name_is_the_in21k_fine_tune():
    e = parse_entry("vit_tiny")
    assert e.timm_name == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    from search.archs import BUILTINS

    assert "no ImageNet-1k-only ViT-Tiny" in BUILTINS["vit_tiny"].note


@pytest.mark.parametrize(
    "spec, message",
    [
        ("resnet_18.in21k", r"unknown weights 'in21k'; allowed: tv_in1k"),
        ({"model": "mini_cnn", "pretrained": True}, r"'mini_cnn' has no pretrained weights"),
        ({"model": "timm/resnet50", "pretrained": True}, r"name the pretrained weights as timm/resnet50.<tag>"),
        (
            "timm/resnet18",
            r"^'timm/resnet18': no pretrained tag; name the weights as timm/resnet18.<tag> \(a1_in1k, "
            r"a2_in1k, a3_in1k, \.\.\.\) or write \{model: timm/resnet18, pretrained: false\} for scratch$",
        ),
        ("timm/", r"expected timm/<architecture>"),
        ({"model": "timm/resnet50.a1_in1k", "source": "imagenet"}, r"source 'imagenet' is not one of"),
        ({"pretrained": True}, r"mapping with 'model'"),
    ],
)
def test_bad_entries(spec, message):
    with pytest.raises(SearchError, match=message):
        parse_entry(spec)


def test_labels_are_unique_and_positions_named():
    entries = parse_pool(["mini_cnn", {"model": "resnet_18", "pretrained": False}, "resnet_18"])
    assert [e.label for e in entries] == ["mini_cnn", "resnet_18-scratch", "resnet_18"]
    with pytest.raises(SearchError, match=r"pool\[2\]: duplicate label 'mini_cnn' \(also pool\[0\]\)"):
        parse_pool(["mini_cnn", "resnet_18", {"model": "mini_cnn"}])
