"""What the CLI prints: commands that work as printed, names that fit, tables in 100 columns.

`prog()` is how this process was started (`python -m search`, `.venv/bin/python -m search`,
`search`), so every command the tool suggests can be pasted into the same shell. `shorten`
keeps the head and the tail of a long name (timm tags differ at the end); `table` lays out
rows in at most WIDTH columns unless asked to be wide.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WIDTH = 100  # every line the CLI prints fits a 100-column terminal


def prog() -> str:
    """The command prefix that reaches this `search` from the user's shell.

    `python` when the shell's `python` is this interpreter (an activated venv), else the
    interpreter's path (relative to the working directory when below it: `.venv/bin/python`).
    """
    exe = Path(sys.executable)
    on_path = shutil.which("python")
    if on_path and Path(on_path).resolve() == exe.resolve():
        return "python -m search"
    try:
        shown = exe.absolute().relative_to(Path.cwd())
    except ValueError:
        shown = exe.absolute()
    return f"{shown} -m search"


def command(rest: str) -> str:
    """A full command line for `search REST`, e.g. command('dashboard digits')."""
    return f"{prog()} {rest}"


def shorten(name: str, width: int) -> str:
    """`name` in at most `width` characters: head and tail kept, '…' between (tags end names)."""
    if len(name) <= width:
        return name
    if width <= 1:
        return name[:width]
    tail = (width - 1) // 2
    return name[: width - 1 - tail] + "…" + name[len(name) - tail :]


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, right: Sequence[bool] = (),
          shrink: int = 0, wide: bool = False, width: int = WIDTH, sep: str = " ") -> list[str]:
    """Header, rule and rows as aligned text lines.

    Columns are as wide as their widest cell; when the table is wider than `width` (and not
    `wide`), column `shrink` (the long names) gives up characters, its cells shortened with
    `shorten`, down to 8. `right`: which columns align right (numbers).
    """
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    n = len(header)
    widths = [max(len(r[i]) for r in cells) for i in range(n)]
    total = sum(widths) + len(sep) * (n - 1)
    if not wide and total > width:
        widths[shrink] = max(8, widths[shrink] - (total - width))
    out = []
    for k, r in enumerate(cells):
        parts = []
        for i, c in enumerate(r):
            c = shorten(c, widths[i]) if i == shrink else c
            parts.append(c.rjust(widths[i]) if i < len(right) and right[i] else c.ljust(widths[i]))
        out.append(sep.join(parts).rstrip())
        if k == 0:
            out.append("-" * min(sum(widths) + len(sep) * (n - 1), width if not wide else 10**6))
    return out


def fit_line(line: str, width: int = WIDTH) -> str:
    """A free-form line cut to `width` (for progress lines; '…' marks the cut)."""
    return line if len(line) <= width else line[: width - 1] + "…"


def terminal() -> bool:
    """Is stdout a terminal (live progress) rather than a log or a pipe (plain lines)?"""
    forced = os.environ.get("SEARCH_PROGRESS")
    if forced in ("live", "plain"):
        return forced == "live"
    return sys.stdout.isatty()
