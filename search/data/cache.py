"""The data root's file machinery: official downloads, checksums, records of what was checked,
locks and atomic directories.

A published file is fetched once (checksum-verified, retried, written to a
temporary file of its own under the file's build lock and renamed into place)
and verified before its first use; what is built from it (unpacked archives,
.npy caches) is written under a temporary name and renamed into place under an
advisory lock, so concurrent processes on one machine or a shared filesystem
build it once and never read half of it.

Every file in a data root may have been copied in by someone else, so nothing
in it vouches for itself: what this machine has checked is recorded outside
the data root (`search.data.records`), and a `.FILE.verified` beside a file
(what earlier versions wrote) is ignored.

A directory built from a checked source (the .npy caches of CIFAR, MedMNIST,
Galaxy10 and image folders; carve-outs) is recorded the same way by the machine
that built it: each file's identity and content digest (`derived_dir`). One
this machine has no valid record for is never trusted as it is: it is built
again from the source into a temporary directory beside it and compared, file
by file; recorded when it matches, and otherwise refused (the official sets:
one line naming the file that differs and the folder to delete) or left
unused (image folders and carve-outs, which each process can build again in
memory). Where the source is not there to compare with, the error names it.
The directory itself is only ever read, never replaced: several machines may
share the data root, and each checks for itself.

About 480 lines, read top to bottom: downloads, verification, locks and atomic
directories, then the derived directories, which use all of them.
"""

from __future__ import annotations

import hashlib
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

from search.data.records import CHUNK, checked, content_digest, forget_record, identity, read_record, write_record
from search.errors import SearchError
from search.files import new_beside
from search.reach import network_up as _network_up
from search.reach import offline as _offline

log = logging.getLogger(__name__)

RETRIES = 3


@dataclass(frozen=True)
class Remote:
    """One official download: URL, the file name it gets under the data root, and its checksum."""

    url: str
    file: str
    md5: str | None = None
    sha256: str | None = None


class Download(NamedTuple):
    """A file a dataset needs, for the offline checklist: nothing to fetch once `unpacked` exists and
    this machine's record vouches for it, or where `alt` (read in the file's place) exists."""

    remote: Remote
    unpacked: Path  # the directory built from it (`derived_dir`, keyed by `source_key(remote)`)
    size: int | None  # bytes
    bound: bool  # `size` is only an upper bound
    alt: Path | None = None  # a directory read instead of the file where there is one


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


def missing_error(name: str, path: Path, why: str, for_dir: Path | None = None) -> SearchError:
    # A directory built from the file that is there already was built elsewhere (or changed): it is
    # used only once checked against the file, so say why a file is needed beside its product.
    checked = (
        f", and {for_dir}, which was not built on this machine, is only used once checked against it"
        if for_dir is not None and for_dir.is_dir()
        else ""
    )
    return SearchError(
        f"data.dataset '{name}': {path} is missing ({why}){checked}; on a machine with internet run "
        f"`python -m search prefetch RECIPE` and copy {path.parent} over, or point data.root / $SEARCH_DATA "
        "at a directory that has it"
    )


def fetch(name: str, remote: Remote, root: Path, for_dir: Path | None = None) -> Path:
    """The file under `root`, verified (once) or downloaded first if missing: checksum-verified,
    retried, renamed into place, with a progress bar on a terminal. `for_dir`: the directory built
    from it, named in the error when the file is missing."""
    path = root / remote.file
    if path.is_file():
        verify(name, remote, path)
        return path
    host = urllib.parse.urlparse(remote.url).hostname or ""
    if _offline():
        raise missing_error(name, path, "offline mode: SEARCH_OFFLINE is set", for_dir)
    if not _network_up(host):
        raise missing_error(name, path, f"no network: {host} unreachable", for_dir)
    root.mkdir(parents=True, exist_ok=True)
    with build_lock(path):
        if path.is_file():  # downloaded meanwhile by the process that held the lock
            verify(name, remote, path)
            return path
        _download(name, remote, path)
    return path


