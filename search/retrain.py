"""`retrain`: train a fixed configuration on train+val, evaluate once on the test split.

The official test split is read in exactly one place, `evaluate_test`, after
training has ended: nothing is selected on it. The recipe must fix everything
(one pool entry, nothing sampled), as `python -m search best` writes it. The
model trains for the full `train.epochs` (no early stopping: there is no
held-out data left to stop on) and its final weights are the result. Test
metrics (keys prefixed `test_`), a confusion-matrix PNG, the history and the
final checkpoint go to `studies/<study>/retrain/` and onto the study
(`user_attrs["retrain"]` plus study artifacts the dashboard serves).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch

from search import artifacts, metrics, plots, space
from search import data as datamod
from search import study as st
from search.data import Data, Split, channels
from search.errors import SearchError
from search.files import write_text
from search.hparams import TrainCfg
from search.models import build_model, info_of, input_resolution
from search.pool import PoolEntry, parse_pool
from search.recipe import Recipe
from search.record import set_study_attrs, study_attrs
from search.stats import summarize
from search.storage import default_storage, open_storage
from search.text import command, wrap, wrap_items
from search.train import fit, predict, resolve_device


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


def evaluate_test(model: torch.nn.Module, data: Data, device: torch.device) -> tuple[dict[str, float], torch.Tensor]:
    """The one evaluation on the official test split: (metrics, confusion matrix)."""
    test = data.test  # the only read of the test split in the package
    info = info_of(model)
    logits = predict(model, test.x, info.resolution, info.mean, info.std, device, None, False)
    cm = metrics.confusion(logits.argmax(1), test.y, data.num_classes)
    return metrics.evaluate(logits, test.y), cm


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
) -> tuple[torch.nn.Module, Any, dict[str, float], torch.Tensor]:
    """One final model under `seed`: (model, fit result, test metrics, confusion matrix)."""
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
    )
    if result.failed:
        raise SearchError(
            f"retrain of {entry.label} (seed {seed}) failed: {result.reason}; lower train.lr or "
            "train.batch_size in the recipe and run it again"
        )
    values, cm = evaluate_test(model, data, dev)
    return model, result, {f"test_{k}": v for k, v in values.items()}, cm


def retrain(
    recipe: Recipe, storage: str | None = None, say: Callable[[str], None] = print, seeds: int = 1
) -> dict[str, Any]:
    """Train on train+val for train.epochs under `seeds` seeds (study.seed, +1, ...), test each
    final model once, write and record the results; returns the record.

    The checkpoint kept is the first seed's: chosen before any test result is seen, so keeping it
    selects nothing on the test split.
    """
    entry, hp = fixed_config(recipe)
    study, url = target_study(recipe, storage)
    data = datamod.load_data(recipe.data, recipe.study.seed)
    dev = resolve_device(recipe.hardware.device)
    fit_data = merge_train_val(data)
    seed_list = [recipe.study.seed + i for i in range(seeds)]
    say(
        _fit(
            f"retrain {entry.label} on {len(fit_data.train)} train+val images for {hp.epochs} epochs, "
            f"seed{'s' if seeds > 1 else ''} {', '.join(map(str, seed_list))}"
        )
    )
    runs: list[dict[str, Any]] = []
    kept = None
    for seed in seed_list:
        model, result, test, cm = _train_once(recipe, entry, hp, data, fit_data, seed, dev, say)
        runs.append({"seed": seed, "test_metrics": test, "epochs": len(result.history)})
        say(
            "\n".join(
                wrap_items(
                    f"test, seed {seed} (official split, evaluated once):", [f"{k} {v:.4f}" for k, v in test.items()]
                )
            )
        )
        if kept is None:
            kept = (model, result, test, cm, seed)
    assert kept is not None  # seed_list is never empty
    model, result, test, cm, seed = kept

    out = artifacts.study_dir(study.study_name, artifacts.url_file(url)) / "retrain"
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "split": "test",
        "n_test": int(cm.sum()),
        "pool_label": entry.label,
        "epochs": len(result.history),
        "hyperparameters": {k: v for k, v in hp.model_dump().items() if k in space.PARAMS},
        "seed": seed,
        "test_metrics": test,
        "seeds": runs,
        "checkpoint": f"model.pt: seed {seed}, the first (kept before any test result)",
        "dir": str(out),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if seeds > 1:
        record["test_summary"] = summarize([r["test_metrics"] for r in runs])
    write_text(out / "test_metrics.json", json.dumps(record, indent=1))
    write_text(out / "history.json", json.dumps(result.history, indent=1))
    title = f"{entry.label}: test accuracy {test['test_accuracy']:.4f} (n={record['n_test']}, seed {seed})"
    plot_confusion(cm, data.classes, title, out / "confusion.png")
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    artifacts.save_checkpoint(
        out / "model.pt",
        state,
        artifacts.model_kwargs(recipe, model, hp, data),
        trial=None,
        epoch=len(result.history),
        metrics=test,
        device=str(next(model.parameters()).device),
    )

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
    if seeds > 1:
        say(
            "\n".join(
                wrap_items(
                    f"test over {seeds} seeds (mean, std, 95% t-interval):",
                    [
                        f"{k} {v['mean']:.4f}±{v['std']:.4f} [{v['low']:.4f}, {v['high']:.4f}]"
                        for k, v in record["test_summary"].items()
                        if k in ("test_accuracy", "test_" + recipe.study.metric)
                    ],
                )
            )
        )
    say(
        _fit(
            f"wrote {out}/test_metrics.json, confusion.png, model.pt ({record['checkpoint']}); "
            f"recorded on study '{study.study_name}'"
        )
    )
    return record
