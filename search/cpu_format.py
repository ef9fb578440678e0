"""The memory format and precision a CPU trial trains in (`hardware.cpu_format`), chosen per machine.

`fit` on the CPU runs in one of CPU_FORMATS: float32 NCHW (`nchw`), float32 `channels_last`, bf16
autocast around the forward (`bf16`; the loss, weights and optimizer stay float32) or both
(`channels_last_bf16`). Which is fastest depends on the model, the input size, the batch, the
CPU and torch's oneDNN kernels, so under `auto` (the default) a short probe times a few training
steps of the actual model in each candidate format and takes the fastest. The decision is kept
in memory for the process and on disk ($XDG_STATE_HOME/search/cpu_format.json, by default
~/.local/state/search/cpu_format.json), keyed by model, resolution, batch size, CPU flags, threads
and torch version, so the next trial of that key (in any process) takes it without probing; one
process probes a key while the others on the machine wait for its decision (a file lock), so
two studies started together on one machine train a trial in the same format.
bf16 formats are candidates only where the CPU computes bf16 natively (avx512_bf16 or AMX
flags) and `hardware.amp` is on; naming one on a CPU without it is a user error.

The probe's timings are noisy, so two probes could choose differently: a trial records the
format it trains in (trial attribute `cpu_format`), and a retried or resumed trial trains in
the recorded one (search.objective).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from search.data.cache import build_lock
from search.errors import SearchError
from search.files import write_text
from search.recipe import CPU_FORMATS

log = logging.getLogger("search")

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # native bf16 dot products (Cooper Lake, Zen 4, AMX)
PROBE_WARMUP = 1  # steps per format before timing: oneDNN builds its kernels on the first
BF16_MARGIN = 1.15  # a bf16 format must be this much faster than float32 to be chosen
PROBE_STEPS = 3  # timed steps per format, interleaved; the fastest of them counts

_decided: dict[str, str] = {}  # this process's decisions by probe key


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where there is none to read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def bf16_native(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU computes bf16 natively: its flags, else (no flags to read) oneDNN's own check."""
    flags = cpu_flags() if flags is None else flags
    if flags:
        return bool(flags & BF16_FLAGS)
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def candidates(amp: bool, flags: frozenset[str] | None = None) -> list[str]:
    """The formats `auto` tries: float32 NCHW and channels_last, and the bf16 ones where native and amp is on."""
    bf16 = amp and bf16_native(flags)
    return [f for f in CPU_FORMATS if bf16 or not f.endswith("bf16")]


def probe_key(model_key: str, resolution: int, batch_size: int, flags: frozenset[str] | None = None) -> str:
    """What a decision holds for: the model, input size and batch, and the machine (CPU flags,
    threads, torch version)."""
    flags = cpu_flags() if flags is None else flags
    machine = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12]
    return f"{model_key}@{resolution}:b{batch_size}:t{torch.get_num_threads()}:cpu-{machine}:torch-{torch.__version__}"


def cache_path() -> Path:
    """$XDG_STATE_HOME/search/cpu_format.json, else ~/.local/state/search/cpu_format.json."""
    base = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec: a relative path there is invalid and ignored.
    return (Path(base) if os.path.isabs(base) else Path.home() / ".local" / "state") / "search" / "cpu_format.json"


def _read_cache(path: Path) -> dict[str, str]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and v in CPU_FORMATS}


def _remember(path: Path, key: str, fmt: str) -> None:
    """Add one decision to the disk cache (read, merge, replace); a cache that cannot be written is
    only a warning: the next process probes again."""
    try:
        write_text(path, json.dumps({**_read_cache(path), key: fmt}, indent=1, sort_keys=True) + "\n")
    except OSError as e:
        log.warning("cpu_format: decision not cached at %s (%s); other processes probe again", path, e)


