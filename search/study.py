"""Study mechanics: storage, sampler, pruner, the objective, workers.

The normalized recipe lives in the study (user attr `recipe`), so a worker
needs only the storage URL and the study name. `n_trials` is the study-wide
total: a trial that starts when the total is already taken (by finished,
running or waiting trials of lower number) ends at once as FAIL with reason
"study total reached" and is not counted, so any number of workers, runs and
resumes finish exactly `n_trials`.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from search import artifacts, report, space, weights
from search.data import Data, load_data
from search.errors import SearchError
from search.models import build_model, input_resolution
from search.pool import IMAGENET_SOURCES, PoolEntry, parse_pool
from search.recipe import Recipe, recipe_from_dict
from search.train import fit, resolve_device

log = logging.getLogger("search")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)

STUDIES = Path("studies")
NOT_COUNTED = ("interrupted", "study total reached")  # FAIL reasons that free their slot
STALE_REASON = "worker died (no heartbeat)"


class TrialFailed(Exception):
    """A trial that ended without a result (diverged, out of memory, invalid combination)."""


class TotalReached(Exception):
    """The study's total is taken; this trial does not count."""


# ---------------------------------------------------------------------------
# storage


def default_storage(name: str) -> str:
    return f"sqlite:///{STUDIES / name}.db"


def mask(url: str) -> str:
    """The URL with its password replaced by ***, for logs and the stored recipe."""
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)


def open_storage(url: str, heartbeat: int | None = 60) -> optuna.storages.BaseStorage:
    """An Optuna storage for a URL; RDB storages beat and retry trials of dead workers."""
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    try:
        if url.startswith(("sqlite:", "postgresql", "mysql")):
            kwargs: dict[str, Any] = {}
            if url.startswith("sqlite:"):
                kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
            else:
                kwargs["engine_kwargs"] = {"pool_pre_ping": True}
            if heartbeat:
                kwargs.update(
                    heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=3, inherit_intermediate_values=True),
                )
            return optuna.storages.RDBStorage(url, **kwargs)
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            path = url[len("journal:") :].removeprefix("//")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        if url.startswith("redis://"):
            from optuna.storages.journal import JournalRedisBackend

            return optuna.storages.JournalStorage(JournalRedisBackend(url))
    except SearchError:
        raise
    except Exception as e:  # noqa: BLE001 - connection problems are the user's to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SearchError(f"study.storage: cannot open {mask(url)}: {first}") from None
    raise SearchError(
        f"study.storage: unsupported URL '{mask(url)}'; use sqlite:///PATH.db, postgresql+psycopg://..., "
        "mysql+pymysql://..., journal:PATH.log or redis://HOST:PORT"
    )


def make_sampler(recipe: Recipe) -> optuna.samplers.BaseSampler:
    s, seed = recipe.study.sampler, recipe.study.seed
    builders: dict[str, Callable[[], optuna.samplers.BaseSampler]] = {
        "tpe": lambda: optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=s.n_startup_trials, multivariate=s.multivariate,
            group=s.group and s.multivariate, constant_liar=s.constant_liar),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=s.n_startup_trials),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=s.n_startup_trials,
                                                      warn_independent_sampling=False),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed, qmc_type=s.qmc_type, warn_independent_sampling=False),
    }
    return builders[s.name]()


def make_pruner(recipe: Recipe) -> optuna.pruners.BasePruner:
    p = recipe.study.pruner
    builders: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=p.min_trials, n_warmup_steps=p.warmup_epochs),
        "percentile": lambda: optuna.pruners.PercentilePruner(
            p.percentile, n_startup_trials=p.min_trials, n_warmup_steps=p.warmup_epochs),
        "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(
            min_resource=max(1, p.warmup_epochs), reduction_factor=p.reduction_factor),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(
            min_resource=max(1, p.warmup_epochs), max_resource=recipe.train.epochs, reduction_factor=p.reduction_factor),
        "none": optuna.pruners.NopPruner,
    }
    return builders[p.name]()


# ---------------------------------------------------------------------------
# study creation and the stored recipe


def stored_form(recipe: Recipe) -> dict[str, Any]:
    """What the study keeps: the normalized recipe, storage password masked."""
    d = recipe.normalized()
    if d["study"]["storage"]:
        d["study"]["storage"] = mask(d["study"]["storage"])
    return d


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    """Parts that must agree between runs of one study (not the budget, storage or hardware)."""
    d = json.loads(json.dumps(d))
    for key in ("storage", "timeout", "n_trials"):
        d["study"].pop(key, None)
    d.pop("hardware", None)
    return d


def diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def open_study(recipe: Recipe, storage_url: str | None = None, force: bool = False) -> optuna.Study:
    """Create the study (schema, recipe) or load it; a changed recipe is refused unless forced."""
    url = storage_url or recipe.study.storage or default_storage(recipe.study.name)
    storage = open_storage(url)
    study = optuna.create_study(
        study_name=recipe.study.name, storage=storage, load_if_exists=True,
        direction=recipe.study.direction, sampler=make_sampler(recipe), pruner=make_pruner(recipe),
    )
    new = stored_form(recipe)
    old = study.user_attrs.get("recipe")
    if old is not None and not force and _comparable(old) != _comparable(new):
        changes = diff(_comparable(old), _comparable(new))
        raise SearchError(
            f"study '{recipe.study.name}' in {mask(url)} was created with a different recipe "
            f"({'; '.join(changes[:5])}{' ...' if len(changes) > 5 else ''}); use another study.name, "
            "or --force to continue with the new recipe"
        )
    if old != new:
        study.set_user_attr("recipe", new)
    return study


def load_stored(storage_url: str, name: str) -> tuple[Recipe, optuna.Study]:
    """The recipe stored in an existing study (for workers and resumes)."""
    storage = open_storage(storage_url)
    try:
        summary = next(s for s in optuna.get_all_study_summaries(storage) if s.study_name == name)
    except StopIteration:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise SearchError(f"no study '{name}' in {mask(storage_url)}; studies there: {', '.join(names) or 'none'}") from None
    stored = summary.user_attrs.get("recipe")
    if stored is None:
        raise SearchError(f"study '{name}' has no stored recipe: it was not created by `search run`")
    recipe = recipe_from_dict(stored, source=f"recipe stored in study '{name}'")
    study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(recipe), pruner=make_pruner(recipe))
    return recipe, study


# ---------------------------------------------------------------------------
# counting towards the total


def counts(t: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial takes one of the study's n_trials slots."""
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING):
        return True
    return t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") not in (*NOT_COUNTED, None, STALE_REASON)


def finished(study: optuna.Study) -> int:
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state in done or (t.state == TrialState.FAIL and counts(t)))


def remaining(study: optuna.Study, n_trials: int) -> int:
    return max(0, n_trials - sum(1 for t in study.get_trials(deepcopy=False) if counts(t)))


# ---------------------------------------------------------------------------
# the objective


def leakage_warning(entries: list[PoolEntry], data: Data) -> str | None:
    risky = [e.label for e in entries if e.source in IMAGENET_SOURCES]
    if data.overlap == "none" or not risky:
        return None
    kind = "shares classes with" if data.overlap == "semantic" else "may overlap"
    return (f"{data.name} {kind} ImageNet, and these pool entries were trained on ImageNet labels: "
            f"{', '.join(risky)}. Their scores may be inflated; fairer choices: pretrained: false, "
            "SSL/SWSL (timm/resnet50.fb_ssl_yfcc100m_ft_in1k), CLIP (timm/vit_base_patch16_clip_224.openai), "
            "DINOv2 (timm/vit_small_patch14_dinov2.lvd142m).")


def preflight(entries: list[PoolEntry]) -> None:
    """Every pretrained entry's weights are cached (or fetched) before any trial starts."""
    for e in entries:
        if e.pretrained:
            weights.fetch(e)


def trial_seed(study_seed: int, number: int) -> int:
    return (study_seed * 1_000_003 + number) % 2**31


