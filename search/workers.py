"""Workers: heartbeats, stale trials and their retries, counting towards the total, one trial's
ask/run/tell, the work loop, the local process pool.

Dead workers: every running trial records a sign of life from a thread of its own, independent
of training progress (Optuna's heartbeat on RDB storages, a `heartbeat_at` attr everywhere). A
trial silent for STALE_BEATS heartbeats is failed with reason "worker died (no heartbeat)" and
queued again as a WAITING copy (same params, seed and intermediate values); the copy holds the
slot, so the dead trial does not count. Workers wait for the last running trials before they
exit, so a retry is always picked up.

Resuming: a running trial saves its full training state at every epoch end (search.resume); a
retry (of a dead, preempted or interrupted trial) takes it over and goes on from the epoch after
it. SIGTERM or Ctrl-C (search.process) stops the running trial at the next step, queues it again
and exits without a traceback; a second Ctrl-C exits at once. A worker whose trial was failed by
another (as stale) drops it and goes on: the retry is someone else's.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Final

import optuna
import torch
from optuna.trial import TrialState

from search import optuna_api, pack
from search.errors import TotalReached, TrialFailed, TrialInterrupted, TrialLost
from search.outage import DEFAULT_PATIENCE, Patience, StorageGone, unreachable
from search.process import STOP, STOPPED_BY, raise_if_stopped
from search.recipe import Recipe
from search.record import (
    attrs,
    new_attrs,
    new_system_attrs,
    omit,
    rejected,
    set_attrs,
    set_stored_attrs,
    system_attrs,
)
from search.storage import STALE_BEATS, mask
from search.text import command
from search.trials import STALE_REASON

log = logging.getLogger("search")

HEARTBEAT_ATTR: Final = "heartbeat_at"  # epoch seconds of a running trial's last sign of life


MAX_RETRIES = 3  # a trial whose workers keep dying is not queued again after this (preemptions do not count)


RESUME_ATTRS = ("fail_reason", HEARTBEAT_ATTR, "resumed_from_epoch", "restarted", "trained_epochs")  # not carried


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, died: bool = True) -> None:
    """Queue a WAITING copy of a dead (or, died=False, preempted) worker's trial: same params and
    seed, its intermediate values kept; it resumes from the trial's last saved epoch.

    Idempotent: a trial is queued again once. `fail_stale` calls this for each trial it fails as
    stale. The copy records the original in the system attrs Optuna's
    RetryHeartbeatStaleTrialCallback uses (`failed_trial`, `retry_history`), so its helpers work;
    `deaths` counts the dead workers only, so a trial preempted any number of times is always
    queued again.
    """
    if any(attrs(t).get("retry_of") == trial.number for t in study.get_trials(deepcopy=False)):
        return  # queued already: by a call tried again after its write went through, or by another worker
    past = system_attrs(trial)
    history = [*past.get("retry_history", []), trial.number]
    deaths = past.get("deaths", 0) + int(died)
    if deaths > MAX_RETRIES:
        return
    study.add_trial(
        optuna.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=new_attrs(omit(attrs(trial), RESUME_ATTRS), retry_of=trial.number),
            system_attrs=new_system_attrs(
                failed_trial=past.get("failed_trial", trial.number), retry_history=history, deaths=deaths
            ),
            intermediate_values=trial.intermediate_values,
        )
    )


def sweep(study: optuna.Study, heartbeat: int, patience: Patience | None = None) -> list[int]:
    """Fail and retry the stale trials of dead workers, judged by the storage's heartbeat if it
    has one, else by our `heartbeat_at` attr (stale after STALE_BEATS heartbeats).

    Within STALE_BEATS heartbeats of the storage coming back after an outage nothing is judged:
    the live workers' beats were refused too, and need time to reach the storage again.
    """
    patience = patience or Patience(DEFAULT_PATIENCE)
    if time.time() - patience.back_at < STALE_BEATS * heartbeat:
        return []
    rdb = optuna_api.heartbeat_enabled(optuna_api.storage_of(study))
    return patience.call(lambda: fail_stale(study, None if rdb else STALE_BEATS * heartbeat), "sweep")


def _stale_ids(study: optuna.Study, older_than: float | None) -> list[int]:
    """Ids of RUNNING trials without a sign of life for `older_than` s (our heartbeat attr), or,
    with None, those the RDB storage's heartbeat table calls stale."""
    storage = optuna_api.storage_of(study)
    if older_than is None:
        if not optuna_api.heartbeat_enabled(storage):
            return []
        return optuna_api.stale_trial_ids(study)
    now = time.time()
    return [
        optuna_api.trial_id(t)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if now - last_sign_of_life(t, now, older_than) > older_than
    ]


