"""Study mechanics: storage, sampler, pruner, the objective, workers.

The normalized recipe lives in the study (user attr `recipe`), so a worker
needs only the storage URL and the study name. `n_trials` is the study-wide
total: a trial that starts when the total is already taken (by finished,
running or waiting trials of lower number) ends at once as FAIL with reason
"study total reached" and is not counted, so any number of workers, runs and
resumes finish exactly `n_trials`.

Dead workers: every running trial records a sign of life from a thread of its
own, independent of training progress (Optuna's heartbeat on RDB storages, a
`heartbeat_at` attr everywhere). A trial silent for STALE_BEATS heartbeats is
failed with reason "worker died (no heartbeat)" and queued again as a WAITING
copy (same params, seed and intermediate values); the copy holds the slot, so
the dead trial does not count. Workers wait for the last running trials before
they exit, so a retry is always picked up.

Resuming: a running trial saves its full training state at every epoch end,
atomically, to `trial-N.pt` under the study's resume directory (`study.
checkpoint_dir`/NAME, default `studies/NAME/resume`; a shared path for many
machines). A retry (of a dead, preempted or interrupted trial) takes that file
over and goes on from the epoch after it: at most the epoch in progress is
lost, and on the CPU the history is exactly the uninterrupted one's. The file
is removed when the trial ends. SIGTERM or Ctrl-C stops the running trial at
the next step, queues it again and exits without a traceback; a second Ctrl-C
exits at once. A worker whose trial was failed by another (as stale) drops it
and goes on: the retry is someone else's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
from optuna.trial import TrialState

from search import artifacts, pack, report, space, weights
from search.data import Data, load_data, load_raw
from search.data import check as check_data
from search.errors import SearchError
from search.measure import measure as measure_model
from search.models import build_model, input_resolution
from search.pool import IMAGENET_SOURCES, PoolEntry, parse_pool
from search.recipe import CONSTRAINABLE, BoundCfg, Recipe, recipe_from_dict
from search.train import fit, resolve_device, seed_everything

log = logging.getLogger("search")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)

STUDIES = Path("studies")
STALE_REASON = "worker died (no heartbeat)"
NOT_COUNTED = ("interrupted", "study total reached", STALE_REASON)  # FAIL reasons that free their slot
HEARTBEAT_ATTR = "heartbeat_at"  # epoch seconds of a running trial's last sign of life
STALE_BEATS = 10  # heartbeats of silence before a running trial is judged dead (a slow process still beats)
MAX_RETRIES = 3  # a trial whose workers keep dying is not queued again after this (preemptions do not count)
STATE_FORMAT = 1  # of the per-epoch resume files
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # recorded on each trial: which process ran it


class TrialFailed(Exception):
    """A trial that ended without a result (diverged, out of memory, invalid combination)."""


class TrialLost(Exception):
    """Another worker failed this trial (as stale) while it ran here: its retry runs elsewhere."""


class TrialInterrupted(Exception):
    """SIGTERM or Ctrl-C stopped the trial: its last epoch is saved and it is queued again."""


class TotalReached(Exception):
    """The study's total is taken; this trial does not count."""


