"""Results of a study: leaderboard per pool entry, top-k trials, plots, the best recipe.

Everything reads the trials as they are, so it works while trials still run.
`write_report` puts `leaderboard.md`, `leaderboard.csv`, `trials.csv` and four
PNG plots under `studies/<name>/report/`. matplotlib is imported only when
plotting (search.plots), so workers never pay for it.

About 850 lines (formatted) because every table and plot of one report reads the same rows
and formats, each a short function; choosing a winner (best, confirmation, Pareto) is
search.selection, which the report prints and writes.
"""

from __future__ import annotations

import csv
import datetime
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from search import artifacts, budget, plots, selection
from search.files import replacing, write_text
from search.progress import compute_text, seconds_text
from search.recipe import Recipe
from search.record import attrs, study_attrs
from search.resume import disk_use, resume_dir
from search.storage import dir_of
from search.text import WIDTH, fit_line, shorten, table, wrap, wrap_items
from search.trials import POOL_PARAM, counted, feasible, label, ranked, spent_seconds, value

STATE_KEYS = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
}
PLOTS = ("history.png", "per_entry.png", "curves.png", "importance.png")
COLUMNS = (
    "entry",
    "best",
    "median",
    "complete",
    "pruned",
    "failed",
    "not_counted",
    "running",
    "sec_per_epoch",
    "device_seconds",
    "params",
    "source",
    "overlap",
)


def leaderboard(study: optuna.Study, recipe: Recipe) -> list[dict[str, Any]]:
    """One row per pool label, best entry first: best/median value, state counts, s/epoch, params, source."""
    maximize = recipe.study.direction == "maximize"
    rows: dict[str, dict[str, Any]] = {}
    trials = study.get_trials(deepcopy=False)
    counts = {t.number for t in counted(trials)}
    for t in trials:
        name = label(t)
        if name is None:
            continue
        a = attrs(t)
        r = rows.setdefault(
            name,
            {
                "entry": name,
                "values": [],
                "complete": 0,
                "pruned": 0,
                "failed": 0,
                "not_counted": 0,
                "running": 0,
                "epoch_seconds": [],
                "device_seconds": 0.0,
                "params": None,
                "source": a.get("weight_source", ""),
                "overlap": a.get("imagenet_overlap", ""),
            },
        )
        key = STATE_KEYS.get(t.state)
        if t.state == TrialState.FAIL and t.number not in counts:
            key = "not_counted"  # retried, interrupted, past the total: not a failure of the trial
        if key:
            r[key] += 1
        if t.state == TrialState.COMPLETE and value(t) is not None and feasible(t):
            r["values"].append(value(t))
        n = a.get("epochs") or 0
        sec = a.get("sec_per_epoch")
        if n and sec is not None:
            r["epoch_seconds"].append((n, n * sec))
        r["device_seconds"] += spent_seconds(a)
        r["params"] = r["params"] or a.get("params")
    out = []
    for r in rows.values():
        vals = r.pop("values")
        secs = r.pop("epoch_seconds")
        r["best"] = (max(vals) if maximize else min(vals)) if vals else None
        r["median"] = statistics.median(vals) if vals else None
        n_epochs = sum(n for n, _ in secs)
        r["sec_per_epoch"] = sum(sec for _, sec in secs) / n_epochs if n_epochs else None  # mean over epochs
        out.append({c: r[c] for c in COLUMNS})
    sign = -1 if maximize else 1
    out.sort(key=lambda r: (r["best"] is None, sign * (r["best"] or 0)))
    return out


