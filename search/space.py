"""The search space: presets + recipe overrides -> `trial.suggest_*` calls.

The pool is one categorical (`model`) over entry labels. Every other parameter
names a `train` field; a parameter is sampled only when it takes effect
(momentum only for SGD, the backbone multiplier only for pretrained entries
that fine-tune their backbone, label smoothing only with cross-entropy, the
stem's channel reduction only for 1-channel data, ...). Overrides in
`space.overrides` replace a preset's range (`{low, high, log}`), give choices
(a list), fix a value (a scalar) or remove the parameter (`null`: the `train`
default is used).

What cannot take effect is not sampled where a preset would sample it (a step
size or linear-probe length is kept below `train.epochs`) and refused, with
the key and a fix, where the recipe asks for it (`check_overrides`).

About 430 lines: the parameter table, its presets and the override rules are one contract.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import optuna
from pydantic import ValidationError, field_validator, model_validator

from search.datasets import DataCfg, channels
from search.errors import SearchError, did_you_mean, one_of
from search.hparams import TrainCfg
from search.pool import PoolEntry
from search.section import Section
from search.trials import POOL_PARAM


class ParamCfg(Section):
    """One override: a range, a list of choices, or (outside this class) a fixed value / null."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> ParamCfg:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices is empty; list at least one value")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high")
        if self.low > self.high:
            raise ValueError(f"low {self.low} > high {self.high}; swap them")
        if self.log and self.low <= 0:
            raise ValueError(f"log range needs low > 0, got {self.low}; raise low or set log: false")
        return self


# Smart union: a YAML int stays an int and a bool a bool (left-to-right would turn 32 into 32.0).
Override = ParamCfg | list[Any] | bool | int | float | str | None


class SpaceCfg(Section):
    preset: Literal["quick", "full", "none"] = "quick"
    overrides: dict[str, Override] = {}

    @field_validator("overrides", mode="before")
    @classmethod
    def _lists_are_choices(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: ({"choices": x} if isinstance(x, list) else x) for k, x in v.items()}
        return v


# (train values so far, the pool entry, the data's image channels or None where unknown) -> sampled?
Cond = Callable[[dict[str, Any], PoolEntry, int | None], bool]