def last_sign_of_life(t: optuna.trial.FrozenTrial, now: float, older_than: float) -> float:
    """Epoch seconds of a running trial's last heartbeat (`heartbeat_at`), else of its start.

    Anyone with access to the storage can write the attribute: one that is not a finite number,
    or that lies further in the future than a clock can be off (it would pin a dead trial as
    alive), is ignored with a warning, and the trial is judged by its start."""
    start = (t.datetime_start or datetime.now()).timestamp()
    beat = attrs(t).get(HEARTBEAT_ATTR, rejected(t, HEARTBEAT_ATTR))
    if beat is None:
        return start
    if type(beat) not in (int, float) or not (0 < beat <= now + older_than):  # NaN fails both
        log.warning("trial %d: %s is %.40r, not a time up to now; judged by its start", t.number, HEARTBEAT_ATTR, beat)
        return start
    return float(beat)


def fail_stale(study: optuna.Study, older_than: float | None = None) -> list[int]:
    """Fail RUNNING trials whose worker stopped beating (for `older_than` s; None: as the RDB
    storage's heartbeat says) with reason STALE_REASON, and queue their retries.

    Returns the numbers of the trials this call failed.
    """
    storage = optuna_api.storage_of(study)
    failed = []
    for trial_id in _stale_ids(study, older_than):
        # A finished trial takes no attrs, so the reason goes on while it is still RUNNING.
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            set_stored_attrs(storage, trial_id, fail_reason=STALE_REASON)
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
def beating(
    trial: optuna.Trial, interval: float, lost: threading.Event | None = None, patience: Patience | None = None
) -> Iterator[None]:
    """Record a sign of life on the trial every `interval` s, from a thread of its own: Optuna's
    heartbeat on RDB storages, and the user attr `heartbeat_at` (epoch seconds) everywhere.

    Journal and gRPC storages have no heartbeat of their own; on RDB storages the attr lets
    `fail-stale` judge any storage the same way. When the storage refuses the beat because the
    trial has finished (another worker failed it as stale), `lost` is set and beating stops. A
    beat the storage could not take is noted on `patience` (one line an outage) and tried at the
    next interval.
    """
    stop = threading.Event()
    storage, trial_id = optuna_api.storage_of(trial.study), optuna_api.trial_id(trial)
    rdb = optuna_api.heartbeat_enabled(storage)

    def beat() -> None:
        while True:
            try:
                if rdb:
                    optuna_api.record_heartbeat(storage, trial_id)
                set_stored_attrs(storage, trial_id, heartbeat_at=time.time())
                if patience is not None:
                    patience.up()
            except optuna.exceptions.UpdateFinishedTrialError:
                if lost is not None:
                    lost.set()
                return
            except Exception as e:  # noqa: BLE001 - a missed beat is not worth killing the trial
                if patience is not None and unreachable(e):
                    patience.down(e, "heartbeat")
                else:
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