def _download(name: str, remote: Remote, path: Path) -> None:
    tmp = new_beside(path, ".part")  # unique: concurrent first downloads never share one
    check = _checksum(remote)
    last: Exception | None = None
    try:
        for attempt in range(1, RETRIES + 1):
            try:
                digest = _stream(remote, tmp, check[0] if check else None)
            except OSError as e:  # URLError, timeouts, resets: try again
                last = e
                log.warning("download of %s failed (attempt %d/%d): %s", remote.url, attempt, RETRIES, e)
                time.sleep(min(2**attempt, 10) if attempt < RETRIES else 0)
                continue
            if check and digest != check[1]:
                raise SearchError(
                    f"data.dataset '{name}': {remote.url} has {check[0]} {digest}, expected {check[1]}; "
                    f"the download was discarded and {path} not written; retry `python -m search prefetch RECIPE`, "
                    "or place a good copy there"
                )
            os.replace(tmp, path)  # atomic: readers see no file or the whole verified file
            if check:
                _record(path, *check)
            return
        raise missing_error(name, path, f"download failed {RETRIES} times: {last}")
    finally:
        tmp.unlink(missing_ok=True)  # a failed or interrupted download leaves nothing behind


def _stream(remote: Remote, tmp: Path, algorithm: str | None) -> str | None:
    """One try: the URL's bytes streamed into `tmp`, and their hex digest under `algorithm` (if any)."""
    h = hashlib.new(algorithm) if algorithm else None
    with _open_url(remote.url) as resp, open(tmp, "wb") as out, _progress(resp, remote.file) as bar:
        for block in iter(lambda: resp.read(CHUNK), b""):
            out.write(block)
            bar.update(len(block))
            if h:
                h.update(block)
    return h.hexdigest() if h else None


def _progress(resp: Any, label: str) -> Any:
    """A byte progress bar for a download on a terminal (tqdm stays silent in logs and pipes)."""
    total = getattr(resp, "headers", {}).get("Content-Length") if hasattr(resp, "headers") else None
    return tqdm(total=int(total) if total else None, unit="B", unit_scale=True, desc=label, disable=None, leave=False)


def _record(path: Path, algo: str, digest: str, st: os.stat_result | None = None) -> None:
    """Note that `path`, as it is now (or was at `st`), has this digest."""
    try:
        st = st or path.stat()
    except OSError:
        return
    write_record(path, {"identity": identity(st), algo: digest})


def _recorded(path: Path, algo: str, digest: str) -> bool:
    """Whether this machine's record vouches for the file as it is now (same identity, same digest)."""
    rec = read_record(path)
    try:
        st = path.stat()
    except OSError:
        return False
    return rec is not None and rec.get("identity") == identity(st) and rec.get(algo) == digest


def verify(name: str, remote: Remote, path: Path, aside: bool = True) -> None:
    """Check a local file against its published checksum before its first use.

    Hashing a 16 GB file takes minutes, so a good result is recorded in the
    state directory (the file's identity and digest) and later processes on
    this machine trust the record while the file is unchanged. A bad file is
    refused (and, with `aside`, renamed to FILE.corrupt so that the next
    prefetch downloads it again); it is never used.
    """
    check = _checksum(remote)
    if check is None or _recorded(path, *check):
        return
    before = path.stat()
    got = file_digest(path, check[0])
    if got == check[1]:
        if identity(path.stat()) == identity(before):  # not written while it was read
            _record(path, *check, before)
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
    rename wins, as without a lock; where the lock file cannot be made (a
    read-only data root) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        f = open(final.parent / f".{final.name}.lock", "a")  # noqa: SIM115 - closed below
    except OSError:  # a read-only data root: nothing is built there, reading needs no lock
        yield
        return
    with f:
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
        if not final.is_dir():  # else built by the process that held the lock
            _build_in_place(final, build)
    return final


def _build_in_place(final: Path, build: Callable[[Path], None]) -> None:
    """`atomic_dir`'s work, for a caller that holds the build lock."""
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


def discard(folder: Path) -> None:
    """Remove a cache directory: renamed aside first, so nobody ever reads it half-deleted."""
    gone = folder.with_name(f"{folder.name}.{os.getpid()}.gone.tmp")
    forget_record(folder)
    try:
        os.replace(folder, gone)
    except OSError:
        return  # gone already
    shutil.rmtree(gone, ignore_errors=True)


# ---------------------------------------------------------------------------
# derived directories: built from a checked source, trusted only as this machine built or checked them


def source_key(remote: Remote) -> str:
    """What a directory built from a published file stands for: the file and its published checksum
    (a record vouches only for a directory built from that very file)."""
    check = _checksum(remote)
    return f"{remote.file} ({check[0]} {check[1]})" if check else remote.file


