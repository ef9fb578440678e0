"""Recipes: YAML -> a frozen, validated `Recipe`.

Every section forbids unknown keys. Validation errors become one `SearchError`
line naming the file, the key path, the bad value, the allowed values and a
close match. `--set a.b=c` overrides are parsed as YAML scalars (numbers,
bools, null, lists) and applied before validation, so they are checked too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from search.datasets import DataCfg, check_name
from search.errors import SearchError, did_you_mean, one_of
from search.hparams import TrainCfg
from search.pool import PoolEntryCfg, parse_pool
from search.section import Section
from search.space import SpaceCfg, check_overrides

Direction = Literal["minimize", "maximize"]
# The validation metrics a study can monitor (search.metrics computes them) and the direction each implies.
METRICS: dict[str, Direction] = {
    "accuracy": "maximize",
    "balanced_accuracy": "maximize",
    "f1": "maximize",
    "auc": "maximize",
    "loss": "minimize",
}
# What a study can optimize or constrain besides the validation metrics, and the direction of each
# (train_seconds is timed by the study; search.measure measures the others, before training).
MEASURES: dict[str, Direction] = {
    "params": "minimize",
    "flops": "minimize",
    "latency_ms": "minimize",
    "throughput": "maximize",
    "train_seconds": "minimize",
}

SAMPLERS = ("tpe", "nsga2", "random", "gp", "cmaes", "qmc")
MULTI_SAMPLERS = ("tpe", "nsga2", "gp", "random", "qmc")  # those Optuna runs with several objectives
CONSTRAINABLE = ("params", "flops", "latency_ms", "throughput")  # measured before training
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "none")


class SamplerCfg(Section):
    """Optuna sampler and its main options (unused options are ignored by samplers without them)."""

    name: Literal["tpe", "nsga2", "random", "gp", "cmaes", "qmc"] = "tpe"
    n_startup_trials: int = Field(10, ge=0)  # tpe, gp, cmaes: random trials before modelling
    # tpe, gp, cmaes: how the start-up trials pick their pool entry: the one that has had the least
    # compute (epochs x flops; an entry never tried first), or at random
    startup_pool: Literal["compute", "random"] = "compute"
    population_size: int = Field(20, ge=2)  # nsga2: trials per generation
    multivariate: bool = True  # tpe
    group: bool = True  # tpe: separate models for conditional sub-spaces
    constant_liar: bool = True  # tpe: spread parallel workers apart
    qmc_type: Literal["sobol", "halton"] = "sobol"  # qmc

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


class PrunerCfg(Section):
    """Optuna pruner; epochs are the pruning steps."""

    name: Literal["median", "percentile", "successive_halving", "hyperband", "none"] = "median"
    warmup_epochs: int = Field(1, ge=0)  # never prune before this many epochs were reported
    min_trials: int = Field(3, ge=0)  # never prune until this many trials finished
    percentile: float = Field(25.0, gt=0, lt=100)  # percentile pruner
    reduction_factor: int = Field(3, ge=2)  # successive halving, hyperband
    # median, percentile: compare a trial with the others at its epoch, or at the compute it has
    # spent (epochs x the model's flops: a costly entry meets what a cheap one reached with as much)
    compare: Literal["epoch", "compute"] = "epoch"

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _compare(self) -> PrunerCfg:
        if self.compare == "compute" and self.name not in ("median", "percentile"):
            raise ValueError(
                f"compare: compute works with the median and percentile pruners, not '{self.name}'; "
                "set compare: epoch or name: median"
            )
        return self


class StudyRankCfg(Section):
    """`study.rank`: rank the pool (the `rank` section) before the search and act on it."""

    keep: int | None = Field(None, ge=1)  # sample only the K best ranked entries (unrankable ones stay)
    order: bool = False  # enqueue one baseline trial per kept entry, best ranked first


class RankCfg(Section):
    """`python -m search rank` and `study.rank`: frozen-feature scores of the pool entries (search.rank)."""

    max_images: int = Field(2000, ge=10)  # stratified sample of train the features are taken on
    max_val_images: int = Field(2000, ge=10)  # stratified sample of val the probe and kNN are scored on
    by: Literal["logme", "probe", "knn"] = "logme"  # the score that orders the entries
    knn_k: int = Field(10, ge=1)  # neighbours of the cosine kNN vote
    batch_size: int | None = Field(None, ge=1)  # images per forward pass; None: as many as fit memory (search.infer)


class BoundCfg(Section):
    """A constraint on one measure: the trial is feasible when min <= value <= max."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _some(self) -> BoundCfg:
        if self.min is None and self.max is None:
            raise ValueError("a constraint needs max, min or both, e.g. {max: 5.0e6}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max}; swap them")
        return self


