"""A real CUDA out-of-memory error through `fit`: the step is retried in micro-batches.

ResNet-18 at 32 px, batch 4096, with this process capped (by
`torch.cuda.set_per_process_memory_fraction`) halfway between the probes of a
512 and a 4096 batch (peak of one step, as packing measures them): the full
batch does not fit, so `fit` halves the micro-batch until it does and keeps
that size. Prints the probes and the micro-batch the fit settled on. About
30 s on an H100/H200.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from search import pack  # noqa: E402
from search.data import Data, Split  # noqa: E402
from search.datasets import AugmentCfg  # noqa: E402
from search.models import build_model  # noqa: E402
from search.recipe import TrainCfg  # noqa: E402
from search.train import fit  # noqa: E402

RES, BATCH = 32, 4096  # the CIFAR stem (stride 1, no max-pool): large activations
dev = torch.device("cuda")
precision = pack.precision_name(dev, amp=True)
probes = {}
for bs in (BATCH // 8, BATCH // 2, BATCH):
    model = build_model({"model": "resnet_18", "pretrained": False}, num_classes=10, in_chans=3, resolution=RES)
    probes[bs] = pack.measure_step(model, 3, RES, bs, 10, dev, precision)
    print(f"probe resnet_18 @{RES}px batch {bs:>5} {precision}: {probes[bs] / 2**30:.2f} GiB")
# A cap between what an eighth of the batch and the whole batch need: the full batch cannot fit.
cap = (probes[BATCH // 8] + probes[BATCH]) / 2
total = torch.cuda.get_device_properties(dev).total_memory
torch.cuda.set_per_process_memory_fraction(cap / total, dev)
CAP_GIB = cap / 2**30
g = torch.Generator().manual_seed(0)


def split(n: int) -> Split:
    return Split(
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


data = Data(
    "random",
    split(2 * BATCH),
    split(512),
    split(16),
    tuple(map(str, range(10))),
    "none",
    AugmentCfg(crop="pad", flip=True),
    32,
)
model = build_model({"model": "resnet_18", "pretrained": False}, num_classes=10, in_chans=3, resolution=RES)
res = fit(model, data, TrainCfg(epochs=2, batch_size=BATCH), device="cuda", gpu_memory_share=0.01)
print(
    f"fit under a {CAP_GIB:.2f} GiB cap, batch {BATCH}: status {res.status} {res.reason!r}, micro-batch "
    f"{res.micro_batch}, per epoch {[r['micro_batch'] for r in res.history]}, "
    f"peak {max((r['peak_memory_mb'] for r in res.history), default=0):.0f} MiB"
)
ok = res.status == "ok" and res.micro_batch < BATCH
print("OOM micro-batch check:", "PASS" if ok else "FAIL")
raise SystemExit(0 if ok else 1)
