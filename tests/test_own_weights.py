"""Own weights files as pool entries: parsed, read safely, morphed exactly, hashed on every trial."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from safetensors.torch import save_file

from search import artifacts, cli, morph, rank, weights
from search import data as datamod
from search import study as st
from search.data import Split
from search.errors import SearchError
from search.hparams import TrainCfg
from search.models import build_model
from search.pool import parse_entry, parse_pool
from search.recipe import recipe_from_dict
from search.train import fit
from tests.conftest import built_once, tiny_recipe, write_recipe

DIGITS = datamod.DataCfg(dataset="digits", max_samples=300)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rgb(split: Split) -> Split:
    return Split(split.x.repeat(1, 3, 1, 1), split.y)


def _train_file(folder: Path) -> None:
    """resnet_18 trained for 5 epochs on the digits' train split, as RGB (a 3-channel 3x3 stem): trained.pt.
    Five, not two: after two the file's head start over scratch (one fine-tuning epoch) was 0.07 to 0.15
    by the thread count (2 or 1); after five it is 0.29 to 0.35."""
    data = datamod.load_data(DIGITS, 0)
    rgb = replace(data, train=_rgb(data.train), val=_rgb(data.val), test=_rgb(data.test))
    torch.manual_seed(0)
    model = build_model({"model": "resnet_18", "pretrained": False}, num_classes=10, in_chans=3, resolution=8)
    hp = TrainCfg(epochs=5, batch_size=32, lr=0.003, weight_decay=0.0)
    assert not fit(model, rgb, hp, device="cpu", amp=False).failed
    torch.save(model.state_dict(), folder / "trained.pt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "own-weights-trained", _train_file) / "trained.pt"


@pytest.fixture
def random_file(tmp_path) -> Path:
    """A random resnet_18 with the standard 7x7 RGB stem and an ImageNet-sized head, as safetensors."""
    torch.manual_seed(1)
    m = build_model({"model": "resnet_18", "pretrained": False}, num_classes=1000, in_chans=3, resolution=224)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "random.safetensors"))
    return tmp_path / "random.safetensors"


def test_an_entry_names_its_file_so_two_files_of_one_architecture_are_two_entries(tmp_path):
    a, b = str(tmp_path / "ssl.safetensors"), str(tmp_path / "in_house.pt")
    entries = parse_pool(
        [
            {"model": "resnet_18", "weights": a, "source": "ssl"},
            {"model": "resnet_18", "weights": b, "source": "in1k"},
            {"model": "resnet_18", "pretrained": False},
            {"model": "timm/resnet18", "weights": b, "source": "dinov2", "resolution": 32},
        ]
    )
    assert [e.label for e in entries] == [
        "resnet_18+ssl",
        "resnet_18+in_house",
        "resnet_18-scratch",
        "timm/resnet18+in_house@32",
    ]
    assert [(e.source, e.overlap, e.pretrained, e.weights) for e in entries] == [
        ("ssl", "low", True, a),
        ("in1k", "full", True, b),
        ("none", "none", False, None),
        ("dinov2", "none", True, b),
    ]
    assert entries[0].attrs()["weights_file"] == a and "weights_file" not in entries[2].attrs()
    with pytest.raises(SearchError, match=r"pool\[1\]: duplicate label 'resnet_18\+ssl'"):
        parse_pool(
            [
                {"model": "resnet_18", "weights": a, "source": "ssl"},
                {"model": "resnet_18", "weights": "x/ssl.pt", "source": "ssl"},
            ]
        )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"model": "resnet_18", "weights": "w.ckpt", "source": "ssl"},
            r"expected a file ending in \.safetensors, \.pt",
        ),
        ({"model": "resnet_18", "weights": "w.pt"}, r"say where the file's weights come from with source: one of in1k"),
        ({"model": "resnet_18", "weights": "w.pt", "source": "none"}, r"source: one of .* \(got 'none'\)"),
        ({"model": "resnet_18.tv_in1k", "weights": "w.pt", "source": "ssl"}, r"replaces the published weights; write"),
        ({"model": "resnet_18", "weights": "w.pt", "source": "ssl", "pretrained": False}, r"without pretrained: false"),
        ({"model": "timm/resnet_81", "weights": "w.pt", "source": "ssl"}, r"timm has no model 'resnet_81'"),
    ],
)
def test_a_wrong_weights_entry_says_what_to_write(spec, message):
    with pytest.raises(SearchError, match=message):
        parse_entry(spec)


def test_the_published_morphs_apply_to_a_file_exactly(random_file, tmp_path):
    """7x7 RGB stem -> 3x3 gray by the formula (max diff 0); timm: channel reduce; ViT: positions resampled."""
    src = weights.safe_load(random_file)
    model = build_model(
        {"model": "resnet_18", "weights": str(random_file), "source": "ssl"}, num_classes=10, in_chans=1, resolution=8
    )
    assert (
        model.state_dict()["conv1.weight"] - morph.resnet_small_stem(src["conv1.weight"], 1, "mean")
    ).abs().max() == 0
    assert all(torch.equal(v, src[k]) for k, v in model.state_dict().items() if k.startswith("layer4."))
    assert model.fc[1].weight.shape == (10, 512)  # the file's head dropped, a new one for 10 classes

    timm_src = build_model({"model": "timm/resnet18", "pretrained": False}, num_classes=7, in_chans=3, resolution=32)
    torch.save({"state_dict": timm_src.state_dict(), "epoch": 3}, tmp_path / "timm.pt")  # a training checkpoint
    m = build_model(
        {"model": "timm/resnet18", "weights": str(tmp_path / "timm.pt"), "source": "ssl"},
        num_classes=10,
        in_chans=1,
        resolution=32,
    )
    assert torch.equal(m.state_dict()["conv1.weight"], timm_src.state_dict()["conv1.weight"].mean(1, keepdim=True))

    vit = build_model(
        {"model": "timm/vit_tiny_patch16_224", "pretrained": False}, num_classes=5, in_chans=3, resolution=224
    )
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    spec = {
        "model": "timm/vit_tiny_patch16_224",
        "weights": str(tmp_path / "vit.safetensors"),
        "source": "dinov2",
        "resolution": 32,
    }
    small = build_model(spec, num_classes=10, in_chans=3)
    want = morph.resize_pos_embed(vit.state_dict()["pos_embed"], (2, 2), 1)
    assert (small.state_dict()["pos_embed"] - want).abs().max() == 0


def test_a_file_that_needs_code_to_load_is_refused_naming_it(tmp_path):
    import argparse

    bad = tmp_path / "bad.pt"
    torch.save({"conv1.weight": torch.zeros(1), "opts": argparse.ArgumentParser}, bad)
    entry = parse_entry({"model": "resnet_18", "weights": str(bad), "source": "ssl"})
    with pytest.raises(SearchError, match=rf"weights file {bad} needs code to be unpickled.*check that it is a plain"):
        weights.check(entry)


def test_validate_and_prefetch_list_a_missing_file_as_a_local_file(tmp_path, capsys):
    gone = tmp_path / "gone.safetensors"
    f = write_recipe(
        tmp_path / "r.yaml", tiny_recipe(pool=[{"model": "resnet_18", "weights": str(gone), "source": "ssl"}])
    )
    assert cli.main(["validate", str(f)]) == cli.MISSING_FILES
    out = capsys.readouterr().out
    assert f"resnet_18+ssl weights [size unknown]: {gone}" in out.replace("\n      ", " ") or str(gone) in out
    assert "from a local file (nothing to download)" in out and "copy the file there" in out
    assert cli.main(["prefetch", str(f)]) == 2
    captured = capsys.readouterr()
    assert str(gone) in captured.out and "a local file (nothing to download)" in captured.out


@pytest.mark.slow
def test_a_pool_of_two_files_and_scratch_records_each_file_and_the_trained_one_beats_scratch(
    trained, random_file, tmp_path, monkeypatch
):
    # The file's stem for gray digits is the formula applied to the file (3x3 already: the channel
    # reduction only). With `sum` a gray image meets the filters as its RGB copy did, so the
    # file's batch-norm statistics still hold; `mean` (the default) scales the stem's output by 1/3.
    spec = {"model": "resnet_18", "weights": str(trained), "source": "ssl"}
    src = weights.safe_load(trained)
    for reduce in ("mean", "sum"):
        model = build_model(spec, num_classes=10, in_chans=1, resolution=8, channel_reduce=reduce)
        want = morph.reduce_channels(src["conv1.weight"], 1, reduce)
        assert (model.state_dict()["conv1.weight"] - want).abs().max() == 0

    # fine-tuning from it beats scratch at equal epochs (one) on the digits
    data = datamod.load_data(DIGITS, 0)
    hp = TrainCfg(epochs=1, batch_size=32, lr=0.001, weight_decay=0.0, channel_reduce="sum")
    acc = {}
    for name, s in (("file", spec), ("scratch", {"model": "resnet_18", "pretrained": False})):
        torch.manual_seed(0)
        m = build_model(s, num_classes=10, in_chans=1, resolution=8, channel_reduce="sum")
        acc[name] = fit(m, data, hp, device="cpu", amp=False, seed=0).best["accuracy"]
    assert acc["file"] > acc["scratch"] + 0.1, acc

    # a study over both files and scratch: three entries, each file's trial with its sha256
    monkeypatch.chdir(tmp_path)
    pool = [
        spec,
        {"model": "resnet_18", "weights": str(random_file), "source": "ssl"},
        {"model": "resnet_18", "pretrained": False},
    ]
    recipe = recipe_from_dict(
        tiny_recipe(study={"n_trials": 3, "baselines": True}, data={"max_samples": 100}, pool=pool, train={"epochs": 1})
    )
    study = st.open_study(recipe)
    st.work(recipe, study, quiet=True)
    trials = optuna.load_study(study_name="tiny", storage="sqlite:///studies/tiny.db").trials
    got = {t.user_attrs["pool_label"]: t.user_attrs.get("weights_sha256") for t in trials}
    assert got == {
        "resnet_18+trained": sha256(trained),
        "resnet_18+random": sha256(random_file),
        "resnet_18-scratch": None,
    }
    assert {t.user_attrs.get("weights_file") for t in trials} == {str(trained), str(random_file), None}
    assert all(
        t.user_attrs["weight_source"] == ("none" if "scratch" in t.user_attrs["pool_label"] else "ssl") for t in trials
    )

    # rank scores them as any pretrained entry
    rows = {r["entry"]: r for r in rank.rank_pool(recipe, datamod.load_data(recipe.data, 0))}
    assert rows["resnet_18+trained"]["status"] == rows["resnet_18+random"]["status"] == "ok"
    assert rows["resnet_18-scratch"]["status"] == "scratch"


def test_a_retrain_checkpoint_and_an_export_safetensors_are_usable_as_they_are(tmp_path):
    """model.pt (state dict beside its build record) and model.safetensors (with metadata): head dropped."""
    from safetensors.torch import save

    torch.manual_seed(0)
    trained = build_model("mini_cnn", num_classes=4, in_chans=1, resolution=8)
    artifacts.save_checkpoint(tmp_path / "model.pt", trained.state_dict(), {"spec": "mini_cnn"}, trial=None)
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    (tmp_path / "model.safetensors").write_bytes(save(state, metadata={"search": "{}"}))
    for name in ("model.pt", "model.safetensors"):
        entry = parse_entry({"model": "mini_cnn", "weights": str(tmp_path / name), "source": "ssl", "label": name})
        m = build_model(entry, num_classes=10, in_chans=1, resolution=8)
        assert all(
            torch.equal(v, trained.state_dict()[k]) for k, v in m.state_dict().items() if k.startswith("features")
        )
        assert m.fc.weight.shape == (10, 128)
