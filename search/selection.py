"""Choosing a winner: the best trial and its fixed recipe (`best`), the leaderboard of
configurations confirmed over seeds with intervals and winner stability, the Pareto front of
several objectives and `best --pick`. The report (search.report) prints and writes these.
About 400 lines, the four ways of choosing, each short; every one ranks trials by search.trials.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from search import confirmed, plots, space
from search.artifacts import spec_of
from search.errors import SearchError
from search.recipe import Recipe
from search.record import attrs, number
from search.stats import winner_stability
from search.text import WIDTH, command, table, wrap
from search.trials import feasible, label, ranked, value


def best_choice(study: optuna.Study, recipe: Recipe) -> tuple[FrozenTrial, str]:
    """(the best trial, the rule that chose it): the highest confirmed mean when configurations were
    confirmed over seeds, else the best single (feasible) trial."""
    done = ranked(study)
    if not done:
        raise SearchError(
            f"study '{study.study_name}' has no complete trial yet; run or resume it first "
            f"({command('worker --storage URL --study ' + study.study_name)})"
        )
    m = recipe.study.metric
    rows = [r for r in confirmed_rows(study, recipe) if r["feasible"]]
    if rows:
        r = rows[0]
        t = next(t for t in done if t.number == r["trial"])
        return t, (
            f"best confirmed mean val {m} over {r['seeds']} seeds among {len(rows)} confirmed "
            f"configurations: {r['mean']:.4f}, 95% t-interval [{r['low']:.4f}, {r['high']:.4f}]"
        )
    return done[0], f"best single trial by val {m} (one seed; no confirmation runs)"


def best_trial(study: optuna.Study, recipe: Recipe) -> FrozenTrial:
    return best_choice(study, recipe)[0]


def winning_values(recipe: Recipe, t: FrozenTrial) -> dict[str, Any]:
    """The hyperparameters the search sampled in trial `t` (those that took effect), in sampling order."""
    sampled, _ = space.resolve(recipe.space, recipe.train)
    return {n: t.params[n] for n in sampled if n in t.params}


def best_recipe(study: optuna.Study, recipe: Recipe, t: FrozenTrial | None = None) -> dict[str, Any]:
    """A standalone recipe: the best trial's pool entry and hyperparameters fixed, nothing sampled.

    Every value is in `train:`, the trial's sampled ones first, then what the recipe fixed in
    `space.overrides`, then the recipe's `train`; parameters that did not take effect in that
    trial keep their `train` value, as in the trial. `space` samples nothing (preset none), the
    pool is the winning entry, `study.trial_seed` pins the trial's seed and `hardware.cpu_format`
    the CPU format it trained in (the same curve), and `study.origin` names the study, so
    `retrain` records its test metrics there.
    """
    t = t or best_trial(study, recipe)
    d = recipe.normalized()
    d["pool"] = [spec_of(recipe, label(t))]
    _, fixed = space.resolve(recipe.space, recipe.train)
    won = winning_values(recipe, t)
    if won.get("loss") == "focal" and fixed.get("label_smoothing", recipe.train.label_smoothing):
        # Label smoothing did not act under the sampled focal loss, and a nonzero value beside a fixed
        # loss: focal is refused as having no effect: 0 acts the same (not at all).
        fixed = {**fixed, "label_smoothing": 0.0}
    d["train"] = {**won, **fixed, **{k: v for k, v in d["train"].items() if k not in won and k not in fixed}}
    d["space"] = {"preset": "none", "overrides": {}}
    d["study"].update(
        name=f"{study.study_name}-best",
        n_trials=1,
        baselines=False,
        rank=None,
        origin=study.study_name,
        trial_seed=attrs(t).get("seed"),
        confirm=None,
    )  # the same seed: the same curve
    fmt = attrs(t).get("cpu_format")
    if fmt and recipe.hardware.cpu_format == "auto" and "hardware" in d:
        d["hardware"]["cpu_format"] = fmt  # on the CPU, the format the trial trained in: the same curve
    if len(recipe.study.names) > 1:  # one configuration: its own run has nothing to trade off
        d["study"].update(objectives=None, constraints={})
    return d


def best_yaml(
    study: optuna.Study, recipe: Recipe, t: FrozenTrial | None = None, rule: str = "", path: str = "FILE"
) -> str:
    """best_recipe as YAML: a header naming the trial, its metric and what to do with the file, and
    `train:` with the trial's sampled values first, under a comment saying so."""
    if t is None:
        t, rule = best_choice(study, recipe)
    d = json.loads(json.dumps(best_recipe(study, recipe, t)))
    won = winning_values(recipe, t)
    head = [
        f"Best trial {t.number} of study '{study.study_name}': {label(t)}, val {recipe.study.metric} "
        f"{value(t):.4f} (epoch {attrs(t).get('best_epoch')}), seed {attrs(t).get('seed')}.",
        *([f"Chosen by: {rule}."] if rule else []),
        "Nothing is sampled: the pool is that entry, every value is in train:, the seed is pinned (study.trial_seed).",
        f"Train it once more (the same curve): {command('run ' + path)}",
        f"Test it (train+val, one evaluation on the test split): {command('retrain ' + path)}",
    ]
    out = ["# " + line for h in head for line in wrap(h, WIDTH - 2, indent="  ")]

    def dump(obj: Any, indent: str = "") -> list[str]:
        return [indent + line for line in yaml.safe_dump(obj, sort_keys=False).splitlines()]

    for key, section in sorted(d.items(), key=lambda kv: kv[0] not in ("pool", "train")):  # the winner first
        if key != "train":
            out += dump({key: section})
            continue
        out.append("train:")
        if won:
            out.append(f"  # trial {t.number}'s values, sampled by the search:")
            out += dump({k: section[k] for k in won}, "  ")
        out.append("  # fixed by the recipe, and the defaults:" if won else "  # the recipe's values and defaults:")
        out += dump({k: v for k, v in section.items() if k not in won}, "  ")
    return "\n".join(out) + "\n"