def run_one(
    study: optuna.Study,
    objective: Callable[..., float | list[float]],
    heartbeat: int,
    say: Callable[[str], None] = print,
    patience: Patience | None = None,
    on_told: Callable[[optuna.trial.FrozenTrial], None] = lambda t: None,
) -> optuna.trial.FrozenTrial | None:
    """Ask for a trial (a queued one first), run it with a heartbeat, tell its end.

    The harness's own loop rather than `Study.optimize`, so that a trial failed meanwhile by
    another worker (as stale) is dropped instead of crashing the worker ("Cannot tell a FAIL
    trial"), and an interrupted trial is queued again. Returns the finished trial, or None
    when it was lost to another worker. KeyboardInterrupt (a signal) propagates after the
    trial is queued again; an unexpected error after the trial is failed with its reason.

    Every storage call waits out an outage (`patience`). A trial the storage failed under is
    queued again, never failed: its retry resumes from the saved state. StorageGone (past the
    patience) propagates with the trial left RUNNING and its state kept, for a sweep to queue.
    `on_told` gets each trial once its end is told (its saved state may go then, not before).
    """
    patience = patience or Patience(DEFAULT_PATIENCE)
    trial = patience.call(lambda: optuna_api.ask(study), "ask")
    lost = threading.Event()
    values: float | list[float] | None = None
    state = TrialState.FAIL
    try:
        try:
            with beating(trial, heartbeat, lost, patience):
                values = objective(trial, lost)
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except (TrialFailed, TotalReached):
            pass
        except (TrialInterrupted, KeyboardInterrupt):
            _again(study, trial, patience, "interrupted")
            raise
        except StorageGone:
            raise
        except Exception as e:
            if unreachable(e):  # a storage call of the trial that did not wait: queued again, not failed
                say(f"trial {trial.number:>3} stopped by the storage outage ({type(e).__name__}); queued again")
                _again(study, trial, patience, "storage unreachable")
                return None
            if not isinstance(e, TrialLost | optuna.exceptions.UpdateFinishedTrialError):
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    if attrs(trial).get("fail_reason") is None:
                        set_attrs(trial, fail_reason=f"error: {type(e).__name__}: {e}"[:500])
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                raise
    except TrialInterrupted as e:
        raise KeyboardInterrupt(STOPPED_BY[0] if STOPPED_BY else str(e)) from None
    finally:
        gc.collect()
    frozen = patience.call(lambda: optuna_api.frozen(trial), "reading the trial")
    if frozen.state != TrialState.RUNNING:  # failed meanwhile by another worker: its retry is theirs
        say(
            f"trial {trial.number:>3} was failed by another worker ({attrs(frozen).get('fail_reason')}); "
            "dropped here, its retry runs from its saved state"
        )
        return None
    told = patience.call(
        lambda: study.tell(trial, values if state == TrialState.COMPLETE else None, state=state, skip_if_finished=True),
        "tell",
    )
    patience.call(lambda: on_told(told), "after the tell")
    return told


def _again(study: optuna.Study, trial: optuna.Trial, patience: Patience, reason: str) -> None:
    """Queue a running trial again (its retry resumes from the saved state) and fail this copy,
    which then frees its slot; both writes wait out an outage, and `retry` is idempotent."""

    def write() -> None:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            set_attrs(trial, fail_reason=reason)
        retry(study, optuna_api.frozen(trial), died=False)
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)

    patience.call(write, "queueing the trial again")


def drain(
    study: optuna.Study,
    objective: Callable[..., float | list[float]],
    heartbeat: int,
    *,
    more: Callable[[list[optuna.trial.FrozenTrial]], bool] = lambda trials: False,
    deadline: float | None = None,
    say: Callable[[str], None] = print,
    on_end: Callable[[optuna.trial.FrozenTrial | None], None] = lambda t: None,
    closed: Callable[[list[optuna.trial.FrozenTrial]], str | None] = lambda trials: None,
    patience: Patience | None = None,
    on_told: Callable[[optuna.trial.FrozenTrial], None] = lambda t: None,
) -> int:
    """Run trials in this process until none is left to run; returns how many ran here.

    A trial is run while one is queued (WAITING) or `more(trials)` asks for a new one (the
    search, below its total). When none is, but other workers' trials still run, this worker
    waits (a SIGTERM or Ctrl-C ends the wait): if one of them dies, its retry is queued and run
    here. Stale trials are swept before each; `deadline` (epoch seconds) stops the loop between
    trials; `on_end` gets each finished trial (None: lost to another worker); `on_told` each
    trial told. While `closed(trials)` gives a reason (a budget spent, a stop rule), no trial is
    taken, queued ones neither; the loop waits for running trials (their end may reopen it) and
    then ends. Storage calls wait out an outage for `patience`; past it StorageGone propagates.
    """
    patience = patience or Patience(DEFAULT_PATIENCE)
    ran = 0
    while deadline is None or time.time() < deadline:
        raise_if_stopped()
        sweep(study, heartbeat, patience)
        trials = patience.call(lambda: study.get_trials(deepcopy=False), "reading the trials")
        if closed(trials) is None and (more(trials) or any(t.state == TrialState.WAITING for t in trials)):
            on_end(run_one(study, objective, heartbeat, say, patience, on_told))
            ran += 1
        elif any(t.state == TrialState.RUNNING for t in trials):
            STOP.wait(min(heartbeat, 5))
        else:
            break
    return ran


