"""The CPU format of a trial: the probe's choice (injected timer and flags), its caches, the
`hardware.cpu_format` knob, the record on the trial that a retry reuses, and `fit` in each format."""

from __future__ import annotations

import json
import math

import optuna
import pytest
import torch
from optuna.trial import TrialState

from search import cpu_format, objective, train, workers
from search.data import Data, load_data
from search.errors import SearchError
from search.models import build_model
from search.recipe import CPU_FORMATS, DataCfg, TrainCfg, recipe_from_dict
from search.record import attrs
from tests.conftest import timeless, tiny_recipe

BF16 = frozenset({"avx512f", "avx512_bf16"})
NO_BF16 = frozenset({"avx2", "avx512f"})
COST = {"nchw": 5.0, "channels_last": 2.0, "bf16": 3.0, "channels_last_bf16": 4.0}  # seconds per step


class FakeClock:
    """A timer that advances only when a step runs, by that format's cost; counts the steps."""

    def __init__(self, cost: dict[str, float]) -> None:
        self.cost, self.now, self.steps = cost, 0.0, {f: 0 for f in cost}

    def step(self, fmt: str) -> None:
        self.now += self.cost[fmt]
        self.steps[fmt] += 1

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def fresh_decisions(monkeypatch, tmp_path):
    """Each test starts with no decision in memory and its own disk cache."""
    monkeypatch.setattr(cpu_format, "_decided", {})
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture(scope="module")
def digits() -> Data:
    return load_data(DataCfg(dataset="digits", max_samples=200), seed=0)


def mini(data: Data):
    return build_model("mini_cnn", num_classes=data.num_classes, in_chans=data.in_chans, resolution=8)


def test_pick_takes_the_fastest_candidate_after_a_warm_up():
    clock = FakeClock(COST)
    assert cpu_format.pick(clock.step, list(CPU_FORMATS), clock) == "channels_last"
    per_format = cpu_format.PROBE_WARMUP + cpu_format.PROBE_STEPS
    assert clock.steps == dict.fromkeys(CPU_FORMATS, per_format)
    clock = FakeClock({**COST, "channels_last": 5.0})  # a tie with nchw: the earlier format
    assert cpu_format.pick(clock.step, ["nchw", "channels_last"], clock) == "nchw"


@pytest.mark.parametrize(("bf16_cost", "want"), [(1.9, "channels_last"), (1.5, "bf16")])
def test_bf16_is_picked_only_when_clearly_faster(bf16_cost, want):
    clock = FakeClock({**COST, "bf16": bf16_cost})  # channels_last (float32) takes 2.0
    assert cpu_format.pick(clock.step, list(CPU_FORMATS), clock) == want
    assert cpu_format.pick(clock.step, ["bf16"], clock) == "bf16"


def test_auto_probes_once_then_reads_the_memory_and_the_disk_cache(tmp_path):
    clock, cache = FakeClock(COST), tmp_path / "formats.json"
    first = cpu_format.choose("auto", "k", clock.step, flags=BF16, timer=clock, cache=cache)
    assert first == "channels_last"
    probed = sum(clock.steps.values())
    assert probed == 4 * (cpu_format.PROBE_WARMUP + cpu_format.PROBE_STEPS)
    assert json.loads(cache.read_text()) == {"k": "channels_last"}
    # the same key again: no step, even if the timings would now say otherwise
    slow = FakeClock({**COST, "channels_last": 9.0})
    assert cpu_format.choose("auto", "k", slow.step, flags=BF16, timer=slow, cache=cache) == "channels_last"
    cpu_format._decided.clear()  # another process: the disk cache decides
    assert cpu_format.choose("auto", "k", slow.step, flags=BF16, timer=slow, cache=cache) == "channels_last"
    assert sum(slow.steps.values()) == 0
    # another key is probed, and both decisions are kept
    assert cpu_format.choose("auto", "k2", slow.step, flags=BF16, timer=slow, cache=cache) == "bf16"
    assert json.loads(cache.read_text()) == {"k": "channels_last", "k2": "bf16"}


def test_a_damaged_cache_or_a_cached_format_not_a_candidate_is_probed_again(tmp_path):
    cache = tmp_path / "formats.json"
    cache.write_text("{not json")
    clock = FakeClock(COST)
    assert cpu_format.choose("auto", "k", clock.step, flags=BF16, timer=clock, cache=cache) == "channels_last"
    cpu_format._decided.clear()
    cache.write_text(json.dumps({"k": "bf16"}))  # cached where bf16 ran; this CPU has none
    clock = FakeClock(COST)
    assert cpu_format.choose("auto", "k", clock.step, flags=NO_BF16, timer=clock, cache=cache) == "channels_last"
    n = cpu_format.PROBE_WARMUP + cpu_format.PROBE_STEPS
    assert clock.steps == {"nchw": n, "channels_last": n, "bf16": 0, "channels_last_bf16": 0}


def test_auto_tries_bf16_only_where_native_and_amp_is_on():
    assert cpu_format.candidates(True, BF16) == list(CPU_FORMATS)
    assert cpu_format.candidates(True, frozenset({"amx_bf16"})) == list(CPU_FORMATS)
    assert cpu_format.candidates(True, NO_BF16) == ["nchw", "channels_last"]
    assert cpu_format.candidates(False, BF16) == ["nchw", "channels_last"]
    clock = FakeClock({**COST, "bf16": 0.5, "channels_last_bf16": 0.5})
    assert cpu_format.choose("auto", "k", clock.step, flags=NO_BF16, timer=clock) == "channels_last"
    assert clock.steps["bf16"] == clock.steps["channels_last_bf16"] == 0
    assert cpu_format.cache_path().is_file()  # under $XDG_STATE_HOME (the fixture's)


