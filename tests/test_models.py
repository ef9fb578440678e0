from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm

from search import morph
from search.builtins import MiniCNN
from search.errors import SearchError
from search.models import build_model
from tests.conftest import run_inline
from tests.weights_cache import hf_checkpoint, torchvision_checkpoint

VIT = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches, offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _assert_rest_equal(model, src, skip):
    """Every loaded tensor but the morphed ones and the head equals the checkpoint."""
    state = model.state_dict()
    head = model.info.head
    checked = 0
    for k, v in state.items():
        if k in skip or any(k == h or k.startswith(h + ".") for h in head):
            continue
        assert torch.equal(v, src[k]), k
        checked += 1
    assert checked > 10


@pytest.mark.parametrize("in_chans", [1, 3])
def test_resnet18_small_stem_is_bicubic_resize_of_channel_mean(caches, in_chans):
    src = torchvision_checkpoint(caches / "torch", "resnet18-f37072fd.pth", tvm.resnet18())
    m = build_model("resnet_18", num_classes=7, in_chans=in_chans, resolution=28)
    w = src["conv1.weight"]
    reduced = w.mean(dim=1, keepdim=True) if in_chans == 1 else w
    expected = F.interpolate(reduced, size=(3, 3), mode="bicubic", align_corners=False)
    assert m.conv1.weight.shape == (64, in_chans, 3, 3)
    assert (m.conv1.stride, m.conv1.padding) == ((1, 1), (1, 1))
    assert isinstance(m.maxpool, torch.nn.Identity)
    assert torch.equal(m.conv1.weight.data, expected)
    _assert_rest_equal(m, src, {"conv1.weight"})
    assert m(torch.randn(2, in_chans, 28, 28)).shape == (2, 7)


def test_resnet18_64px_gray_is_channel_mean(caches):
    src = torchvision_checkpoint(caches / "torch", "resnet18-f37072fd.pth", tvm.resnet18())
    m = build_model("resnet_18", num_classes=5, in_chans=1, resolution=64)
    assert m.conv1.weight.shape == (64, 1, 7, 7) and m.conv1.stride == (2, 2)
    assert torch.equal(m.conv1.weight.data, src["conv1.weight"].mean(dim=1, keepdim=True))
    _assert_rest_equal(m, src, {"conv1.weight"})
    m_sum = build_model("resnet_18", num_classes=5, in_chans=1, resolution=64, channel_reduce="sum")
    assert torch.equal(m_sum.conv1.weight.data, src["conv1.weight"].sum(dim=1, keepdim=True))
    assert m_sum.info.channel_reduce == "sum"


@pytest.mark.parametrize(
    "name, filename, make, stem",
    [
        ("efficientnet_b0", "efficientnet_b0_rwightman-7f5810bc.pth", tvm.efficientnet_b0, "features.0.0.weight"),
        ("convnext_tiny", "convnext_tiny-983f1562.pth", tvm.convnext_tiny, "features.0.0.weight"),
    ],
)
@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_torchvision_gray_stems(caches, name, filename, make, stem, mode):
    src = torchvision_checkpoint(caches / "torch", filename, make())
    m = build_model(name, num_classes=9, in_chans=1, channel_reduce=mode)
    w = src[stem]
    expected = w.mean(dim=1, keepdim=True) if mode == "mean" else w.sum(dim=1, keepdim=True)
    assert torch.equal(m.state_dict()[stem], expected)
    _assert_rest_equal(m, src, {stem})
    out = m(torch.randn(1, 1, 224, 224))
    assert out.shape == (1, 9)