def confirmed_rows(study: optuna.Study, recipe: Recipe) -> list[dict[str, Any]]:
    """Configurations trained over several seeds (see search.confirmed), best mean first."""
    return [r for r in confirmed.confirmed(study) if r["seeds"] >= 2]


def stability(rows: list[dict[str, Any]], recipe: Recipe) -> tuple[int, float, str] | None:
    """(top trial, how often it stays first with one seed drawn per configuration, method)."""
    feasible = [r for r in rows if r["feasible"]]
    if len(feasible) < 2:
        return None
    return winner_stability({r["trial"]: r["values"] for r in feasible}, recipe.study.direction == "maximize")


def confirmed_text(study: optuna.Study, recipe: Recipe, wide: bool = False) -> str:
    """The confirmed leaderboard: mean, std and 95% t-interval per configuration, best per entry."""
    rows = confirmed_rows(study, recipe)
    if not rows:
        return ""
    m = recipe.study.metric
    lines = [f"confirmed over seeds (validation {m}; mean, sample std, Student-t 95% interval)"]
    lines += table(
        ["trial", "pool entry", "seeds", "mean", "std", "95% CI (t)", "values"],
        [
            [
                r["trial"],
                r["entry"],
                r["seeds"],
                f"{r['mean']:.4f}",
                f"{r['std']:.4f}",
                f"[{r['low']:.4f}, {r['high']:.4f}]",
                " ".join(f"{v:.4f}" for v in r["values"]) + ("" if r["feasible"] else "  (infeasible)"),
            ]
            for r in rows
        ],
        right=[True, False, True, True, True, True],
        shrink=1,
        wrap=True,
        wide=wide,
    )
    best_per: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["feasible"]:
            best_per.setdefault(r["entry"], r)
    lines += wrap(
        "best confirmed per pool entry: "
        + ", ".join(f"{e} trial {r['trial']} ({r['mean']:.4f})" for e, r in best_per.items()),
        10**6 if wide else WIDTH,
    )
    s = stability(rows, recipe)
    if s:
        lines += wrap(
            f"winner stability: trial {s[0]} is first in {100 * s[1]:.1f}% of draws of one seed per "
            f"configuration ({s[2]})",
            10**6 if wide else WIDTH,
        )
    return "\n".join(lines)