def top_trials(study: optuna.Study, recipe: Recipe, k: int | None = None) -> list[dict[str, Any]]:
    """The k best complete trials (k: the recipe's study.top_k, at least 1) with their hyperparameters."""
    k = k if k is not None else max(1, recipe.study.top_k)
    return [
        {
            "rank": i + 1,
            "trial": t.number,
            "value": value(t),
            "entry": label(t),
            "best_epoch": attrs(t).get("best_epoch"),
            "hyperparameters": {n: v for n, v in t.params.items() if n != POOL_PARAM},
        }
        for i, t in enumerate(ranked(study)[:k])
    ]


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _hp_text(hp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={format(v, '.4g') if isinstance(v, float) else v}" for k, v in hp.items())


def short_count(n: int | None) -> str:
    """11172810 -> '11.2M', 94186 -> '94.2k' (the exact count is in the CSV and with --wide)."""
    if n is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Leaderboard rows by (weight source, ImageNet overlap), the group of the best entry first."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["source"], r["overlap"]), []).append(r)
    return out


def _board_cells(r: dict[str, Any], wide: bool) -> list[Any]:
    """A leaderboard row's cells, from the entry to the parameter count (exact when `wide`)."""
    return [
        r["entry"],
        _fmt(r["best"], ".4f"),
        _fmt(r["median"], ".4f"),
        r["complete"],
        r["pruned"],
        r["failed"],
        r["not_counted"],
        r["running"],
        _fmt(r["sec_per_epoch"], ".2f"),
        seconds_text(r["device_seconds"]),
        _fmt(r["params"], ",") if wide else short_count(r["params"]),
    ]


def leaderboard_text(study: optuna.Study, recipe: Recipe, top: int = 0, wide: bool = False) -> str:
    """The leaderboard, grouped by weight source, in 100 columns (and the `top` best trials when top > 0).

    `wide`: names in full and exact parameter counts, whatever the width.
    """
    rows = leaderboard(study, recipe)
    m = recipe.study.metric
    running = sum(r["running"] for r in rows)
    note = f", {running} running" if running else ""
    lines = [f"study {study.study_name}: leaderboard (validation {m}{note}), grouped by weight source"]
    if not rows:
        lines.append("no trial has started yet")
    else:
        ordered = [r for group in _groups(rows).values() for r in group]
        body = table(
            [
                "pool entry",
                f"best {m}" if wide else "best",
                "median",
                "done",
                "pruned",
                "failed",
                "n/c",
                "running",
                "s/epoch",
                "spent",
                "params",
            ],
            [_board_cells(r, wide) for r in ordered],
            right=[False] + [True] * 10,
            wide=wide,
            indent="  ",
            sep="  ",
        )
        lines += body[:2]
        i = 2
        for (source, overlap), group in _groups(rows).items():
            lines.append(
                f"weight source {source} (ImageNet overlap {overlap or '?'}):"
                if source
                else "weight source not recorded:"
            )
            lines += body[i : i + len(group)]
            i += len(group)
    if any(r["not_counted"] for r in rows):
        lines.append("n/c: not counted toward n_trials (retried after a dead worker, interrupted, or past the total)")
    lines += ending_text(study, recipe, wide)
    if top:
        lines += ["", *top_text(study, recipe, top, wide)]
    return "\n".join(lines)


def _state_counts(study: optuna.Study) -> str:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        key = STATE_KEYS.get(t.state, t.state.name.lower())
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in counts.items()) or "no trials"


def top_text(study: optuna.Study, recipe: Recipe, top: int, wide: bool = False) -> list[str]:
    """The `top` best complete trials as a table, hyperparameters wrapped; an honest line when none is."""
    rows = top_trials(study, recipe, top)
    m = recipe.study.metric
    if not rows:
        return [f"top trials: none yet, no trial has completed ({_state_counts(study)})"]
    head = f"top {len(rows)} trials" + (f" (of the {top} asked for)" if len(rows) < top else "") + ":"
    return [
        head,
        *table(
            ["#", "trial", "pool entry", m, "epoch", "hyperparameters"],
            [
                [
                    r["rank"],
                    r["trial"],
                    r["entry"],
                    f"{r['value']:.4f}",
                    r["best_epoch"],
                    _hp_text(r["hyperparameters"]),
                ]
                for r in rows
            ],
            right=[True, True, False, True, True],
            shrink=2,
            wrap=True,
            wide=wide,
            indent="  ",
            sep="  ",
        ),
    ]