def _vit_checkpoint(caches):
    import timm

    return hf_checkpoint(
        caches / "hf",
        VIT.removeprefix("timm/").join(["timm/", ""]),
        timm.create_model("vit_tiny_patch16_224", pretrained=False),
    )


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_vit_tiny_gray_patch_embed_and_pos_embed(caches, mode):
    src = _vit_checkpoint(caches)
    m = build_model("vit_tiny", num_classes=4, in_chans=1, resolution=224, channel_reduce=mode)
    w = src["patch_embed.proj.weight"]
    expected = w.mean(dim=1, keepdim=True) if mode == "mean" else w.sum(dim=1, keepdim=True)
    assert torch.equal(m.patch_embed.proj.weight.data, expected)
    _assert_rest_equal(m, src, {"patch_embed.proj.weight"})
    assert m.info.label == "vit_tiny" and m.head.out_features == 4

    small = build_model("vit_tiny", num_classes=4, in_chans=3, resolution=64, channel_reduce=mode)
    assert small.pos_embed.shape == (1, 1 + 16, 192)
    assert torch.equal(small.pos_embed.data, morph.resize_pos_embed(src["pos_embed"], (4, 4), 1))
    assert torch.equal(small.pos_embed.data[:, 0], src["pos_embed"][:, 0])  # the class token keeps its embedding
    _assert_rest_equal(small, src, {"pos_embed"})
    assert small(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_timm_model_from_hf_cache(caches):
    import timm

    src = hf_checkpoint(caches / "hf", "timm/resnet18.a1_in1k", timm.create_model("resnet18"))
    m = build_model("timm/resnet18.a1_in1k", num_classes=3, in_chans=1, dropout=0.2)
    assert torch.equal(m.conv1.weight.data, src["conv1.weight"].mean(dim=1, keepdim=True))
    _assert_rest_equal(m, src, {"conv1.weight"})
    assert m.fc.out_features == 3 and m.drop_rate == 0.2
    assert m.info.resolution == 224


TINY_VIT = "timm/test_vit.r160_in1k"  # timm's own test ViT: position embeddings and a checkpoint filter, 0.4M params


def _hf_file(hf: Path, repo_id: str, filename: str, state: dict[str, torch.Tensor]) -> Path:
    """The HF cache's snapshot file of a repo, written aside and renamed in (as another process would)."""
    from safetensors.torch import save_file

    snap = hf / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True, exist_ok=True)
    (snap.parents[1] / "refs").mkdir(exist_ok=True)
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    tmp = snap / f".{filename}.tmp"
    if filename.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    else:
        torch.save(state, tmp)
    tmp.replace(snap / filename)
    return snap / filename


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_timm_weights_are_read_once_and_what_was_read_is_loaded(caches, monkeypatch, filename):
    """A trial reads a timm weights file once, through the safe loader, and timm builds from those
    tensors: the file replaced right after that read (by another process) changes nothing."""
    import safetensors.torch
    import timm

    from search import weights

    first = {k: v.clone() for k, v in timm.create_model("test_vit").state_dict().items()}
    torch.manual_seed(1)
    second = timm.create_model("test_vit").state_dict()
    path = _hf_file(caches / "hf", "timm/test_vit.r160_in1k", filename, first)
    reads: list[str] = []
    safe_load, torch_load, st_load = weights.safe_load, torch.load, safetensors.torch.load_file

    def read_then_replace(p, mmap=False):
        got = safe_load(p, mmap)
        _hf_file(caches / "hf", "timm/test_vit.r160_in1k", filename, second)
        return got

    def counted(load):
        return lambda f, *a, **k: reads.append(str(f)) or load(f, *a, **k)

    monkeypatch.setattr(weights, "safe_load", read_then_replace)
    monkeypatch.setattr(torch, "load", counted(torch_load))  # how timm reads a .bin or .pth file
    monkeypatch.setattr(safetensors.torch, "load_file", counted(st_load))  # ... and a .safetensors one
    m = build_model(TINY_VIT, num_classes=3, in_chans=3)
    assert reads == [str(path)]
    _assert_rest_equal(m, first, set())
    assert not torch.equal(first["pos_embed"], second["pos_embed"])  # the replacement differs


def test_a_timm_training_checkpoint_yields_the_weights_timm_would_take(tmp_path):
    from search import weights

    one, two = torch.ones(2), torch.full((2,), 2.0)
    got = weights.timm_state({"state_dict": {"module.w": one}, "state_dict_ema": {"_orig_mod.w": two}}, tmp_path)
    assert list(got) == ["w"] and torch.equal(got["w"], two)  # EMA first, wrapper prefixes dropped
    assert torch.equal(weights.timm_state({"model": {"w": one}, "epoch": 3}, tmp_path)["w"], one)
    assert list(weights.timm_state({"w": one}, tmp_path)) == ["w"]
    with pytest.raises(SearchError, match=r"^weights file .* holds a list, not a state dict; delete it and run"):
        weights.timm_state([one], tmp_path / "x.pth")