def plot_confirmed(study: optuna.Study, recipe: Recipe, ax: Any) -> None:
    """Each confirmed configuration's runs, mean and 95% t-interval, coloured by pool entry."""
    rows = confirmed_rows(study, recipe)
    if not rows:
        plots.empty(ax, "no confirmation runs yet (study.confirm or `search confirm STUDY`)")
        return
    colors = plots.colors(list(dict.fromkeys(r["entry"] for r in rows)))
    shown = set()
    for i, r in enumerate(rows):
        c = colors[r["entry"]]
        ax.errorbar(
            i,
            r["mean"],
            yerr=[[r["mean"] - r["low"]], [r["high"] - r["mean"]]],
            fmt="o",
            color=c,
            capsize=5,
            label=None if r["entry"] in shown else r["entry"],
            zorder=3,
        )
        ax.scatter([i + 0.12] * len(r["values"]), r["values"], color=c, s=12, alpha=0.6, zorder=2)
        shown.add(r["entry"])
    ax.set_xticks(range(len(rows)), [f"trial {r['trial']}" for r in rows], fontsize=8)
    ax.set(ylabel=f"val {recipe.study.metric}", title="Confirmed configurations: mean and 95% t-interval (dots: seeds)")
    ax.legend(fontsize=8)


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the points no other point dominates (at least as good in all, better in one)."""
    signs = [1 if d == "minimize" else -1 for d in directions]
    pts = [[s * v for s, v in zip(signs, p, strict=True)] for p in points]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))

    return [i for i, p in enumerate(pts) if not any(dominates(q, p) for j, q in enumerate(pts) if j != i)]


def front_trials(study: optuna.Study, recipe: Recipe) -> list[FrozenTrial]:
    """The feasible complete trials on the Pareto front, best primary metric first."""
    done = ranked(study)  # feasible only: an infeasible trial is never on the front
    keep = set(pareto_front([t.values for t in done], recipe.study.directions))
    return [t for i, t in enumerate(done) if i in keep]


def _objective_cells(t: FrozenTrial, recipe: Recipe) -> list[str]:
    return [
        format(v, ".4f" if n in ("accuracy", "balanced_accuracy", "f1", "auc", "loss") else ".4g")
        for n, v in zip(recipe.study.names, t.values, strict=True)
    ]


def pareto_text(study: optuna.Study, recipe: Recipe, wide: bool = False) -> str:
    """The Pareto front as a table (multi-objective studies; '' otherwise)."""
    names = recipe.study.names
    if len(names) < 2:
        return ""
    front = front_trials(study, recipe)
    infeasible = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if not feasible(t))
    dirs = ", ".join(f"{n} ({d[:3]})" for n, d in zip(names, recipe.study.directions, strict=True))
    note = f"; {infeasible} infeasible trials left out" if infeasible else ""
    lines = wrap(f"Pareto front: {len(front)} trials ({dirs}{note})", 10**6 if wide else WIDTH)
    lines += table(
        ["trial", "pool entry", *names],
        [[t.number, label(t), *_objective_cells(t, recipe)] for t in front],
        right=[True, False] + [True] * len(names),
        shrink=1,
        wide=wide,
    )
    return "\n".join(lines)


def pareto_rows(study: optuna.Study, recipe: Recipe) -> list[dict[str, Any]]:
    """Every complete trial with its objectives, feasibility and whether it is on the front."""
    front = {t.number for t in front_trials(study, recipe)}
    return [
        {
            "trial": t.number,
            "entry": label(t),
            **dict(zip(recipe.study.names, t.values, strict=True)),
            "feasible": feasible(t),
            "on_front": t.number in front,
        }
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.values
    ]


def plot_pareto(study: optuna.Study, recipe: Recipe, path: Path) -> Path:
    """The first objective against each other one: trials coloured by pool entry, front ringed and
    joined, infeasible trials grey crosses."""
    names = recipe.study.names
    rows = pareto_rows(study, recipe)
    others = names[1:]
    with plots.figure(path, (6.5 * len(others), 4.5)) as fig:
        for ax, other in zip(fig.subplots(1, len(others), squeeze=False)[0], others, strict=True):
            _plot_projection(ax, rows, names, other, recipe.study.directions)
    return path


def _plot_projection(
    ax: Any, rows: list[dict[str, Any]], names: list[str], other: str, directions: Sequence[str]
) -> None:
    """The primary objective against `other`: trials by entry, the front ringed (and joined for two)."""
    colors = plots.colors(list(dict.fromkeys(r["entry"] for r in rows)))
    shown = set()
    for r in rows:
        name = r["entry"] if r["feasible"] else "infeasible"
        style = (
            {"color": colors[name], "alpha": 0.8, "zorder": 3, "linewidths": 1.5}
            | ({"edgecolors": "black", "s": 60} if r["on_front"] else {"edgecolors": "none", "s": 30})
            if r["feasible"]
            else {"color": "grey", "marker": "x", "alpha": 0.6}
        )
        ax.scatter(r[other], r[names[0]], label=None if name in shown else name, **style)
        shown.add(name)
    pairs = sorted((r[other], r[names[0]]) for r in rows if r["on_front"])
    if pairs and len(names) == 2:  # with more objectives the front is not a line in each projection
        where = "post" if directions[1] == "minimize" else "pre"
        ax.step(*zip(*pairs, strict=True), where=where, color="black", lw=1, alpha=0.6, label="Pareto front")
    if not rows:
        plots.empty(ax, "no complete trial yet")
    ax.set(xlabel=other, ylabel=f"val {names[0]}", title=f"{names[0]} against {other} (ringed: Pareto front)")
    if rows:
        ax.legend(fontsize=8)


CONDITION_OPS = {
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
    "==": lambda a, b: a == b,
}


def parse_pick(text: str) -> list[tuple[str, str, float]]:
    """'latency_ms<=5, params<1e6' -> [(name, op, number), ...]."""
    out = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|<|>)\s*([-+0-9.eE]+)", part)
        try:
            out.append((m.group(1), m.group(2), float(m.group(3))))  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            raise SearchError(
                f"--pick '{part}': expected NAME OP NUMBER with OP one of <=, <, >=, >, ==, "
                "e.g. --pick 'latency_ms<=5' (several: comma-separated)"
            ) from None
    if not out:
        raise SearchError("--pick: empty condition; e.g. --pick 'latency_ms<=5'")
    return out


def _measure(t: FrozenTrial, name: str, recipe: Recipe) -> float | None:
    names = recipe.study.names
    if name in names and t.values:
        return t.values[names.index(name)]
    v = number(attrs(t), name)  # a measure or a best_ metric: named at run time
    return v if v is not None else number(attrs(t), f"best_{name}")


def pick(study: optuna.Study, recipe: Recipe, text: str) -> FrozenTrial:
    """The best primary metric among the front's trials that meet every condition of `text`."""
    conds = parse_pick(text)
    front = front_trials(study, recipe)
    for name, _, _ in conds:
        if front and all(_measure(t, name, recipe) is None for t in front):
            allowed = [
                *recipe.study.names,
                *(
                    n
                    for n in ("params", "flops", "latency_ms", "throughput", "train_seconds")
                    if n not in recipe.study.names
                ),
            ]
            raise SearchError(f"--pick: '{name}' is not recorded on the trials; use one of {', '.join(allowed)}")
    ok = [
        t
        for t in front
        if all(CONDITION_OPS[op](_measure(t, n, recipe), x) for n, op, x in conds if _measure(t, n, recipe) is not None)
    ]
    if not ok:
        raise SearchError(
            f"--pick '{text}': no trial on the Pareto front meets it; the front is "
            + "; ".join(
                f"trial {t.number} "
                + " ".join(f"{n} {c}" for n, c in zip(recipe.study.names, _objective_cells(t, recipe), strict=True))
                for t in front
            )
            + "; loosen the condition"
        )
    return ok[0]