def _elapsed(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def running_text(study: optuna.Study, recipe: Recipe, wide: bool = False) -> list[str]:
    """The trials running now: epochs reported so far, the last value, time since the start."""
    now = datetime.datetime.now()
    trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not trials:
        return []
    m = recipe.study.metric
    rows = []
    for t in trials:
        pts = sorted(t.intermediate_values.items())
        rows.append(
            [
                t.number,
                label(t) or "(not sampled yet)",
                f"{pts[-1][0] if pts else 0}/{recipe.train.epochs}",
                _fmt(pts[-1][1] if pts else None, ".4f"),
                _elapsed((now - t.datetime_start).total_seconds()) if t.datetime_start else "-",
            ]
        )
    return [
        f"running now ({len(rows)}):",
        *table(
            ["trial", "pool entry", "epochs", f"last {m}", "running for"],
            rows,
            right=[True, False, True, True, True],
            shrink=1,
            wide=wide,
            indent="  ",
        ),
    ]


def retrain_text(study: optuna.Study, recipe: Recipe) -> list[str]:
    """The retrain's test result (the study's `retrain` record), or nothing before a retrain."""
    rec = study_attrs(study).get("retrain")
    if not rec:
        return []
    metrics = [f"{k} {v:.4f}" for k, v in rec["test_metrics"].items() if isinstance(v, float)]
    lines = [
        f"test split (by retrain, evaluated once, n={rec.get('n_test', '?')}): {rec['pool_label']} trained on "
        f"train+val for {rec['epochs']} epochs, seed {rec.get('seed', '?')}:",
        *wrap_items("  ", metrics),
    ]
    summary = rec.get("test_summary")
    if summary:
        lines += wrap_items(
            f"  over {len(rec.get('seeds', ()))} seeds (mean, std, 95% t-interval):",
            [
                f"{k} {v['mean']:.4f}±{v['std']:.4f} [{v['low']:.4f}, {v['high']:.4f}]"
                for k, v in summary.items()
                if k in ("test_accuracy", f"test_{recipe.study.metric}")
            ],
            indent="    ",
        )
    return lines


def importance_text(study: optuna.Study) -> list[str]:
    """fANOVA importances on one line, with the number of trials they rest on and a caveat below
    IMPORTANCE_MIN_TRIALS."""
    imp = importances(study)
    if isinstance(imp, str) or not imp:
        return wrap(imp if isinstance(imp, str) else "parameter importances: no sampled parameter")
    n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    return wrap_items(
        f"parameter importances ({importance_caption(n)}):",
        [f"{k} {v:.2f}" + ("," if i < len(imp) - 1 else "") for i, (k, v) in enumerate(imp.items())],
        sep=" ",
    )


def ending_text(study: optuna.Study, recipe: Recipe, wide: bool = False) -> list[str]:
    """The budget used (study.budget), compute per pool entry, and why the search ended before
    n_trials, if it did."""
    lines = []
    if recipe.study.budget is not None:
        lines.append(
            budget.text(recipe.study.budget, budget.used(study.get_trials(deepcopy=False), recipe.train.epochs))
        )
    spent = compute_text(study.get_trials(deepcopy=False), wide)
    if spent:
        lines += spent.splitlines()
    ended = study_attrs(study).get("ended")
    if ended:
        lines.append(f"ended before {recipe.study.n_trials} trials: {ended}")
    return lines


def report_text(study: optuna.Study, recipe: Recipe, top: int = 3, wide: bool = False) -> str:
    """What `report` prints: leaderboard, running trials, top trials, test result, importances."""
    parts = [
        leaderboard_text(study, recipe, wide=wide),
        "\n".join(running_text(study, recipe, wide)),
        "\n".join(top_text(study, recipe, top, wide)),
        "\n".join(retrain_text(study, recipe)),
        "\n".join(importance_text(study)),
        disk_text(study, recipe),
    ]
    return "\n\n".join(p for p in parts if p)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def disk_text(study: optuna.Study, recipe: Recipe) -> str:
    """The disk the study holds on this machine: resume states (about one per running or queued
    trial) and artifacts (the top-k checkpoints and every trial's history)."""
    (n_states, states), (n_files, files) = disk_use(resume_dir(study, recipe)), disk_use(dir_of(study) / "artifacts")
    return (
        f"disk held: resume states {n_states} files, {_size(states)}; "
        f"artifacts (checkpoints, histories) {n_files} files, {_size(files)}"
    )


# ---------------------------------------------------------------------------
# files


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def source_rows(study: optuna.Study, recipe: Recipe) -> list[list[Any]]:
    """Per weight source (and overlap): its entries, their best value and complete trials."""
    maximize = recipe.study.direction == "maximize"
    out = []
    for (source, overlap), group in _groups(leaderboard(study, recipe)).items():
        vals = [r["best"] for r in group if r["best"] is not None]
        best = (max(vals) if maximize else min(vals)) if vals else None
        out.append(
            [
                source,
                overlap,
                ", ".join(r["entry"] for r in group),
                _fmt(best, ".4f"),
                sum(r["complete"] for r in group),
            ]
        )
    return out


def markdown(study: optuna.Study, recipe: Recipe) -> str:
    m = recipe.study.metric
    board = [[*_board_cells(r, wide=True), r["source"], r["overlap"]] for r in leaderboard(study, recipe)]
    top = [
        [r["rank"], r["trial"], r["entry"], f"{r['value']:.4f}", r["best_epoch"], _hp_text(r["hyperparameters"])]
        for r in top_trials(study, recipe)
    ]
    parts = [
        f"# Study `{study.study_name}`",
        f"Validation {m} ({recipe.study.direction}); {len(study.get_trials(deepcopy=False))} trials.",
        "## Leaderboard per pool entry",
        _md_table(
            [
                "pool entry",
                f"best {m}",
                "median",
                "complete",
                "pruned",
                "failed",
                "not counted",
                "running",
                "s/epoch",
                "params",
                "source",
                "ImageNet overlap",
            ],
            board,
        ),
        "## By weight source",
        _md_table(
            ["weight source", "ImageNet overlap", "pool entries", f"best {m}", "complete"], source_rows(study, recipe)
        ),
        "## Top trials",
        _md_table(["rank", "trial", "pool entry", f"val {m}", "best epoch", "hyperparameters"], top)
        if top
        else f"No complete trial yet ({_state_counts(study)}).",
    ]
    imp = importances(study)
    if isinstance(imp, dict) and imp:
        n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        parts += [
            "## Parameter importances",
            f"{importance_caption(n)}: " + ", ".join(f"{k} {v:.2f}" for k, v in imp.items()) + ".",
        ]
    test = study_attrs(study).get("retrain")
    if test:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in test["test_metrics"].items() if isinstance(v, float))
        parts += [
            "## Test split (evaluated once, by `retrain`)",
            f"{test['pool_label']} trained on train+val for {test['epochs']} epochs: {metrics}.",
        ]
    extra = selection_text(study, recipe)
    if extra:
        parts += ["## Choosing a winner", "```\n" + extra + "\n```"]
        parts += [
            f"![{p[:-4]}]({p})"
            for p in ("pareto.png", "confirmed.png")
            if (p == "pareto.png" and len(recipe.study.names) > 1)
            or (p == "confirmed.png" and selection.confirmed_rows(study, recipe))
        ]
    if study_attrs(study).get("rank"):
        parts += ["## Rank scores against fine-tuned results", rank_markdown(study, recipe)]
    parts += ["## Plots", *[f"![{p[:-4]}]({p})" for p in PLOTS]]
    return "\n\n".join(parts) + "\n"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with replacing(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial as a flat row: number, state, value, entry, best epoch, reason, hyperparameters."""

    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "value": value(t),
                "entry": label(t),
                "source": attrs(t).get("weight_source"),
                "overlap": attrs(t).get("imagenet_overlap"),
                **(
                    {n: v for n, v in zip(study.metric_names or (), t.values or (), strict=False)}
                    if len(study.directions) > 1
                    else {}
                ),
                "feasible": feasible(t),
                "best_epoch": attrs(t).get("best_epoch"),
                "fail_reason": attrs(t).get("fail_reason"),
                **{n: v for n, v in t.params.items() if n != POOL_PARAM},
            }
        )
    return rows


def write_report(study: optuna.Study, recipe: Recipe, directory: Path) -> list[Path]:
    """Markdown, CSVs and PNG plots under `directory`; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    md = directory / "leaderboard.md"
    write_text(md, markdown(study, recipe))
    board, trials = directory / "leaderboard.csv", directory / "trials.csv"
    _write_csv(board, leaderboard(study, recipe) or [dict.fromkeys(COLUMNS)])
    _write_csv(trials, trial_rows(study) or [{"trial": None}])
    return [
        md,
        board,
        trials,
        *plot_all(study, recipe, directory),
        *selection_files(study, recipe, directory),
        *write_rank(study, recipe, directory),
    ]


def selection_files(study: optuna.Study, recipe: Recipe, directory: Path) -> list[Path]:
    """pareto.csv/png (several objectives) and confirmed.csv/png (confirmation runs), when they apply."""
    out = []
    if len(recipe.study.names) > 1:
        rows = selection.pareto_rows(study, recipe)
        _write_csv(directory / "pareto.csv", rows or [{"trial": None}])
        out += [directory / "pareto.csv", selection.plot_pareto(study, recipe, directory / "pareto.png")]
    rows = selection.confirmed_rows(study, recipe)
    if rows:
        _write_csv(
            directory / "confirmed.csv",
            [
                {
                    **{k: v for k, v in r.items() if k != "hyperparameters"},
                    "values": " ".join(f"{v:.6g}" for v in r["values"]),
                }
                for r in rows
            ],
        )
        with plots.figure(directory / "confirmed.png") as fig:
            selection.plot_confirmed(study, recipe, fig.subplots())
        out += [directory / "confirmed.csv", directory / "confirmed.png"]
    return out


def selection_text(study: optuna.Study, recipe: Recipe, wide: bool = False) -> str:
    """The Pareto front and the confirmed leaderboard, those that apply, for `report`."""
    parts = (selection.pareto_text(study, recipe, wide), selection.confirmed_text(study, recipe, wide))
    return "\n\n".join(p for p in parts if p)


# ---------------------------------------------------------------------------
# plots


def plot_history(study: optuna.Study, recipe: Recipe, ax: Any) -> None:
    """Each trial's value by trial number (pruned: its last reported value), best so far as a step line."""
    m = recipe.study.metric
    labels = [r["entry"] for r in leaderboard(study, recipe)]
    colors = plots.colors(labels)
    best, xs, ys = None, [], []
    maximize = recipe.study.direction == "maximize"
    shown = set()
    for t in study.get_trials(deepcopy=False):
        name = label(t)
        v = value(t)
        if t.state == TrialState.COMPLETE and v is not None:
            ax.scatter(t.number, v, color=colors.get(name), label=None if name in shown else name, zorder=3)
            shown.add(name)
            if feasible(t):
                best = v if best is None else (max if maximize else min)(best, v)
        elif t.state == TrialState.PRUNED and t.intermediate_values:
            last = t.intermediate_values[max(t.intermediate_values)]
            ax.scatter(t.number, last, color=colors.get(name), marker="x", alpha=0.6, zorder=2)
        if best is not None:
            xs.append(t.number)
            ys.append(best)
    if not shown:
        plots.empty(ax, "no complete trial yet")
        return
    ax.step(xs, ys, where="post", color="black", lw=1, label="best so far")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="trial", ylabel=f"val {m}", title="Optimization history (x: pruned, last value)")
    ax.legend(fontsize=8)