@pytest.mark.parametrize("setting", CPU_FORMATS)
def test_a_named_format_is_taken_without_a_probe(setting):
    clock = FakeClock(COST)
    assert cpu_format.choose(setting, "k", clock.step, flags=BF16, timer=clock) == setting
    assert sum(clock.steps.values()) == 0


@pytest.mark.parametrize("setting", ["bf16", "channels_last_bf16"])
def test_a_bf16_format_is_refused_on_a_cpu_without_native_bf16(setting):
    clock = FakeClock(COST)
    with pytest.raises(SearchError, match=rf"hardware.cpu_format: {setting} but this CPU has no native bf16"):
        cpu_format.choose(setting, "k", clock.step, flags=NO_BF16, timer=clock)


def test_the_recipe_knob_defaults_to_auto_and_refuses_other_values():
    r = tiny_recipe()
    assert recipe_from_dict(r).hardware.cpu_format == "auto"
    assert recipe_from_dict({**r, "hardware": {"cpu_format": "channels_last"}}).hardware.cpu_format == "channels_last"
    with pytest.raises(SearchError, match=r"hardware.cpu_format: 'nhwc' is not allowed \(did you mean 'nchw'\?\)"):
        recipe_from_dict({**r, "hardware": {"cpu_format": "nhwc"}})


def test_the_probe_step_leaves_the_model_and_the_random_state_as_they_were(digits):
    model = mini(digits)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    step = cpu_format.training_step(model, digits.in_chans, 8, 16, digits.num_classes)
    for fmt in CPU_FORMATS:
        step(fmt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.is_contiguous() and p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("fmt", CPU_FORMATS)
def test_fit_trains_in_each_format_and_repeats_itself(digits, fmt):
    hp = TrainCfg(epochs=2, batch_size=32, lr=3e-3)
    runs, models = [], []
    for _ in range(2):
        torch.manual_seed(0)  # the same initial weights
        models.append(mini(digits))
        runs.append(train.fit(models[-1], digits, hp, device="cpu", seed=0, cpu_format=fmt))
    res = runs[0]
    assert res.status == "ok" and len(res.history) == 2
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in res.history)
    assert 0.0 <= res.best["accuracy"] <= 1.0
    assert timeless(runs[0].history) == timeless(runs[1].history)  # deterministic on one machine
    weight = [p for p in models[0].parameters() if p.ndim == 4 and p.shape[1] > 1][0]  # a conv over channels
    assert weight.dtype == torch.float32  # bf16 autocast: the weights stay float32
    last = fmt.startswith("channels_last")
    assert weight.is_contiguous(memory_format=torch.channels_last) == last
    assert weight.is_contiguous() == (not last)
    amp = torch.bfloat16 if "bf16" in fmt else None
    logits = train.predict(models[0], digits.val.x, 8, (0.5,), (0.25,), torch.device("cpu"), amp, last)
    assert logits.shape == (len(digits.val.y), digits.num_classes) and logits.dtype == torch.float32


def test_fit_refuses_an_unknown_format(digits):
    with pytest.raises(SearchError, match="cpu_format 'nhwc' is not a format"):
        train.fit(mini(digits), digits, TrainCfg(epochs=1), device="cpu", cpu_format="nhwc")


def test_the_format_is_recorded_on_the_trial_and_a_retry_reuses_it(digits, monkeypatch):
    recipe = recipe_from_dict(tiny_recipe())
    study = optuna.create_study()
    trial = study.ask()
    picked: list[list[str]] = []

    def fake_pick(step, formats, timer=None):
        picked.append(formats)
        return "channels_last"

    monkeypatch.setattr(cpu_format, "pick", fake_pick)
    cpu = torch.device("cpu")
    fmt = objective.cpu_format_of(trial, recipe, "mini_cnn", mini(digits), digits, 8, 32, cpu)
    assert fmt == "channels_last" and attrs(trial)["cpu_format"] == "channels_last" and len(picked) == 1
    # a retry of that trial, in another process (nothing in memory) where the probe would now say nchw
    study.tell(trial, state=TrialState.FAIL)
    workers.retry(study, study.get_trials(deepcopy=False)[0])
    cpu_format._decided.clear()
    cpu_format.cache_path().unlink()
    monkeypatch.setattr(cpu_format, "pick", lambda *a, **k: "nchw")
    retry = study.ask()
    assert attrs(retry)["retry_of"] == 0
    assert objective.cpu_format_of(retry, recipe, "mini_cnn", mini(digits), digits, 8, 32, cpu) == "channels_last"
    assert attrs(retry)["cpu_format"] == "channels_last"
    # a trial on CUDA: no probe, nothing recorded
    other = study.ask()
    assert objective.cpu_format_of(other, recipe, "mini_cnn", None, digits, 8, 32, torch.device("cuda")) == "nchw"
    assert "cpu_format" not in attrs(other)


def test_a_resume_state_of_another_format_is_not_restored(tmp_path):
    recipe = recipe_from_dict(tiny_recipe())
    study = optuna.create_study()
    trial = study.ask()
    setup = objective.Setup(recipe, None, [], "cpu", print, True, None, None, "fp")  # type: ignore[arg-type]
    cpu = torch.device("cpu")
    nchw = objective.state_identity(trial, setup, 0, cpu, "nchw")
    assert nchw["precision"] == "fp32"  # as before formats: older states still resume
    assert objective.state_identity(trial, setup, 0, cpu, "bf16")["precision"] == "bf16"
    assert objective.state_identity(trial, setup, 0, cpu, "channels_last")["precision"] == "channels_last"
