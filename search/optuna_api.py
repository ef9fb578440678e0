"""Every use of Optuna's private API, in one place, each with the reason (Optuna 5.0; the
bound `optuna<6` in pyproject keeps it so). Nothing else in the package reaches past Optuna's
public API.
"""

from __future__ import annotations

import warnings
from typing import Any

import optuna
from optuna.storages._grpc import client as grpc_client
from optuna.storages._grpc.server import make_server
from optuna.storages._heartbeat import is_heartbeat_enabled


def quiet() -> None:
    """Entry points: Optuna's per-trial INFO lines and experimental-feature warnings off (the
    harness prints its own progress)."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The study's storage: the companion study of confirmations, artifacts and heartbeats need
    the same one (Study has no public accessor)."""
    return study._storage


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage's id of a trial (storage calls take ids; trials expose only their number)."""
    return trial._trial_id


def frozen(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """A live trial as the storage has it now (state included: another worker may have failed it)."""
    return trial.study._storage.get_trial(trial._trial_id)


def trial_by_number(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """One trial of the study without loading all of them."""
    storage = study._storage
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study._study_id, number))


def heartbeat_enabled(storage: optuna.storages.BaseStorage) -> bool:
    """Whether the storage keeps Optuna's heartbeat table (RDB storages opened with one)."""
    return is_heartbeat_enabled(storage)


def grpc_server(storage: optuna.storages.BaseStorage, host: str, port: int, executor: Any) -> Any:
    """Optuna's gRPC storage server (not started): `run_grpc_proxy_server` builds the same server
    but blocks until it ends and takes no thread pool, and `search proxy` needs to stop it on
    SIGTERM and bound its database connections by the pool's threads."""
    return make_server(storage, host, port, executor)


class GrpcClient(optuna.storages.GrpcStorageProxy):
    """Optuna's gRPC storage client on a channel with `options` besides Optuna's own:
    GrpcStorageProxy builds its channel in `_setup` (optuna.storages._grpc.client) and takes no
    options, and its default reconnect backoff (up to 120 s) keeps a worker from seeing a
    restarted proxy (see search.storage.GRPC_RECONNECT)."""

    def __init__(self, *, host: str, port: int, options: list[tuple[str, int]]) -> None:
        self._options = options
        super().__init__(host=host, port=port)

    def _setup(self) -> None:
        # Optuna's _setup with the options added; grpc and the stubs are its lazy imports (an extra).
        own = [("grpc.max_receive_message_length", -1)]  # Optuna's one option (create_insecure_channel)
        self._channel = grpc_client.grpc.insecure_channel(f"{self._host}:{self._port}", options=own + self._options)
        self._stub = grpc_client.api_pb2_grpc.StorageServiceStub(self._channel)
        self._cache = grpc_client.GrpcClientCache(self._stub)


def record_heartbeat(storage: optuna.storages.BaseStorage, trial_id: int) -> None:
    """Optuna's heartbeat, written by our own thread: Study.optimize would write it, but the
    harness runs its own ask/tell loop (see search.workers.run_one)."""
    storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """The RUNNING trials the storage's heartbeat table calls stale (its grace period): the
    query behind optuna.storages.fail_stale_trials, which fails them without a reason."""
    return study._storage._get_stale_trial_ids(study._study_id)  # type: ignore[attr-defined]


def ask(study: optuna.Study) -> optuna.Trial:
    """Study.ask, without its warning that a heartbeat is meant for Study.optimize: the harness
    beats itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return study.ask()


class NumberedQMC(optuna.samplers.QMCSampler):
    """QMC whose point is the trial number's: Optuna counts points in a study attr that two
    workers can read at once (both then take the same point); a trial number is never shared."""

    _number = 0

    def sample_relative(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, search_space: dict[str, Any]
    ) -> dict[str, Any]:
        self._number = trial.number
        return super().sample_relative(study, trial, search_space)

    def _find_sample_id(self, study: optuna.Study, search_space: dict[str, Any]) -> int:
        return self._number


def reseed_sampler(sampler: optuna.samplers.BaseSampler, seed: int) -> None:
    """Seed the sampler's random state for one trial (private attributes).

    Optuna seeds a sampler once per process, so every worker and every resumed run would replay
    the same draws. Its samplers keep a `LazyRandomState` in `_rng` (TPE, random, GP) or
    `_cma_rng` (CMA-ES), and an inner random sampler for start-up / independent draws in
    `_random_sampler` or `_independent_sampler` (QMC's own sequence is its seed and the trial
    number: `NumberedQMC`). Optuna 5.0; a sampler without them is left as it is.
    """
    for name in ("_rng", "_cma_rng"):
        state = getattr(sampler, name, None)
        if state is not None:
            state.rng.seed(seed % 2**32)
    for name in ("_random_sampler", "_independent_sampler"):
        inner = getattr(sampler, name, None)
        if inner is not None:
            reseed_sampler(inner, seed + 1)