def plot_entries(study: optuna.Study, recipe: Recipe, ax: Any) -> None:
    """Box and jittered strip of complete values per pool entry."""
    rows = leaderboard(study, recipe)
    done = ranked(study)
    values = {r["entry"]: [value(t) for t in done if label(t) == r["entry"]] for r in rows}
    values = {k: v for k, v in values.items() if v}
    if not values:
        plots.empty(ax, "no complete trial yet")
        return
    colors = plots.colors([r["entry"] for r in rows])
    ax.boxplot(list(values.values()), positions=range(len(values)), widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for i, (name, v) in enumerate(values.items()):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(v)), v, color=colors[name], alpha=0.8, zorder=3)
    ax.set_xticks(range(len(values)), list(values), rotation=20, ha="right", fontsize=8)
    ax.set(ylabel=f"val {recipe.study.metric}", title="Complete trials per pool entry")


def curve(study: optuna.Study, t: FrozenTrial, metric: str) -> list[tuple[int, float]]:
    """(epoch, val metric) of a trial: its intermediate values, else (several objectives, which
    report none) the history artifact it stored when it ended."""
    if t.intermediate_values:
        return sorted(t.intermediate_values.items())
    return [(h["epoch"], h[f"val_{metric}"]) for h in artifacts.history_of(study, t) if f"val_{metric}" in h]