class ConfirmCfg(Section):
    """Train the top_k configurations again with seeds - 1 further seeds after the search."""

    top_k: int = Field(3, ge=1)
    seeds: int = Field(3, ge=2)  # seeds per configuration, the search's own run included


STUDY_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # names files under studies/: no '/', no leading '.'


class WarmStartCfg(Section):
    """`study.warm_start`: the best configurations of an earlier study, queued first (search.warmstart)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    source: str = Field(alias="from", min_length=1)  # NAME, NAME@STORAGE or a `best` recipe (.yaml)
    top_k: int = Field(5, ge=1)  # configurations taken, best first (one from a best.yaml)


class BudgetCfg(Section):
    """`study.budget`: what all workers together may spend, counted from what every trial recorded."""

    epochs: int | None = Field(None, ge=1)  # epochs trained, summed over trials
    hours: float | None = Field(None, gt=0)  # trial wall time, summed over trials
    device_hours: float | None = Field(None, gt=0)  # wall time of the trials that ran on a GPU (or MPS)

    @model_validator(mode="after")
    def _some(self) -> BudgetCfg:
        if self.epochs is None and self.hours is None and self.device_hours is None:
            raise ValueError("a budget needs epochs, hours or device_hours, e.g. {epochs: 200}")
        return self


class StopCfg(Section):
    """`study.stop`: end the search before n_trials when more trials will not help (search.stopping)."""

    patience: int | None = Field(None, ge=1)  # finished trials in a row without improving on the best
    min_delta: float = Field(0.0, ge=0)  # an improvement is a gain of more than this
    terminator: bool = False  # Optuna's Terminator: regret bound below the error of a result
    min_trials: int = Field(10, ge=2)  # complete trials before the Terminator judges

    @model_validator(mode="after")
    def _some(self) -> StopCfg:
        if self.patience is None and not self.terminator:
            raise ValueError("a stop rule needs patience: N, terminator: true or both")
        return self


class StudyCfg(Section):
    name: str = Field(pattern=STUDY_NAME)
    storage: str | None = None  # default: sqlite:///studies/<name>.db
    n_trials: int = Field(20, ge=1)  # the study's total, across all workers and runs
    timeout: float | None = Field(None, gt=0)  # seconds, study-wide, from the start of the latest `run`
    heartbeat: int = Field(20, ge=1)  # seconds between a running trial's signs of life; stale after 10 silent
    resume: bool = True  # save each running trial's state at every epoch end; a retry goes on from there
    checkpoint_dir: str | None = None  # where those states live (default studies/NAME/resume); shared for many machines
    storage_patience: float = Field(300.0, gt=0)  # seconds a worker waits out a storage outage, then exits
    sampler: SamplerCfg = SamplerCfg()
    pruner: PrunerCfg = PrunerCfg()
    seed: int = 0  # data carve-outs; trial seeds (training, sampler) derive from it and the number
    trial_seed: int | None = Field(None, ge=0)  # pins every trial's training seed (a `best` recipe's)
    metric: Literal["accuracy", "balanced_accuracy", "f1", "auc", "loss"] = "accuracy"
    direction: Literal["maximize", "minimize"] | None = None  # follows from metric
    # Several objectives: the first is a validation metric (the primary one: study.metric follows it),
    # the others validation metrics or measures (params, flops, latency_ms, throughput, train_seconds).
    objectives: list[str] | None = Field(None, min_length=1)
    constraints: dict[str, BoundCfg] = {}  # measure -> {max, min}; infeasible trials are never best
    confirm: ConfirmCfg | None = None  # re-train the top configurations over seeds after the search
    baselines: bool = False  # enqueue one default-hyperparameter trial per pool entry first
    rank: StudyRankCfg | None = None  # rank the pool before the search (see the rank section)
    top_k: int = Field(3, ge=0)  # checkpoints kept as artifacts
    # study a `best` recipe was exported from; `retrain` records test metrics there (a name: it names files)
    origin: str | None = Field(None, pattern=STUDY_NAME)
    warm_start: WarmStartCfg | None = None  # queue an earlier study's best configurations first
    budget: BudgetCfg | None = None  # stop taking trials when spent (epochs, hours, device-hours)
    stop: StopCfg | None = None  # stop taking trials when more will not help (patience, terminator)

    @model_validator(mode="after")
    def _direction(self) -> StudyCfg:
        if self.objectives:
            self._objectives()
        implied = METRICS[self.metric]
        if self.direction is not None and self.direction != implied:
            raise ValueError(
                f"direction '{self.direction}' contradicts metric '{self.metric}', which is to "
                f"{implied}; remove study.direction"
            )
        if self.direction is None:
            object.__setattr__(self, "direction", implied)
        for name in self.constraints:
            if name not in CONSTRAINABLE:
                raise ValueError(
                    f"constraints: '{name}' cannot be constrained{did_you_mean(name, CONSTRAINABLE)}; "
                    f"constraints apply to what is measured before training: {one_of(CONSTRAINABLE)}"
                )
        return self

    def _objectives(self) -> None:
        names = self.objectives or []
        allowed = [*METRICS, *MEASURES]
        for name in names:
            if name not in allowed:
                raise ValueError(
                    f"objectives: unknown objective '{name}'{did_you_mean(name, allowed)}; allowed: {one_of(allowed)}"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: {names} names one objective twice; list each once")
        if names[0] not in METRICS:
            raise ValueError(
                f"objectives: the first objective is the primary validation metric, got "
                f"'{names[0]}'; put one of {one_of(METRICS)} first"
            )
        if "metric" in self.model_fields_set and self.metric != names[0]:
            raise ValueError(
                f"metric '{self.metric}' contradicts objectives, whose first (primary) is "
                f"'{names[0]}'; remove study.metric"
            )
        object.__setattr__(self, "metric", names[0])
        if len(names) > 1:
            if self.sampler.name not in MULTI_SAMPLERS:
                raise ValueError(
                    f"sampler '{self.sampler.name}' optimizes one objective only, and objectives "
                    f"lists {len(names)}; use one of {one_of(MULTI_SAMPLERS)}"
                )
            if self.stop is not None and self.stop.terminator:
                raise ValueError(
                    f"stop.terminator judges one objective, and objectives lists {len(names)}; "
                    "remove study.stop.terminator (patience follows the first objective)"
                )
            if self.pruner.name != "none":
                raise ValueError(
                    f"pruner '{self.pruner.name}' cannot run with {len(names)} objectives "
                    "(Optuna cannot prune multi-objective trials); set study.pruner: none"
                )

    @property
    def names(self) -> list[str]:
        """The objectives, or the one metric."""
        return list(self.objectives or [self.metric])

    @property
    def directions(self) -> list[Literal["minimize", "maximize"]]:
        """Each objective's natural direction."""
        return [METRICS.get(n) or MEASURES[n] for n in self.names]