class QuietExpectedEnds(logging.Filter):
    """Drops Optuna's two warnings (traceback, then "failed with value None") for a trial that ended
    with TrialFailed or TotalReached: the progress line already gives the reason, and a trial past
    the total has nothing to report. Other failures keep their traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.ended: set[str] = set()  # "Trial 4" heads whose second warning is still to come

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        head = msg.split(" failed with ", 1)[0]
        if record.exc_info and isinstance(record.exc_info[1], (TrialFailed, TotalReached)):
            self.ended.add(head)
            return False
        if head in self.ended and msg.endswith("failed with value None."):
            self.ended.discard(head)
            return False
        return True


_OPTIMIZE_LOG = logging.getLogger("optuna.study._optimize")  # where Optuna logs a failed trial
if not any(isinstance(f, QuietExpectedEnds) for f in _OPTIMIZE_LOG.filters):
    _OPTIMIZE_LOG.addFilter(QuietExpectedEnds())


# ---------------------------------------------------------------------------
# storage


def default_storage(name: str) -> str:
    return f"sqlite:///{STUDIES / name}.db"


def mask(url: str) -> str:
    """The URL with its password replaced by ***, for logs, messages and the stored recipe."""
    return re.sub(r"(://[^:/@]*:)[^/]*@", r"\1***@", url)


def _scrub(text: str, url: str) -> str:
    """Text (e.g. a driver's error) with the URL's password removed wherever it appears."""
    m = re.search(r"://[^:/@]*:([^/]*)@", url)
    return mask(text.replace(m.group(1), "***") if m and m.group(1) else text)


def expand(url: str) -> str:
    """${VAR} in a storage URL taken from the environment, so passwords stay out of recipes."""
    out = os.path.expandvars(url)
    missing = re.findall(r"\$\{?(\w+)", out)
    if missing:
        raise SearchError(f"study.storage: environment variable {missing[0]} in '{mask(url)}' is not set; "
                          f"export {missing[0]}=... before starting the study or its workers")
    return out


# Plain schemes get the drivers this package installs (SQLAlchemy would pick psycopg2/MySQLdb).
DRIVERS = {"postgres": "postgresql+psycopg", "postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql",
           "mariadb": "mysql+pymysql"}


def _sqlite_connect(dbapi_connection: Any, record: Any) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy's begin event issues BEGIN, not pysqlite


def _sqlite_begin(conn: Any) -> None:
    # Every transaction takes the write lock up front: a deferred transaction that reads and then
    # writes gets "database is locked" at once (no busy wait) when another process wrote meanwhile.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _rdb(url: str, heartbeat: int | None) -> optuna.storages.BaseStorage:
    scheme, rest = url.split("://", 1)
    url = f"{DRIVERS.get(scheme, scheme)}://{rest}"
    sqlite = scheme.startswith("sqlite")
    if sqlite and rest.startswith("/") and rest != "/:memory:":
        Path(rest[1:]).parent.mkdir(parents=True, exist_ok=True)
    engine: dict[str, Any] = ({"connect_args": {"timeout": 120}} if sqlite else  # busy timeout, seconds
                              {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}})
    kwargs: dict[str, Any] = {"engine_kwargs": engine}
    if heartbeat:
        kwargs.update(heartbeat_interval=heartbeat, grace_period=STALE_BEATS * heartbeat,
                      heartbeat_stale_trial_callback=retry)
    storage = optuna.storages.RDBStorage(url, **kwargs)
    if sqlite:
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_connect)
        sqlalchemy.event.listen(storage.engine, "begin", _sqlite_begin)
        storage.engine.dispose()  # connections opened while creating the schema predate the listeners
    return storage


def _journal_file(url: str, heartbeat: int | None) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend

    path = url[len("journal:") :].removeprefix("//")
    if not path:
        raise SearchError("study.storage: 'journal:' needs a file, e.g. journal:/shared/studies/NAME.log")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(path))


def _redis(url: str, heartbeat: int | None) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalRedisBackend

    # ?prefix=NAME keeps several users' (or tests') journals apart on one server.
    base, _, query = url.partition("?")
    params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
    prefix = params.pop("prefix", "")
    base += ("?" + "&".join(f"{k}={v}" for k, v in params.items())) if params else ""
    import redis

    redis.Redis.from_url(base, socket_connect_timeout=10).ping()  # fail now, clearly, not at the first write
    return optuna.storages.JournalStorage(JournalRedisBackend(base, prefix=prefix))


def _grpc(url: str, heartbeat: int | None) -> optuna.storages.BaseStorage:
    """A client of `search proxy` (Optuna's gRPC storage proxy). It keeps no heartbeat table, so
    dead workers are found by our `heartbeat_at` attr, as on journal storages."""
    from search.proxy import client

    return client(url)


STORAGES: dict[str, Callable[[str, int | None], optuna.storages.BaseStorage]] = {
    "sqlite": _rdb, "postgresql": _rdb, "postgres": _rdb, "mysql": _rdb, "mariadb": _rdb,
    "journal": _journal_file, "redis": _redis, "rediss": _redis, "grpc": _grpc,
}


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].split("+", 1)[0].lower() if ":" in url else ""


def resolve_url(url: str) -> str:
    """The URL with ${VAR} filled in, after its scheme is checked (nothing is opened)."""
    scheme = _scheme(url)
    if scheme not in STORAGES or (scheme != "journal" and "://" not in url):
        raise SearchError(
            f"study.storage: unsupported URL '{mask(url)}'; use sqlite:///PATH.db (one machine), "
            "postgresql+psycopg://USER:PASS@HOST/DB or mysql+pymysql://... (many machines), "
            "journal:PATH.log (shared filesystem), redis://HOST:PORT or grpc://HOST:PORT "
            "(a `search proxy` in front of a database)"
        )
    return expand(url)


def _storage_error(url: str, full: str, e: Exception) -> SearchError:
    root = e  # Optuna wraps driver errors ("An exception is raised during the commit"): say the cause
    while root.__cause__ or root.__context__:
        root = root.__cause__ or root.__context__
    text = " ".join(str(root if root is not e and str(root) else e).split()) or type(e).__name__
    text = re.sub(r"\(Background on this error at: \S+\)", "", text).strip()
    return SearchError(f"study.storage: cannot open {mask(url)}: {_scrub(text, full)[:300]}; "
                       "check the URL, that the server runs, and that the database exists")


# Reachability without writing: each checker raises if the storage could not be opened, and
# creates nothing (no file, no schema). Schemes without one are checked by opening them.


def _local_path(full: str) -> Path | None:
    """The file of a sqlite:/// or journal: URL (None for an in-memory database)."""
    if full.startswith("journal:"):
        return Path(full[len("journal:") :].removeprefix("//"))
    rest = full.split("://", 1)[1].split("?", 1)[0]
    return Path(rest[1:]) if rest.startswith("/") and rest not in ("/", "/:memory:") else None


def _creatable(path: Path) -> None:
    """`path` is a file, or can be created: its nearest existing ancestor is a writable directory."""
    if path.exists():
        if not path.is_file():
            raise SearchError(f"study.storage: {path} exists and is not a file")
        return
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SearchError(f"study.storage: cannot create {path}: {parent} is not a writable directory")


def _reach_file(full: str) -> None:
    path = _local_path(full)
    if full.startswith("journal:") and not full[len("journal:") :].removeprefix("//"):
        raise SearchError("study.storage: 'journal:' needs a file, e.g. journal:/shared/studies/NAME.log")
    if path is not None:
        _creatable(path)


def _engine(full: str) -> sqlalchemy.engine.Engine:
    scheme, rest = full.split("://", 1)
    args = {} if scheme.startswith("sqlite") else {"connect_timeout": 10}
    return sqlalchemy.create_engine(f"{DRIVERS.get(scheme, scheme)}://{rest}", poolclass=sqlalchemy.pool.NullPool,
                                    connect_args=args)


def _reach_server(full: str) -> None:
    engine = _engine(full)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    finally:
        engine.dispose()


def _reach_redis(full: str) -> None:
    import redis

    base = full.partition("?")[0]
    redis.Redis.from_url(base, socket_connect_timeout=10).ping()


REACHABLE: dict[str, Callable[[str], None]] = {
    "sqlite": _reach_file, "journal": _reach_file, "postgresql": _reach_server, "postgres": _reach_server,
    "mysql": _reach_server, "mariadb": _reach_server, "redis": _reach_redis, "rediss": _reach_redis,
}


def check_storage(url: str) -> None:
    """Scheme, ${VAR} and reachability of a storage URL, creating nothing."""
    full = resolve_url(url)
    reach = REACHABLE.get(_scheme(url))
    if reach is None:
        return
    try:
        reach(full)
    except SearchError:
        raise
    except Exception as e:  # noqa: BLE001 - connection problems are the user's to fix
        raise _storage_error(url, full, e) from None


def _names_rdb(full: str) -> list[str]:
    """Study names in an RDB storage, read without creating Optuna's schema."""
    engine = _engine(full)
    try:
        with engine.connect() as conn:
            if not sqlalchemy.inspect(conn).has_table("studies"):
                return []
            return [n for (n,) in conn.exec_driver_sql("SELECT study_name FROM studies")]
    finally:
        engine.dispose()


def _names_journal(full: str) -> list[str] | None:
    path = _local_path(full)
    return [] if path is not None and not path.is_file() else None  # None: the file exists, open it


# Study names without writing, per scheme; None (or no lister): open the storage to list them.
STUDY_NAMES: dict[str, Callable[[str], list[str] | None]] = {
    "sqlite": _names_rdb, "postgresql": _names_rdb, "postgres": _names_rdb, "mysql": _names_rdb,
    "mariadb": _names_rdb, "journal": _names_journal,
}


def open_storage(url: str, heartbeat: int | None = 60) -> optuna.storages.BaseStorage:
    """An Optuna storage for a URL; RDB storages beat every `heartbeat` seconds and retry dead workers' trials."""
    full = resolve_url(url)
    try:
        return STORAGES[_scheme(url)](full, heartbeat)
    except SearchError:
        raise
    except Exception as e:  # noqa: BLE001 - connection problems are the user's to fix
        raise _storage_error(url, full, e) from None


def sampler_seed(study_seed: int, number: int) -> int:
    """The sampler's seed for trial `number`: its own stream, apart from the training seed."""
    return int(np.random.SeedSequence([study_seed, number, 1]).generate_state(1)[0])


class _NumberedQMC(optuna.samplers.QMCSampler):
    """QMC whose point is the trial number's: Optuna counts points in a study attr that two
    workers can read at once (both then take the same point); a trial number is never shared."""

    _number = 0

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict[str, Any]) -> dict[str, Any]:
        self._number = trial.number
        return super().sample_relative(study, trial, search_space)

    def _find_sample_id(self, study: optuna.Study, search_space: dict[str, Any]) -> int:
        return self._number


def reseed_sampler(sampler: optuna.samplers.BaseSampler, seed: int) -> None:
    """Seed the sampler's random state for one trial (private API: the one adapter).

    Optuna seeds a sampler once per process, so every worker and every resumed run would replay
    the same draws. Its samplers keep a `LazyRandomState` in `_rng` (TPE, random, GP) or
    `_cma_rng` (CMA-ES), and an inner random sampler for start-up / independent draws in
    `_random_sampler` or `_independent_sampler` (QMC's own sequence is its seed and the trial
    number: `_NumberedQMC`). Optuna 5.0; a sampler without them is left as it is.
    """
    for name in ("_rng", "_cma_rng"):
        state = getattr(sampler, name, None)
        if state is not None:
            state.rng.seed(seed % 2**32)
    for name in ("_random_sampler", "_independent_sampler"):
        inner = getattr(sampler, name, None)
        if inner is not None:
            reseed_sampler(inner, seed + 1)


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether every constraint stored on the trial is satisfied (a trial without any is).

    Reads what `record_constraints` stored, as Optuna's samplers and `best_trials` do."""
    return all(v <= 0 for v in trial.constraints.values())


def constraint_values(bounds: dict[str, BoundCfg], measures: dict[str, Any]) -> dict[str, float]:
    """Per recipe constraint (study.constraints): how far the measure is beyond its bound (<= 0: within).

    Relative to the bound (value/max - 1, 1 - value/min), so constraints of different units weigh
    alike in the samplers' summed violation.
    """
    out = {}
    for name, b in bounds.items():
        v = measures[name]
        over = [v / b.max - 1 if b.max else v - b.max] if b.max is not None else []
        under = [1 - v / b.min if b.min else b.min - v] if b.min is not None else []
        out[name] = max(over + under)
    return out


def make_sampler(recipe: Recipe) -> optuna.samplers.BaseSampler:
    """The recipe's sampler; `reseed_sampler` gives it each trial's own seed before it samples."""
    s, seed = recipe.study.sampler, recipe.study.seed
    builders: dict[str, Callable[[], optuna.samplers.BaseSampler]] = {
        "tpe": lambda: optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=s.n_startup_trials, multivariate=s.multivariate,
            group=s.group and s.multivariate, constant_liar=s.constant_liar),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, population_size=s.population_size),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=s.n_startup_trials),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=s.n_startup_trials,
                                                      warn_independent_sampling=False),
        "qmc": lambda: _NumberedQMC(seed=seed, qmc_type=s.qmc_type, warn_independent_sampling=False),
    }
    return builders[s.name]()