def plot_curves(study: optuna.Study, recipe: Recipe, ax: Any) -> None:
    """Per-epoch validation metric of every trial (dashed: pruned or still running)."""
    m = recipe.study.metric
    rows = leaderboard(study, recipe)
    colors = plots.colors([r["entry"] for r in rows])
    shown = set()
    for t in study.get_trials(deepcopy=False):
        pts = curve(study, t, m)
        if not pts:
            continue
        name = label(t)
        style = "-" if t.state == TrialState.COMPLETE else "--"
        # Markers: a trial pruned after its first epoch is one point, not an invisible line.
        ax.plot(
            *zip(*pts, strict=True),
            style,
            marker="o",
            markersize=3,
            color=colors.get(name),
            alpha=0.7,
            lw=1,
            label=None if name in shown else name,
        )
        shown.add(name)
    if not shown:
        plots.empty(ax, "no epoch reported yet")
        return
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="epoch", ylabel=f"val {m}", title="Validation curves (dashed: pruned or running)")
    ax.legend(fontsize=8)


IMPORTANCE_MIN_TRIALS = 20  # fewer complete trials than this: importances are a rough hint


def importance_caption(n: int) -> str:
    """How much the importances rest on: the number of trials, a caveat under the threshold."""
    caveat = f"; under {IMPORTANCE_MIN_TRIALS}: a rough hint, not a ranking" if n < IMPORTANCE_MIN_TRIALS else ""
    return f"fANOVA over {n} complete trials{caveat}"


