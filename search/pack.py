"""Several trials per GPU, packed by measured memory (`hardware.trials_per_gpu`).

Each worker process trains one trial at a time; several workers share a GPU,
and a worker that sees several GPUs takes the one that admits its trial.
Before a trial trains, its worker measures (once per study: a probe) the
peak memory of one forward/backward/optimizer step of the pool entry at its
input resolution, batch size and precision, and waits until its GPU may take
it (`admits`): with `auto`, while the GPU's measured free memory holds the
probe plus a margin, and always when no other trial runs there (a large model
runs alone; out of memory then falls back to micro-batches); with a number N,
while fewer than N trials run there.

Two workers must not both see the same free memory and both start: admission
holds a per-GPU file lock, and an admitted worker at once reserves its probe in
its own CUDA caching allocator (one block, freed to the cache, not to the
driver), so the next worker's measurement already excludes it; the trial's
tensors then reuse that cached block. Trials running on a GPU are listed in a
ledger file next to the lock (process ids; dead ones are dropped). Every
machine's workers follow the same rule on their own GPUs: nothing is shared
beyond the machine but the probes, which are stored in the study.

The lock and the ledger live in a directory of the user's own
(`$SEARCH_GPU_LEDGER`, else `<temp dir>/search-gpu-<uid>`, created mode 700):
a shared temp directory is anyone's, and a ledger there could be forged, or
linked to a file of the user's that admission would overwrite. A directory
that someone else owns or may write is refused with one line (no fallback:
the user's processes must all meet in the same place, and a silent
alternative would split them), and files in it are opened without following
links and replaced whole through a fresh file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search.errors import SearchError
from search.files import mkdir_private, untrusted
from search.record import MEMORY_PROBE, memory_probe, set_memory_probe

PROBE_PREFIX = MEMORY_PROBE  # study user attr per (entry, resolution, batch size, precision): peak bytes
POLL_SECONDS = 1.0  # how often a waiting worker measures its GPU's free memory again
AUTO_WORKERS_PER_GPU = 8  # local workers started per GPU under trials_per_gpu: auto (at most)
GIB = 2**30
LEDGER_ENV = "SEARCH_GPU_LEDGER"  # the directory of this user's GPU ledgers (default: ledger_dir)
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC  # ledger files: never through a link, never into a child


# ---------------------------------------------------------------------------
# the rule (pure)


def admits(free: int, need: int, margin: int, running: int, trials_per_gpu: int | str) -> bool:
    """May a GPU take one more trial?

    free: its measured free bytes now; need: the trial's probe (peak bytes of one step, plus
    its data when that is kept on the GPU); margin: bytes kept free beyond it; running: trials
    already training there. A GPU with nothing running always takes the trial.
    """
    if running == 0:
        return True
    if trials_per_gpu == "auto":
        return free >= need + margin
    return running < int(trials_per_gpu)


def local_workers(n_gpus: int, trials_per_gpu: int | str, cpus: int) -> int:
    """Local worker processes for `run` when packing: the most trials the GPUs may hold at once.

    A number N gives N per GPU; `auto` gives up to AUTO_WORKERS_PER_GPU per GPU, no more than
    one per CPU core (each worker augments its batches and runs its Python loop on a core).
    """
    per_gpu = AUTO_WORKERS_PER_GPU if trials_per_gpu == "auto" else int(trials_per_gpu)
    if trials_per_gpu == "auto":
        per_gpu = max(1, min(per_gpu, cpus // max(1, n_gpus)))
    return max(1, n_gpus) * per_gpu


def margin_bytes(total: int, share: float) -> int:
    """The margin kept free on a GPU of `total` bytes: `share` of it, at least 1 GiB (contexts, fragmentation)."""
    return max(GIB, int(share * total))


# ---------------------------------------------------------------------------
# probes: measured once, stored in the study


def probe_key(label: str, resolution: int, batch_size: int, precision: str) -> str:
    return f"{PROBE_PREFIX}{label}@{resolution}px:b{batch_size}:{precision}"


def precision_name(device: torch.device, amp: bool) -> str:
    """The precision fit trains in on this device: bf16, fp16 (where bf16 is not native) or fp32."""
    if not (amp and device.type == "cuda"):
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def measure_step(
    model: nn.Module,
    in_chans: int,
    resolution: int,
    batch_size: int,
    num_classes: int,
    device: torch.device,
    precision: str,
) -> int:
    """Peak CUDA bytes of one training step of `model`: weights, activations, gradients, AdamW state.

    AdamW (two state tensors per parameter) bounds SGD with momentum (one). The input is
    random, channels_last, under the precision's autocast, as in `fit`.
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    # torch accepts Module.to(device, memory_format=...); its stubs lack that form.
    model.to(device, memory_format=torch.channels_last).train()  # type: ignore[call-overload]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    x = torch.randn(batch_size, in_chans, resolution, resolution, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        logits = model(x)
    torch.nn.functional.cross_entropy(logits.float(), y).backward()
    opt.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del x, y, logits, opt
    model.to("cpu")
    torch.cuda.empty_cache()
    return int(peak)