def _held(cls: type[optuna.pruners.BasePruner]) -> type[optuna.pruners.BasePruner]:
    """`cls` that prunes nothing until `min_trials` trials completed (what the median pruner's
    n_startup_trials does), as the recipe's study.pruner.min_trials promises for every pruner.

    The inner pruner is still asked at every step, so each trial records the rungs it reached
    and later trials are compared against the early ones too. A subclass, not a wrapper:
    TPE treats a HyperbandPruner's brackets specially and finds them by isinstance.
    """

    class Held(cls):  # type: ignore[misc, valid-type]
        def __init__(self, min_trials: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.min_trials = min_trials

        def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
            pruned = super().prune(study, trial)
            if not pruned or self.min_trials == 0:
                return pruned
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            return len(done) >= self.min_trials

    Held.__name__ = Held.__qualname__ = f"Held{cls.__name__}"
    return Held


HeldSuccessiveHalving = _held(optuna.pruners.SuccessiveHalvingPruner)
HeldHyperband = _held(optuna.pruners.HyperbandPruner)


def make_pruner(recipe: Recipe) -> optuna.pruners.BasePruner:
    p = recipe.study.pruner
    builders: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=p.min_trials, n_warmup_steps=p.warmup_epochs),
        "percentile": lambda: optuna.pruners.PercentilePruner(
            p.percentile, n_startup_trials=p.min_trials, n_warmup_steps=p.warmup_epochs),
        "successive_halving": lambda: HeldSuccessiveHalving(
            p.min_trials, min_resource=max(1, p.warmup_epochs), reduction_factor=p.reduction_factor),
        "hyperband": lambda: HeldHyperband(
            p.min_trials, min_resource=max(1, p.warmup_epochs), max_resource=recipe.train.epochs,
            reduction_factor=p.reduction_factor),
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
    for key in ("storage", "timeout", "n_trials", "heartbeat", "confirm"):
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
    storage = open_storage(url, recipe.study.heartbeat)
    study = optuna.create_study(
        study_name=recipe.study.name, storage=storage, load_if_exists=True,
        directions=recipe.study.directions, sampler=make_sampler(recipe), pruner=make_pruner(recipe),
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
    if study.metric_names != recipe.study.names and len(study.directions) == len(recipe.study.names):
        study.set_metric_names(recipe.study.names)  # the dashboard's axes and the report's columns
    return study


def load_stored(storage_url: str, name: str) -> tuple[Recipe, optuna.Study]:
    """The recipe stored in an existing study (for workers and resumes).

    A missing study is refused before the storage is opened for writing: a fresh
    database gets no schema, a journal path no file.
    """
    path = storage_url.removeprefix("sqlite:///")
    if storage_url.startswith("sqlite:///") and not Path(expand(path)).is_file():
        raise SearchError(f"no study database at {path}; check --storage, or create the study with `search run RECIPE`")
    check_storage(storage_url)
    full = expand(storage_url)
    lister = STUDY_NAMES.get(_scheme(storage_url))
    try:
        names = lister(full) if lister else None
    except Exception as e:  # noqa: BLE001 - connection problems are the user's to fix
        raise _storage_error(storage_url, full, e) from None
    if names is not None and name not in names:
        raise SearchError(f"no study '{name}' in {mask(storage_url)}; studies there: {', '.join(names) or 'none'}; "
                          "create it with `python -m search run RECIPE`")
    storage = open_storage(storage_url, heartbeat=None)
    try:
        summary = next(s for s in optuna.get_all_study_summaries(storage) if s.study_name == name)
    except StopIteration:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise SearchError(f"no study '{name}' in {mask(storage_url)}; studies there: {', '.join(names) or 'none'}") from None
    stored = summary.user_attrs.get("recipe")
    if stored is None:
        raise SearchError(f"study '{name}' has no stored recipe: it was not created by `search run`")
    recipe = recipe_from_dict(stored, source=f"recipe stored in study '{name}'")
    if isinstance(storage, optuna.storages.RDBStorage):
        storage.engine.dispose()
        storage = open_storage(storage_url, recipe.study.heartbeat)  # now with the study's heartbeat
    study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(recipe), pruner=make_pruner(recipe))
    return recipe, study


