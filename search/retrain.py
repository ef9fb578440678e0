"""`retrain`: train a fixed configuration on train+val, evaluate once on the test split.

The official test split is read in exactly one place, `evaluate_test`, after
training has ended: nothing is selected on it. The recipe must fix everything
(one pool entry, nothing sampled), as `python -m search best` writes it. The
model trains for the full `train.epochs` (no early stopping: there is no
held-out data left to stop on) and its final weights are the result. Test
metrics (keys prefixed `test_`), a confusion-matrix PNG, the history, the
recipe and the final checkpoint go to `studies/<study>/retrain/` and onto the
study (`user_attrs["retrain"]` plus study artifacts the dashboard serves).

`--tta flip` adds test-time augmentation to that one evaluation: the softmax
probabilities of each image and its mirror image are averaged. Both metric sets
are reported, the plain ones exactly as without TTA; neither chooses anything.
(`search export` reads the test split once more, to check the exported model
against this one: agreement of two copies of the final model, no metric.)

Each seed's result is kept in `studies/<study>/retrain.partial/` as it finishes, so a run stopped
by SIGTERM or Ctrl-C (exit 143 / 130, one line) goes on with the next seed when it is run again;
a seed kept for another recipe is not used. The results are written to a new directory that then
replaces `retrain/` whole: its `model.pt` and `test_metrics.json` (which holds the checkpoint's
SHA-256) always come from the same run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import torch

from search import artifacts, cpu_format, metrics, plots, space
from search import data as datamod
from search import study as st
from search.data import Data, Split
from search.datasets import channels
from search.device import resolve_device
from search.errors import SearchError
from search.files import write_text
from search.hparams import TrainCfg
from search.models import build_model, info_of, input_resolution
from search.pool import PoolEntry, parse_pool
from search.recipe import Recipe
from search.record import set_study_attrs, study_attrs
from search.stats import summarize
from search.storage import default_storage, open_storage, study_dir, url_file
from search.text import command, wrap, wrap_items
from search.train import fit, predict


def target_study(recipe: Recipe, storage: str | None = None) -> tuple[optuna.Study, str]:
    """The study the results are recorded on (the exporting study, `study.origin`) and its storage URL."""
    name = recipe.study.origin or recipe.study.name
    url = storage or recipe.study.storage or default_storage(name)
    if recipe.study.origin:  # it must exist: a misspelt origin creates no database
        try:
            return st.load_stored(url, name)[1], url
        except SearchError as e:
            raise SearchError(
                f"study.origin: {e}; pass --storage URL of that study, or remove study.origin to record on a new study"
            ) from None
    store = open_storage(url, heartbeat=None)
    if name in {s.study_name for s in optuna.get_all_study_summaries(store)}:
        return optuna.load_study(study_name=name, storage=store), url
    return st.open_study(recipe, url), url


def fixed_config(recipe: Recipe) -> tuple[PoolEntry, TrainCfg]:
    """(pool entry, train hyperparameters) of a recipe that searches nothing; SearchError otherwise."""
    entries = parse_pool(recipe.pool)
    fixed = space.resolve(recipe.space, recipe.train)[1]
    # A conditional parameter that does not take effect (momentum under adamw) is not a search.
    sampled = list(space.reachable(recipe.space, recipe.train, entries, channels(recipe.data)))
    if len(entries) != 1 or sampled:
        what = f"{len(entries)} pool entries" if len(entries) != 1 else f"sampled parameters {', '.join(sampled)}"
        raise SearchError(
            f"retrain needs a recipe that fixes everything, found {what}; export one with "
            f"`{command('best STUDY --out best.yaml')}`"
        )
    # No early stopping: with val merged into train there is nothing honest to stop on. Validated, so
    # integer fields get ints even where a fixed override was read as a float (batch_size 32.0).
    return entries[0], TrainCfg.model_validate({**recipe.train.model_dump(), **fixed, "patience": None})


def _fit(line: str) -> str:
    """A message line in 100 columns, continuation lines indented."""
    return "\n".join(wrap(line))


def merge_train_val(data: Data) -> Data:
    """train+val as the training split; the test split is left out of the object entirely."""
    train = Split(torch.cat([data.train.x, data.val.x]), torch.cat([data.train.y, data.val.y]))
    none = Split(data.train.x[:0], data.train.y[:0])
    return Data(data.name, train, data.val, none, data.classes, data.overlap, data.augment, data.resolution)


TTA_TEXT = {"flip": "image and mirror image"}
# Test-time augmentation: the views of a batch of uint8 images (B, C, H, W) besides the images themselves.
TTA_VIEWS: dict[str, Callable[[torch.Tensor], list[torch.Tensor]]] = {
    "flip": lambda x: [x.flip(-1)],  # the mirror image (left-right)
}


def evaluate_test(
    model: torch.nn.Module, data: Data, device: torch.device, tta: str | None = None
) -> tuple[dict[str, float], torch.Tensor, dict[str, float] | None]:
    """The one evaluation on the official test split: (metrics, confusion matrix, metrics with TTA
    or None). The plain metrics are computed as without `tta`; with it, the softmax
    probabilities of the image and its TTA_VIEWS are averaged."""
    test = data.test  # the only read of the test split in the training code
    info = info_of(model)

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        return predict(model, x, info.resolution, info.mean, info.std, device, None, False)

    logits = logits_of(test.x)
    cm = metrics.confusion(logits.argmax(1), test.y, data.num_classes)
    plain = metrics.evaluate(logits, test.y)
    if tta is None:
        return plain, cm, None
    views = TTA_VIEWS[tta](test.x)
    probs = sum((logits_of(v).softmax(1) for v in views), logits.softmax(1)) / (1 + len(views))
    # log of the averaged probabilities: what metrics.evaluate reads as logits gives them back by softmax
    return plain, cm, metrics.evaluate(probs.clamp_min(torch.finfo(probs.dtype).tiny).log(), test.y)


def plot_confusion(cm: torch.Tensor, classes: tuple[str, ...], title: str, path: Path) -> Path:
    n = len(classes)
    with plots.figure(path, (max(4, 0.45 * n + 2), max(3.5, 0.45 * n + 1.5))) as fig:
        ax = fig.subplots()
        im = ax.imshow(cm.numpy(), cmap="Blues")
        if n <= 20:  # counts stay legible
            vmax = int(cm.max())
            for i in range(n):
                for j in range(n):
                    v = int(cm[i, j])
                    color = "white" if v > vmax / 2 else "black"
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color=color)
            ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(n), classes, fontsize=7)
        ax.set(xlabel="predicted", ylabel="true", title=title)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return path


def _train_once(
    recipe: Recipe,
    entry: PoolEntry,
    hp: TrainCfg,
    data: Data,
    fit_data: Data,
    seed: int,
    dev: torch.device,
    say: Callable[[str], None],
    tta: str | None = None,
) -> tuple[torch.nn.Module, Any, dict[str, float], torch.Tensor, dict[str, float] | None]:
    """One final model under `seed`: (model, fit result, test metrics, confusion matrix, TTA metrics)."""
    torch.manual_seed(seed)  # the initial weights follow the seed as well as the training
    model = build_model(
        entry,
        num_classes=data.num_classes,
        in_chans=data.in_chans,
        resolution=input_resolution(entry, data.resolution),
        dropout=hp.dropout,
        channel_reduce=hp.channel_reduce,
    )

    def on_epoch(epoch: int, record: dict[str, float]) -> None:
        say(
            f"retrain {entry.label:<24} seed {seed} epoch {epoch:>3}/{hp.epochs}  "
            f"train_loss {record['train_loss']:.4f}  {record['seconds']:.1f}s"
        )

    fmt = "nchw"
    if dev.type == "cpu":  # the format hardware.cpu_format says (auto: the cached or probed fastest)
        res = input_resolution(entry, data.resolution)
        step = cpu_format.training_step(model, data.in_chans, res, hp.batch_size, data.num_classes)
        key = cpu_format.probe_key(entry.label, res, hp.batch_size)
        fmt = cpu_format.choose(recipe.hardware.cpu_format, key, step, amp=recipe.hardware.amp)
    result = fit(
        model,
        fit_data,
        hp,
        device=dev,
        on_epoch=on_epoch,
        monitor=recipe.study.metric,
        seed=seed,
        amp=recipe.hardware.amp,
        compile=recipe.hardware.compile,
        gpu_memory_share=recipe.hardware.gpu_memory_share,
        cpu_format=fmt,
    )
    if result.failed:
        raise SearchError(
            f"retrain of {entry.label} (seed {seed}) failed: {result.reason}; lower train.lr or "
            "train.batch_size in the recipe and run it again"
        )
    values, cm, with_tta = evaluate_test(model, data, dev, tta)
    tested = {f"test_{k}": v for k, v in with_tta.items()} if with_tta is not None else None
    return model, result, {f"test_{k}": v for k, v in values.items()}, cm, tested


class Stopped(KeyboardInterrupt):
    """SIGTERM or Ctrl-C stopped a retrain; `message` says what was kept (one line)."""

    def __init__(self, signal_name: str, message: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.message = message


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt('SIGTERM') in the block, as Ctrl-C raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def recipe_key(recipe: Recipe) -> str:
    """What a kept seed was trained for: a digest of the normalized recipe."""
    text = json.dumps(recipe.normalized(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _kept_seed(partial: Path, seed: int, key: str, with_model: bool) -> dict[str, Any] | None:
    """A seed finished by an earlier run of the same recipe (its checkpoint too when `with_model`), or None."""
    try:
        run = json.loads((partial / f"seed-{seed}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(run, dict) or run.get("key") != key or run.get("seed") != seed:
        return None
    if with_model and not (partial / f"seed-{seed}.pt").is_file():
        return None
    return run


def _run_seed(
    recipe: Recipe, entry: PoolEntry, hp: TrainCfg, data: Data, fit_data: Data, seed: int, ctx: dict[str, Any]
) -> dict[str, Any]:
    """Train and test one seed and keep its result (and, for the first seed, its checkpoint, written
    first) in the partial directory; a seed kept by an earlier run is read back instead."""
    partial, key, say = ctx["partial"], ctx["key"], ctx["say"]
    first = seed == recipe.study.seed
    run = _kept_seed(partial, seed, key, first)
    if run is not None:
        say(f"seed {seed}: tested in an earlier run; kept, not trained again")
        return run
    model, result, test, cm, tested = _train_once(recipe, entry, hp, data, fit_data, seed, ctx["dev"], say, ctx["tta"])
    if first:  # the checkpoint kept: written before the record that says the seed is done
        artifacts.save_checkpoint(
            partial / f"seed-{seed}.pt",
            {k: v.detach().to("cpu") for k, v in model.state_dict().items()},
            artifacts.model_kwargs(recipe, model, hp, data),
            trial=None,
            epoch=len(result.history),
            metrics=test,
            device=str(next(model.parameters()).device),
        )
    run = {
        "key": key,
        "seed": seed,
        "test_metrics": test,
        **({"tta": ctx["tta"], "test_metrics_tta": tested} if tested is not None else {}),
        "epochs": len(result.history),
        "history": result.history,
        "confusion": cm.tolist(),
    }
    write_text(partial / f"seed-{seed}.json", json.dumps(run))
    return run


def _stopped_message(e: KeyboardInterrupt, done: list[int], partial: Path) -> Stopped:
    name = str(e) if str(e) == "SIGTERM" else "SIGINT"
    kept = f"seed {', '.join(map(str, done))} kept in {partial}" if done else "no seed finished"
    return Stopped(name, f"retrain stopped ({name}): {kept}; run the same command again to go on")


def _replace_dir(out: Path, write: Callable[[Path], None]) -> None:
    """`write` the files into a new directory beside `out`, then put it in `out`'s place whole."""
    new = out.with_name(f".{out.name}.new-{secrets.token_hex(4)}")
    old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
    try:
        new.mkdir(parents=True)
        write(new)
        if out.exists():
            out.rename(old)
        new.rename(out)
    finally:
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _write_results(
    out: Path,
    record: dict[str, Any],
    run: dict[str, Any],
    checkpoint: Path,
    classes: tuple[str, ...],
    title: str,
    recipe: dict[str, Any],
) -> None:
    """model.pt, test_metrics.json (with the checkpoint's SHA-256), history.json, confusion.png
    and recipe.json (what `search export` rebuilds) in place of `out`, all from one run."""

    def write(new: Path) -> None:
        shutil.copyfile(checkpoint, new / "model.pt")
        record["model_sha256"] = hashlib.sha256((new / "model.pt").read_bytes()).hexdigest()
        (new / "history.json").write_text(json.dumps(run["history"], indent=1))
        plot_confusion(torch.tensor(run["confusion"]), classes, title, new / "confusion.png")
        (new / "test_metrics.json").write_text(json.dumps(record, indent=1))
        (new / "recipe.json").write_text(json.dumps(recipe, indent=1))

    _replace_dir(out, write)


