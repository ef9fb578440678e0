"""Whole studies timed on one GPU: wall time, trials/hour, mean GPU utilisation.

The data is CIFAR-10-shaped and synthetic: 50,000 train + 10,000 test 32x32 RGB
images written in the official CIFAR-10 python-batch format (cifar-10-batches-py/,
pickled dicts with bytes keys) and read by the real `cifar10` loader. Each class
is a random low-frequency colour template plus noise, so there is something to
learn and trials differ (it is not CIFAR-10: accuracies say nothing about it).
Models train from scratch (`pretrained: false`): a GPU machine has no weights
cache. Each study runs as `python -m search run` in a subprocess:

  headline   ResNet-18 at 32 px, TPE, no pruner, then Hyperband
  pool       ResNet-18, MiniCNN, ViT-Tiny at 64 px, no pruner, then Hyperband
  pack       MiniCNN at 28 px: trials_per_gpu auto against one trial per GPU,
             their trials/hour as a ratio (the same run of this script)

Every study asks for --trials x --epochs (50 x 15). A study still running at its
share of --budget is stopped (SIGTERM: its running trials end "interrupted") and
its figures are projected from what it did: epochs/hour measured over the run,
the 50-trial wall time as total epochs needed / that rate (under Hyperband the
epochs a trial needs are the mean of the trials that ended). Projected figures
are marked "~". GPU utilisation is the mean of nvidia-smi samples every 0.5 s.

    python scripts/bench_study.py --smoke            # CPU, tiny, under a minute: the plumbing
    python scripts/bench_study.py --budget 420       # on a GPU: the figures, within 7 minutes
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def write_cifar10(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """cifar-10-batches-py/ as in the official archive, with synthetic learnable images."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    coarse = rng.uniform(0, 255, (10, 3, 4, 4))  # one low-frequency colour template per class
    templates = coarse.repeat(8, axis=2).repeat(8, axis=3)  # 3 x 32 x 32

    def images(n: int, offset: int) -> tuple[np.ndarray, list[int]]:
        labels = (np.arange(n) + offset) % 10
        x = 0.6 * templates[labels] + 0.4 * rng.uniform(0, 255, (n, 3, 32, 32))
        return x.clip(0, 255).astype(np.uint8).reshape(n, 3072), [int(v) for v in labels]

    per = n_train // 5
    for i in range(6):
        n = per if i < 5 else n_test
        data, labels = images(n, i)
        d = {b"batch_label": b"synthetic", b"labels": labels, b"data": data, b"filenames": [b"s.png"] * n}
        (folder / (f"data_batch_{i + 1}" if i < 5 else "test_batch")).write_bytes(pickle.dumps(d, protocol=2))
    meta = {b"num_cases_per_batch": per, b"label_names": CLASSES, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


class GpuSampler:
    """Mean GPU utilisation (%) from `nvidia-smi` samples every 0.5 s while running; None without one."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "500"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.split(",")[0]))  # the first GPU
            except ValueError:
                pass

    def __exit__(self, *exc: object) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def recipe(
    name: str,
    data_root: Path,
    pool: list,
    resolution: int | None,
    pruner: str,
    args: argparse.Namespace,
    trials_per_gpu: str | int | None,
    batch_sizes: list[int],
) -> dict:
    return {
        "study": {
            "name": name,
            "n_trials": args.trials,
            "sampler": {"name": "tpe", "n_startup_trials": 10},
            "pruner": {"name": pruner, "warmup_epochs": 1} if pruner != "none" else "none",
            "seed": 0,
            "top_k": 0,
            "heartbeat": 30,
        },
        "data": {
            "dataset": "cifar10",
            "root": str(data_root),
            "resolution": resolution,
            "val_split": 0.1,
            **({"max_samples": args.max_samples} if args.max_samples else {}),
        },
        "pool": pool,
        "space": {"preset": "quick", "overrides": {"batch_size": batch_sizes}},
        "train": {"epochs": args.epochs},
        "hardware": {"device": args.device, "trials_per_gpu": trials_per_gpu},
    }


def run_study(work: Path, rec: dict, limit: float, workers: int | None) -> dict:
    """Run one study by the CLI within `limit` seconds; its figures from the stored trials."""
    import optuna

    path = work / f"{rec['study']['name']}.yaml"
    path.write_text(yaml.safe_dump(rec, sort_keys=False))
    cmd = [sys.executable, "-m", "search", "run", str(path), "-q", *(["--workers", str(workers)] if workers else [])]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    stopped = False
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            out, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            stopped = True
            os.killpg(proc.pid, signal.SIGTERM)  # run and its workers: running trials end "interrupted"
            try:
                out, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
        wall = time.perf_counter() - t0
    db = work / "studies" / f"{rec['study']['name']}.db"
    if (proc.returncode not in (0, 1) and not stopped) or not db.is_file():
        raise SystemExit(f"{rec['study']['name']}: exit {proc.returncode} after {wall:.0f} s:\n{out[-3000:]}")
    study = optuna.load_study(study_name=rec["study"]["name"], storage=f"sqlite:///{db}")
    trials = study.get_trials(deepcopy=False)
    states = optuna.trial.TrialState
    ended = [t for t in trials if t.state in (states.COMPLETE, states.PRUNED)]
    epochs = sum((t.user_attrs.get("epochs") or 0) for t in trials)  # interrupted trials' epochs count too
    oom = sum(1 for t in trials if t.user_attrs.get("status") == "oom")
    micro = sum(1 for t in trials if t.user_attrs.get("micro_batch", 10**9) < t.params.get("batch_size", 0))
    epochs_per_trial = (
        (sum((t.user_attrs.get("epochs") or 0) for t in ended) / len(ended)) if ended else rec["train"]["epochs"]
    )
    rate = epochs / wall  # epochs per second
    n = rec["study"]["n_trials"]
    done = len(ended) >= n
    projected = wall if done else (n * epochs_per_trial / rate if rate else float("inf"))
    best = max((t.value for t in trials if t.state == states.COMPLETE and t.value is not None), default=float("nan"))
    return {
        "name": rec["study"]["name"],
        "wall": wall,
        "ended": len(ended),
        "n": n,
        "done": done,
        "trials_per_hour": (len(ended) / wall * 3600) if done else 3600 * rate / epochs_per_trial,
        "projected": projected,
        "epochs": epochs,
        "gpu": gpu.mean,
        "oom": oom,
        "micro": micro,
        "best": best,
        "pruned": sum(1 for t in trials if t.state == states.PRUNED and t.user_attrs.get("status") != "oom"),
    }


def line(r: dict) -> str:
    """Two lines of at most 100 columns: the timing, then what the trials did."""
    approx = "" if r["done"] else "~"
    gpu = f"{r['gpu']:.0f}%" if r["gpu"] is not None else "n/a"
    proj = f"{approx}{r['projected'] / 60:.1f} min" if r["projected"] < float("inf") else "n/a (no epoch)"
    return (
        f"{r['name']:<24} {r['ended']:>3}/{r['n']} trials in {r['wall']:.1f} s, "
        f"{approx}{r['trials_per_hour']:.1f} trials/h, {r['n']} trials: {proj}, gpu {gpu}\n"
        f"{'':<24} {r['epochs']} epochs, pruned {r['pruned']}, out of memory {r['oom']}, "
        f"micro-batched {r['micro']}, best acc. {r['best']:.3f}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny, on the CPU, under a minute: checks the plumbing")
    p.add_argument("--device", default="cuda")
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all studies together")
    p.add_argument("--phases", default="headline,pool,pack")
    p.add_argument("--max-samples", type=int, default=None, help="train images used (default: all 45,000)")
    p.add_argument("--keep", action="store_true", help="keep the working directory (studies, recipes)")
    args = p.parse_args()
    n_train, n_test = 50_000, 10_000
    big, small = [256, 512], [128, 256]
    heavy, pool_px = "resnet_18", 64
    if args.smoke:  # the plumbing of every phase, in seconds of CPU: MiniCNN stands in for ResNet-18
        args.device, args.trials, args.epochs, args.max_samples = "cpu", 2, 1, 60
        n_train, n_test, big, small, heavy, pool_px = 500, 100, [32], [32], "mini_cnn", 16
        args.budget = max(args.budget, 900.0)  # a plumbing check: every study runs to its end
    phases = args.phases.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench_study_"))
    write_cifar10(work / "data", n_train, n_test)
    weights = {"headline": [0.3, 0.2], "pool": [0.15, 0.1], "pack": [0.125, 0.125]}
    share = args.budget / sum(sum(weights[ph]) for ph in phases)
    print(f"synthetic CIFAR-10-format data: {n_train} train / {n_test} test, 10% of train for validation")
    print(f"{args.trials} trials x {args.epochs} epochs per study; device {args.device}; budget {args.budget:.0f} s")
    results = {}
    data = work / "data"
    scratch = lambda m: {"model": m, "pretrained": False}  # noqa: E731
    try:
        if "headline" in phases:
            for pruner, w in zip(("none", "hyperband"), weights["headline"], strict=True):
                rec = recipe(
                    f"{heavy.replace('_', '')}-32px-{pruner}", data, [scratch(heavy)], None, pruner, args, "auto", big
                )
                results[rec["study"]["name"]] = r = run_study(work, rec, w * share, None)
                print(line(r), flush=True)
        if "pool" in phases:
            pool = [scratch(m) for m in dict.fromkeys((heavy, "mini_cnn", "vit_tiny"))]
            for pruner, w in zip(("none", "hyperband"), weights["pool"], strict=True):
                rec = recipe(f"pool-{pool_px}px-{pruner}", data, pool, pool_px, pruner, args, "auto", small)
                results[rec["study"]["name"]] = r = run_study(work, rec, w * share, None)
                print(line(r), flush=True)
        if "pack" in phases:
            for mode, w in zip(("auto", None), weights["pack"], strict=True):
                rec = recipe(
                    f"minicnn-28px-{mode or 'single'}", data, [scratch("mini_cnn")], 28, "none", args, mode, small
                )
                workers = None if mode else 1  # auto: as many as the GPU may hold (one on a CPU)
                results[rec["study"]["name"]] = r = run_study(work, rec, w * share, workers)
                print(line(r), flush=True)
            packed, single = results["minicnn-28px-auto"], results["minicnn-28px-single"]
            ratio = packed["trials_per_hour"] / single["trials_per_hour"]
            print(
                f"MiniCNN 28 px packed / one trial per GPU: {ratio:.2f}x "
                f"trials/hour (goal >= 3x); oom in packed: {packed['oom']} (goal 0)"
            )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for name, goal in ((f"{heavy.replace('_', '')}-32px-none", 15), (f"{heavy.replace('_', '')}-32px-hyperband", 5)):
        if name in results:
            r = results[name]
            print(
                f"headline {name}: {'' if r['done'] else '~'}{r['projected'] / 60:.1f} min for {r['n']} x "
                f"{args.epochs} (goal <= {goal} min)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
