"""End-to-end study on a CUDA machine: `python -m search run` on CIFAR-format data.

Writes CIFAR-10 python batches of synthetic, learnable images (class-coloured
noise, 10,000 train + 2,000 test) into a temporary data root, runs a 3-trial
study over a mixed pool (ResNet-18 and MiniCNN at 32 px, ViT-Tiny at 64 px;
all from scratch, so no weights are needed) with bf16 autocast and
channels_last, then one MiniCNN trial with the data left on the host, and
prints what each trial recorded: state, accuracy, device, seconds per epoch,
images/s and peak GPU memory.

    PYTHONPATH=$PWD python3 scripts/gpu_smoke.py [DEVICE]     # cuda by default
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml


def write_cifar10(root: Path, n_train: int = 10_000, n_test: int = 2_000, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(n: int) -> dict:
        y = rng.integers(0, 10, n)
        colour = np.stack([(y * 25) % 256, (y * 70) % 256, (255 - y * 25) % 256], 1)[:, :, None, None]
        x = np.clip(colour + rng.normal(0, 60, (n, 3, 32, 32)), 0, 255).astype(np.uint8)
        return {b"data": x.reshape(n, -1), b"labels": y.tolist()}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n_train // 5)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))


def run_study(tmp: Path, name: str, device: str, **over) -> bool:
    import optuna

    from search import artifacts

    recipe = {
        "study": {
            "name": name,
            "n_trials": 3,
            "storage": f"sqlite:///{tmp}/{name}.db",
            "baselines": True,
            "sampler": "random",
            "pruner": "none",
            "top_k": 0,
        },
        "data": {"dataset": "cifar10", "root": str(tmp / "data")},
        "pool": [
            {"model": "resnet_18", "pretrained": False},
            "mini_cnn",
            {"model": "vit_tiny", "pretrained": False, "resolution": 64},
        ],
        "space": {
            "preset": "quick",
            "overrides": {"optimizer": "adamw", "lr": 0.002, "batch_size": 256, "weight_decay": 0.0005, "dropout": 0.0},
        },
        "train": {"epochs": 3},
        "hardware": {"device": device},
    }
    for key, value in over.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) else value
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "search", "run", str(tmp / f"{name}.yaml")])
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp}/{name}.db")
    print(
        f"\n{name}\n{'trial':<6}{'entry':<20}{'state':<10}{'val acc':>8}{'device':>8}{'s/epoch':>9}{'img/s':>9}"
        f"{'peak MiB':>10}"
    )
    for t in study.trials:
        h = artifacts.history_of(study, t)  # the per-epoch records are the trial's history artifact
        last = h[-1] if h else {}
        print(
            f"{t.number:<6}{t.user_attrs.get('pool_label', '?'):<20}{t.state.name:<10}"
            f"{(t.value or 0):>8.4f}{t.user_attrs.get('device', '?'):>8}"
            f"{last.get('seconds', 0):>9.2f}{last.get('images_per_s', 0):>9.0f}{last.get('peak_memory_mb', 0):>10.0f}"
        )
    return proc.returncode == 0 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def main(device: str = "cuda") -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_cifar10(tmp / "data")
        ok = run_study(tmp, "gpu-smoke", device)
        # The data left on the host (as when it exceeds hardware.gpu_memory_share): pinned batches per step.
        ok = (
            run_study(
                tmp,
                "gpu-smoke-host",
                device,
                study={"n_trials": 1},
                pool=["mini_cnn"],
                hardware={"gpu_memory_share": 1e-9},
            )
            and ok
        )
        print("gpu smoke:", "ok" if ok else "FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