@dataclass(frozen=True)
class Param:
    kind: Literal["float", "int", "cat"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    when: Cond | None = None  # sampled only when this holds
    range_kind: Literal["float", "int"] | None = None  # of a choice parameter: the kind a range override gives it

    @property
    def bounds(self) -> tuple[float, float]:
        """(low, high) of a range parameter (kind 'float' or 'int')."""
        assert self.low is not None and self.high is not None, f"a '{self.kind}' parameter has no range"
        return self.low, self.high

    def describe(self) -> str:
        if self.kind == "cat":
            return "{" + ", ".join(map(str, self.choices or ())) + "}"
        scale = " log" if self.log else ""
        step = f" step {self.step:g}" if self.step else ""
        return f"{self.kind} [{self.low:g}, {self.high:g}]{scale}{step}"


# Conditions see every `train` value: the recipe's, replaced by those fixed or sampled so far.
def _sgd(p: dict[str, Any], e: PoolEntry, chans: int | None = None) -> bool:
    return p["optimizer"] == "sgd"


def _pretrained(p: dict[str, Any], e: PoolEntry, chans: int | None = None) -> bool:
    return e.pretrained


def _reduces_stem(p: dict[str, Any], e: PoolEntry, chans: int | None = None) -> bool:
    return e.pretrained and chans != 3  # RGB data loads the RGB stem as it is


def _tunes_backbone(p: dict[str, Any], e: PoolEntry, chans: int | None = None) -> bool:
    return e.pretrained and p["finetune"] != "linear_probe"


def _lp_ft(p: dict[str, Any], e: PoolEntry, chans: int | None = None) -> bool:
    return e.pretrained and p["finetune"] == "lp_ft"


def _mixing(p: dict[str, Any], e: PoolEntry, chans: int | None = None) -> bool:
    return p["mixup_alpha"] > 0 or p["cutmix_alpha"] > 0


def _step(p: dict[str, Any], e: PoolEntry, chans: int | None = None) -> bool:
    return p["schedule"] == "step"


def _focal(p: dict[str, Any], e: PoolEntry, chans: int | None = None) -> bool:
    return p["loss"] == "focal"


def _ce(p: dict[str, Any], e: PoolEntry, chans: int | None = None) -> bool:
    return p["loss"] == "ce"  # the focal loss takes no label smoothing


# Every tunable parameter, in sampling order (conditions look at earlier ones).
PARAMS: dict[str, Param] = {
    "optimizer": Param("cat", choices=("sgd", "adamw")),
    "lr": Param("float", 1e-4, 1e-1, log=True),
    "weight_decay": Param("float", 1e-6, 1e-2, log=True),
    "momentum": Param("float", 0.8, 0.99, when=_sgd),
    "nesterov": Param("cat", choices=(True, False), when=_sgd),
    "batch_size": Param("cat", choices=(64, 128, 256)),
    "schedule": Param("cat", choices=("cosine", "step", "plateau", "constant")),
    "step_size": Param("int", 2, 20, when=_step),
    "warmup_epochs": Param("float", 0.0, 3.0),
    "dropout": Param("float", 0.0, 0.5),
    "loss": Param("cat", choices=("ce", "focal")),
    "focal_gamma": Param("float", 0.5, 3.0, when=_focal),
    "label_smoothing": Param("float", 0.0, 0.2, when=_ce),
    # Off (0) is a choice of its own: a range from 0 would leave some mixing on in nearly every trial.
    "mixup_alpha": Param("cat", choices=(0.0, 0.1, 0.2, 0.4), range_kind="float"),
    "cutmix_alpha": Param("cat", choices=(0.0, 0.25, 0.5, 1.0), range_kind="float"),
    "mix_prob": Param("float", 0.3, 1.0, when=_mixing),
    "aug_scale": Param("float", 0.5, 1.5),
    "grad_clip": Param("float", 0.5, 10.0, log=True),
    "finetune": Param("cat", choices=("full", "linear_probe", "lp_ft"), when=_pretrained),
    "lp_epochs": Param("int", 1, 5, when=_lp_ft),
    "backbone_lr_mult": Param("float", 0.01, 1.0, log=True, when=_tunes_backbone),
    "channel_reduce": Param("cat", choices=("mean", "sum"), when=_reduces_stem),  # pretrained stems, gray data
}

PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),  # nothing sampled but what space.overrides ranges (a `best` recipe: all in train)
    "quick": ("optimizer", "lr", "weight_decay", "momentum", "batch_size", "dropout", "backbone_lr_mult"),
    "full": (
        "optimizer",
        "lr",
        "weight_decay",
        "momentum",
        "nesterov",
        "batch_size",
        "schedule",
        "step_size",
        "warmup_epochs",
        "dropout",
        "label_smoothing",
        "mixup_alpha",
        "cutmix_alpha",
        "mix_prob",
        "aug_scale",
        "finetune",
        "lp_epochs",
        "backbone_lr_mult",
    ),
}


def _from_override(name: str, base: Param, o: ParamCfg) -> Param:
    if o.choices is not None:
        return Param("cat", choices=tuple(o.choices), when=base.when)
    assert o.low is not None and o.high is not None  # ParamCfg._shape: a range has both ends
    whole = float(o.low).is_integer() and float(o.high).is_integer()
    kind = base.kind if base.kind != "cat" else (base.range_kind or ("int" if whole else "float"))
    if kind == "int" and not (float(o.low).is_integer() and float(o.high).is_integer()):
        raise SearchError(f"space.overrides.{name}: an integer range needs whole numbers, got {o.low}..{o.high}")
    cast = int if kind == "int" else float
    return Param(kind, cast(o.low), cast(o.high), o.log, o.step, when=base.when)


def resolve(space: SpaceCfg, train: TrainCfg) -> tuple[dict[str, Param], dict[str, Any]]:
    """(sampled params in order, fixed values) after applying the overrides to the preset."""
    names = list(PRESETS[space.preset])
    sampled: dict[str, Param] = {n: PARAMS[n] for n in names}
    fixed: dict[str, Any] = {}
    for name, o in space.overrides.items():
        if name not in PARAMS:
            raise SearchError(
                f"space.overrides: unknown parameter '{name}'{did_you_mean(name, PARAMS)}; tunable: {one_of(PARAMS)}"
            )
        sampled.pop(name, None)
        if isinstance(o, ParamCfg):
            sampled[name] = _from_override(name, PARAMS[name], o)
        elif o is not None:
            fixed[name] = o
    for name, (partner, choice, why) in EPOCH_BOUNDED.items():
        _within_epochs(space, train, sampled, fixed, name, partner, choice, why)
    order = list(PARAMS)
    return dict(sorted(sampled.items(), key=lambda kv: order.index(kv[0]))), fixed


# Epoch counts that act only below train.epochs: (the choice of another param they belong to, what would
# happen at train.epochs or more).
EPOCH_BOUNDED = {
    "lp_epochs": ("finetune", "lp_ft", "the backbone would never be unfrozen"),
    "step_size": ("schedule", "step", "the learning rate would never decay"),
}