def probe(study: Any, key: str, measure: Callable[[], int], ledger: Path | None = None) -> int:
    """The probe stored in the study under `key`, or `measure()`d now and stored (one attr per key,
    so workers storing different probes at once never overwrite each other).

    With the GPU's `ledger`, it is measured under the GPU's lock (no trial is admitted meanwhile);
    a GPU too full for the probe step is measured again once memory has been freed.
    """
    stored = memory_probe(study, key)
    if stored is not None:
        return stored
    while True:
        with _locked(ledger) if ledger else contextlib.nullcontext():
            try:
                peak = measure()
                break
            except torch.OutOfMemoryError:
                pass
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # outside the except: the failed step's tensors are released
        time.sleep(POLL_SECONDS)
    set_memory_probe(study, key, peak)
    return peak


# ---------------------------------------------------------------------------
# admission: a lock and a ledger per GPU on this machine


def gpu_id(device: torch.device) -> str:
    """A name of the physical GPU that is the same in every process (CUDA_VISIBLE_DEVICES differs)."""
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    return str(uuid) if uuid else f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')}-{device.index or 0}"


def devices_for(device: torch.device) -> list[torch.device]:
    """The GPUs a trial may take: the one named (cuda:N), else every visible one (cuda, auto)."""
    if device.index is not None:
        return [device]
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def ledger_dir() -> Path:
    """This user's directory of GPU ledgers: $SEARCH_GPU_LEDGER, else <temp dir>/search-gpu-<uid>.

    Per user, because nobody else may write it (see `_open_dir`); every process of the user on
    this machine reaches the same one, which is what a ledger is for. Another user's trials on
    the same GPU are seen only through its measured free memory.
    """
    chosen = os.environ.get(LEDGER_ENV)
    return Path(chosen) if chosen else Path(tempfile.gettempdir()) / f"search-gpu-{os.getuid()}"


def ledger_path(device: torch.device) -> Path:
    """The ledger of a physical GPU on this machine, in `ledger_dir()`."""
    return ledger_dir() / f"{re.sub(r'[^A-Za-z0-9._-]', '_', gpu_id(device))}.json"


def _refused(path: Path, why: str, directory: bool) -> SearchError:
    fix = (
        f"remove it, or set {LEDGER_ENV} to a directory of your own that only you may write "
        "(created with mode 700 when missing)"
        if directory
        else "remove it while no worker of yours runs (the ledger is rebuilt from running processes)"
    )
    what = "directory" if directory else "file"
    return SearchError(f"GPU ledger {what} {path} is refused: {why}; {fix}")


def _why_not_opened(e: OSError, path: Path) -> str:
    # O_NOFOLLOW refuses a link with ELOOP, or ENOTDIR where O_DIRECTORY is also asked for.
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        return "it is a symbolic link" if path.is_symlink() else "it is not a directory"
    return e.strerror or str(e)


def _checked(fd: int, path: Path, directory: bool) -> int:
    """`fd` when what it opened is the user's alone (`untrusted`); else it is closed and refused."""
    st = os.fstat(fd)
    why = untrusted(st.st_mode, st.st_uid, os.getuid(), directory)
    if why:
        os.close(fd)
        raise _refused(path, why, directory)
    return fd


def _open_dir(path: Path) -> int:
    """A descriptor of the ledger directory, created with mode 700 if missing, refused if not the
    user's alone. Ledger files are opened relative to it: nothing is looked up by path again."""
    created = mkdir_private(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW)
    except OSError as e:
        raise _refused(path, _why_not_opened(e, path), True) from None
    fd = _checked(fd, path, True)
    if created:
        os.fchmod(fd, 0o700)  # exactly 700, whatever the umask left
    return fd


def _open_file(dirfd: int, path: Path, flags: int) -> int:
    """A ledger or lock file in the directory `dirfd`, never through a link (FileNotFoundError passes)."""
    try:
        fd = os.open(path.name, flags | NOFOLLOW | os.O_NONBLOCK, 0o600, dir_fd=dirfd)  # NONBLOCK: a FIFO never hangs
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise
        raise _refused(path, _why_not_opened(e, path), False) from None
    return _checked(fd, path, False)


