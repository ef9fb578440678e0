"""What a worker shows while it runs: live bars on a terminal, plain lines in a log or a pipe.

On a terminal (stdout is a TTY, TERM is not dumb): a study bar (trials done of the total,
pruned and failed counts, the best value and its trial, elapsed time and ETA) and, under it, a
bar for the running trial (epoch, steps, images/s, the trial's ETA), both drawn by tqdm and at
most 100 columns wide; the epoch and trial-end lines are printed above them. In a log or a
pipe: only the epoch and trial-end lines, as before, no carriage returns.

The lines themselves are here too: the line a trial prints when it ends (`trial_line`: study
bar, trial, entry, outcome, best so far, seconds) and the best-so-far text of the study bar.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import IO, Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from search.record import attrs
from search.text import WIDTH, fit_line, shorten, wrap_items
from search.trials import compute_by_entry, feasible, label, ranked, value


def live_terminal(stream: IO[str] | None = None) -> bool:
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM", "") != "dumb"


class Progress:
    """The display of one worker process: `say` lines, `trial`/`step`/`trial_done` for the bars.

    Plain mode (live=False) prints lines and ignores the rest, so the training loop pays
    nothing for it (the study passes no step callback then).
    """

    def __init__(
        self, n_total: int, *, live: bool | None = None, quiet: bool = False, stream: IO[str] | None = None
    ) -> None:
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.live = (not quiet) and (live_terminal(self.stream) if live is None else live)
        self.n_total = n_total
        self.study_bar: Any = None
        self.trial_bar: Any = None
        self.epochs = 0

    def _width(self) -> int:
        cols = shutil.get_terminal_size((WIDTH, 24)).columns  # 0 on a terminal that never said its size
        return min(WIDTH, cols) if cols > 0 else WIDTH

    def say(self, line: str) -> None:
        if self.quiet:
            return
        if self.live and self.study_bar is not None:
            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def study(self, done: int, pruned: int, failed: int, best: str) -> None:
        """The study line: `done` of the total ended (counted), and what it stands at."""
        if not self.live:
            return
        if self.study_bar is None:
            self.study_bar = tqdm(
                total=self.n_total,
                initial=done,
                position=0,
                file=self.stream,
                ncols=self._width(),
                unit="trial",
                dynamic_ncols=False,
                leave=True,
                bar_format="study {n_fmt}/{total_fmt} |{bar:12}| {desc} [{elapsed}<{remaining}]",
            )
        self.study_bar.n = done
        self.study_bar.set_description_str(f"{pruned} pruned, {failed} failed{best}", refresh=False)
        self.study_bar.refresh()

    def trial(self, number: int, label: str, epochs: int, first_epoch: int = 1) -> None:
        """A trial starts (or resumes at `first_epoch`): its bar appears at its first step."""
        self.close_trial()
        self.epochs = epochs
        self._trial = (number, label, first_epoch)

    def step(self, epoch: int, i: int, steps: int, batch: int) -> None:
        """Step `i` (1-based) of `steps` of `epoch` ended, `batch` images each."""
        if not self.live:
            return
        if self.trial_bar is None:
            number, label, first = self._trial
            label = label if len(label) <= 24 else label[:23] + "~"
            self.trial_bar = tqdm(
                total=self.epochs * steps * batch,
                initial=(first - 1) * steps * batch,
                position=1,
                file=self.stream,
                ncols=self._width(),
                leave=False,
                unit="img",
                unit_scale=True,
                dynamic_ncols=False,
                bar_format="{desc} |{bar:10}| {rate_fmt} [{elapsed}<{remaining}]",
            )
            self._name = f"trial {number:>3} {label}"
        self.trial_bar.set_description_str(f"{self._name} ep {epoch}/{self.epochs} {i}/{steps}", refresh=False)
        self.trial_bar.update(batch)

    def close_trial(self) -> None:
        if self.trial_bar is not None:
            self.trial_bar.close()
            self.trial_bar = None

    def close(self) -> None:
        self.close_trial()
        if self.study_bar is not None:
            self.study_bar.close()
            self.study_bar = None


# ---------------------------------------------------------------------------
# progress lines


def bar(done: int, total: int, width: int = 20) -> str:
    filled = min(width, round(width * done / max(total, 1)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def best_so_far(study: optuna.Study) -> str:
    """'  best 0.9123 (trial 4)': the best feasible complete trial's primary value, or ''."""
    top = ranked(study)
    return f"  best {value(top[0]):.4f} (trial {top[0].number})" if top else ""


def outcome(study: optuna.Study, trial: FrozenTrial, metric: str) -> str:
    """How a trial ended, in a few words: its value(s), or why it was pruned or failed."""
    a = attrs(trial)
    if trial.state == TrialState.COMPLETE and len(trial.values or ()) > 1:
        what = "  ".join(f"{n} {v:.4g}" for n, v in zip(study.metric_names or (), trial.values, strict=False))
    elif trial.state == TrialState.COMPLETE:
        what = f"val_{metric} {value(trial):.4f}"
    elif trial.state == TrialState.PRUNED and a.get("status") == "oom":
        what = f"infeasible: {a.get('fail_reason')}"
    elif trial.state == TrialState.PRUNED:
        what = f"pruned at epoch {max(trial.intermediate_values, default=0)}"
    else:
        what = f"failed: {a.get('fail_reason') or 'error'}"
    return what if feasible(trial) else what + "  (infeasible)"


def trial_line(study: optuna.Study, trial: FrozenTrial, done: int, total: int, metric: str) -> str:
    """One line when a trial ends: study progress bar, trial, entry, outcome, best so far, seconds."""
    name = label(trial)
    if name is None:  # ended before sampling (e.g. the study total was already taken)
        return ""
    secs = (attrs(trial).get("epochs") or 0) * (attrs(trial).get("sec_per_epoch") or 0.0)
    what = outcome(study, trial, metric)
    head = f"{bar(done, total, 10)} {done}/{total} trial {trial.number:>3} {shorten(name, 20):<20} "
    tail = f"{best_so_far(study)}  {secs:.1f}s"
    if len(head) + len(what) + len(tail) > WIDTH:  # the outcome first: the best so far gives way, then its end
        tail = f"  {secs:.1f}s"
    return head + fit_line(what, max(20, WIDTH - len(head) - len(tail))) + tail


def seconds_text(s: float) -> str:
    """Device-seconds in a few characters: 42s, 12m05s, 3h20m."""
    n = int(round(s))
    return f"{n // 3600}h{n % 3600 // 60:02d}m" if n >= 3600 else f"{n // 60}m{n % 60:02d}s" if n >= 60 else f"{n}s"


def compute_text(trials: list[FrozenTrial], wide: bool = False) -> str:
    """'compute per pool entry: mini_cnn 1m02s (58%), resnet_18-scratch 45s (42%)' ('' before any epoch):
    the device-seconds each entry's trials spent, pruned and failed ones included; names shortened
    to 30 characters unless `wide`."""
    spent = compute_by_entry(trials)
    total = sum(spent.values())
    if not total:
        return ""
    items = [f"{k if wide else shorten(k, 30)} {seconds_text(v)} ({v / total:.0%})" for k, v in spent.items()]
    items = [f"{x}," for x in items[:-1]] + items[-1:]
    return "\n".join(wrap_items(f"compute per pool entry ({seconds_text(total)} in all):", items, sep=" "))
