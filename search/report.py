"""Results of a study: the leaderboard per pool entry (works while trials still run)."""

from __future__ import annotations

import statistics
from typing import Any

import optuna
from optuna.trial import TrialState

from search.recipe import Recipe


def leaderboard(study: optuna.Study, recipe: Recipe) -> list[dict[str, Any]]:
    """One row per pool label, best entry first."""
    maximize = recipe.study.direction == "maximize"
    rows: dict[str, dict[str, Any]] = {}
    for t in study.get_trials(deepcopy=False):
        label = t.user_attrs.get("pool_label") or t.params.get("model")
        if label is None:
            continue
        r = rows.setdefault(label, {
            "entry": label, "values": [], "complete": 0, "pruned": 0, "failed": 0, "running": 0,
            "epoch_seconds": [], "params": None, "source": t.user_attrs.get("weight_source", ""),
            "overlap": t.user_attrs.get("imagenet_overlap", ""),
        })
        key = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
               TrialState.RUNNING: "running"}.get(t.state)
        if key:
            r[key] += 1
        if t.state == TrialState.COMPLETE and t.value is not None:
            r["values"].append(t.value)
        r["epoch_seconds"] += t.user_attrs.get("epoch_seconds", [])
        r["params"] = r["params"] or t.user_attrs.get("params")
    out = []
    for r in rows.values():
        vals = r.pop("values")
        secs = r.pop("epoch_seconds")
        r["best"] = (max(vals) if maximize else min(vals)) if vals else None
        r["median"] = statistics.median(vals) if vals else None
        r["sec_per_epoch"] = statistics.fmean(secs) if secs else None
        out.append(r)
    sign = -1 if maximize else 1
    out.sort(key=lambda r: (r["best"] is None, sign * (r["best"] or 0)))
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def leaderboard_text(study: optuna.Study, recipe: Recipe) -> str:
    rows = leaderboard(study, recipe)
    m = recipe.study.metric
    head = (f"{'pool entry':<28} {'best ' + m:>14} {'median':>8} {'done':>5} {'pruned':>6} {'failed':>6} "
            f"{'s/epoch':>8} {'params':>11}  {'source':<14} overlap")
    lines = [f"study {study.study_name}: leaderboard (validation {m})", head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['entry']:<28} {_fmt(r['best'], '.4f'):>14} {_fmt(r['median'], '.4f'):>8} {r['complete']:>5} "
            f"{r['pruned']:>6} {r['failed']:>6} {_fmt(r['sec_per_epoch'], '.2f'):>8} {_fmt(r['params'], ','):>11}  "
            f"{r['source']:<14} {r['overlap']}"
        )
    return "\n".join(lines)