def parse_ledger(data: bytes) -> dict[str, int] | None:
    """A ledger's {pid: need bytes}, or None for a torn or foreign one (admission starts it again)."""
    try:
        ledger = json.loads(data)
    except ValueError:
        return None
    if not isinstance(ledger, dict):
        return None
    ok = all(re.fullmatch(r"[0-9]{1,10}", k) and type(v) is int for k, v in ledger.items())
    return ledger if ok else None


def _read(dirfd: int, path: Path) -> dict[str, int] | None:
    """The ledger at `path` in `dirfd`; None when it is missing, torn or foreign."""
    try:
        fd = _open_file(dirfd, path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return parse_ledger(f.read())


def _write(dirfd: int, path: Path, ledger: dict[str, int]) -> None:
    """Write the ledger whole to a new file of a unique name (as mkstemp makes one: O_EXCL, never
    through a link), then rename it over the old one: readers see one ledger or the other."""
    tmp = f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600, dir_fd=dirfd)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(ledger))
        os.replace(tmp, path.name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dirfd)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[dict[str, int]]:
    """The ledger {pid: need bytes} of the GPU, under its lock; changes to the dict are written back.

    The directory must be the user's alone (`_open_dir`); the lock and the ledger are opened in it
    without following links, and refused when they are not the user's regular files.
    """
    dirfd = _open_dir(path.parent)
    try:
        lock = _open_file(dirfd, path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            stored = _read(dirfd, path)
            ledger = {pid: n for pid, n in (stored or {}).items() if _alive(int(pid))}
            before = dict(ledger)
            try:
                yield ledger
            finally:
                if ledger != before or stored is None:
                    _write(dirfd, path, ledger)
        finally:
            os.close(lock)  # and with it the lock
    finally:
        os.close(dirfd)


def reserve(device: torch.device, nbytes: int) -> None:
    """Hold `nbytes` in this process's CUDA cache: the block is freed to the cache, not the driver,
    so other processes measure it as used and this trial's tensors are carved from it."""
    if nbytes > 0:
        block = torch.empty(nbytes, dtype=torch.uint8, device=device)
        del block


def _running(path: Path) -> int:
    """Trials in a GPU's ledger now, read without its lock (an ordering hint only)."""
    dirfd = _open_dir(path.parent)
    try:
        return sum(_alive(int(pid)) for pid in _read(dirfd, path) or {})
    finally:
        os.close(dirfd)


@contextlib.contextmanager
def gpu_slot(
    devices: list[torch.device],
    need: int,
    trials_per_gpu: int | str,
    margin_share: float,
    on_wait: Callable[[str], None] | None = None,
    measure: Callable[[torch.device], tuple[int, int]] | None = None,
    ledgers: list[Path] | None = None,
) -> Iterator[torch.device]:
    """Wait until one of `devices` admits a trial needing `need` bytes; yield it, holding the place.

    The GPUs are tried with the fewest trials first (spreading load), each under its lock.
    `measure(device)` returns (free, total) bytes (default: `torch.cuda.mem_get_info`);
    `ledgers` are the GPUs' ledger files (default: `ledger_path`). On leaving, this process's
    cached blocks go back to the driver so the next trial measures them free.
    """
    measure = measure or torch.cuda.mem_get_info
    paths = ledgers or [ledger_path(d) for d in devices]
    me = str(os.getpid())
    said = False
    chosen: tuple[torch.device, Path] | None = None
    while chosen is None:
        seen = []
        for dev, path in sorted(zip(devices, paths, strict=True), key=lambda dp: _running(dp[1])):
            with _locked(path) as running:
                running.pop(me, None)
                free, total = measure(dev)
                if admits(free, need, margin_bytes(total, margin_share), len(running), trials_per_gpu):
                    if dev.type == "cuda":
                        reserve(dev, need)
                    running[me] = need
                    chosen = dev, path
                    break
                seen.append(f"{dev}: {free / GIB:.2f} GiB free, {len(running)} running")
        if chosen is None:
            if on_wait and not said:
                on_wait(f"waiting for GPU memory: {need / GIB:.2f} GiB + margin needed; {'; '.join(seen)}")
                said = True
            time.sleep(POLL_SECONDS)
    dev, path = chosen
    try:
        yield dev
    finally:
        with _locked(path) as running:
            running.pop(me, None)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
