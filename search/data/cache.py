"""The data root's file machinery: official downloads, checksums, locks and atomic directories.

A published file is fetched once (checksum-verified, retried, renamed into
place) and verified once before its first use (`.FILE.verified` records the
result); what is built from it (unpacked archives, .npy caches) is written
under a temporary name and renamed into place under an advisory lock, so
concurrent processes on one machine or a shared filesystem build it once and
never read half of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from search.errors import SearchError
from search.net import network_up as _network_up
from search.net import offline as _offline

log = logging.getLogger(__name__)

RETRIES = 3
CHUNK = 1 << 20


@dataclass(frozen=True)
class Remote:
    """One official download: URL, the file name it gets under the data root, and its checksum."""

    url: str
    file: str
    md5: str | None = None
    sha256: str | None = None


class Download(NamedTuple):
    """A file a dataset needs, for the offline checklist: nothing to fetch once `unpacked` exists."""

    remote: Remote
    unpacked: Path  # the directory it is unpacked into
    size: int | None  # bytes
    bound: bool  # `size` is only an upper bound


def _open_url(url: str, timeout: float = 60.0) -> Any:
    """The network (tests replace this)."""
    req = urllib.request.Request(url, headers={"User-Agent": "search-harness"})
    return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - fixed https URLs


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _checksum(remote: Remote) -> tuple[str, str] | None:
    if remote.sha256:
        return "sha256", remote.sha256.lower()
    if remote.md5:
        return "md5", remote.md5.lower()
    return None


def missing_error(name: str, path: Path, why: str) -> SearchError:
    return SearchError(
        f"data.dataset '{name}': {path} is missing ({why}); on a machine with internet run "
        f"`python -m search prefetch RECIPE` and copy {path.parent} over, or point data.root / $SEARCH_DATA "
        "at a directory that has it"
    )


def fetch(name: str, remote: Remote, root: Path) -> Path:
    """The file under `root`, verified (once) or downloaded first if missing: checksum-verified,
    retried, renamed into place, with a progress bar on a terminal."""
    path = root / remote.file
    if path.is_file():
        verify(name, remote, path)
        return path
    host = urllib.parse.urlparse(remote.url).hostname or ""
    if _offline():
        raise missing_error(name, path, "offline mode: SEARCH_OFFLINE is set")
    if not _network_up(host):
        raise missing_error(name, path, f"no network: {host} unreachable")
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    check = _checksum(remote)
    last: Exception | None = None
    for attempt in range(1, RETRIES + 1):
        try:
            h = hashlib.new(check[0]) if check else None
            with _open_url(remote.url) as resp, open(tmp, "wb") as out, _progress(resp, remote.file) as bar:
                for block in iter(lambda: resp.read(CHUNK), b""):
                    out.write(block)
                    bar.update(len(block))
                    if h:
                        h.update(block)
        except OSError as e:  # URLError, timeouts, resets: try again
            last = e
            tmp.unlink(missing_ok=True)
            log.warning("download of %s failed (attempt %d/%d): %s", remote.url, attempt, RETRIES, e)
            time.sleep(min(2**attempt, 10) if attempt < RETRIES else 0)
            continue
        if check and h is not None and h.hexdigest() != check[1]:
            tmp.unlink(missing_ok=True)
            raise SearchError(
                f"data.dataset '{name}': {remote.url} has {check[0]} {h.hexdigest()}, expected {check[1]}; "
                f"the download was discarded and {path} not written; retry `python -m search prefetch RECIPE`, "
                "or place a good copy there"
            )
        os.replace(tmp, path)  # atomic: readers see no file or the whole verified file
        if check:
            _record(path, *check)
        return path
    raise missing_error(name, path, f"download failed {RETRIES} times: {last}")


def _progress(resp: Any, label: str) -> Any:
    """A byte progress bar for a download on a terminal (tqdm stays silent in logs and pipes)."""
    total = getattr(resp, "headers", {}).get("Content-Length") if hasattr(resp, "headers") else None
    return tqdm(total=int(total) if total else None, unit="B", unit_scale=True, desc=label, disable=None, leave=False)


def _record_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified")


def _record(path: Path, algo: str, digest: str) -> None:
    """Note that `path`, at its present size and mtime, has this digest (best effort: a read-only
    data root only means the next process hashes the file again)."""
    st = path.stat()
    rec = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, algo: digest}
    tmp = _record_file(path).with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, _record_file(path))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.debug("verification record of %s not written: %s", path, e)


def _recorded(path: Path, algo: str, digest: str) -> bool:
    """Whether a verification record vouches for the file as it is now (same size and mtime)."""
    try:
        rec = json.loads(_record_file(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns and rec.get(algo) == digest


def verify(name: str, remote: Remote, path: Path, aside: bool = True) -> None:
    """Check a local file against its published checksum before its first use.

    Hashing a 16 GB file takes minutes, so a good result is recorded beside it
    (`.FILE.verified`: size, mtime, digest) and later processes trust the record
    while the file is unchanged. A bad file is refused (and, with `aside`, renamed
    to FILE.corrupt so that the next prefetch downloads it again); it is never used.
    """
    check = _checksum(remote)
    if check is None or _recorded(path, *check):
        return
    got = file_digest(path, check[0])
    if got == check[1]:
        _record(path, *check)
        return
    fix = "delete it and run `python -m search prefetch RECIPE` to download it again"
    if aside:
        bad = path.with_name(path.name + ".corrupt")
        os.replace(path, bad)
        fix = f"moved it to {bad}; run `python -m search prefetch RECIPE` to download it again"
    raise SearchError(
        f"data.dataset '{name}': {path} has {check[0]} {got}, expected {check[1]} (the published checksum): "
        f"not the official file; {fix}"
    )


def unreadable(name: str, path: Path, e: Exception) -> SearchError:
    return SearchError(
        f"data.dataset '{name}': cannot read {path} ({type(e).__name__}: {e}); the file is damaged or not "
        "the official one: delete it and run `python -m search prefetch RECIPE`"
    )


@contextmanager
def build_lock(final: Path) -> Iterator[None]:
    """One process builds `final` while the others on the machine (or sharing the filesystem) wait.

    An advisory lock on a hidden file beside it; where there is no `fcntl`
    (Windows) or the filesystem refuses locks, everyone builds and the first
    rename wins, as without a lock.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(final.parent / f".{final.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def atomic_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory under a temporary name, then rename it into place: readers see all of it or nothing."""
    if final.is_dir():
        return final
    with build_lock(final):
        if final.is_dir():  # built by the process that held the lock
            return final
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", suffix=".tmp", dir=final.parent))
        try:
            build(tmp)
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def discard(folder: Path) -> None:
    """Remove a cache directory: renamed aside first, so nobody ever reads it half-deleted."""
    gone = folder.with_name(f"{folder.name}.{os.getpid()}.gone.tmp")
    try:
        os.replace(folder, gone)
    except OSError:
        return  # gone already
    shutil.rmtree(gone, ignore_errors=True)


def read_cached(folder: Path, read: Callable[[], Any]) -> Any:
    """`read()` of a built cache directory; None when it is damaged, after removing it under its lock.

    Missing or malformed files mean damage (a half-finished removal, a hand edit); a
    process that finds it so takes the build lock, tries again (another may have
    rebuilt it meanwhile) and discards it if it is still unreadable. Other
    errors (no memory, too many open files) are raised: the directory is fine.
    """
    try:
        return read()
    except (FileNotFoundError, ValueError, EOFError):
        pass
    with build_lock(folder):
        try:
            return read()
        except (FileNotFoundError, ValueError, EOFError):
            discard(folder)
            return None


def mmap_tensor(path: Path) -> torch.Tensor:
    """A .npy file as a tensor backed by the page cache: nothing is read until it is used."""
    return torch.from_numpy(np.load(path, mmap_mode="c"))  # copy-on-write: writable view, file untouched