def importances(study: optuna.Study) -> dict[str, float] | str:
    """fANOVA parameter importances, or why they cannot be computed yet.

    optuna-dashboard computes PED-ANOVA importances instead, so on few trials the two can
    disagree; both are estimates over the complete trials."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2:
        return f"parameter importances need at least 2 complete trials, found {len(done)}"
    try:
        target = (lambda t: t.values[0]) if len(study.directions) > 1 else None  # the primary objective
        return optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target=target
        )
    except (RuntimeError, ValueError) as e:  # e.g. no parameter varies across the trials
        return f"parameter importances unavailable: {e}"


def plot_importance(study: optuna.Study, recipe: Recipe, ax: Any) -> None:
    imp = importances(study)
    if isinstance(imp, str) or not imp:
        plots.empty(ax, imp if isinstance(imp, str) else "no sampled parameter")
        return
    n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    names = list(imp)[::-1]
    ax.barh(names, [imp[k] for k in names], color="tab:blue" if n >= IMPORTANCE_MIN_TRIALS else "tab:gray")
    ax.set(xlabel="importance (fANOVA, normalized)", title=f"Parameter importances ({n} complete trials)")
    if n < IMPORTANCE_MIN_TRIALS:
        ax.text(
            0.98,
            0.02,
            f"only {n} trials (< {IMPORTANCE_MIN_TRIALS}): a rough hint",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=9,
            color="tab:red",
        )


def plot_all(study: optuna.Study, recipe: Recipe, directory: Path) -> list[Path]:
    out = []
    for name, plot in zip(PLOTS, (plot_history, plot_entries, plot_curves, plot_importance), strict=True):
        with plots.figure(directory / name) as fig:
            plot(study, recipe, fig.subplots())
        out.append(directory / name)
    return out


# ---------------------------------------------------------------------------
# rank scores (study.rank) against the fine-tuned results: how good was the estimator?

RANK_SCORES = ("logme", "probe", "knn")
RANK_PLOT = "rank.png"


def rank_rows(study: optuna.Study, recipe: Recipe) -> list[dict[str, Any]]:
    """One row per ranked entry (rank order): its scores, its fine-tuned best and place; [] without a rank."""
    stored = study_attrs(study).get("rank")
    if not stored:
        return []
    board = {r["entry"]: r for r in leaderboard(study, recipe)}
    places = {r["entry"]: i + 1 for i, r in enumerate(r for r in board.values() if r["best"] is not None)}
    rows = []
    for i, r in enumerate(x for x in stored["rows"] if x["status"] == "ok"):
        best = board.get(r["entry"], {}).get("best")
        rows.append(
            {
                "entry": r["entry"],
                "rank": i + 1,
                **{k: r[k] for k in RANK_SCORES},
                "kept": r["entry"] in stored["order"],
                "fine_tuned_best": best,
                "fine_tuned_place": places.get(r["entry"]),
                "complete": board.get(r["entry"], {}).get("complete", 0),
            }
        )
    return rows


def rank_tau(study: optuna.Study, recipe: Recipe) -> dict[str, tuple[float | None, int]]:
    """Kendall's tau-b between each score and the fine-tuned best, over entries with both: (tau, n).

    For a metric to minimise the fine-tuned ranking is that of -best, so a good score has tau > 0.
    """
    from scipy.stats import kendalltau  # scipy: a heavy import, for this table only

    sign = 1 if recipe.study.direction == "maximize" else -1
    rows = [r for r in rank_rows(study, recipe) if r["fine_tuned_best"] is not None]
    out: dict[str, tuple[float | None, int]] = {}
    for k in RANK_SCORES:
        if len(rows) < 2:
            out[k] = (None, len(rows))
            continue
        tau = kendalltau([r[k] for r in rows], [sign * r["fine_tuned_best"] for r in rows]).statistic
        out[k] = (None if tau != tau else float(tau), len(rows))  # NaN (all tied) -> None
    return out


def _tau_line(taus: dict[str, tuple[float | None, int]]) -> str:
    n = max((n for _, n in taus.values()), default=0)
    if n < 2:
        return f"Kendall's tau: needs fine-tuned results of 2 ranked entries, have {n}"
    return f"Kendall's tau with the fine-tuned ranking ({n} entries): " + ", ".join(
        f"{k} {_fmt(t, '+.2f')}" for k, (t, _) in taus.items()
    )


def _rank_cells(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """The rank-vs-fine-tuning rows as table cells (terminal and Markdown alike)."""
    return [
        [
            r["rank"],
            r["entry"],
            _fmt(r["logme"], ".4f"),
            _fmt(r["probe"], ".3f"),
            _fmt(r["knn"], ".3f"),
            _fmt(r["fine_tuned_best"], ".4f") if r["kept"] else "dropped",
            _fmt(r["fine_tuned_place"], "d"),
            r["complete"],
        ]
        for r in rows
    ]


def rank_text(study: optuna.Study, recipe: Recipe, wide: bool = False) -> str:
    """The rank scores next to the fine-tuned results, and Kendall's tau; '' when the study did not rank."""
    rows = rank_rows(study, recipe)
    stored = study_attrs(study).get("rank")
    if not stored:
        return ""
    m = recipe.study.metric
    cells = _rank_cells(rows)
    lines = [f"rank before the search (by {stored['by']}, keep {stored['keep'] or 'all'}) against fine-tuning:"]
    lines += table(
        ["#", "pool entry", "logme", "probe", "knn", f"fine-tuned {m}", "place", "done"],
        cells,
        right=[True, False, True, True, True, True, True, True],
        shrink=1,
        wide=wide,
        indent=" ",
        sep="  ",
    )
    for entry, why in stored["unranked"].items():
        line = f" -  {entry if wide else shorten(entry, 40)}: not ranked, {why}"
        lines.append(line if wide else fit_line(line))
    lines += wrap(_tau_line(rank_tau(study, recipe)), 10**6 if wide else WIDTH)
    return "\n".join(lines)


