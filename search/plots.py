"""What every plot of the package shares: matplotlib on the Agg backend (imported only when a
plot is drawn, so workers never pay for it), one colour per pool entry, the text an empty
panel shows, and a figure that is saved and closed whatever happens while drawing it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from search.files import replacing

SIZE = (7.0, 4.2)  # inches at 100 dpi: 700 x 420 pixels, readable in a Markdown page


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colors(labels: Sequence[str]) -> dict[str | None, Any]:
    """One tab10 colour per label, in order (cycling after ten)."""
    cycle = pyplot().get_cmap("tab10").colors
    return {label: cycle[i % len(cycle)] for i, label in enumerate(labels)}


def empty(ax: Any, text: str) -> None:
    """An axes that says why it has nothing to show."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


@contextmanager
def figure(path: Path, size: tuple[float, float] = SIZE) -> Iterator[Any]:
    """A figure to draw on (`fig.subplots(...)`), laid out and saved to `path` at the end of the
    block, and closed even when drawing fails (pyplot keeps every open figure otherwise)."""
    plt = pyplot()
    fig = plt.figure(figsize=size, dpi=100)
    try:
        yield fig
        fig.tight_layout()
        with replacing(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
