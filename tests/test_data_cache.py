"""The data root's file machinery (search.data.cache) on its own: fetch, verify, locks, atomic
directories, discard. Real files in a temporary directory; only the network is replaced."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from search.data import cache
from search.data.cache import Remote
from search.errors import SearchError
from tests.conftest import fake_network

PAYLOAD = b"the official file\n" * 1000
URL = "https://example.org/files/set.bin"


def remote(**checksum: str) -> Remote:
    return Remote(URL, "set.bin", **checksum)


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


@pytest.fixture
def state(tmp_path_factory, monkeypatch) -> Path:
    """This test's own state directory: the records in it are this test's."""
    home = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    return home / "search" / "verified"


def records(state: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(state.glob("*.json"))]


def identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def spy_hashing(monkeypatch) -> list[Path]:
    """The files hashed from now on."""
    hashed: list[Path] = []
    real = cache.file_digest
    monkeypatch.setattr(cache, "file_digest", lambda p, algo: hashed.append(p) or real(p, algo))
    return hashed


# ---------------------------------------------------------------------------
# fetch


def test_fetch_retries_verifies_records_and_renames_into_place(tmp_path, monkeypatch, state):
    calls = fake_network(monkeypatch, PAYLOAD, fail_first=2)
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    path = cache.fetch("set", remote(md5=md5), tmp_path)
    assert path == tmp_path / "set.bin" and path.read_bytes() == PAYLOAD
    assert calls == [URL] * 3  # two resets, then the file
    # The record is this user's, outside the data root, keyed by the real path.
    assert records(state) == [{"identity": identity(path), "md5": md5, "path": os.path.realpath(path)}]
    assert state.stat().st_mode & 0o777 == 0o700
    assert visible(tmp_path) == ["set.bin"]  # no temporary file, no record beside it


def test_fetch_uses_the_file_that_is_there(tmp_path, monkeypatch, state):
    calls = fake_network(monkeypatch, PAYLOAD)
    (tmp_path / "set.bin").write_bytes(PAYLOAD)
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    assert cache.fetch("set", remote(sha256=sha), tmp_path) == tmp_path / "set.bin"
    assert calls == []
    assert [r["sha256"] for r in records(state)] == [sha]


def all_meet_at_the_lock(monkeypatch, n: int) -> None:
    """The build lock's door holds each of `n` threads until all `n` are there: every one has found
    the file missing before any takes the lock, so without a working lock every one would build it."""
    barrier = threading.Barrier(n)
    real = cache.build_lock

    @contextmanager
    def door(final: Path) -> Iterator[None]:
        barrier.wait(timeout=30)
        with real(final):
            yield

    monkeypatch.setattr(cache, "build_lock", door)


def locked(final: Path) -> bool:
    """Whether someone holds `final`'s build lock now (a lock of our own would have to wait)."""
    with open(final.parent / f".{final.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_concurrent_first_downloads_fetch_once_into_one_intact_file(tmp_path, monkeypatch):
    calls = fake_network(monkeypatch, PAYLOAD)
    all_meet_at_the_lock(monkeypatch, 3)
    serve, held = cache._open_url, []
    monkeypatch.setattr(
        cache, "_open_url", lambda url, timeout=60.0: held.append(locked(tmp_path / "set.bin")) or serve(url)
    )
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.fetch("set", remote(md5=md5), tmp_path))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert held == [True]  # the others waited outside while it downloaded
    assert calls == [URL] and results == [tmp_path / "set.bin"] * 3  # one download, the others waited for it
    assert (tmp_path / "set.bin").read_bytes() == PAYLOAD
    assert visible(tmp_path) == ["set.bin"]  # no temporary file left


def test_an_interrupted_download_leaves_no_temporary_file(tmp_path, monkeypatch):
    fake_network(monkeypatch, PAYLOAD)

    class Cut(io.BytesIO):
        def read(self, n=-1):
            raise KeyboardInterrupt

    monkeypatch.setattr(cache, "_open_url", lambda url, timeout=60.0: Cut(PAYLOAD))
    with pytest.raises(KeyboardInterrupt):
        cache.fetch("set", remote(), tmp_path)
    assert visible(tmp_path) == []


