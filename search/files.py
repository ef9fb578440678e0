"""Files that others may read at any moment (reports, recipes, checkpoints, resume states): each
is written to a new, uniquely named file beside it and renamed into place, so a reader sees the
old file or the new one, whole, and two writers never write into the same temporary file.

The temporary file is created with O_EXCL under a random name, as mkstemp does, but with the
usual mode (0666 less the umask): mkstemp's 0600 would follow the file into place and shut the
other users of a shared directory out.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