def _listing(folder: Path) -> list[str]:
    """The files of a derived directory: not hidden ones (locks), not sub-directories (carve-outs)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def _record_dir(folder: Path, source: str, files: dict[str, Any] | None = None) -> None:
    if files is None:
        files = {}
        for f in _listing(folder):
            got = checked(folder / f)
            if got is None:  # written meanwhile: not vouched for, checked by the next process
                return
            files[f] = got
    write_record(folder, {"source": source, "files": files})


def recorded_dir(folder: Path, source: str, rehash: bool = True) -> bool:
    """Whether this machine's record vouches for `folder` as it is now: built (or checked) here from
    `source`, every recorded file there and unchanged, or (`rehash`) hashed again to the recorded
    digest (a `touch`, a copy back in place)."""
    rec = read_record(folder)
    if rec is None or rec.get("source") != source or not isinstance(rec.get("files"), dict) or not rec["files"]:
        return False
    again = {}
    try:
        for f, want in rec["files"].items():
            if not isinstance(want, dict) or "/" in f or f.startswith("."):
                return False
            if want.get("identity") == identity((folder / f).stat()):
                continue
            got = checked(folder / f) if rehash else None
            if got is None or got["sha256"] != want.get("sha256"):
                return False
            again[f] = got
    except OSError:  # a recorded file is gone
        return False
    if again:
        write_record(folder, {**rec, "files": {**rec["files"], **again}})
    return True


def _compare(folder: Path, fresh: Path) -> tuple[list[str], list[str], dict[str, Any]]:
    """(missing, different, the checked files): `folder`'s files against a fresh build of them."""
    missing, different, files = [], [], {}
    for f in _listing(fresh):
        try:
            got = checked(folder / f)
        except FileNotFoundError:
            missing.append(f)
            continue
        if got is None or got["sha256"] != content_digest(fresh / f):
            different.append(f)
        else:
            files[f] = got
    return missing, different, files


@contextmanager
def _scratch(beside: Path) -> Iterator[Path]:
    """An empty temporary directory beside `beside`, or in the system's temporary directory where the
    data root is read-only (a shared root often is); removed afterwards."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{beside.name}.", suffix=".check.tmp", dir=beside.parent))
    except OSError:
        tmp = Path(tempfile.mkdtemp(prefix=f"{beside.name}.", suffix=".check.tmp"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def derived_dir(name: str, folder: Path, build: Callable[[Path], None], source: str, strict: bool = True) -> bool:
    """`folder`, built from `source` by `build` (into the empty directory it is given), fit to read.

    Built here if missing (atomically, under its lock) and recorded; trusted while
    this machine's record vouches for it (`recorded_dir`). A directory with no
    valid record here (built by another machine sharing the root, copied in,
    changed) is checked: built afresh into a temporary directory beside it,
    the files compared by content digest, recorded when they match; the
    directory itself is only read, never replaced, as another machine may be
    using it. When they differ, `strict` refuses with one line naming the file
    and the folder to delete; otherwise (caches that are cheap to build again
    in memory) returns False after a warning, and the caller uses its own
    copy; a damaged one (files missing) is removed and built again.
    """
    if folder.is_dir() and recorded_dir(folder, source):
        return True
    folder.parent.mkdir(parents=True, exist_ok=True)  # a data root used for the first time
    with build_lock(folder):
        if not folder.is_dir():
            _build_in_place(folder, build)
            _record_dir(folder, source)
            return True
        if recorded_dir(folder, source):  # checked meanwhile by another process of this machine
            return True
        with _scratch(folder) as fresh:
            build(fresh)
            missing, different, files = _compare(folder, fresh)
        if not missing and not different:
            _record_dir(folder, source, files)
            return True
        what = (
            f"{folder / missing[0]} is missing"
            if missing
            else f"{folder / different[0]} differs from what {source} gives"
        )
        if strict:
            raise SearchError(
                f"data.dataset '{name}': {what} (it was not built on this machine, or was changed since); "
                f"nothing of it was used: delete {folder} so that it is built again"
            )
        if missing:  # damaged (a removal cut short): nobody can use it, build it again
            discard(folder)
            _build_in_place(folder, build)
            _record_dir(folder, source)
            return True
    log.warning(
        "data.dataset '%s': %s (another machine's library versions, or a changed file); this process uses "
        "its own copy and leaves the directory as it is: delete %s to have it built again here",
        name,
        what,
        folder,
    )
    return False


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
    # Copy-on-write: a writable view, the file untouched.
    return torch.from_numpy(np.load(path, mmap_mode="c", allow_pickle=False))
