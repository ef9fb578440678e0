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
import textwrap
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
    # The same environment means the same bin directory: a venv's python is a symlink to the base
    # interpreter, so resolving the files would take the system's `python` for this venv's.
    if on_path and Path(on_path).absolute().parent.resolve() == exe.absolute().parent.resolve():
        return "python -m search"
    try:
        shown = exe.absolute().relative_to(Path.cwd())
    except ValueError:
        shown = exe.absolute()
    return f"{shown} -m search"


def command(rest: str) -> str:
    """A full command line for `search REST`, e.g. command('dashboard digits')."""
    return f"{prog()} {rest}"


def shorten(name: str, width: int, head: int | None = None) -> str:
    """`name` in at most `width` characters: head and tail kept, '…' between (tags end names).

    `head`: characters kept before the '…' (default: a little over half).
    """
    if len(name) <= width:
        return name
    if width <= 1:
        return name[:width]
    head = width - 1 - (width - 1) // 2 if head is None else max(0, min(head, width - 1))
    return name[:head] + "…" + name[len(name) - (width - 1 - head) :]


def shorten_all(names: Sequence[str], width: int) -> dict[str, str]:
    """Each name shortened to `width`, the '…' placed where the shortened names stay distinct.

    timm names differ in the middle as often as at the end (`convnext_tiny.fb_in22k_ft_in1k`
    and `convnext_small.fb_in22k_ft_in1k`): the first split, from the default one outwards,
    that tells every name apart wins.
    """
    unique = list(dict.fromkeys(names))
    if all(len(n) <= width for n in unique) or width <= 1:
        return {n: shorten(n, width) for n in unique}
    default = width - 1 - (width - 1) // 2
    for head in sorted(range(width), key=lambda h: (abs(h - default), -h)):
        short = {n: shorten(n, width, head) for n in unique}
        if len(set(short.values())) == len(unique):
            return short
    return {n: shorten(n, width) for n in unique}


MIN_WRAP = 24  # a wrapped last column (hyperparameters, values) keeps at least this many


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    right: Sequence[bool] = (),
    shrink: int = 0,
    wide: bool = False,
    width: int = WIDTH,
    sep: str = " ",
    wrap: bool = False,
    indent: str = "",
) -> list[str]:
    """Header, rule and rows as aligned text lines, each at most `width` long unless `wide`.

    Columns are as wide as their widest cell. When the table is wider than `width`, column
    `shrink` (the long names) gives up characters, its cells shortened by `shorten_all`, down
    to 8; with `wrap`, the last column (free text: hyperparameters, values) first wraps onto
    continuation lines under itself. `right`: which columns align right (numbers). `indent`
    starts every line.
    """
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    n = len(header)
    widths = [max(len(r[i]) for r in cells) for i in range(n)]
    room = width - len(indent)
    if not wide:
        if wrap:
            others = sum(widths[:-1]) + len(sep) * (n - 1)
            if others + MIN_WRAP > room:
                widths[shrink] = max(8, widths[shrink] - (others + MIN_WRAP - room))
                others = sum(widths[:-1]) + len(sep) * (n - 1)
            widths[-1] = max(1, min(widths[-1], room - others))
        total = sum(widths) + len(sep) * (n - 1)
        if total > room:
            widths[shrink] = max(8, widths[shrink] - (total - room))
    names = shorten_all([r[shrink] for r in cells[1:]], widths[shrink])
    offset = len(indent) + sum(widths[:-1]) + len(sep) * (n - 1)
    out = []
    for k, r in enumerate(cells):
        last = [r[-1]]
        if wrap and not wide and k > 0 and len(r[-1]) > widths[-1]:
            last = textwrap.wrap(r[-1], widths[-1], break_on_hyphens=False, break_long_words=True) or [""]
        parts = []
        for i, c in enumerate(r):
            if i == n - 1:
                c = last[0]
            if i == shrink:
                c = names.get(c, shorten(c, widths[i])) if k > 0 else shorten(c, widths[i])
            parts.append(c.rjust(widths[i]) if i < len(right) and right[i] else c.ljust(widths[i]))
        out.append((indent + sep.join(parts)).rstrip())
        out += [" " * offset + piece for piece in last[1:]]
    rule = max(len(line) for line in out) - len(indent)  # as long as the widest line, header to last row
    return [out[0], indent + "-" * rule, *out[1:]]


def wrap(text: str, width: int = WIDTH, indent: str = "  ") -> list[str]:
    """Free text as lines of at most `width`, continuation lines indented."""
    return textwrap.wrap(text, width, subsequent_indent=indent, break_on_hyphens=False) or [""]


def wrap_items(head: str, items: Sequence[str], sep: str = "  ", width: int = WIDTH, indent: str = "  ") -> list[str]:
    """`head` then `items` (e.g. 'test_accuracy 0.9123'), as many a line as fit; an item is never
    split. A blank head is the first line's indent; after a head ending in ':' comes one space."""
    lines = [head]
    for item in items:
        last = lines[-1]
        joined = last + item if not last.strip() else last + (" " if last.endswith(":") else sep) + item
        if len(joined) <= width or not last.strip():
            lines[-1] = joined
        else:
            lines.append(indent + item)
    return lines


def fit_line(line: str, width: int = WIDTH) -> str:
    """A free-form line cut to `width` (for progress lines; '…' marks the cut)."""
    return line if len(line) <= width else line[: width - 1] + "…"


def terminal() -> bool:
    """Is stdout a terminal (live progress) rather than a log or a pipe (plain lines)?"""
    forced = os.environ.get("SEARCH_PROGRESS")
    if forced in ("live", "plain"):
        return forced == "live"
    return sys.stdout.isatty()