def _say_summary(record: dict[str, Any], metric: str, say: Callable[[str], None]) -> None:
    say(
        "\n".join(
            wrap_items(
                f"test over {len(record['seeds'])} seeds (mean, std, 95% t-interval):",
                [
                    f"{k} {v['mean']:.4f}±{v['std']:.4f} [{v['low']:.4f}, {v['high']:.4f}]"
                    for k, v in record["test_summary"].items()
                    if k in ("test_accuracy", "test_" + metric)
                ],
            )
        )
    )


def retrain(
    recipe: Recipe,
    storage: str | None = None,
    say: Callable[[str], None] = print,
    seeds: int = 1,
    tta: str | None = None,
) -> dict[str, Any]:
    """Train on train+val for train.epochs under `seeds` seeds (study.seed, +1, ...), test each
    final model once (also with test-time augmentation `tta`, a TTA_VIEWS name), write and record
    the results; returns the record. SIGTERM or Ctrl-C raise
    `Stopped` with the seeds finished kept for the next run.

    The checkpoint kept is the first seed's: chosen before any test result is seen, so keeping it
    selects nothing on the test split.
    """
    entry, hp = fixed_config(recipe)
    if tta is not None and tta not in TTA_VIEWS:
        raise SearchError(f"retrain --tta {tta}: unknown test-time augmentation; allowed: {', '.join(TTA_VIEWS)}")
    study, url = target_study(recipe, storage)
    data = datamod.load_data(recipe.data, recipe.study.seed)
    fit_data = merge_train_val(data)
    seed_list = [recipe.study.seed + i for i in range(seeds)]
    out = study_dir(study.study_name, url_file(url)) / "retrain"
    partial = out.with_name("retrain.partial")
    key = recipe_key(recipe) + (f"+tta-{tta}" if tta else "")  # a kept seed has the metrics asked for
    ctx = {"partial": partial, "key": key, "say": say, "dev": resolve_device(recipe.hardware.device), "tta": tta}
    say(
        _fit(
            f"retrain {entry.label} on {len(fit_data.train)} train+val images for {hp.epochs} epochs, "
            f"seed{'s' if seeds > 1 else ''} {', '.join(map(str, seed_list))}"
        )
    )
    runs: list[dict[str, Any]] = []
    if tta == "flip" and not data.augment.flip:
        say(_fit(f"note: {data.name} trains without flips (augment.flip off): mirror images may score lower"))
    with sigterm_interrupts():
        try:
            for seed in seed_list:
                runs.append(_run_seed(recipe, entry, hp, data, fit_data, seed, ctx))
                test = runs[-1]["test_metrics"]
                say(
                    "\n".join(
                        wrap_items(
                            f"test, seed {seed} (official split, evaluated once):",
                            [f"{k} {v:.4f}" for k, v in test.items()],
                        )
                    )
                )
                if tta is not None and "test_metrics_tta" in runs[-1]:
                    say(
                        "\n".join(
                            wrap_items(
                                f"test with TTA {tta}, seed {seed} ({TTA_TEXT[tta]}, probabilities averaged; "
                                "never selected on):",
                                [f"{k} {v:.4f}" for k, v in runs[-1]["test_metrics_tta"].items()],
                            )
                        )
                    )
            return _finish(recipe, study, entry, hp, data, runs, out, say)
        except KeyboardInterrupt as e:
            raise _stopped_message(e, [r["seed"] for r in runs], partial) from None