PoolSpec = Annotated[str | PoolEntryCfg, Field(union_mode="left_to_right")]


# Local worker processes at most: each is a process with its own model and CPU threads, so far
# more than a machine's cores or GPUs is a typo; the CLI's --workers can share the bound.
MAX_WORKERS = 256


# How `fit` lays out and computes on the CPU (search.cpu_format): float32 NCHW, float32 channels_last,
# bf16 autocast around the forward, or both; `hardware.cpu_format: auto` probes which is fastest.
CPU_FORMATS = ("nchw", "channels_last", "bf16", "channels_last_bf16")


class HardwareCfg(Section):
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$")
    amp: bool = True  # bf16 autocast on CUDA; on the CPU, lets cpu_format auto try bf16
    # on the CPU: auto (a probe per model, input size and batch; cached) or one of CPU_FORMATS
    cpu_format: Literal["auto", "nchw", "channels_last", "bf16", "channels_last_bf16"] = "auto"
    compile: bool = False  # torch.compile, once per architecture and input shape
    workers: int = Field(1, ge=1, le=MAX_WORKERS)  # local worker processes for `run`
    gpu_memory_share: float = Field(0.5, gt=0, le=1)  # keep data on GPU if it fits this share
    # Several trials per GPU (search/pack.py): null = off (workers as --workers places them);
    # auto = while measured free memory holds the next trial's probe + margin; N = N at most.
    trials_per_gpu: int | str | None = None
    memory_margin: float = Field(0.05, ge=0, lt=1)  # auto: share of a GPU's memory kept free (>= 1 GiB)

    @field_validator("trials_per_gpu", mode="before")
    @classmethod
    def _trials_per_gpu(cls, v: Any) -> Any:
        if v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(
            "expected auto (pack by measured memory), a whole number >= 1 (trials at most per GPU) or null (off)"
        )


