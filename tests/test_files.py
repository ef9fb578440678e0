"""Files written through a unique temporary file and a rename: whole or not at all, never shared."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from search.errors import SearchError
from search.files import new_beside, own_directory, replacing, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "best.yaml", "old\n")
    with pytest.raises(RuntimeError), replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer died")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["best.yaml"]


def test_writers_at_once_each_get_their_own_file_and_one_wins_whole(tmp_path):
    path = tmp_path / "report.md"
    names: list[str] = []

    def write(i: int) -> None:
        with replacing(path) as tmp:
            names.append(tmp.name)
            tmp.write_text(str(i) * 10_000)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 8 and all(n.startswith(".report.md.") for n in names)
    text = path.read_text()
    assert len(text) == 10_000 and len(set(text)) == 1  # one writer's content, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_the_new_file_has_the_usual_mode_and_follows_no_link(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text(tmp_path / "a" / "m.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # others of a shared studies/ can read it
    tmp = new_beside(tmp_path / "x")
    assert tmp.parent == tmp_path and tmp.name.startswith(".x.") and tmp.read_bytes() == b""


OTHER_UID = 65534  # nobody: stands for another user (chown needs root; the tests run as root here)


def test_own_directory_is_made_private(tmp_path):
    d = own_directory(tmp_path / "a" / "cache", "cache directory", "X_DIR")
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700 and os.lstat(d).st_uid == os.getuid()
    (tmp_path / "mine").mkdir(mode=0o755)  # the user's own, others may read it: taken as it is
    assert own_directory(tmp_path / "mine", "cache directory", "X_DIR") == tmp_path / "mine"
    assert stat.S_IMODE(os.lstat(tmp_path / "mine").st_mode) == 0o755


def _another_users(d):
    if os.geteuid() != 0:
        pytest.skip("making a directory another user's needs root")
    d.mkdir()
    os.chown(d, OTHER_UID, OTHER_UID)


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (_another_users, f"it is owned by uid {OTHER_UID}, not by you (uid {os.getuid()})"),
        (lambda d: (d.mkdir(), os.chmod(d, 0o777)), "others may write it (mode 777)"),
        (lambda d: ((d.parent / "real").mkdir(mode=0o700), d.symlink_to(d.parent / "real")), "it is a symbolic link"),
        (lambda d: d.write_text(""), "it is not a directory"),
    ],
)
def test_own_directory_refuses_what_others_may_change(tmp_path, make, why):
    d = tmp_path / "cache"
    make(d)
    with pytest.raises(SearchError) as e:
        own_directory(d, "inductor cache directory", "TORCHINDUCTOR_CACHE_DIR")
    assert str(e.value) == (
        f"inductor cache directory {d} is refused: {why}; remove it, or set TORCHINDUCTOR_CACHE_DIR to a "
        "directory of your own that only you may write (created with mode 700 when missing)"
    )
