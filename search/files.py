"""Files that others may read at any moment (reports, recipes, checkpoints, resume states): each
is written to a new, uniquely named file beside it and renamed into place, so a reader sees the
old file or the new one, whole, and two writers never write into the same temporary file.

The temporary file is created with O_EXCL under a random name, as mkstemp does, but with the
usual mode (0666 less the umask): mkstemp's 0600 would follow the file into place and shut the
other users of a shared directory out.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from search.errors import SearchError


def new_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A new, empty file in `path`'s directory that no other writer uses (hidden, random name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
        except FileExistsError:
            continue
        return tmp


@contextmanager
def replacing(path: Path, durable: bool = False) -> Iterator[Path]:
    """A new file to write in the block; at its end it replaces `path` (renamed: atomic on one
    filesystem), and is removed if the block fails. `durable`: flushed to disk first, so a shared
    filesystem shows all of it once it shows the name (resume states)."""
    tmp = new_beside(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> Path:
    """`path.write_text(text)`, through `replacing`."""
    with replacing(path) as tmp:
        tmp.write_text(text)
    return path


def untrusted(mode: int, owner: int, uid: int, directory: bool) -> str | None:
    """Why a directory (or file in it) of this mode and owner is not user `uid`'s alone, or None.

    A directory someone else owns or may write lets them plant what the user reads from it (a
    forged GPU ledger, a pickled compiler cache) or a link from it to a file of the user's.
    """
    if stat.S_ISLNK(mode):
        return "it is a symbolic link"
    if not (stat.S_ISDIR(mode) if directory else stat.S_ISREG(mode)):
        return f"it is not a {'directory' if directory else 'regular file'}"
    if owner != uid:
        return f"it is owned by uid {owner}, not by you (uid {uid})"
    if mode & 0o022:
        return f"others may write it (mode {stat.S_IMODE(mode):o})"
    return None


def mkdir_private(path: Path) -> bool:
    """Create directory `path` with mode 700 (its parents as usual); True when this call created it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return False
    return True


def own_directory(path: Path, what: str, env: str) -> Path:
    """`path`, a directory that only this user may write: created with mode 700 when missing; a
    link, a file, another user's directory or one others may write is refused (SearchError that
    names `what` and the variable `env` that chooses another)."""
    created = mkdir_private(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        # O_NOFOLLOW refuses a link with ELOOP, or ENOTDIR as O_DIRECTORY is also asked for.
        linked = e.errno in (errno.ELOOP, errno.ENOTDIR)
        why: str | None = ("it is a symbolic link" if path.is_symlink() else "it is not a directory") if linked else ""
        why = why or e.strerror or str(e)
    else:
        try:
            st = os.fstat(fd)
            why = untrusted(st.st_mode, st.st_uid, os.getuid(), True)
            if created and not why:
                os.fchmod(fd, 0o700)  # exactly 700, whatever the umask left
        finally:
            os.close(fd)
    if why:
        raise SearchError(
            f"{what} {path} is refused: {why}; remove it, or set {env} to a directory of your own "
            "that only you may write (created with mode 700 when missing)"
        )
    return path
