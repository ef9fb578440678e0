"""Records of what this machine checked in a data root, kept outside it.

Every file in a data root may have been copied in by someone else (`cp -a`,
`rsync -a`, a shared filesystem), so nothing in it vouches for itself. What
this machine has checked is recorded in a per-user state directory
(`$XDG_STATE_HOME/search/verified`, by default `~/.local/state/search/verified`,
mode 0700): one JSON file per checked path, named by a digest of its real
path, holding the file's identity (device, inode, size, mtime_ns, ctime_ns) and
what was found (a digest; for a directory, each file's). A copy has another
device or inode, and ctime cannot be set with `os.utime`, so a file swapped in
with a forged size and mtime no longer matches its record. Records are read
only from a directory the user owns that nobody else may write to: anyone who
can write a record can vouch for any file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read at a time, hashing or downloading


def state_dir() -> Path:
    """Where this user's records live: $XDG_STATE_HOME/search/verified, else ~/.local/state/search/verified."""
    base = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec: a relative path there is invalid and ignored.
    return (Path(base) if os.path.isabs(base) else Path.home() / ".local" / "state") / "search" / "verified"


def _private_dir(create: bool) -> Path | None:
    """The state directory, or None where it holds nothing to trust (absent, not the user's own, or
    writable by others: anyone who can write a record could vouch for any file)."""
    d = state_dir()
    try:
        if create:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = d.stat()
    except OSError as e:
        if create:
            log.warning("data: no record of checked files kept (%s); every process checks them again", e)
        return None
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        log.warning(
            "data: %s is not private to this user (owner %d, mode %o); its records are ignored: "
            "`chmod 700` it or set $XDG_STATE_HOME",
            d,
            st.st_uid,
            st.st_mode & 0o777,
        )
        return None
    return d


def _record_name(real: str) -> str:
    return hashlib.sha256(real.encode()).hexdigest() + ".json"


def identity(st: os.stat_result) -> list[int]:
    """What changes when a file is replaced, copied or written: ctime too, which `os.utime` cannot set."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def read_record(path: Path) -> dict[str, Any] | None:
    d = _private_dir(create=False)
    if d is None:
        return None
    real = os.path.realpath(path)
    try:
        rec = json.loads((d / _record_name(real)).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("path") == real else None


def write_record(path: Path, rec: dict[str, Any]) -> None:
    """Best effort: without a record the next process only checks the file again."""
    d = _private_dir(create=True)
    if d is None:
        return
    real = os.path.realpath(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=d)  # 0600: records are private
    except OSError as e:
        log.debug("record of %s not written: %s", path, e)
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({**rec, "path": real}, f)
        os.replace(tmp, d / _record_name(real))
    except OSError as e:
        log.debug("record of %s not written: %s", path, e)
        Path(tmp).unlink(missing_ok=True)


def forget_record(path: Path) -> None:
    d = _private_dir(create=False)
    if d is not None:
        (d / _record_name(os.path.realpath(path))).unlink(missing_ok=True)


def _npy_header(f: Any) -> bytes:
    """A .npy file's dtype, shape and order (what its header says, however numpy padded it)."""
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, fortran, dtype = read[version](f)
    except (ValueError, KeyError, EOFError, SyntaxError) as e:
        return f"not a plain .npy file: {e}\n".encode()  # never what np.save writes
    return f"npy {np.lib.format.dtype_to_descr(dtype)!r} {shape} {fortran}\n".encode()


def content_digest(path: Path) -> str:
    """sha256 of what a file holds; for a .npy file of its dtype, shape, order and data, so that two
    machines whose numpy versions lay the header out differently agree on the same array."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix == ".npy":
            h.update(_npy_header(f))
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def checked(path: Path) -> dict[str, Any] | None:
    """A file's identity and content digest, or None where it changed while it was read."""
    before = identity(path.stat())
    digest = content_digest(path)
    return {"identity": before, "sha256": digest} if identity(path.stat()) == before else None