def rank_markdown(study: optuna.Study, recipe: Recipe) -> str:
    rows = rank_rows(study, recipe)
    table = _md_table(
        [
            "rank",
            "pool entry",
            "LogME",
            "probe acc",
            "kNN acc",
            f"fine-tuned best {recipe.study.metric}",
            "place",
            "complete",
        ],
        _rank_cells(rows),
    )
    return f"{table}\n\n{_tau_line(rank_tau(study, recipe))}. ![rank]({RANK_PLOT})"


def plot_rank(study: optuna.Study, recipe: Recipe, path: Path) -> None:
    """One panel per score: score against the fine-tuned best of each ranked entry, tau in the title."""
    rows = [r for r in rank_rows(study, recipe) if r["fine_tuned_best"] is not None]
    taus = rank_tau(study, recipe)
    colors = plots.colors([r["entry"] for r in rank_rows(study, recipe)])
    with plots.figure(path, (11, 3.8)) as fig:
        _plot_rank_panels(fig.subplots(1, len(RANK_SCORES)), rows, taus, colors, recipe.study.metric)


def _plot_rank_panels(
    axes: Any, rows: list[dict[str, Any]], taus: dict[str, tuple[float | None, int]], colors: Any, metric: str
) -> None:
    for ax, k in zip(axes, RANK_SCORES, strict=True):
        if not rows:
            plots.empty(ax, "no ranked entry has a fine-tuned result yet")
            continue
        for r in rows:
            ax.scatter(r[k], r["fine_tuned_best"], color=colors[r["entry"]], label=r["entry"], zorder=3)
        tau, n = taus[k]
        ax.set(
            xlabel=k,
            ylabel=f"fine-tuned best val {metric}",
            title=f"{k}: Kendall tau {_fmt(tau, '+.2f')} (n={n})",
        )
    if rows:
        axes[0].legend(fontsize=7)


def write_rank(study: optuna.Study, recipe: Recipe, directory: Path) -> list[Path]:
    """rank.csv and rank.png when the study ranked its pool; nothing otherwise."""
    rows = rank_rows(study, recipe)
    if not study_attrs(study).get("rank"):
        return []
    csv_path, png = directory / "rank.csv", directory / RANK_PLOT
    _write_csv(csv_path, rows or [{"entry": None}])
    plot_rank(study, recipe, png)
    return [csv_path, png]