def step_times(
    step: Callable[[str], None], formats: list[str], timer: Callable[[], float] = time.perf_counter, steps: int = 0
) -> dict[str, float]:
    """Seconds of one step in each format: PROBE_WARMUP untimed steps each, then `steps` (default
    PROBE_STEPS) rounds of one timed step per format, interleaved; the fastest of each format's
    (the least disturbed by other work on the machine)."""
    for fmt in formats:
        for _ in range(PROBE_WARMUP):
            step(fmt)
    times: dict[str, list[float]] = {f: [] for f in formats}
    for _ in range(steps or PROBE_STEPS):
        for fmt in formats:
            t0 = timer()
            step(fmt)
            times[fmt].append(timer() - t0)
    return {f: min(t) for f, t in times.items()}


def pick(step: Callable[[str], None], formats: list[str], timer: Callable[[], float] = time.perf_counter) -> str:
    """The format whose step is fastest by `step_times` (ties: the earlier format, nchw first); a bf16
    one only when BF16_MARGIN times faster than the fastest float32 one (it changes the numerics:
    not for a gain that timing noise could make)."""
    times = step_times(step, formats, timer)

    def fastest(fmts: list[str]) -> str | None:
        return min(fmts, key=lambda f: (times[f], formats.index(f))) if fmts else None

    fp32 = fastest([f for f in formats if not f.endswith("bf16")])
    bf16 = fastest([f for f in formats if f.endswith("bf16")])
    if fp32 is None or (bf16 is not None and times[bf16] * BF16_MARGIN < times[fp32]):
        return str(bf16)
    return fp32


def choose(
    setting: str,
    key: str,
    step: Callable[[str], None],
    *,
    amp: bool = True,
    flags: frozenset[str] | None = None,
    timer: Callable[[], float] = time.perf_counter,
    cache: Path | None = None,
) -> str:
    """The CPU format for `setting` (`hardware.cpu_format`): a named one as it is (bf16 ones refused
    on a CPU without native bf16); under `auto`, the cached decision for `key`, else the fastest
    candidate by `pick(step, ...)`, then cached in memory and on disk (`cache`, default cache_path())."""
    if setting != "auto":
        if setting not in CPU_FORMATS:
            raise SearchError(f"hardware.cpu_format: '{setting}'; allowed: auto, {', '.join(CPU_FORMATS)}")
        if setting.endswith("bf16") and not bf16_native(flags):
            raise SearchError(
                f"hardware.cpu_format: {setting} but this CPU has no native bf16 (flags avx512_bf16 or "
                "amx_bf16): it would run emulated, far slower; use auto, nchw or channels_last"
            )
        return setting
    formats = candidates(amp, flags)
    if len(formats) == 1:
        return formats[0]
    if key in _decided:
        return _decided[key]
    path = cache or cache_path()
    fmt = _read_cache(path).get(key)
    if fmt not in formats:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # no lock and no cache: this process probes for itself (a warning when it writes)
        with build_lock(path):  # one probe per key on the machine: concurrent studies agree
            fmt = _read_cache(path).get(key)
            if fmt not in formats:
                fmt = pick(step, formats, timer)
                log.info("cpu_format: %s for %s (probed)", fmt, key)
                _remember(path, key, fmt)
    _decided[key] = fmt
    return fmt


def training_step(
    model: nn.Module, in_chans: int, resolution: int, batch_size: int, num_classes: int
) -> Callable[[str], None]:
    """One forward and backward of a copy of `model` on a random batch, in a given format (the probe's
    step). One copy per memory layout (bf16 autocast leaves the weights float32, so two at most);
    the model, its weights and the random state are left as they were."""
    copies: dict[bool, nn.Module] = {}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, in_chans, resolution, resolution, generator=gen)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen)

    def step(fmt: str) -> None:
        last = fmt.startswith("channels_last")
        memory_format = torch.channels_last if last else torch.contiguous_format
        if last not in copies:
            copies[last] = copy.deepcopy(model).to(memory_format=memory_format).train()
        net = copies[last]
        with torch.random.fork_rng(devices=[]):  # dropout, drop-path: the caller's random state is kept
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fmt.endswith("bf16")):
                out = net(x.contiguous(memory_format=memory_format))
            F.cross_entropy(out.float(), y).backward()
        net.zero_grad(set_to_none=True)

    return step