def _finish(
    recipe: Recipe,
    study: optuna.Study,
    entry: PoolEntry,
    hp: TrainCfg,
    data: Data,
    runs: list[dict[str, Any]],
    out: Path,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Write the results in place of `out`, record them on the study, drop the partial directory."""
    kept = runs[0]  # the first seed's: chosen before any test result
    seed, test = kept["seed"], kept["test_metrics"]
    n_test = int(sum(map(sum, kept["confusion"])))
    record: dict[str, Any] = {
        "split": "test",
        "n_test": n_test,
        "pool_label": entry.label,
        "epochs": kept["epochs"],
        "hyperparameters": {k: v for k, v in hp.model_dump().items() if k in space.PARAMS},
        "seed": seed,
        "test_metrics": test,
        **({"tta": kept["tta"], "test_metrics_tta": kept["test_metrics_tta"]} if "test_metrics_tta" in kept else {}),
        "seeds": [{k: r[k] for k in ("seed", "test_metrics", "test_metrics_tta", "epochs") if k in r} for r in runs],
        "checkpoint": f"model.pt: seed {seed}, the first (kept before any test result)",
        "dir": str(out),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if len(runs) > 1:
        record["test_summary"] = summarize([r["test_metrics"] for r in runs])
    partial = out.with_name("retrain.partial")
    title = f"{entry.label}: test accuracy {test['test_accuracy']:.4f} (n={n_test}, seed {seed})"
    recipe_json = st.stored_form(recipe)
    _write_results(out, record, kept, partial / f"seed-{seed}.pt", data.classes, title, recipe_json)
    shutil.rmtree(partial, ignore_errors=True)

    if study_attrs(study).get("retrain"):
        say(
            _fit(
                f"note: study '{study.study_name}' already had a test evaluation "
                f"({study_attrs(study).get('retrain', {}).get('finished')}); it is replaced by this one"
            )
        )
    store = artifacts.store_for(out.parent)
    for name in ("test_metrics.json", "confusion.png", "model.pt"):
        optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(out / name), study_or_trial=study)
    set_study_attrs(study, retrain=record)
    if len(runs) > 1:
        _say_summary(record, recipe.study.metric, say)
    say(
        _fit(
            f"wrote {out}/test_metrics.json, confusion.png, recipe.json, model.pt ({record['checkpoint']}); "
            f"recorded on study '{study.study_name}'"
        )
    )
    return record