class TrackingCfg(Section):
    """`tracking`: follow the study in MLflow and/or TensorBoard (off by default; search.tracking)."""

    mlflow: str | bool = False  # a tracking URI, or true: a SQLite file next to the study
    tensorboard: str | None = None  # a directory: one event directory per trial, and the hparams summary
    experiment: str | None = None  # the MLflow experiment (default: the study name)


class Recipe(Section):
    study: StudyCfg
    data: DataCfg = DataCfg()
    pool: list[PoolSpec] = Field(min_length=1)
    space: SpaceCfg = SpaceCfg()
    train: TrainCfg = TrainCfg()
    hardware: HardwareCfg = HardwareCfg()
    rank: RankCfg = RankCfg()
    tracking: TrackingCfg = TrackingCfg()

    @model_validator(mode="after")
    def _pool_and_space(self) -> Recipe:
        check_name(self.data.dataset)  # a misspelt dataset fails here, not at the first trial
        parse_pool(self.pool)
        check_overrides(self.space, self.train, self.data)
        return self

    def normalized(self) -> dict[str, Any]:
        """JSON-ready dict with every default filled in: what the study stores."""
        return json.loads(self.model_dump_json())


# ---------------------------------------------------------------------------
# loading, overrides, error formatting


class _Loader(yaml.SafeLoader):
    """YAML with 1.2 floats: `1e-3` is a number, not a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\.inf|\.nan)$", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a','b','c'], typed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SearchError(f"--set '{text}': expected KEY.PATH=VALUE, e.g. --set train.epochs=5")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise SearchError(f"--set '{text}': value is not valid YAML ({getattr(e, 'problem', e)})") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SearchError(f"--set '{text}': '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"recipe file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SearchError(
            f"{path}: not a text recipe (byte {e.start} is not UTF-8); a recipe is a YAML file "
            "saved as UTF-8, e.g. recipes/digits.yaml"
        ) from None
    except OSError as e:
        raise SearchError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    if "\x00" in text:
        raise SearchError(
            f"{path}: not a text recipe (it holds NUL bytes, like a binary file); a recipe is a "
            "YAML file saved as UTF-8, e.g. recipes/digits.yaml"
        )
    try:
        raw = parse_yaml(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SearchError(f"{path}:{where} not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise SearchError(f"{path}: expected a mapping of sections (study, data, pool, ...)")
    return recipe_from_dict(apply_overrides(raw, overrides), source=str(path))


def recipe_from_dict(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise SearchError(f"{source}: {format_error(e, raw)}") from None
    except SearchError as e:
        raise SearchError(f"{source}: {e}") from None


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of loc (for listing allowed keys)."""
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def format_error(err: ValidationError, raw: dict[str, Any]) -> str:
    """The first (most useful) pydantic error as one line."""
    errors = err.errors()
    # Union members produce one error each; prefer the one from the mapping form.
    e = next((x for x in errors if x["type"] == "extra_forbidden"), None) or next(
        (x for x in errors if x["type"] != "string_type"), errors[0]
    )  # a mapping's own error, not "not a string"
    loc = tuple(
        p
        for p in e["loc"]
        if p not in ("str", "PoolEntryCfg", "ParamCfg") and not str(p).startswith(("list[", "function-"))
    )
    where = _loc(loc) or "recipe"
    bad = e.get("input")
    kind = e["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc)
        allowed = sorted(model.model_fields) if model else []
        hint = did_you_mean(loc[-1], allowed)
        where = _loc(loc[:-1]) or "recipe"
        return f"{where}: unknown key '{loc[-1]}'{hint}; allowed keys: {one_of(allowed)}"
    if kind == "missing":
        return f"{where}: required key is missing; add it to the recipe"
    if kind == "literal_error":
        expected = e["ctx"]["expected"].replace("'", "").replace(" or ", ", ").split(", ")
        return f"{where}: '{bad}' is not allowed{did_you_mean(bad, expected)}; allowed: {one_of(expected)}"
    msg = e["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if isinstance(bad, dict):  # a section's own check: its message names the key and value
        return f"{where}: {msg}"
    return f"{where}: {msg} (got {json.dumps(bad, default=str)})"