def resume_command(recipe: Recipe, storage_url: str) -> str:
    """The command that continues the study (the stored recipe, the same storage): the URL as
    written, ${VAR} kept (the worker fills it in), a password written into it masked."""
    cmd = command(f"worker --storage '{mask(storage_url)}' --study {recipe.study.name}")
    if mask(storage_url) != storage_url:
        cmd += (
            "   (password masked: export it, e.g. as SEARCH_DB_PASSWORD, and write ${SEARCH_DB_PASSWORD} in its place)"
        )
    return cmd


def cpu_share(n_workers: int, cores: int | None = None) -> int:
    """CPU threads for each of `n_workers` local workers: the cores divided among them, at least 1."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, n_workers))


def gpu_assignment(n_workers: int, visible: str | None, count: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each local worker: GPUs round-robin (several workers may share one)."""
    ids = (
        [v.strip() for v in visible.split(",") if v.strip()] if visible is not None else [str(i) for i in range(count)]
    )
    return [ids[i % len(ids)] if ids else None for i in range(n_workers)]


def default_workers(recipe: Recipe) -> int:
    """Local workers for `run` without --workers: hardware.workers, or under trials_per_gpu on a
    CUDA machine as many as its GPUs may hold at once (`pack.local_workers`)."""
    hw = recipe.hardware
    if (
        hw.workers > 1
        or hw.trials_per_gpu is None
        or hw.device not in ("auto", "cuda")
        or not torch.cuda.is_available()
    ):
        return hw.workers
    return pack.local_workers(torch.cuda.device_count(), hw.trials_per_gpu, os.cpu_count() or 1)


def run_workers(recipe: Recipe, storage_url: str, n_workers: int, *, quiet: bool = False) -> int:
    """Start `n_workers` local `worker` processes on the study and wait for them.

    The study (schema, stored recipe) exists before they start. The URL reaches them in the
    environment (SEARCH_STORAGE), not on a command line others can read. SIGTERM is passed on
    to every worker; the run then ends with KeyboardInterrupt. Returns 0, or 1 if a worker failed.
    """
    gpus: list[str | None] = [None] * n_workers
    packed = recipe.hardware.trials_per_gpu is not None  # each trial takes the GPU that admits it
    if recipe.hardware.device in ("auto", "cuda") and torch.cuda.is_available() and not packed:
        gpus = gpu_assignment(n_workers, os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())
    cmd = [
        sys.executable,
        "-m",
        "search",
        "worker",
        "--study",
        recipe.study.name,
        "--no-report",
        *(["-q"] if quiet else []),
    ]
    procs = []
    # N local workers share this machine's cores: each gets its share of CPU threads (unless the
    # user chose), or 2 x N spinning OpenMP pools fight over the same cores.
    threads = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(cpu_share(n_workers))}
    for gpu in gpus:
        env = {**os.environ, **threads, "SEARCH_STORAGE": storage_url}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        procs.append(subprocess.Popen(cmd, env=env))
    if not quiet:
        where = (
            ", ".join(f"worker {i}: GPU {g}" for i, g in enumerate(gpus))
            if gpus[0] is not None
            else "each trial on the GPU whose memory admits it"
            if packed and torch.cuda.is_available()
            else "CPU/auto"
        )
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
        print(
            f"{'; '.join(bad)}; its trial is retried by the others or by: {resume_command(recipe, storage_url)}",
            file=sys.stderr,
        )
        return 1
    return 0
