"""Batched inference sized by memory: the same outputs whatever the batch, measured once per model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from search import infer, rank
from search.models import IMAGENET_MEAN, IMAGENET_STD, build_model
from search.train import predict

CPU = torch.device("cpu")


def _images(n: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _backbone(model: str = "resnet_18", resolution: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model({"model": model, "pretrained": False}, num_classes=5, in_chans=3, resolution=resolution)
    return rank.backbone(net)


def test_live_bytes_counts_storages_while_they_live():
    with infer.LiveBytes() as live:
        a = torch.empty(1000, dtype=torch.float32)
        view = a[10:20]  # a view: no new storage
        b = torch.ones(500, dtype=torch.float64)
        del a, view, b
        c = torch.zeros(100, dtype=torch.uint8)
    assert live.peak == 4000 + 4000
    assert live.live == 100
    del c


def test_batch_for_the_budget():
    assert infer.batch_for(10 * infer.MIB, 256 * infer.MIB) == 25
    assert infer.batch_for(10**12, 256 * infer.MIB) == 1
    assert infer.batch_for(1, 256 * infer.MIB) == infer.MAX_BATCH


@pytest.mark.parametrize("model", ["resnet_18", "mini_cnn"])
def test_features_do_not_depend_on_the_batch(model, monkeypatch):
    net = _backbone(model)
    x = _images(11)
    reference = rank.embed(net, x, device=CPU, batch_size=256, channels_last=False)  # one batch: the old default
    assert reference.shape[0] == 11 and np.isfinite(reference).all()
    for batch in (1, 4, 10):
        same = rank.embed(net, x, device=CPU, batch_size=batch, channels_last=False)
        np.testing.assert_allclose(same, reference, rtol=1e-5, atol=1e-5)
    # sized by memory: a budget below one image gives batches of 1 after the 4-image probe
    monkeypatch.setattr(infer, "CPU_BUDGET", 1)
    fresh = _backbone(model)
    auto = rank.embed(fresh, x, device=CPU, channels_last=False)
    np.testing.assert_allclose(auto, reference, rtol=1e-5, atol=1e-5)
    (per_image,) = infer.per_image_bytes(fresh).values()
    assert per_image > 3 * 16 * 16 * 4  # at least its own float input at 16 px
    monkeypatch.setattr(infer, "CPU_BUDGET", 3 * per_image)
    sizes = [len(out) for out in infer.forward_batches(fresh, x, 16, mean=None, std=None, device=CPU)]
    assert sizes == [3, 3, 3, 2]  # measured before: no probe batch
    # channels_last: the same features to float rounding
    np.testing.assert_allclose(rank.embed(fresh, x, device=CPU, channels_last=True), reference, rtol=1e-4, atol=1e-4)


def test_measured_once_per_model_and_size(monkeypatch):
    net = _backbone()
    x = _images(9)
    calls = []
    real = infer._measured
    monkeypatch.setattr(infer, "_measured", lambda *a: calls.append(1) or real(*a))
    sizes = [len(o) for o in infer.forward_batches(net, x, 16, mean=None, std=None, device=CPU)]
    assert sizes == [infer.PROBE_IMAGES, 9 - infer.PROBE_IMAGES]
    list(infer.forward_batches(net, x, 16, mean=None, std=None, device=CPU))
    assert len(calls) == 1
    list(infer.forward_batches(net, x, 12, mean=None, std=None, device=CPU))  # another size: measured again
    assert len(calls) == 2
    measured = infer.per_image_bytes(net)
    assert 0 < measured[(12, "cpu", None, False)] < measured[(16, "cpu", None, False)]
    assert list(infer.forward_batches(net, x[:0], 16, mean=None, std=None, device=CPU)) == []


def test_predict_logits_do_not_depend_on_the_batch(monkeypatch):
    torch.manual_seed(0)
    net = build_model({"model": "resnet_18", "pretrained": False}, num_classes=5, in_chans=3, resolution=16)
    x = _images(7)
    args = (net, x, 16, IMAGENET_MEAN, IMAGENET_STD, CPU, None, False)
    reference = predict(*args, batch=512)
    assert reference.shape == (7, 5) and reference.dtype == torch.float32
    monkeypatch.setattr(infer, "CPU_BUDGET", 1)
    torch.testing.assert_close(predict(*args), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predict(*args, batch=2), reference, rtol=1e-5, atol=1e-5)


def test_knn_chunks_give_the_same_vote(monkeypatch):
    rng = np.random.default_rng(0)
    tr, va = rng.normal(size=(300, 8)), rng.normal(size=(70, 8))
    ytr, yva = rng.integers(0, 4, 300), rng.integers(0, 4, 70)
    whole = rank.knn_accuracy(tr, ytr, va, yva, k=7)
    monkeypatch.setattr(rank, "KNN_BYTES", 24 * 300 * 3)  # three val rows at a time
    assert rank.knn_accuracy(tr, ytr, va, yva, k=7) == whole
