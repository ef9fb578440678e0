"""The resume state: a running trial's full training state, saved at every epoch end, that a
retry (of a dead, preempted or interrupted trial) takes over and goes on from.

It lives in `trial-N.pt` under the study's resume directory (`study.checkpoint_dir`/NAME,
default `studies/NAME/resume`; a shared path for many machines), written atomically and
durably, and carries what identifies the run it belongs to (format, study, number, params,
seed, versions): a state of another run is not resumed. At most the epoch in progress is lost,
and on the CPU the resumed history is exactly the uninterrupted one's. The file is removed when
the trial ends.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import optuna

from search.files import replacing
from search.recipe import Recipe
from search.record import attrs
from search.storage import dir_of

STATE_FORMAT = 1  # of the per-epoch resume files


def resume_dir(study: optuna.Study, recipe: Recipe) -> Path:
    """Where a study's running trials keep their last epoch's state."""
    if recipe.study.checkpoint_dir:
        return Path(recipe.study.checkpoint_dir).expanduser() / study.study_name
    return dir_of(study) / "resume"


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (a crash leaves the previous file whole) and durably (a shared filesystem
    sees all of it once the name does)."""
    import torch

    with replacing(path, durable=True) as tmp:
        torch.save(state, tmp)


def take_state(directory: Path, trial: optuna.Trial, seed: int) -> tuple[dict[str, Any] | None, str]:
    """For a retry: the state its predecessor saved, moved to this trial's own file (so a retry
    that dies in turn leaves it to the next), or None and why it starts over."""
    import torch

    mine = directory / f"trial-{trial.number}.pt"
    source = directory / f"trial-{attrs(trial).get('retry_of')}.pt"
    path = mine if mine.exists() else source
    if not path.exists():
        return None, f"no saved state at {source}: trained from the first epoch"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: start over, and say so
        return None, f"saved state {path} unreadable ({type(e).__name__}: {e}): trained from the first epoch"
    meta = state.get("trial", {}) if isinstance(state, dict) else {}
    if (
        meta.get("format") != STATE_FORMAT
        or meta.get("seed") != seed
        or json.dumps(meta.get("params"), sort_keys=True) != json.dumps(trial.params, sort_keys=True)
    ):
        return (
            None,
            f"saved state {path} is of another run (params, seed or format differ): trained from the first epoch",
        )
    if path != mine:
        os.replace(path, mine)
    return state, ""