# ---------------------------------------------------------------------------
# dead workers: stale trials are failed with a reason and queued again


RESUME_ATTRS = ("fail_reason", HEARTBEAT_ATTR, "resumed_from_epoch", "restarted")  # not carried to a retry


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, died: bool = True) -> None:
    """Queue a WAITING copy of a dead (or, died=False, preempted) worker's trial: same params and
    seed, its intermediate values kept; it resumes from the trial's last saved epoch.

    `fail_stale` calls this for each trial it fails as stale. The copy records the original in
    the system attrs Optuna's RetryHeartbeatStaleTrialCallback uses (`failed_trial`,
    `retry_history`), so its helpers work; `deaths` counts the dead workers only, so a trial
    preempted any number of times is always queued again.
    """
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    deaths = trial.system_attrs.get("deaths", 0) + int(died)
    if deaths > MAX_RETRIES:
        return
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in RESUME_ATTRS}
    study.add_trial(optuna.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={**user_attrs, "retry_of": trial.number},
        system_attrs={"failed_trial": trial.system_attrs.get("failed_trial", trial.number), "retry_history": history,
                      "deaths": deaths},
        intermediate_values=trial.intermediate_values,
    ))


def _beats(storage: optuna.storages.BaseStorage) -> bool:
    """Whether the storage keeps Optuna's heartbeat (RDB storages opened with one)."""
    return bool(getattr(storage, "get_heartbeat_interval", lambda: None)())


def sweep(study: optuna.Study, heartbeat: int) -> list[int]:
    """Fail and retry the stale trials of dead workers, judged by the storage's heartbeat if it
    has one, else by our `heartbeat_at` attr (stale after STALE_BEATS heartbeats)."""
    return fail_stale(study, None if _beats(study._storage) else STALE_BEATS * heartbeat)


def _stale_ids(study: optuna.Study, older_than: float | None) -> list[int]:
    """Ids of RUNNING trials without a sign of life for `older_than` s (our heartbeat attr), or,
    with None, those the RDB storage's heartbeat table calls stale."""
    storage = study._storage
    if older_than is None:
        if not _beats(storage):
            return []
        return storage._get_stale_trial_ids(study._study_id)  # type: ignore[attr-defined]
    now = time.time()
    return [t._trial_id for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if now - (t.user_attrs.get(HEARTBEAT_ATTR) or t.datetime_start.timestamp()) > older_than]


def fail_stale(study: optuna.Study, older_than: float | None = None) -> list[int]:
    """Fail RUNNING trials whose worker stopped beating (for `older_than` s; None: as the RDB
    storage's heartbeat says) with reason STALE_REASON, and queue their retries.

    Returns the numbers of the trials this call failed.
    """
    storage = study._storage
    failed = []
    for trial_id in _stale_ids(study, older_than):
        # A finished trial takes no attrs, so the reason goes on while it is still RUNNING.
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_user_attr(trial_id, "fail_reason", STALE_REASON)
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        trial = storage.get_trial(trial_id)
        retry(study, trial)
        failed.append(trial.number)
    return failed


