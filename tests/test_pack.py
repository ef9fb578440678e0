"""Packing trials onto GPUs: the admission rule given measured numbers, the worker count,
probes cached in the study, and the per-GPU ledger that admission waits on."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import threading
import time

import optuna
import pytest
import torch

from search import pack
from search.errors import SearchError

GIB = 2**30


@pytest.mark.parametrize(
    ("free", "need", "running", "tpg", "ok"),
    [
        (0, 120 * GIB, 0, "auto", True),  # alone: a model larger than the GPU still runs (micro-batches)
        (60 * GIB, 50 * GIB, 1, "auto", True),  # 50 + 7 margin <= 60
        (56 * GIB, 50 * GIB, 1, "auto", False),  # 50 + 7 > 56: waits
        (57 * GIB, 50 * GIB, 3, "auto", True),  # exactly probe + margin
        (130 * GIB, 1 * GIB, 7, "auto", True),  # small models: many at once
        (130 * GIB, 1 * GIB, 2, 3, True),  # a fixed number ignores memory ...
        (130 * GIB, 1 * GIB, 3, 3, False),  # ... and caps the count
        (0, 1 * GIB, 1, 2, True),
    ],
)
def test_admission_rule_given_measured_numbers(free, need, running, tpg, ok):
    margin = pack.margin_bytes(140 * GIB, 0.05)
    assert margin == 7 * GIB
    assert pack.admits(free, need, margin, running, tpg) is ok


def test_how_many_probes_fit_follows_from_the_rule():
    # A 141 GiB GPU, 5% margin: trials of a 3 GiB probe are admitted while free >= 3 + 7.05 GiB.
    total, probe = 141 * GIB, 3 * GIB
    margin = pack.margin_bytes(total, 0.05)
    free, running = total - GIB, 0  # one GiB of contexts
    while pack.admits(free, probe, margin, running, "auto"):
        free, running = free - probe, running + 1
    assert running == 44  # (140 - 7.05) / 3 -> 44 trials, the 45th waits
    assert pack.margin_bytes(8 * GIB, 0.05) == GIB  # never under 1 GiB


def test_local_workers():
    assert pack.local_workers(2, 3, cpus=64) == 6
    assert pack.local_workers(1, "auto", cpus=16) == pack.AUTO_WORKERS_PER_GPU
    assert pack.local_workers(4, "auto", cpus=8) == 8  # two cores per GPU
    assert pack.local_workers(2, "auto", cpus=1) == 2


def test_probe_is_measured_once_per_key_and_stored_in_the_study(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", study_name="p")
    calls = []
    key = pack.probe_key("resnet_18", 32, 512, "bf16")
    assert key == "memory_probe:resnet_18@32px:b512:bf16"
    measure = lambda: calls.append(1) or 123_456  # noqa: E731
    assert pack.probe(study, key, measure) == 123_456
    again = optuna.load_study(storage=f"sqlite:///{tmp_path}/s.db", study_name="p")  # another worker
    assert pack.probe(again, key, measure) == 123_456 and len(calls) == 1
    assert pack.probe(again, pack.probe_key("resnet_18", 32, 256, "bf16"), lambda: 7) == 7
    assert again.user_attrs[key] == 123_456
    assert pack.precision_name(torch.device("cpu"), amp=True) == "fp32"


def test_a_probe_that_does_not_fit_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setattr(pack, "POLL_SECONDS", 0.01)
    study = optuna.create_study()
    tries = []

    def measure() -> int:
        tries.append(1)
        if len(tries) < 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return 42

    assert pack.probe(study, "memory_probe:x", measure, tmp_path / "gpu.json") == 42 and len(tries) == 3


def test_a_gpu_slot_waits_for_memory_and_for_the_running_trial(tmp_path, monkeypatch):
    monkeypatch.setattr(pack, "POLL_SECONDS", 0.02)
    ledger = tmp_path / "gpu0.json"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # a trial running there
    try:
        ledger.write_text(json.dumps({str(other.pid): 50 * GIB, "999999999": GIB}))  # the second is long dead
        free = [40 * GIB]  # 50 GiB taken of 90
        said = []
        t0 = time.monotonic()

        def finish_other() -> None:
            time.sleep(0.3)
            other.kill()
            other.wait()
            free[0] = 90 * GIB

        threading.Thread(target=finish_other).start()
        cpu = torch.device("cpu")
        with pack.gpu_slot(
            [cpu], 45 * GIB, "auto", 0.05, on_wait=said.append, measure=lambda d: (free[0], 90 * GIB), ledgers=[ledger]
        ) as placed:
            assert time.monotonic() - t0 >= 0.3  # 45 + 4.5 GiB did not fit in 40 while the other ran
            assert placed == cpu and json.loads(ledger.read_text()) == {str(os.getpid()): 45 * GIB}
        assert said == ["waiting for GPU memory: 45.00 GiB + margin needed; cpu: 40.00 GiB free, 1 running"]
        assert json.loads(ledger.read_text()) == {}
        with pack.gpu_slot([cpu], 200 * GIB, "auto", 0.05, measure=lambda d: (0, 90 * GIB), ledgers=[ledger]):
            pass  # alone on the GPU: admitted at once
    finally:
        other.kill()
        other.wait()


def test_a_trial_takes_the_gpu_that_admits_it(tmp_path):
    # Two GPUs (stand-ins: the measurements are given): GPU 0 runs a big trial and has 10 GiB free,
    # GPU 1 runs two small ones with 60 GiB free. A 20 GiB trial goes to GPU 1, though it is busier.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        g0, g1 = torch.device("cpu", 0), torch.device("cpu", 1)
        l0, l1 = tmp_path / "g0.json", tmp_path / "g1.json"
        l0.write_text(json.dumps({str(other.pid): 70 * GIB}))
        l1.write_text(json.dumps({str(other.pid): 2 * GIB, str(os.getppid()): 2 * GIB}))
        free = {g0: 10 * GIB, g1: 60 * GIB}
        with pack.gpu_slot(
            [g0, g1], 20 * GIB, "auto", 0.05, measure=lambda d: (free[d], 80 * GIB), ledgers=[l0, l1]
        ) as placed:
            assert placed == g1 and str(os.getpid()) in json.loads(l1.read_text())
        free[g0] = 70 * GIB  # now both admit: the one with fewer trials is tried first
        with pack.gpu_slot(
            [g0, g1], 20 * GIB, "auto", 0.05, measure=lambda d: (free[d], 80 * GIB), ledgers=[l0, l1]
        ) as placed:
            assert placed == g0
    finally:
        other.kill()
        other.wait()


# ---------------------------------------------------------------------------
# the ledger's directory and files: the user's own, never through a link

OTHER_UID = 65534  # nobody: stands for another user (chown needs root; the tests run as root here)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="making a file another user's needs root")


def test_the_ledger_directory_is_per_user_and_made_private(tmp_path, monkeypatch):
    monkeypatch.delenv(pack.LEDGER_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    home = pack.ledger_dir()
    assert home == tmp_path / f"search-gpu-{os.getuid()}"  # not one shared search-gpu for everyone
    with pack._locked(home / "gpu0.json") as running:
        running[str(os.getpid())] = GIB
    assert stat.S_IMODE(os.lstat(home).st_mode) == 0o700 and os.lstat(home).st_uid == os.getuid()
    assert json.loads((home / "gpu0.json").read_text()) == {str(os.getpid()): GIB}
    assert {stat.S_IMODE(p.stat().st_mode) for p in home.iterdir()} == {0o600}
    monkeypatch.setenv(pack.LEDGER_ENV, str(tmp_path / "mine" / "gpus"))
    assert pack.ledger_dir() == tmp_path / "mine" / "gpus"
    with pack._locked(pack.ledger_dir() / "gpu0.json"):
        pass
    assert stat.S_IMODE(os.lstat(tmp_path / "mine" / "gpus").st_mode) == 0o700


def _another_users(d):
    d.mkdir()
    os.chown(d, OTHER_UID, OTHER_UID)


def _writable_by_all(d):
    d.mkdir()
    os.chmod(d, 0o777)


def _a_link_to_a_private_dir(d):
    (d.parent / "real").mkdir(mode=0o700)
    d.symlink_to(d.parent / "real")


@pytest.mark.parametrize(
    ("make", "why"),
    [
        pytest.param(_another_users, f"owned by uid {OTHER_UID}, not by you", marks=as_root),
        (_writable_by_all, "others may write it (mode 777)"),
        (_a_link_to_a_private_dir, "it is a symbolic link"),
    ],
)
def test_a_ledger_directory_that_is_not_the_users_alone_is_refused(tmp_path, monkeypatch, make, why):
    monkeypatch.setattr(pack, "POLL_SECONDS", 0.01)
    d = tmp_path / "search-gpu"
    make(d)
    with pytest.raises(SearchError) as e:
        with pack.gpu_slot(
            [torch.device("cpu")], GIB, "auto", 0.05, measure=lambda d: (0, GIB), ledgers=[d / "g.json"]
        ):
            raise AssertionError("admitted through a directory that is not the user's")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"GPU ledger directory {d} is refused: ") and why in msg
    assert "set SEARCH_GPU_LEDGER to a directory of your own" in msg
    assert os.listdir(d) == [] and not (tmp_path / "real" / "g.json").exists()  # nothing written there


@pytest.mark.parametrize("name", ["g.lock", "g.json"])
def test_a_linked_lock_or_ledger_is_refused_and_its_target_untouched(tmp_path, name):
    d = tmp_path / "gpus"
    d.mkdir(mode=0o700)
    victim = tmp_path / "victim"  # a file of the user's that a planted link points at
    victim.write_text(json.dumps({str(os.getpid()): 1}))
    (d / name).symlink_to(victim)
    before = victim.read_bytes()
    with pytest.raises(SearchError, match=rf"^GPU ledger file {d / name} is refused: it is a symbolic link; remove it"):
        with pack._locked(d / "g.json") as running:
            running.clear()
    assert victim.read_bytes() == before and (d / name).is_symlink()


@as_root
def test_a_ledger_file_of_another_user_is_refused(tmp_path):
    d = tmp_path / "gpus"
    d.mkdir(mode=0o700)
    (d / "g.json").write_text(json.dumps({str(os.getppid()): 1}))  # a forged trial
    os.chown(d / "g.json", OTHER_UID, OTHER_UID)
    with pytest.raises(SearchError, match=f"g.json is refused: it is owned by uid {OTHER_UID}"):
        with pack._locked(d / "g.json"):
            pass


def test_the_ledger_is_replaced_whole_through_a_fresh_file(tmp_path):
    d = tmp_path / "gpus"
    d.mkdir(mode=0o700)
    ledger = d / "g.json"
    with pack._locked(ledger) as running:
        running[str(os.getpid())] = 5
    os.link(ledger, tmp_path / "second-name")  # the old file, reachable elsewhere: never written in place
    with pack._locked(ledger) as running:
        running[str(os.getpid())] = 6
    assert json.loads(ledger.read_text()) == {str(os.getpid()): 6}
    assert json.loads((tmp_path / "second-name").read_text()) == {str(os.getpid()): 5}
    assert sorted(p.name for p in d.iterdir()) == ["g.json", "g.lock"]  # no temp file left
    assert pack._running(ledger) == 1


@pytest.mark.parametrize(
    ("data", "parsed"),
    [
        (b'{"12": 5}', {"12": 5}),
        (b"", None),
        (b'{"12": 5', None),  # torn
        (b"[1, 2]", None),
        (b'{"../x": 5}', None),
        (b'{"\xc2\xb2": 5}', None),  # a digit to str.isdigit, not to int()
        (b'{"12": "5"}', None),
    ],
)
def test_a_ledger_that_is_not_pids_and_bytes_starts_again(data, parsed):
    assert pack.parse_ledger(data) == parsed