def test_missing_weights_fail_fast_with_one_line(caches):
    t0 = time.perf_counter()
    with pytest.raises(SearchError) as e:
        build_model("resnet_18", num_classes=10, in_chans=3, resolution=32)
    assert time.perf_counter() - t0 < 10
    msg = str(e.value)
    assert "\n" not in msg
    assert str(caches / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "python -m search prefetch" in msg and "resnet_18" in msg
    with pytest.raises(
        SearchError, match=r"vit_tiny_patch16_224.augreg_in21k .*models--timm--vit_tiny_patch16_224.augreg_in21k"
    ):
        build_model("vit_tiny.augreg_in21k", num_classes=10, in_chans=3)


def test_missing_weights_without_offline_flag_probe_fails_fast(caches, monkeypatch):
    """No offline flag: the network probe (mocked unreachable) turns into the same error."""
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE")

    def unreachable(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(SearchError, match=r"no network: download.pytorch.org unreachable"):
        build_model("convnext_tiny", num_classes=10, in_chans=3)


@pytest.mark.slow
def test_cli_missing_weights_exits_2(tmp_path):
    from tests.conftest import tiny_recipe, write_recipe

    write_recipe(tmp_path / "r.yaml", tiny_recipe(pool=["resnet_18"]))
    env = {"TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_CACHE": str(tmp_path / "hf"), "SEARCH_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = run_inline("run", "r.yaml", cwd=tmp_path, env=env)
    assert time.perf_counter() - t0 < 30  # includes interpreter start-up
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "resnet18-f37072fd.pth" in lines[0] and "prefetch" in lines[0]


# forward/backward at every accepted resolution, 1 and 3 channels

SHAPES = (
    [("mini_cnn", r) for r in (28, 32, 64)]
    + [("resnet_18", r) for r in (28, 32, 64, 128)]
    + [("efficientnet_b0", 224), ("convnext_tiny", 224), ("vit_tiny", 224)]
)


@pytest.mark.parametrize("name, res", SHAPES)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_forward_backward_shapes(name, res, in_chans):
    m = build_model({"model": name, "pretrained": False}, num_classes=6, in_chans=in_chans, resolution=res, dropout=0.1)
    out = m(torch.randn(2, in_chans, res, res))
    assert out.shape == (2, 6)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    assert m.info.resolution == res and m.info.params == sum(p.numel() for p in m.parameters())


def test_resnet18_224_shape():
    m = build_model({"model": "resnet_18", "pretrained": False}, num_classes=6, in_chans=3, resolution=224)
    assert m.conv1.kernel_size == (7, 7) and not isinstance(m.maxpool, torch.nn.Identity)
    assert m(torch.randn(1, 3, 224, 224)).shape == (1, 6)


# Parameter counts of the specification (ImageNet heads), within 5 %.
PARAMS = {
    "mini_cnn": 95_000,
    "resnet_18": 11_690_000,
    "efficientnet_b0": 5_290_000,
    "convnext_tiny": 28_590_000,
    "vit_tiny": 5_720_000,
}


@pytest.mark.parametrize("name", PARAMS)
def test_parameter_counts_match_the_specification(name):
    classes = 10 if name == "mini_cnn" else 1000
    m = build_model({"model": name, "pretrained": False}, num_classes=classes, in_chans=3, resolution=224)
    assert abs(m.info.params - PARAMS[name]) / PARAMS[name] < 0.05, m.info.params


def test_dropout_reaches_every_classifier():
    for name in PARAMS:
        m = build_model(
            {"model": name, "pretrained": False},
            num_classes=3,
            in_chans=3,
            resolution=224 if name != "mini_cnn" else 32,
            dropout=0.3,
        )
        rates = [mod.p for mod in m.modules() if isinstance(mod, torch.nn.Dropout)]
        rates += [getattr(m, "drop_rate", None)] if hasattr(m, "drop_rate") else []
        assert 0.3 in rates, name


def test_mini_cnn_is_scratch_only():
    with pytest.raises(SearchError, match="'mini_cnn' has no pretrained weights"):
        build_model({"model": "mini_cnn", "pretrained": True}, num_classes=2, in_chans=1)
    assert isinstance(build_model("mini_cnn", num_classes=2, in_chans=1), MiniCNN)


def test_unknown_timm_name_suggests():
    with pytest.raises(SearchError, match=r"timm has no model 'convnext_tiyn' \(did you mean 'convnext_tiny'\?\)"):
        build_model({"model": "timm/convnext_tiyn", "pretrained": False}, num_classes=2, in_chans=3)
    with pytest.raises(
        SearchError, match=r"timm has no weights 'fb_in23k' for convnext_tiny \(did you mean 'fb_in22k'\?\)"
    ):
        build_model("timm/convnext_tiny.fb_in23k", num_classes=2, in_chans=3)


def test_prefetch_downloads_into_the_real_caches(caches, monkeypatch, capsys):
    """Only the network is mocked: the probe succeeds and the downloads write what the servers would."""
    import socket

    import huggingface_hub
    import timm
    import torch.hub

    from search import cli
    from tests.conftest import tiny_recipe, write_recipe

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: type("C", (), {"close": lambda self: None})())
    urls = []

    def fake_url_download(url, dst, progress=True):
        urls.append(url)
        torch.save(tvm.resnet18().state_dict(), dst)

    def fake_hf_download(repo_id, filename, cache_dir=None, **kw):
        urls.append(f"hf:{repo_id}/{filename}")
        hf_checkpoint(Path(cache_dir), repo_id, timm.create_model("vit_tiny_patch16_224"))
        return str(Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40) / filename)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_url_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_download)
    recipe = write_recipe(caches / "r.yaml", tiny_recipe(pool=["resnet_18", "vit_tiny", "mini_cnn"]))
    assert cli.main(["prefetch", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert urls == [
        "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "hf:timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k/model.safetensors",
    ]
    assert f"resnet_18: {caches / 'torch' / 'hub' / 'checkpoints' / 'resnet18-f37072fd.pth'}" in out
    assert "mini_cnn: no pretrained weights" in out
    # Now cached: a second prefetch downloads nothing, and building works offline.
    assert cli.main(["prefetch", str(recipe)]) == 0 and len(urls) == 2
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert build_model("vit_tiny", num_classes=3, in_chans=3).head.out_features == 3


SWIN = "timm/swin_tiny_patch4_window7_224.ms_in1k"


def test_swin_at_a_new_resolution_resizes_its_relative_position_tables(caches):
    """At 112 px Swin-T's last stage is 4x4, so its windows shrink from 7 to 4: timm builds it so
    (img_size), and its checkpoint filter resizes the 13x13 relative position tables to 7x7."""
    import timm
    from timm.layers import resize_rel_pos_bias_table

    src = hf_checkpoint(caches / "hf", SWIN, timm.create_model("swin_tiny_patch4_window7_224"))  # the hub repo
    table = "layers.3.blocks.0.attn.relative_position_bias_table"
    assert src[table].shape == (13 * 13, 24)
    m = build_model({"model": SWIN, "resolution": 112}, num_classes=3, in_chans=1)
    assert m.info.resolution == 112 and m.info.stem == "patch_embed.proj" and m.info.head == ("head.fc",)
    assert m.layers[3].blocks[0].attn.window_size == (4, 4)
    want = resize_rel_pos_bias_table(src[table], new_window_size=(4, 4), new_bias_shape=(7 * 7, 24))
    assert m.state_dict()[table].shape == (49, 24) and torch.equal(m.state_dict()[table], want)
    resized = {k for k in m.state_dict() if k.startswith("layers.3.") and k.endswith("relative_position_bias_table")}
    assert resized == {table, table.replace("blocks.0", "blocks.1")}
    assert torch.equal(m.patch_embed.proj.weight.data, src["patch_embed.proj.weight"].mean(dim=1, keepdim=True))
    _assert_rest_equal(m, src, {"patch_embed.proj.weight", *resized})  # stages 0-2 keep their 7x7 windows
    out = m(torch.randn(2, 1, 112, 112))
    assert out.shape == (2, 3)
    out.sum().backward()


def test_timm_models_take_an_input_size_only_where_their_config_fixes_it():
    import timm

    assert timm.models.get_pretrained_cfg("swin_tiny_patch4_window7_224").fixed_input_size
    swin = build_model(
        {"model": "timm/swin_tiny_patch4_window7_224", "pretrained": False, "resolution": 64}, num_classes=2, in_chans=3
    )
    assert swin.patch_embed.img_size == (64, 64) and swin(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    assert not timm.models.get_pretrained_cfg("resnet18").fixed_input_size
    cnn = build_model({"model": "timm/resnet18", "pretrained": False, "resolution": 48}, num_classes=2, in_chans=3)
    assert cnn.info.resolution == 48 and cnn(torch.randn(1, 3, 48, 48)).shape == (1, 2)
