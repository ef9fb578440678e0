"""Warm start: an earlier study's best configurations, queued first in a new study.

`study.warm_start: {from: SOURCE, top_k: K}`. SOURCE is a study name (in this study's storage,
or in its own default SQLite file), NAME@STORAGE, or a `best` recipe (a .yaml file). The top K
complete, feasible trials of the source, in the one ranking of the package (search.trials), are
queued as trials of this study before anything is sampled, each recording `warm_start_of`.

The current space decides what is kept: a configuration whose pool entry is no longer in the
pool is skipped; a value out of its range now is clipped to the range; a choice no longer
offered, or a parameter no longer sampled, is dropped (the trial samples it). All of it is said
in one line. However many workers start together, the queue is filled once (search.once).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna

from search.once import once
from search.pool import PoolEntry, parse_pool
from search.recipe import Recipe, WarmStartCfg, load_recipe
from search.record import new_attrs
from search.space import Param, reachable
from search.storage import default_storage, mask, open_storage, require_study
from search.text import WIDTH, wrap
from search.trials import POOL_PARAM, ranked

KEY = "warm_start"  # the study attribute: what was queued, from where, and what did not fit


def source_configurations(cfg: WarmStartCfg, recipe: Recipe) -> list[tuple[str, dict[str, Any]]]:
    """(where it comes from, its params) of each configuration to queue, best first."""
    text = cfg.source
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return [_from_best_yaml(Path(text), recipe)]
    name, _, url = text.partition("@")
    study = _source_study(name, url or recipe.study.storage or default_storage(name))
    return [(f"{name}#{t.number}", dict(t.params)) for t in ranked(study)[: cfg.top_k]]


def _source_study(name: str, url: str) -> optuna.Study:
    require_study(
        name,
        url,
        where="study.warm_start.from: ",
        no_file=f" for study '{name}'; give NAME@STORAGE-URL, or a best.yaml",
        no_study="give NAME@STORAGE-URL for another storage",
    )
    return optuna.load_study(study_name=name, storage=open_storage(url, heartbeat=None))


def _from_best_yaml(path: Path, recipe: Recipe) -> tuple[str, dict[str, Any]]:
    best = load_recipe(path)
    entry = parse_pool(best.pool)[0]
    values = {**best.train.model_dump(), POOL_PARAM: entry.label}
    return f"{best.study.origin or path.name}:best", values


def fit(params: dict[str, Any], space: dict[str, Param], labels: list[str]) -> tuple[dict[str, Any] | None, list[str]]:
    """The params that fit the current space (None: its pool entry is gone), and what changed.

    Out-of-range values are clipped (onto the step grid and to whole numbers where the range has
    them), values no longer among the choices and parameters no longer sampled are dropped."""
    label = params.get(POOL_PARAM)
    if label not in labels:
        return None, [f"entry {label} not in the pool: skipped"]
    out: dict[str, Any] = {POOL_PARAM: label}
    notes: list[str] = []
    for name, v in params.items():
        if name == POOL_PARAM:
            continue
        p = space.get(name)
        if p is None:
            continue  # not sampled here (fixed, or not in this space): the recipe's value acts
        if p.kind == "cat":
            if v in (p.choices or ()):
                out[name] = v
            else:
                notes.append(f"{name} {v} dropped")
            continue
        if isinstance(v, bool) or not isinstance(v, int | float):
            notes.append(f"{name} {v} dropped")
            continue
        clipped = _clip(float(v), p)
        if not math.isclose(clipped, float(v), rel_tol=1e-12, abs_tol=0.0):
            notes.append(f"{name} {v:g}->{clipped:g}")
        out[name] = int(clipped) if p.kind == "int" else clipped
    return out, notes


def _clip(v: float, p: Param) -> float:
    low, high = p.bounds
    v = min(max(v, low), high)
    if p.step:
        v = min(high, low + round((v - low) / p.step) * p.step)
    return float(round(v)) if p.kind == "int" else v


def queue(study: optuna.Study, recipe: Recipe, entries: list[PoolEntry], chans: int | None) -> str | None:
    """Once per study: queue the source's configurations that fit; the line that says what happened
    (None without a warm start, or where another worker or run already queued them)."""
    cfg = recipe.study.warm_start
    if cfg is None:
        return None
    stored, mine = once(study, KEY, lambda: _queue(study, recipe, cfg, entries, chans))
    return stored["line"] if mine else None


def _queue(
    study: optuna.Study, recipe: Recipe, cfg: WarmStartCfg, entries: list[PoolEntry], chans: int | None
) -> dict[str, Any]:
    space = reachable(recipe.space, recipe.train, entries, chans)
    labels = [e.label for e in entries]
    queued: list[str] = []
    changes: list[str] = []
    for ref, params in source_configurations(cfg, recipe):
        fitted, notes = fit(params, space, labels)
        changes += [f"{ref} {n}" for n in notes]
        if fitted is not None:
            study.enqueue_trial(fitted, user_attrs=new_attrs(warm_start_of=ref), skip_if_exists=True)
            queued.append(ref)
    name, at, url = cfg.source.partition("@")
    line = f"warm start from {name}{at}{mask(url)}: {len(queued)} configuration(s) queued first "
    line += f"({', '.join(queued) or 'none'})" + (f"; out of the space now: {', '.join(changes)}" if changes else "")
    line = "\n".join(wrap(line, WIDTH, indent="  "))
    return {"from": cfg.source, "queued": queued, "changes": changes, "line": line}