def test_fetch_discards_a_download_with_the_wrong_checksum(tmp_path, monkeypatch):
    fake_network(monkeypatch, b"something else")
    with pytest.raises(
        SearchError,
        match=r"set.bin has md5 [0-9a-f]{32}, expected 0{32}; the download was "
        r"discarded and .*set.bin not written",
    ):
        cache.fetch("set", remote(md5="0" * 32), tmp_path)
    assert visible(tmp_path) == []


def test_fetch_gives_up_after_the_retries_with_the_last_error(tmp_path, monkeypatch):
    calls = fake_network(monkeypatch, PAYLOAD, fail_first=cache.RETRIES)
    with pytest.raises(SearchError, match=r"set.bin is missing \(download failed 3 times: .*connection reset"):
        cache.fetch("set", remote(), tmp_path)
    assert len(calls) == cache.RETRIES and visible(tmp_path) == []


def test_fetch_offline_names_the_file_and_the_fix_without_probing(tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCH_OFFLINE", "1")
    monkeypatch.setattr(cache, "_network_up", lambda host: pytest.fail("probed the network offline"))
    with pytest.raises(SearchError) as e:
        cache.fetch("set", remote(), tmp_path / "root")
    assert str(e.value) == (
        f"data.dataset 'set': {tmp_path / 'root' / 'set.bin'} is missing (offline mode: SEARCH_OFFLINE is set); "
        f"on a machine with internet run `python -m search prefetch RECIPE` and copy {tmp_path / 'root'} over, "
        "or point data.root / $SEARCH_DATA at a directory that has it"
    )


def test_fetch_without_a_checksum_writes_no_record(tmp_path, monkeypatch, state):
    fake_network(monkeypatch, PAYLOAD)
    cache.fetch("set", remote(), tmp_path)
    assert visible(tmp_path) == ["set.bin"] and records(state) == []


# ---------------------------------------------------------------------------
# verify and its records


def test_verify_trusts_its_record_only_while_the_file_is_unchanged(tmp_path, monkeypatch, state):
    path = tmp_path / "set.bin"
    path.write_bytes(PAYLOAD)
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    hashed = spy_hashing(monkeypatch)
    cache.verify("set", remote(md5=md5), path)
    cache.verify("set", remote(md5=md5), path)
    assert hashed == [path]  # the second time the record vouched for it
    os.utime(path, ns=(0, 0))
    cache.verify("set", remote(md5=md5), path)
    assert hashed == [path, path]
    # A copy (cp -a keeps size and mtime) is another file: no record vouches for it.
    (tmp_path / "copy").mkdir()
    copy = Path(shutil.copy2(path, tmp_path / "copy" / "set.bin"))
    cache.verify("set", remote(md5=md5), copy)
    assert hashed == [path, path, copy]
    # A record for another digest vouches for nothing.
    with pytest.raises(SearchError, match="expected 1{32}"):
        cache.verify("set", remote(md5="1" * 32), path, aside=False)
    assert len(hashed) == 4


def test_a_swapped_file_with_forged_size_mtime_and_record_is_hashed_and_refused(tmp_path, monkeypatch, state):
    path = tmp_path / "set.bin"
    path.write_bytes(PAYLOAD)
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    cache.verify("set", remote(md5=md5), path)
    was = path.stat()
    time.sleep(0.02)  # past the coarse clock tick that stamps ctime
    evil = PAYLOAD.replace(b"official", b"poisoned")
    path.write_bytes(evil)  # in place: same inode, same size
    os.utime(path, ns=(was.st_atime_ns, was.st_mtime_ns))  # and the old mtime
    forged = {"size": was.st_size, "mtime_ns": was.st_mtime_ns, "md5": md5}
    (tmp_path / ".set.bin.verified").write_text(json.dumps(forged))  # the old kind of record, copied beside it
    now = path.stat()
    assert [now.st_ino, now.st_size, now.st_mtime_ns] == [was.st_ino, was.st_size, was.st_mtime_ns]
    assert now.st_ctime_ns != was.st_ctime_ns  # what os.utime cannot set
    hashed = spy_hashing(monkeypatch)
    with pytest.raises(SearchError, match=r"set.bin has md5 [0-9a-f]{32}, expected [0-9a-f]{32} .*not the official"):
        cache.verify("set", remote(md5=md5), path, aside=False)
    assert hashed == [path]


def test_records_in_a_state_directory_others_can_write_are_ignored(tmp_path, monkeypatch, state, caplog):
    path = tmp_path / "set.bin"
    path.write_bytes(PAYLOAD)
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    cache.verify("set", remote(md5=md5), path)
    state.chmod(0o777)
    hashed = spy_hashing(monkeypatch)
    cache.verify("set", remote(md5=md5), path)
    assert hashed == [path] and "is not private to this user" in caplog.text


def test_verify_moves_a_bad_file_aside_or_leaves_it_for_a_check(tmp_path):
    path = tmp_path / "set.bin"
    path.write_bytes(b"not it")
    want = hashlib.sha256(PAYLOAD).hexdigest()
    with pytest.raises(SearchError, match=r"has sha256 [0-9a-f]{64}, expected .*delete it and run"):
        cache.verify("set", remote(sha256=want), path, aside=False)
    assert path.is_file()
    with pytest.raises(SearchError, match=r"not the official file; moved it to .*set.bin.corrupt"):
        cache.verify("set", remote(sha256=want), path)
    assert visible(tmp_path) == ["set.bin.corrupt"]


def test_a_record_that_cannot_be_written_is_not_an_error(tmp_path, monkeypatch):
    path = tmp_path / "set.bin"
    path.write_bytes(PAYLOAD)
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    monkeypatch.setenv("XDG_STATE_HOME", str(blocker))
    cache.verify("set", remote(md5=hashlib.md5(PAYLOAD).hexdigest()), path)
    assert visible(tmp_path) == ["set.bin", "state"]


# ---------------------------------------------------------------------------
# atomic directories, locks, discard, damaged caches


def test_atomic_dir_leaves_nothing_when_the_build_fails(tmp_path):
    def build(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise ValueError("decoding failed")

    with pytest.raises(ValueError, match="decoding failed"):
        cache.atomic_dir(tmp_path / "set.npy", build)
    assert visible(tmp_path) == []


def test_atomic_dir_builds_once_and_then_returns_what_is_there(tmp_path):
    built = []
    final = tmp_path / "set.npy"
    for _ in range(2):
        assert cache.atomic_dir(final, lambda tmp: built.append(tmp) or (tmp / "a").write_text("1")) == final
    assert len(built) == 1 and (final / "a").read_text() == "1"


def test_concurrent_builders_of_one_cache_build_it_once(tmp_path, monkeypatch):
    calls = []
    all_meet_at_the_lock(monkeypatch, 3)

    final = tmp_path / "set.npy"

    def build(tmp: Path) -> None:
        calls.append((tmp, locked(final)))
        (tmp / "done").write_text("1")

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.atomic_dir(final, build))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [held for _, held in calls] == [True]  # built once, the others waiting outside the lock
    assert results == [final] * 3 and (final / "done").read_text() == "1"
    assert visible(tmp_path) == ["set.npy"]  # no temporary directory left


def test_discard_removes_a_directory_and_ignores_one_that_is_gone(tmp_path):
    folder = tmp_path / "set.npy"
    folder.mkdir()
    (folder / "images.npy").write_bytes(b"x")
    cache.discard(folder)
    cache.discard(folder)
    assert visible(tmp_path) == []


def test_read_cached_discards_a_damaged_directory_and_keeps_a_sound_one(tmp_path):
    folder = tmp_path / "set.npy"
    folder.mkdir()
    np.save(folder / "labels.npy", np.arange(3))
    assert cache.read_cached(folder, lambda: np.load(folder / "labels.npy").tolist()) == [0, 1, 2]
    assert cache.read_cached(folder, lambda: np.load(folder / "images.npy")) is None  # damaged: removed
    assert not folder.exists()

    folder.mkdir()

    def out_of_memory():
        raise MemoryError

    with pytest.raises(MemoryError):  # not damage: raised, the directory stays
        cache.read_cached(folder, out_of_memory)
    assert folder.is_dir()


def test_mmap_tensor_reads_nothing_until_used_and_never_writes_the_file(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(6, dtype=np.uint8).reshape(2, 3))
    t = cache.mmap_tensor(tmp_path / "x.npy")
    t[0, 0] = 99  # copy-on-write
    assert t.tolist() == [[99, 1, 2], [3, 4, 5]]
    assert np.load(tmp_path / "x.npy")[0, 0] == 0