def make_objective(recipe: Recipe, data: Data, entries: list[PoolEntry], device: str,
                   on_line: Callable[[str], None] = print) -> Callable[[optuna.Trial], float]:
    metric = recipe.study.metric
    n_trials = recipe.study.n_trials

    def objective(trial: optuna.Trial) -> float:
        earlier = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number and counts(t)]
        if len(earlier) >= n_trials:
            trial.set_user_attr("fail_reason", "study total reached")
            trial.study.stop()
            raise TotalReached(f"the study already has its {n_trials} trials")
        entry, hp = space.suggest(trial, recipe, entries)
        seed = trial_seed(recipe.study.seed, trial.number)
        res = input_resolution(entry, data.resolution)
        dev = resolve_device(device)
        for k, v in {**entry.attrs(), "input_resolution": res, "channel_reduce": hp.channel_reduce,
                     "seed": seed, "device": str(dev)}.items():
            trial.set_user_attr(k, v)
        try:
            try:
                model = build_model(entry, num_classes=data.num_classes, in_chans=data.in_chans, resolution=res,
                                    dropout=hp.dropout, channel_reduce=hp.channel_reduce)
            except (ValueError, RuntimeError) as e:
                trial.set_user_attr("fail_reason", f"invalid combination: {e}")
                raise TrialFailed(f"invalid combination: {e}") from None
            trial.set_user_attr("params", model.info.params)
            history: list[dict[str, float]] = []

            def on_epoch(epoch: int, record: dict[str, float]) -> None:
                history.append(record)
                trial.report(record[f"val_{metric}"], epoch)
                trial.set_user_attr("history", history)
                trial.set_user_attr("epoch_seconds", [round(r["seconds"], 3) for r in history])
                on_line(f"trial {trial.number:>3} {entry.label:<24} epoch {epoch:>3}  "
                        f"val_{metric} {record[f'val_{metric}']:.4f}  {record['seconds']:.1f}s")
                if trial.should_prune():
                    trial.set_user_attr("fail_reason", f"pruned at epoch {epoch}")
                    raise optuna.TrialPruned(f"pruned at epoch {epoch}")

            result = fit(model, data, hp, device=dev, on_epoch=on_epoch, monitor=metric, seed=seed,
                         amp=recipe.hardware.amp, compile=recipe.hardware.compile,
                         gpu_memory_share=recipe.hardware.gpu_memory_share, keep_best=recipe.study.top_k > 0)
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            raise
        artifacts.after_fit(trial, recipe, model, hp, data, result)  # history; checkpoint while in the top-k
        trial.set_user_attr("status", result.status)
        trial.set_user_attr("peak_memory_mb", max((r["peak_memory_mb"] for r in result.history), default=0.0))
        if result.failed:
            trial.set_user_attr("fail_reason", result.reason)
            raise TrialFailed(result.reason)
        trial.set_user_attr("best_epoch", result.best_epoch)
        for k, v in result.best.items():
            trial.set_user_attr(f"best_{k}", v)
        for k, v in result.last.items():
            trial.set_user_attr(f"last_{k}", v)
        return result.best[metric]

    return objective


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def work(recipe: Recipe, study: optuna.Study, *, quiet: bool = False) -> int:
    """Run trials in this process until the study's total (or the timeout) is reached.

    Returns the number of trials this process ran. SIGTERM is turned into
    KeyboardInterrupt, so the running trial ends as FAIL 'interrupted'.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    entries = parse_pool(recipe.pool)
    preflight(entries)
    data = load_data(recipe.data, recipe.study.seed)
    warning = leakage_warning(entries, data)
    if warning:
        log.warning(warning)
    if recipe.study.baselines and not study.user_attrs.get("baselines_enqueued"):
        study.set_user_attr("baselines_enqueued", True)
        for e in entries:
            study.enqueue_trial(space.baseline_params(recipe, e), skip_if_exists=True)
    left = remaining(study, recipe.study.n_trials)
    say = (lambda s: None) if quiet else print
    say(f"{data.summary()}; {left} of {recipe.study.n_trials} trials to run")
    if left == 0:
        return 0
    signal.signal(signal.SIGTERM, _raise_interrupt)
    before = len(study.get_trials(deepcopy=False))

    def stop_at_total(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        line = report.trial_line(study, trial, finished(study), recipe.study.n_trials, recipe.study.metric)
        if line:
            say(line)
        if remaining(study, recipe.study.n_trials) == 0:
            study.stop()

    objective = make_objective(recipe, data, entries, recipe.hardware.device, on_line=say)
    study.optimize(objective, timeout=recipe.study.timeout, callbacks=[stop_at_total],
                   catch=(TrialFailed, TotalReached), gc_after_trial=True)
    return len(study.get_trials(deepcopy=False)) - before


def resume_command(recipe: Recipe, storage_url: str) -> str:
    return f"python -m search worker --storage '{mask(storage_url)}' --study {recipe.study.name}"