def _where(space: SpaceCfg, name: str) -> str:
    """The key a fixed value comes from: a fixed override, else the train section."""
    return f"space.overrides.{name}" if space.overrides.get(name) is not None else f"train.{name}"


def _within_epochs(
    space: SpaceCfg,
    train: TrainCfg,
    sampled: dict[str, Param],
    fixed: dict[str, Any],
    name: str,
    partner: str,
    choice: str,
    why: str,
) -> None:
    """Keep `name` below train.epochs: a preset's range is cut there (or dropped), a recipe's value
    at or above it is refused; where `name` cannot be below it, `partner: choice` has no effect and
    is dropped from a preset's choices or refused."""
    epochs = train.epochs
    user = space.overrides.get(name) is not None
    p = sampled.get(name)
    if p is not None:
        over = [v for v in (p.choices or (p.high,)) if isinstance(v, int | float) and v >= epochs]
        if over and user:
            raise SearchError(
                f"space.overrides.{name}: {over[0]:g} >= train.epochs {epochs}: {why}; keep {name} below {epochs}"
            )
        if over and p.choices:
            sampled[name] = replace(p, choices=tuple(v for v in p.choices if v not in over))
        elif over:
            sampled[name] = replace(p, high=epochs - 1)
        p = sampled[name]
        if not (p.choices if p.kind == "cat" else p.bounds[0] <= p.bounds[1]):
            del sampled[name]  # no value of the preset's range acts: the train value decides below
    if name in sampled:
        return
    value = fixed.get(name, getattr(train, name))
    if not isinstance(value, int | float) or value < epochs:  # not a number: _check_value refuses it
        return
    q = sampled.get(partner)
    if q is not None and choice in (q.choices or ()):
        if space.overrides.get(partner) is not None:
            raise SearchError(
                f"space.overrides.{partner}: '{choice}' has no effect with {_where(space, name)} "
                f"{value} >= train.epochs {epochs} ({why}); lower {name} or drop '{choice}'"
            )
        sampled[partner] = replace(q, choices=tuple(c for c in q.choices or () if c != choice))
    elif q is None and fixed.get(partner, getattr(train, partner)) == choice:
        raise SearchError(
            f"{_where(space, partner)}: '{choice}' has no effect with {_where(space, name)} "
            f"{value} >= train.epochs {epochs} ({why}); set {name} below {epochs}"
        )


def _check_value(train: TrainCfg, name: str, value: Any) -> None:
    try:
        TrainCfg.model_validate({**train.model_dump(), name: value})
    except ValidationError as e:
        msg = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise SearchError(f"space.overrides.{name}: {value!r} is not a valid value: {msg}") from None


def check_overrides(space: SpaceCfg, train: TrainCfg, data: DataCfg) -> None:
    """Every override names a tunable parameter and only admits values `train` accepts; a value
    the recipe fixes that cannot take effect is refused (see also `_within_epochs`)."""
    sampled, fixed = resolve(space, train)
    for name, value in fixed.items():
        _check_value(train, name, value)
    for name, p in sampled.items():
        for value in p.choices or (p.low, p.high):
            _check_value(train, name, value)
    base = {**train.model_dump(), **fixed}
    # With these values fixed the param is never sampled either (its condition cannot hold).
    if base["label_smoothing"] > 0 and "loss" not in sampled and base["loss"] == "focal":
        raise SearchError(
            f"{_where(space, 'label_smoothing')}: {base['label_smoothing']:g} has no effect with "
            f"{_where(space, 'loss')}: focal (the focal loss takes no label smoothing); "
            "remove it or use loss: ce"
        )
    if base["channel_reduce"] != TrainCfg().channel_reduce and channels(data) == 3:
        raise SearchError(
            f"{_where(space, 'channel_reduce')}: '{base['channel_reduce']}' has no effect on "
            f"{data.dataset}, whose images have 3 channels (only 1-channel data reduces a "
            "pretrained RGB stem); remove it"
        )


def suggest(
    trial: optuna.Trial, space: SpaceCfg, train: TrainCfg, entries: list[PoolEntry], chans: int | None
) -> tuple[PoolEntry, TrainCfg]:
    """Sample the pool entry and the hyperparameters that take effect for it (`chans`: the
    data's image channels)."""
    by_label = {e.label: e for e in entries}
    label = trial.suggest_categorical(POOL_PARAM, list(by_label))
    entry = by_label[label]
    sampled, fixed = resolve(space, train)
    values: dict[str, Any] = {**train.model_dump(), **fixed}
    for name, p in sampled.items():
        if p.when is not None and not p.when(values, entry, chans):
            continue
        if p.kind == "cat":
            values[name] = trial.suggest_categorical(name, list(p.choices or ()))
            continue
        low, high = p.bounds
        if p.kind == "int":
            values[name] = trial.suggest_int(name, int(low), int(high), log=p.log, step=int(p.step or 1))
        else:
            values[name] = trial.suggest_float(name, low, high, log=p.log, step=p.step)
    return entry, TrainCfg.model_validate({**train.model_dump(), **values})


