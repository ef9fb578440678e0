"""Faults a long study meets, without training: a storage outage waited out (search.outage), a
trial the storage failed under queued again, never failed, an idempotent retry, resume states
that are not this run's refused, and the states nothing will resume removed."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from search import optuna_api, outage, process, resume, storage, workers
from search.trials import counted
from tests.test_storage import free_port

DIST = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}
DOWN = optuna.exceptions.StorageInternalError("could not connect to server: Connection refused")


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(outage, "FIRST_WAIT", 0.01)
    monkeypatch.setattr(outage, "LONGEST_WAIT", 0.02)


def _flaky(failures: int, error: Exception = DOWN):
    calls = []

    def call():
        calls.append(time.time())
        if len(calls) <= failures:
            raise error
        return len(calls)

    return call


def test_an_outage_is_waited_out_with_one_line_when_it_starts_and_one_when_it_ends():
    lines: list[str] = []
    patience = outage.Patience(60, lines.append)
    assert patience.call(_flaky(4), "tell") == 5
    assert len(lines) == 2
    assert lines[0].startswith("storage unreachable (tell: StorageInternalError: could not connect to server")
    assert lines[0].endswith("retrying for up to 60 s (study.storage_patience)")
    assert lines[1].startswith("storage back after ") and patience.back_at > 0
    assert patience.call(_flaky(0), "tell") == 1 and len(lines) == 2  # no outage: nothing said


def test_past_the_patience_the_call_gives_up_with_storage_gone():
    lines: list[str] = []
    start = time.time()
    with pytest.raises(outage.StorageGone, match=r"unreachable for 0.2 s \(study.storage_patience\) at ask"):
        outage.Patience(0.2, lines.append).call(_flaky(10**6), "ask")
    assert 0.2 <= time.time() - start < 5 and len(lines) == 1


def test_a_stop_signal_ends_the_wait_at_once():
    """A preempted node has seconds before it is killed, not the patience: SIGTERM during an outage
    gives up at once, as past the patience (the trial keeps its saved state for a sweep)."""
    lines: list[str] = []
    start = time.time()
    with process.stopping_on_signals():
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with pytest.raises(outage.StorageGone, match=r"^SIGTERM while the storage was unreachable at report: "):
            outage.Patience(60, lines.append).call(_flaky(10**6), "report")
    process.STOP.clear()  # as the next run's stopping_on_signals does
    assert 0.3 <= time.time() - start < 5 and len(lines) == 1


@pytest.mark.parametrize(
    "error", [ValueError("bad"), optuna.exceptions.UpdateFinishedTrialError("finished"), KeyError("x")]
)
def test_a_refusal_is_not_waited_out(error):
    call = _flaky(1, error)
    with pytest.raises(type(error)):
        outage.Patience(60).call(call, "tell")


def test_what_counts_as_unreachable():
    import sqlalchemy.exc

    assert outage.unreachable(DOWN) and outage.unreachable(ConnectionError("GRPC connection timeout"))
    assert outage.unreachable(sqlalchemy.exc.OperationalError("select", {}, Exception("server closed")))
    assert not outage.unreachable(sqlalchemy.exc.IntegrityError("insert", {}, Exception("duplicate")))
    assert not outage.unreachable(optuna.exceptions.DuplicatedStudyError())
    # Optuna wraps every SQLAlchemy error in StorageInternalError: only a lost connection is waited out
    for cause, waited in (
        (sqlalchemy.exc.OperationalError("select", {}, Exception("closed")), True),
        (sqlalchemy.exc.DataError("insert", {}, Exception("value too long")), False),
    ):
        try:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from cause
        except optuna.exceptions.StorageInternalError as e:
            assert outage.unreachable(e) is waited


def _proxy_in_process(port: int):
    server = optuna_api.grpc_server(optuna.storages.InMemoryStorage(), "127.0.0.1", port, ThreadPoolExecutor(2))
    server.start()
    return server


def test_a_stopped_proxy_is_unreachable_its_refusals_are_not_and_its_return_is_seen():
    """The errors of the real gRPC client: the proxy gone (UNAVAILABLE) is waited out, a refused
    write is not, and the same client reaches the proxy again once it is back on its port."""
    grpc = pytest.importorskip("grpc")

    port = free_port()
    server = _proxy_in_process(port)
    client = storage.open_storage(f"grpc://127.0.0.1:{port}", heartbeat=None)
    try:
        study = optuna.create_study(storage=client, study_name="p")
        trial = study.ask()
        study.tell(trial, 1.0)
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError) as refused:
            client.set_trial_user_attr(optuna_api.trial_id(trial), "x", 1)
        assert not outage.unreachable(refused.value)
        server.stop(None).wait()
        with pytest.raises(grpc.RpcError) as gone:
            client.get_all_studies()
        assert gone.value.code() == grpc.StatusCode.UNAVAILABLE
        assert outage.unreachable(gone.value)
        server = _proxy_in_process(port)  # a fresh, empty storage on the same port
        studies = outage.Patience(30, lambda line: None).call(client.get_all_studies, "reading the studies")
        assert studies == []
    finally:
        server.stop(None)
        client.close()


def _study() -> optuna.Study:
    return optuna.create_study(study_name="f", storage=optuna.storages.InMemoryStorage())


def test_a_retry_is_queued_once_however_often_it_is_asked_for():
    study = _study()
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, params={"lr": 0.01}, distributions=DIST))
    dead = study.get_trials()[0]
    workers.retry(study, dead)
    workers.retry(study, dead)  # a write tried again after it went through, or a second sweep
    workers.retry(study, dead, died=False)
    assert [(t.state, t.user_attrs.get("retry_of")) for t in study.get_trials()] == [
        (TrialState.FAIL, None),
        (TrialState.WAITING, 0),
    ]


def test_a_trial_the_storage_failed_under_is_queued_again_and_not_counted():
    study = _study()
    lines: list[str] = []

    def objective(trial, lost):
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        raise DOWN  # a storage call the trial made, that did not wait

    assert workers.run_one(study, objective, 5, lines.append, outage.Patience(60)) is None
    first, again = study.get_trials()
    assert first.state == TrialState.FAIL and first.user_attrs["fail_reason"] == "storage unreachable"
    assert again.state == TrialState.WAITING and again.user_attrs["retry_of"] == 0 and again.params == first.params
    assert [t.number for t in counted(study.get_trials())] == [1]
    assert lines == ["trial   0 stopped by the storage outage (StorageInternalError); queued again"]


def test_past_the_patience_the_trial_stays_running_for_a_sweep_and_is_not_told():
    study = _study()
    told = []

    def objective(trial, lost):
        raise outage.StorageGone("the storage has been unreachable for 300 s")

    with pytest.raises(outage.StorageGone):
        workers.run_one(study, objective, 5, lambda s: None, outage.Patience(60), on_told=told.append)
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING] and told == []


def test_the_state_goes_only_once_the_end_is_told():
    study = _study()
    told = []
    workers.run_one(study, lambda trial, lost: 0.5, 5, lambda s: None, outage.Patience(60), on_told=told.append)
    assert [(t.number, t.state, t.value) for t in told] == [(0, TrialState.COMPLETE, 0.5)]


# ---------------------------------------------------------------------------
# resume states that are not this run's


def _expected(**over):
    return {
        "study_id": "id-1",
        "fingerprint": "fp",
        "seed": 7,
        "params": {"lr": 0.01},
        "device_type": "cpu",
        "precision": "fp32",
        "gpus": 0,
        **over,
    }


def _state(path, **meta):
    trial = {"format": resume.STATE_FORMAT, "number": 0, **_expected(), **meta}
    torch.save({"trial": trial, "epoch": 3}, path)


@pytest.mark.parametrize(
    ("meta", "why"),
    [
        ({"device_type": "cuda", "precision": "bf16", "gpus": 1}, "saved with device cuda, this trial runs with cpu"),
        ({"study_id": "id-0"}, "written by another study of the same name (deleted and created again)"),
        ({"number": 5}, "of trial 5, not of this trial's retries ([0, 1])"),
        ({"fingerprint": "other"}, "the recipe or the data changed since"),
        ({"params": {"lr": 0.02}}, "its parameters differ"),
        ({"format": 1}, f"format 1, expected {resume.STATE_FORMAT}"),
    ],
)
def test_a_state_of_another_run_or_device_is_not_restored(tmp_path, meta, why):
    _state(tmp_path / "trial-0.pt", **meta)
    trial = SimpleNamespace(number=1, user_attrs={"retry_of": 0})
    state, reason = resume.take_state(tmp_path, trial, _expected(), {0, 1})
    assert state is None and reason == f"saved state {tmp_path / 'trial-0.pt'} is of another run ({why}): " + (
        "trained from the first epoch"
    )
    assert (tmp_path / "trial-0.pt").exists() and not (tmp_path / "trial-1.pt").exists()


def test_a_leftover_of_its_own_number_gives_way_to_the_predecessors_state(tmp_path):
    _state(tmp_path / "trial-1.pt", study_id="id-0")  # left by an earlier study of the same name
    _state(tmp_path / "trial-0.pt")
    trial = SimpleNamespace(number=1, user_attrs={"retry_of": 0})
    state, reason = resume.take_state(tmp_path, trial, _expected(), {0, 1})
    assert reason == "" and state["epoch"] == 3 and state["trial"]["study_id"] == "id-1"
    assert not (tmp_path / "trial-0.pt").exists() and (tmp_path / "trial-1.pt").exists()


def test_the_states_nothing_will_resume_are_removed(tmp_path):
    study = _study()
    add = study.add_trial
    add(optuna.create_trial(state=TrialState.COMPLETE, value=1.0))  # 0
    add(optuna.create_trial(state=TrialState.PRUNED))  # 1
    add(optuna.create_trial(state=TrialState.FAIL))  # 2: its retry (5) waits: keep
    add(optuna.create_trial(state=TrialState.FAIL))  # 3: its retry (6) took the state over
    add(optuna.create_trial(state=TrialState.FAIL))  # 4: no retry (past the limit)
    add(optuna.create_trial(state=TrialState.WAITING, user_attrs={"retry_of": 2}))  # 5
    add(optuna.create_trial(state=TrialState.COMPLETE, value=1.0, user_attrs={"retry_of": 3}))  # 6
    add(optuna.create_trial(state=TrialState.WAITING))  # 7
    for n in (0, 1, 2, 3, 4, 5, 7, 42):
        (tmp_path / f"trial-{n}.pt").write_bytes(b"x")
    (tmp_path / ".trial-9.pt.0123456789ab.tmp").write_bytes(b"torn")
    (tmp_path / "notes.txt").write_text("not ours")
    removed = resume.tidy(tmp_path, study.get_trials())
    assert sorted(p.name for p in removed) == ["trial-0.pt", "trial-1.pt", "trial-3.pt"]
    later = resume.tidy(tmp_path, study.get_trials(), now=time.time() + 2 * resume.ABANDONED)
    assert sorted(p.name for p in later) == [".trial-9.pt.0123456789ab.tmp", "trial-4.pt"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["notes.txt", "trial-2.pt", "trial-42.pt", "trial-5.pt", "trial-7.pt"]
    assert resume.disk_use(tmp_path) == (5, 4 * 1 + len("not ours"))


def test_the_report_says_how_much_disk_the_study_holds(tmp_path):
    from search import report
    from search.recipe import recipe_from_dict
    from search.storage import open_storage
    from tests.conftest import tiny_recipe

    recipe = recipe_from_dict(tiny_recipe(name="d", study={"checkpoint_dir": str(tmp_path / "states")}))
    study = optuna.create_study(study_name="d", storage=open_storage(f"sqlite:///{tmp_path}/d.db", heartbeat=None))
    (tmp_path / "states" / "d").mkdir(parents=True)
    (tmp_path / "states" / "d" / "trial-0.pt").write_bytes(b"x" * 3 * 2**20)
    (tmp_path / "d" / "artifacts").mkdir(parents=True)
    (tmp_path / "d" / "artifacts" / "a").write_bytes(b"x" * 2048)
    line = report.disk_text(study, recipe)
    assert line == "disk held: resume states 1 files, 3.0 MB; artifacts (checkpoints, histories) 1 files, 2.0 KB"
    assert line in report.report_text(study, recipe)


@pytest.mark.slow
def test_a_full_disk_keeps_the_last_good_state_and_the_trial_goes_on(tmp_path, monkeypatch, capsys):
    """The resume state's write fails with ENOSPC at epochs 2 and 3 (space comes back at 4; the
    last epoch saves none): one line says so, the epoch-1 state stays whole meanwhile, and the
    trial completes."""
    import errno

    from search import study as st
    from search.recipe import recipe_from_dict
    from tests.conftest import tiny_recipe

    recipe = recipe_from_dict(tiny_recipe(name="full", study={"n_trials": 1}, train={"epochs": 5}))
    study = st.open_study(recipe, f"sqlite:///{tmp_path}/full.db")
    states = resume.resume_dir(study, recipe)
    save, during = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") in (2, 3) and "trial" in obj:
            during.append(torch.load(states / "trial-0.pt", weights_only=True)["epoch"])
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    st.work(recipe, study)
    out = capsys.readouterr().out
    assert during == [1, 1]  # the last good state, whole, while the disk was full
    said = [line for line in out.splitlines() if "resume state" in line]
    assert said == [
        f"trial   0 resume state of epoch 2 not saved (No space left on device: {states}); "
        "epoch 1's is kept; training goes on",
        "trial   0 resume state saved again (epoch 4)",
    ]
    [t] = study.get_trials()
    assert t.state == TrialState.COMPLETE and sorted(t.intermediate_values) == [1, 2, 3, 4, 5]
    assert list(states.iterdir()) == []  # told: its state went, and no temp file is left