@contextlib.contextmanager
def beating(trial: optuna.Trial, interval: float, lost: threading.Event | None = None) -> Iterator[None]:
    """Record a sign of life on the trial every `interval` s, from a thread of its own: Optuna's
    heartbeat on RDB storages, and the user attr `heartbeat_at` (epoch seconds) everywhere.

    Journal and gRPC storages have no heartbeat of their own; on RDB storages the attr lets
    `fail-stale` judge any storage the same way. When the storage refuses the beat because the
    trial has finished (another worker failed it as stale), `lost` is set and beating stops.
    """
    stop = threading.Event()
    storage, trial_id = trial.study._storage, trial._trial_id
    rdb = _beats(storage)

    def beat() -> None:
        while True:
            try:
                if rdb:
                    storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
                storage.set_trial_user_attr(trial_id, HEARTBEAT_ATTR, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                if lost is not None:
                    lost.set()
                return
            except Exception as e:  # noqa: BLE001 - a missed beat is not worth killing the trial
                log.warning("heartbeat of trial %d not recorded: %s", trial.number, e)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------------------
# counting towards the total


def counted(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials that take one of the study's n_trials slots.

    Finished, pruned, running and queued trials count; so do failures of the trial itself
    (diverged, out of memory, invalid combination). A FAIL counts not when it says it frees its
    slot (interrupted, total reached, worker died), has no reason (its process died before
    writing one), or was retried: the retry holds the slot instead.
    """
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    return [t for t in trials if t.state in live or (
        t.state == TrialState.FAIL and t.number not in retried
        and t.user_attrs.get("fail_reason") not in (*NOT_COUNTED, None))]


def finished(study: optuna.Study) -> int:
    """Trials that ended and count towards the total."""
    return sum(1 for t in counted(study.get_trials(deepcopy=False)) if t.state.is_finished())


def remaining(study: optuna.Study, n_trials: int) -> int:
    return max(0, n_trials - len(counted(study.get_trials(deepcopy=False))))


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
    """Every pretrained entry's weights are cached (or fetched) and plain data before any trial starts."""
    for e in entries:
        if e.pretrained:
            weights.check(e)


def check_all(recipe: Recipe, url: str) -> list[PoolEntry]:
    """Everything a study needs, checked before anything of it is written.

    Storage (scheme, ${VAR}, reachability), the dataset (known, single-label,
    folders present, official files present and matching their checksums,
    decodable) and the pool's weights (cached and plain data): a refusal here
    leaves no study, schema or file behind. The decoded dataset stays in this
    process's memory for the trials that follow.
    """
    check_storage(url)
    entries = parse_pool(recipe.pool)
    check_data(recipe.data)
    preflight(entries)
    load_raw(recipe.data)
    return entries


OUT_OF_MEMORY = "out_of_memory"  # the constraint an OOM result violates


def constraints(user_attrs: dict[str, Any], bounds: dict[str, BoundCfg] | None = None) -> dict[str, float]:
    """The constraint values of a trial that reaches the sampler, by name (<= 0: feasible).

    Read from what the trial recorded (its user attrs); `record_constraints` stores them as
    Optuna constraints, which every constrained sampler (TPE, GP, NSGA-II) reads from COMPLETE
    and PRUNED trials. Every such trial carries every name (GP needs as many values on each).
    out_of_memory: 1 when the configuration did not fit even at the smallest micro-batch.
    The recipe's study.constraints (`bounds`) on measures recorded before training (params,
    flops, latency_ms, throughput): see `constraint_values`.
    """
    out = {OUT_OF_MEMORY: 1.0 if user_attrs.get("status") == "oom" else 0.0}
    if bounds and all(n in user_attrs for n in bounds):
        out.update(constraint_values(bounds, user_attrs))
    return out


def record_constraints(trial: optuna.Trial, bounds: dict[str, BoundCfg] | None = None) -> None:
    """Store `constraints` on a trial about to end COMPLETE or PRUNED (once: Optuna keeps the first)."""
    for name, value in constraints(trial.user_attrs, bounds).items():
        trial.set_constraint(name, value)


FIRST_ATTRS = ("pool_label", "weight_source", "imagenet_overlap", "seed", "fail_reason")  # what users filter on


def trial_attrs(entry: PoolEntry, seed: int, resolution: int, channel_reduce: str, device: str) -> dict[str, Any]:
    """A trial's first attributes, in the order optuna-dashboard shows them as columns (the order
    they are first set): the ones users filter on first, `fail_reason` held by null until a
    reason is known (null is also what `counted` reads as "no reason")."""
    attrs = {**entry.attrs(), "seed": seed, "fail_reason": None, "input_resolution": resolution,
             "channel_reduce": channel_reduce, "device": device, "worker": WORKER}
    return {**{k: attrs[k] for k in FIRST_ATTRS}, **attrs}


def ranked_entries(study: optuna.Study, recipe: Recipe, entries: list[PoolEntry], data: Data,
                   say: Callable[[str], None] = print) -> list[PoolEntry]:
    """The entries the search samples under `study.rank`, in rank order.

    The first worker ranks the pool (see search.rank) and stores the rows and the decision in
    the study (user attr `rank`); every later worker and resume reads them, so all sample the
    same entries. Entries that could not be ranked stay in, with the reason shown.
    """
    from search import rank

    stored = study.user_attrs.get("rank")
    if stored is None:
        say(f"ranking {len(entries)} pool entries on frozen features before the search "
            f"(keep {recipe.study.rank.keep or 'all'}, by {recipe.rank.by})")
        rows = rank.rank_pool(recipe, data)
        decision = {"rows": rows, **rank.decide(rows, recipe.study.rank.keep, recipe.rank.by)}
        stored = study.user_attrs.get("rank")  # another worker may have stored its ranking meanwhile
        if stored is None:
            study.set_user_attr("rank", decision)
            stored = decision
    say(rank.table(stored["rows"], stored["by"]))
    say(rank.decision_text(stored))
    by_label = {e.label: e for e in entries}
    return [by_label[label] for label in stored["order"] if label in by_label]


def trial_seed(study_seed: int, number: int) -> int:
    """Trial `number`'s training seed: initial weights, data order, augmentation, mixing, dropout."""
    return (study_seed * 1_000_003 + number) % 2**31


def gpu_slot(trial: optuna.Trial, recipe: Recipe, data: Data, entry: PoolEntry, res: int, batch_size: int,
             dev: Any, on_line: Callable[[str], None]) -> contextlib.AbstractContextManager[Any]:
    """Where packing is on (`hardware.trials_per_gpu`, a CUDA device): the trial's place on a GPU,
    admitted by its probe (measured once per study and key) plus its data; it yields the GPU
    (any visible one for device cuda/auto). Else it yields `dev`."""
    tpg = recipe.hardware.trials_per_gpu
    if tpg is None or dev.type != "cuda":
        return contextlib.nullcontext(dev)
    precision = pack.precision_name(dev, recipe.hardware.amp)
    key = pack.probe_key(entry.label, res, batch_size, precision)

    def measure() -> int:
        shape = build_model(entry, num_classes=data.num_classes, in_chans=data.in_chans, resolution=res,
                            pretrained=False)  # the same shapes, no weights to load
        return pack.measure_step(shape, data.in_chans, res, batch_size, data.num_classes, dev, precision)

    peak = pack.probe(trial.study, key, measure, pack.ledger_path(dev))
    need = peak + data.train.x.numel() + data.val.x.numel()  # uint8 images, kept on the GPU when they fit
    trial.set_user_attr("memory_probe_mb", round(peak / 2**20, 1))
    import torch

    devices = [dev] if dev.index is not None else [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return pack.gpu_slot(devices, need, tpg, recipe.hardware.memory_margin,
                         on_wait=lambda s: on_line(f"trial {trial.number:>3} {entry.label:<24} {s}"))


# ---------------------------------------------------------------------------
# resuming: one state file per running trial


def resume_dir(study: optuna.Study, recipe: Recipe) -> Path:
    """Where a study's running trials keep their last epoch's state."""
    if recipe.study.checkpoint_dir:
        return Path(recipe.study.checkpoint_dir).expanduser() / study.study_name
    return artifacts.dir_of(study) / "resume"


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (a crash leaves the previous file whole) and durably (a shared filesystem
    sees all of it once the name does)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def take_state(directory: Path, trial: optuna.Trial, seed: int) -> tuple[dict[str, Any] | None, str]:
    """For a retry: the state its predecessor saved, moved to this trial's own file (so a retry
    that dies in turn leaves it to the next), or None and why it starts over."""
    import torch

    mine = directory / f"trial-{trial.number}.pt"
    source = directory / f"trial-{trial.user_attrs['retry_of']}.pt"
    path = mine if mine.exists() else source
    if not path.exists():
        return None, f"no saved state at {source}: trained from the first epoch"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: start over, and say so
        return None, f"saved state {path} unreadable ({type(e).__name__}: {e}): trained from the first epoch"
    meta = state.get("trial", {}) if isinstance(state, dict) else {}
    if (meta.get("format") != STATE_FORMAT or meta.get("seed") != seed
            or json.dumps(meta.get("params"), sort_keys=True) != json.dumps(trial.params, sort_keys=True)):
        return None, f"saved state {path} is of another run (params, seed or format differ): trained from the first epoch"
    if path != mine:
        os.replace(path, mine)
    return state, ""


def make_objective(recipe: Recipe, data: Data, entries: list[PoolEntry], device: str,
                   on_line: Callable[[str], None] = print, *,
                   counting: bool = True) -> Callable[..., float | list[float]]:
    """The trial function `objective(trial, lost=None)`: sample, build, measure, train (resumed
    from a saved state for a retry); returns the objective value(s).

    counting=False (confirmation runs) takes no slot of n_trials. `lost` (set by the heartbeat
    when another worker failed the trial) and STOP (SIGTERM, Ctrl-C) end the training at the
    next step: TrialLost, or TrialInterrupted after the trial is queued again.
    """
    metric = recipe.study.metric
    n_trials = recipe.study.n_trials
    names = recipe.study.names
    multi = len(names) > 1  # Optuna neither takes intermediate values nor prunes these
    wanted = [n for n in (*names, *recipe.study.constraints) if n in CONSTRAINABLE]

    def objective(trial: optuna.Trial, lost: threading.Event | None = None) -> float | list[float]:
        lost = lost or threading.Event()
        trials = trial.study.get_trials(deepcopy=False)
        earlier = [t for t in counted(trials) if t.number < trial.number]
        if counting and len(earlier) >= n_trials:
            trial.set_user_attr("fail_reason", "study total reached")
            trial.study.stop()
            raise TotalReached(f"the study already has its {n_trials} trials")
        # Sampling is lazy (at the first suggest), so seeding here decides this trial's draws.
        reseed_sampler(trial.study.sampler, sampler_seed(recipe.study.seed, trial.number))
        entry, hp = space.suggest(trial, recipe, entries)
        # A retried trial reruns the dead one (same params and seed); the epochs that run reported
        # stand (Optuna keeps a step's first value), so only later epochs are reported again.
        # A queued trial may carry its own `seed` (a confirmation of a configuration under
        # another seed); `study.trial_seed` pins every trial's (a `best` recipe's).
        retried = "retry_of" in trial.user_attrs
        seed = trial.user_attrs.get("seed", recipe.study.trial_seed)
        seed = trial_seed(recipe.study.seed, trial.number) if seed is None else int(seed)
        reported = {s for t in trials if t.number == trial.number for s in t.intermediate_values} if retried else set()
        res = input_resolution(entry, data.resolution)
        dev = resolve_device(device)
        for k, v in trial_attrs(entry, seed, res, hp.channel_reduce, str(dev)).items():
            trial.set_user_attr(k, v)
        try:
            try:
                seed_everything(seed)  # the initial weights are this trial's, not the process's history
                model = build_model(entry, num_classes=data.num_classes, in_chans=data.in_chans, resolution=res,
                                    dropout=hp.dropout, channel_reduce=hp.channel_reduce)
            except (ValueError, RuntimeError) as e:
                trial.set_user_attr("fail_reason", f"invalid combination: {e}")
                raise TrialFailed(f"invalid combination: {e}") from None
            slot = gpu_slot(trial, recipe, data, entry, res, hp.batch_size, dev, on_line)
            measures = measure_model(model, wanted, data.in_chans, res, dev)  # before training: pruned trials have them
            for k, v in measures.items():
                trial.set_user_attr(k, v)
            where = resume_dir(trial.study, recipe)
            path = where / f"trial-{trial.number}.pt"
            state = None
            if retried and recipe.study.resume:
                state, why = take_state(where, trial, seed)
                if state is not None:
                    trial.set_user_attr("resumed_from_epoch", int(state["epoch"]))
                    on_line(f"trial {trial.number:>3} {entry.label:<24} resumes after epoch {state['epoch']} "
                            f"(trial {trial.user_attrs['retry_of']}'s saved state)")
                else:
                    trial.set_user_attr("restarted", why)
            history: list[dict[str, float]] = list(state["history"]) if state else []
            meta = {"format": STATE_FORMAT, "study": trial.study.study_name, "number": trial.number,
                    "params": trial.params, "seed": seed}

            def on_state(s: dict[str, Any]) -> None:
                if not lost.is_set():
                    save_state(path, {"trial": meta, **s})

            def on_epoch(epoch: int, record: dict[str, float]) -> None:
                if lost.is_set():
                    raise TrialLost(f"trial {trial.number} was failed by another worker")
                history.append(record)
                if epoch not in reported and not multi:
                    trial.report(record[f"val_{metric}"], epoch)
                # Short attributes: the per-epoch history is in the intermediate values and, when
                # the trial ends, its history artifact; the dashboard's table stays one line a row.
                trial.set_user_attr("epochs", len(history))
                trial.set_user_attr("sec_per_epoch", round(sum(r["seconds"] for r in history) / len(history), 3))
                if trial.user_attrs.get("micro_batch") != record["micro_batch"]:  # smaller after out of memory
                    trial.set_user_attr("micro_batch", int(record["micro_batch"]))
                on_line(f"trial {trial.number:>3} {entry.label:<24} epoch {epoch:>3}  "
                        f"val_{metric} {record[f'val_{metric}']:.4f}  {record['seconds']:.1f}s")
                if epoch not in reported and not multi and trial.should_prune():  # the pruner judges this run's epochs only
                    trial.set_user_attr("fail_reason", f"pruned at epoch {epoch}")
                    record_constraints(trial, recipe.study.constraints)
                    raise optuna.TrialPruned(f"pruned at epoch {epoch}")

            try:
                with slot as placed:
                    if placed != dev:
                        trial.set_user_attr("device", str(placed))
                    result = fit(model, data, hp, device=placed, on_epoch=on_epoch, monitor=metric, seed=seed,
                                 amp=recipe.hardware.amp, compile=recipe.hardware.compile,
                                 gpu_memory_share=recipe.hardware.gpu_memory_share,
                                 keep_best=recipe.study.top_k > 0,
                                 on_state=on_state if recipe.study.resume else None, state=state,
                                 micro_batch=int(state["micro_batch"]) if state else None,
                                 stop=lambda: lost.is_set() or STOP.is_set())
            except (TrialLost, optuna.exceptions.UpdateFinishedTrialError):
                raise TrialLost(f"trial {trial.number} was failed by another worker") from None
            except Exception:
                path.unlink(missing_ok=True)  # the trial ends here: nothing will resume it
                raise
            if result.status == "interrupted":
                if lost.is_set():
                    raise TrialLost(f"trial {trial.number} was failed by another worker")
                trial.set_user_attr("fail_reason", "interrupted")
                raise TrialInterrupted(result.reason)
            path.unlink(missing_ok=True)
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            raise
        artifacts.after_fit(trial, recipe, model, hp, data, result)  # history; checkpoint while in the top-k
        trial.set_user_attr("status", result.status)
        peak = max((r["peak_memory_mb"] for r in result.history), default=0.0)
        if peak:  # GPU memory; nothing to say on a CPU
            trial.set_user_attr("peak_memory_mb", round(peak, 1))
        if result.status == "oom":
            # PRUNED, not FAIL: samplers learn only from COMPLETE and PRUNED trials, and this one must
            # reach them as infeasible so that they stop proposing its neighbours.
            trial.set_user_attr("fail_reason", result.reason)
            trial.set_user_attr("micro_batch", result.micro_batch)
            record_constraints(trial, recipe.study.constraints)
            raise optuna.TrialPruned(result.reason)
        if result.failed:
            trial.set_user_attr("fail_reason", result.reason)
            raise TrialFailed(result.reason)
        trial.set_user_attr("best_epoch", result.best_epoch)
        for k, v in result.best.items():
            trial.set_user_attr(f"best_{k}", round(v, 6))  # a short cell; full values in the history
        record_constraints(trial, recipe.study.constraints)
        measures["train_seconds"] = round(sum(r["seconds"] for r in result.history), 3)
        trial.set_user_attr("train_seconds", measures["train_seconds"])
        values = [result.best[n] if n in result.best else measures[n] for n in names]
        return values if multi else values[0]

    return objective


# ---------------------------------------------------------------------------
# one trial's life cycle, and stopping on a signal

STOP = threading.Event()  # set by the first SIGTERM / SIGINT: the running trial stops at its next step
_STOPPED_BY: list[str] = []


def _on_signal(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if STOP.is_set():  # the second one: now
        raise KeyboardInterrupt(name)
    _STOPPED_BY[:] = [name]
    STOP.set()
    again = "Ctrl-C again" if signum == signal.SIGINT else "a second signal"
    print(f"\n{name}: stopping at the next step; the running trial keeps its last finished epoch and is "
          f"queued again ({again} quits at once)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT set STOP (the second raises KeyboardInterrupt) while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STOP.clear()
    old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def stopped() -> None:
    """Raise KeyboardInterrupt (named after the signal) once a signal asked to stop."""
    if STOP.is_set():
        raise KeyboardInterrupt(_STOPPED_BY[0] if _STOPPED_BY else "SIGINT")


def _frozen(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    return trial.study._storage.get_trial(trial._trial_id)


def run_one(study: optuna.Study, objective: Callable[..., float | list[float]], heartbeat: int,
            say: Callable[[str], None] = print) -> optuna.trial.FrozenTrial | None:
    """Ask for a trial (a queued one first), run it with a heartbeat, tell its end.

    The harness's own loop rather than `Study.optimize`, so that a trial failed meanwhile by
    another worker (as stale) is dropped instead of crashing the worker ("Cannot tell a FAIL
    trial"), and an interrupted trial is queued again. Returns the finished trial, or None
    when it was lost to another worker. KeyboardInterrupt (a signal) propagates after the
    trial is queued again; an unexpected error after the trial is failed with its reason.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with Study.optimize": we beat ourselves
        trial = study.ask()
    lost = threading.Event()
    values: float | list[float] | None = None
    state = TrialState.FAIL
    try:
        try:
            with beating(trial, heartbeat, lost):
                values = objective(trial, lost)
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except (TrialFailed, TotalReached):
            pass
        except (TrialInterrupted, KeyboardInterrupt):
            retry(study, _frozen(trial), died=False)
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        except Exception as e:
            if not isinstance(e, TrialLost | optuna.exceptions.UpdateFinishedTrialError):
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    if trial.user_attrs.get("fail_reason") is None:
                        trial.set_user_attr("fail_reason", f"error: {type(e).__name__}: {e}"[:500])
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                raise
    except TrialInterrupted as e:
        raise KeyboardInterrupt(_STOPPED_BY[0] if _STOPPED_BY else str(e)) from None
    finally:
        import gc

        gc.collect()
    frozen = _frozen(trial)
    if frozen.state != TrialState.RUNNING:  # failed meanwhile by another worker: its retry is theirs
        say(f"trial {trial.number:>3} was failed by another worker ({frozen.user_attrs.get('fail_reason')}); "
            "dropped here, its retry runs from its saved state")
        return None
    return study.tell(trial, values if state == TrialState.COMPLETE else None, state=state, skip_if_finished=True)


def start_clock(study: optuna.Study, recipe: Recipe) -> None:
    """A `run` starts the study-wide timeout afresh (or clears it); workers share its deadline."""
    study.set_user_attr("deadline", time.time() + recipe.study.timeout if recipe.study.timeout else None)


def _deadline(study: optuna.Study, recipe: Recipe) -> float | None:
    deadline = study.user_attrs.get("deadline")
    if deadline is None and recipe.study.timeout:  # workers started without `run`: the first starts the clock
        deadline = time.time() + recipe.study.timeout
        study.set_user_attr("deadline", deadline)
    return deadline if recipe.study.timeout else None


def work(recipe: Recipe, study: optuna.Study, *, quiet: bool = False) -> int:
    """Run trials in this process until the study's total (or its deadline) is reached.

    Returns the number of trials this process ran. SIGTERM or Ctrl-C stops the
    running trial at its next step, queues it again (it resumes from its last
    finished epoch) and raises KeyboardInterrupt. When the total is taken but
    other workers' trials still run, this worker waits: if one of them dies, its
    retry is run here, so the study still ends with n_trials.
    """
    with stopping_on_signals():
        return _work(recipe, study, quiet=quiet)


def _work(recipe: Recipe, study: optuna.Study, *, quiet: bool = False) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    entries = parse_pool(recipe.pool)
    preflight(entries)
    data = load_data(recipe.data, recipe.study.seed)
    warning = leakage_warning(entries, data)
    if warning:
        log.warning(warning)
    say = (lambda s: None) if quiet else print
    if recipe.study.rank is not None:
        entries = ranked_entries(study, recipe, entries, data, say)
    if recipe.study.rank is not None and recipe.study.rank.order and not study.user_attrs.get("rank_enqueued"):
        study.set_user_attr("rank_enqueued", True)
        for e in entries:  # best ranked first; this replaces the pool-order baselines
            study.enqueue_trial(space.baseline_params(recipe, e), skip_if_exists=True)
    elif recipe.study.baselines and not study.user_attrs.get("baselines_enqueued"):
        study.set_user_attr("baselines_enqueued", True)
        for e in entries:
            study.enqueue_trial(space.baseline_params(recipe, e), skip_if_exists=True)
    hb = recipe.study.heartbeat
    sweep(study, hb)
    n_total = recipe.study.n_trials
    say(f"{data.summary()}; {n_total - finished(study)} of {n_total} trials to run")
    deadline = _deadline(study, recipe)
    objective = make_objective(recipe, data, entries, recipe.hardware.device, on_line=say)

    ran = 0
    while deadline is None or time.time() < deadline:
        stopped()
        sweep(study, hb)
        trials = study.get_trials(deepcopy=False)
        if len(counted(trials)) < n_total or any(t.state == TrialState.WAITING for t in trials):
            done = run_one(study, objective, hb, say)
            ran += 1
            line = done and report.trial_line(study, done, finished(study), n_total, recipe.study.metric)
            if line:
                say(line)
            continue
        if not any(t.state == TrialState.RUNNING for t in trials):
            break
        STOP.wait(min(hb, 5))  # another worker's trial is running: it may die and need a retry
    if deadline is not None and time.time() >= deadline:
        say(f"study timeout of {recipe.study.timeout:g} s reached")
        return ran
    if recipe.study.confirm:  # the search is over: every worker helps confirm its top configurations
        from search import confirm

        cfg = recipe.study.confirm
        queued = confirm.enqueue(study, recipe, cfg.top_k, cfg.seeds)
        if queued:
            say(f"confirming the top {cfg.top_k} configurations over {cfg.seeds} seeds: {queued} runs queued")
        ran += confirm.work(recipe, study, quiet=quiet)
    return ran


def resume_command(recipe: Recipe, storage_url: str) -> str:
    """The command that continues the study (the stored recipe, the same storage)."""
    from search.text import command

    cmd = command(f"worker --storage '{mask(storage_url)}' --study {recipe.study.name}")
    if mask(storage_url) != storage_url:
        cmd += "   (password masked: write it in, or put it in an environment variable: ${PGPASSWORD}-style ${VAR})"
    return cmd


def gpu_assignment(n_workers: int, visible: str | None, count: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each local worker: GPUs round-robin (several workers may share one)."""
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible is not None else [str(i) for i in range(count)]
    return [ids[i % len(ids)] if ids else None for i in range(n_workers)]


def default_workers(recipe: Recipe) -> int:
    """Local workers for `run` without --workers: hardware.workers, or under trials_per_gpu on a
    CUDA machine as many as its GPUs may hold at once (`pack.local_workers`)."""
    import torch

    hw = recipe.hardware
    if hw.workers > 1 or hw.trials_per_gpu is None or hw.device not in ("auto", "cuda") or not torch.cuda.is_available():
        return hw.workers
    return pack.local_workers(torch.cuda.device_count(), hw.trials_per_gpu, os.cpu_count() or 1)


def run_workers(recipe: Recipe, storage_url: str, n_workers: int, *, quiet: bool = False) -> int:
    """Start `n_workers` local `worker` processes on the study and wait for them.

    The study (schema, stored recipe) exists before they start. The URL reaches them in the
    environment (SEARCH_STORAGE), not on a command line others can read. SIGTERM is passed on
    to every worker; the run then ends with KeyboardInterrupt. Returns 0, or 1 if a worker failed.
    """
    import torch

    gpus = [None] * n_workers
    packed = recipe.hardware.trials_per_gpu is not None  # each trial takes the GPU that admits it
    if recipe.hardware.device in ("auto", "cuda") and torch.cuda.is_available() and not packed:
        gpus = gpu_assignment(n_workers, os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())
    cmd = [sys.executable, "-m", "search", "worker", "--study", recipe.study.name, "--no-report", *(["-q"] if quiet else [])]
    procs = []
    for gpu in gpus:
        env = {**os.environ, "SEARCH_STORAGE": storage_url}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        procs.append(subprocess.Popen(cmd, env=env))
    if not quiet:
        where = (", ".join(f"worker {i}: GPU {g}" for i, g in enumerate(gpus)) if gpus[0] is not None
                 else "each trial on the GPU whose memory admits it" if packed and torch.cuda.is_available()
                 else "CPU/auto")
        print(f"started {n_workers} workers ({where}) on {mask(storage_url)}")
    stopped: list[str] = []

    def forward(signum: int, frame: Any) -> None:
        stopped.append(signal.Signals(signum).name)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    old = signal.signal(signal.SIGTERM, forward)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # Ctrl-C reached the workers too (same process group): let them finish
        codes = [p.wait() for p in procs]
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
    if stopped:
        raise KeyboardInterrupt(stopped[0])
    bad = [f"worker {i} exited with {c}" for i, c in enumerate(codes) if c != 0]
    if bad:
        print(f"{'; '.join(bad)}; its trial is retried by the others or by: {resume_command(recipe, storage_url)}",
              file=sys.stderr)
        return 1
    return 0