def baseline_params(space: SpaceCfg, train: TrainCfg, entry: PoolEntry, chans: int | None) -> dict[str, Any]:
    """The `train` defaults for one entry, as values of the sampled parameters (for enqueueing);
    `chans` as `suggest` sees them, so the queued trial asks the same."""
    sampled, fixed = resolve(space, train)
    seen: dict[str, Any] = {**train.model_dump(), **fixed}
    values: dict[str, Any] = {POOL_PARAM: entry.label}
    for name, p in sampled.items():
        if p.when is not None and not p.when(seen, entry, chans):
            continue
        v = seen[name]
        if p.kind == "cat":
            v = v if v in (p.choices or ()) else (p.choices or (v,))[0]
        else:
            low, high = p.bounds
            if v is None or not low <= v <= high:
                v = (low * high) ** 0.5 if p.log else (low + high) / 2
                v = int(round(v)) if p.kind == "int" else v
        values[name] = seen[name] = v
    return values


def _options(p: Param) -> tuple[Any, ...]:
    """Values that stand for a parameter's range when asking whether a condition can hold
    (conditions compare with a choice or a threshold, so the ends of a range suffice)."""
    return (p.choices or ()) if p.kind == "cat" else p.bounds


def reachable(space: SpaceCfg, train: TrainCfg, entries: list[PoolEntry], chans: int | None) -> dict[str, Param]:
    """The sampled params whose condition holds for some pool entry and some earlier values.

    A condition reads the params before it; each is tried with its choices (or range ends)
    when it is itself reachable, else with its fixed or `train` value. `chans` None (an image
    folder not decoded yet) lets the channel condition hold either way.
    """
    sampled, fixed = resolve(space, train)
    base = {**train.model_dump(), **fixed}
    out: dict[str, Param] = {}
    for e in entries:
        options: dict[str, tuple[Any, ...]] = {}  # earlier params reachable for this entry
        for name, p in sampled.items():
            if p.when is None or any(p.when({**base, **combo}, e, chans) for combo in _combos(options)):
                options[name] = _options(p)
                out.setdefault(name, p)
    return {n: out[n] for n in sampled if n in out}


def _combos(options: dict[str, tuple[Any, ...]]) -> Iterator[dict[str, Any]]:
    """Every assignment of the options of the conditioning params (few: choices and range ends)."""
    keys = [k for k in options if k in CONDITIONING]
    for values in itertools.product(*(options[k] for k in keys)):
        yield dict(zip(keys, values, strict=True))


# The params conditions read (keep in step with the condition functions above).
CONDITIONING = ("optimizer", "finetune", "mixup_alpha", "cutmix_alpha", "schedule", "loss")
CONDITION_TEXT: dict[Cond | None, str] = {
    _sgd: "if optimizer=sgd",
    _pretrained: "if pretrained",
    _tunes_backbone: "if pretrained, not linear_probe",
    _lp_ft: "if finetune=lp_ft",
    _mixing: "if mixup/cutmix",
    _step: "if schedule=step",
    _focal: "if loss=focal",
    _ce: "if loss=ce",
    _reduces_stem: "if pretrained and 1-channel data",
}


def describe(space: SpaceCfg, train: TrainCfg, entries: list[PoolEntry], chans: int | None) -> str:
    """The resolved space, one line per parameter, for `validate`.

    Conditional params whose condition can never hold (given the fixed values and the pool)
    are listed apart as never sampled.
    """
    sampled, fixed = resolve(space, train)
    live = reachable(space, train, entries, chans)
    lines = [f"  {POOL_PARAM:<18} {{{', '.join(e.label for e in entries)}}}"]
    for name, p in live.items():
        when = f"  ({CONDITION_TEXT.get(p.when, 'conditional')})" if p.when else ""
        lines.append(f"  {name:<18} {p.describe()}{when}")
    for name, v in fixed.items():
        lines.append(f"  {name:<18} = {v!r} (fixed)")
    never = [f"{n} ({CONDITION_TEXT.get(p.when, 'conditional')})" for n, p in sampled.items() if n not in live]
    if never:
        lines.append(f"  never sampled (condition cannot hold): {', '.join(never)}")
    return "\n".join(lines)
