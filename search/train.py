"""One trial's training loop: `fit(model, data, hparams, device=...)`.

Reads top to bottom: the data goes to the device once as uint8, each batch is
augmented there, the model runs in `channels_last` with bf16 autocast on CUDA
(fp16 with a grad scaler where bf16 is not native) and on the CPU in the
`cpu_format` given (search.cpu_format chooses it), the step never waits for
the host (losses are summed on the device and read once per epoch; only the
fp16 scaler checks for inf each step), and evaluation runs under
`inference_mode`. A step that runs out of memory is retried in smaller
micro-batches with accumulated gradients (the same effective batch); failures
(divergence, out of memory at the smallest micro-batch) end the fit with a
reason instead of raising, so a study records them and goes on. `fit` knows
nothing of Optuna: the study passes `on_epoch(epoch, record)`, which may raise
to prune, `on_state(state)`, which saves each epoch's full state (weights,
optimizer, scaler, schedule position, every RNG), `state` to resume from one
(the rest of the run is then exactly the uninterrupted one's), and `stop()`,
polled at every step, to end the fit early as 'interrupted'.

Speed (scripts/bench_train.py, 32 px, batch 64, 2 AVX-512 CPU cores, medians
of 5 interleaved runs): fit / minimal hand-written loop = 0.99 for mini_cnn
(0.45 s per 1,024-image epoch) and 1.00 for resnet_18 (2.7 s per 256 images);
on an H200 (bf16, 50k images, batch 512) 0.94 for resnet_18 at 51,900
images/s. Measured again after `fit` was split into FitContext/FitState/train_step (2 AMD EPYC cores,
medians of 5): 0.994 for mini_cnn, 0.983 for resnet_18. CPU formats (--formats, 1 thread, CPU
seconds, a Xeon with avx512_bf16 but no AMX, under load ~20): channels_last 1.57x NCHW for
mini_cnn (1,100 vs 700 images per CPU second), 1.06x for resnet_18's probe step; bf16 0.87x
and 0.74x, so `auto` takes channels_last there.

About 870 lines, read top to bottom: pure schedule and loss functions first, then the loop: `FitContext`
(what every step uses), `FitState` (what goes from epoch to epoch, and what a resume restores),
`train_step` (one optimizer step and its out-of-memory retry), `train_epoch`, and `fit`, whose
epoch loop stays in view (108 lines, tests/test_shape.py).
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from search import augment, infer, metrics
from search.data import Data
from search.device import resolve_device
from search.errors import SearchError
from search.files import own_directory
from search.hparams import TrainCfg
from search.recipe import CPU_FORMATS, METRICS
from search.record import FitStatus

PLATEAU_EPOCHS = 2  # plateau schedule: epochs without improvement before each decay
EVAL_BATCH: int | None = None  # images per validation forward; None: as many as fit the budget (search.infer)
MIN_MICRO_BATCH = 1  # out of memory here too: the configuration does not fit this device
RECOMPILE_LIMIT = 64  # torch.compile graphs kept per forward (architecture x shape x dropout x frozen)


@dataclass
class FitResult:
    status: FitStatus  # 'interrupted': stop() said so
    reason: str  # '' when status is ok
    best_epoch: int  # 1-based; 0 when no epoch finished
    best: dict[str, float]  # validation metrics of the best epoch
    last: dict[str, float]  # validation metrics of the last finished epoch
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None  # CPU copy of the best weights (keep_best)
    seconds: float = 0.0
    seed: int = 0
    micro_batch: int = 0  # images per forward/backward (< the batch size after out-of-memory retries)

    @property
    def failed(self) -> bool:
        return self.status in ("diverged", "oom")


# ---------------------------------------------------------------------------
# schedules: pure functions of the step


def lr_factor(
    step: int,
    total: int,
    warmup: int,
    schedule: str,
    *,
    step_every: int = 1,
    gamma: float = 0.1,
    min_ratio: float = 0.0,
    decays: int = 0,
) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based) of `total`.

    Linear warm-up from 1/warmup to 1 over the first `warmup` steps, then
    cosine:   min + (1 - min) * (1 + cos(pi * t)) / 2, t = (step - warmup) / (total - warmup);
    step:     gamma ** (step // step_every)  (decays at fixed epochs, warm-up or not);
    plateau:  gamma ** decays  (`decays` counted by `plateau_decays` from validation results);
    constant: 1.
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        t = min((step - warmup) / max(1, total - warmup), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "step":
        return gamma ** (step // max(1, step_every))
    if schedule == "plateau":
        return gamma**decays
    return 1.0


def better(a: float, b: float, monitor: str) -> bool:
    """Is monitor value `a` strictly better than `b`? NaN is never better, always beaten."""
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a < b if METRICS[monitor] == "minimize" else a > b


def epochs_since_best(values: Sequence[float], monitor: str) -> int:
    """Epochs since the best of `values` (the first one wins ties); 0 for an empty list."""
    best, since = None, 0
    for v in values:
        if best is None or better(v, best, monitor):
            best, since = v, 0
        else:
            since += 1
    return since


def plateau_decays(values: Sequence[float], monitor: str, patience: int = PLATEAU_EPOCHS) -> int:
    """Learning-rate decays of the plateau schedule after these validation values.

    One decay each time the run has gone `patience` more epochs without a new
    best; a new best restarts the count (like ReduceLROnPlateau with cooldown 0).
    """
    decays = 0
    for k in range(1, len(values) + 1):
        since = epochs_since_best(values[:k], monitor)
        decays += since > 0 and since % patience == 0
    return decays


# ---------------------------------------------------------------------------
# optimizer, loss, mixing


def in_head(name: str, head: tuple[str, ...]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in head)


def param_groups(model: nn.Module, hp: TrainCfg, head: tuple[str, ...], pretrained: bool) -> list[dict[str, Any]]:
    """Head and backbone groups, each split into decay / no decay (norms and biases: ndim <= 1).

    Backbone parameters of a pretrained model train at lr * backbone_lr_mult;
    under `linear_probe` they are left out entirely (no optimizer state). A
    scratch model is all "head": every parameter trains at the base rate.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        is_head = in_head(name, head) or not pretrained
        if not is_head and hp.finetune == "linear_probe":
            continue
        groups.setdefault((is_head, p.ndim > 1), []).append(p)
    out = []
    for (is_head, decay), params in sorted(groups.items(), reverse=True):  # head first: its lr is the record's
        mult = 1.0 if is_head else hp.backbone_lr_mult
        out.append(
            {
                "params": params,
                "lr": hp.lr * mult,
                "base_lr": hp.lr * mult,
                "weight_decay": hp.weight_decay if decay else 0.0,
                "name": f"{'head' if is_head else 'backbone'}{'' if decay else '_no_decay'}",
            }
        )
    return out


def make_optimizer(groups: list[dict[str, Any]], hp: TrainCfg, fused: bool) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW over `groups`; fused kernels on CUDA."""
    if hp.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov and hp.momentum > 0, fused=fused or None
        )
    return torch.optim.AdamW(groups, lr=hp.lr, fused=fused or None)


def mix_batch(
    x: torch.Tensor, y: torch.Tensor, hp: TrainCfg, gen: torch.Generator | None, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup or cutmix (chosen at random when both are on) -> (x, y_a, y_b, lam).

    The target is lam * onehot(y_a) + (1 - lam) * onehot(y_b); `mixed_loss`
    computes its cross-entropy. Randomness of the box and lam stays on the host
    (Python `rng`), so no step waits for the device.
    """
    modes = [m for m, a in (("mixup", hp.mixup_alpha), ("cutmix", hp.cutmix_alpha)) if a > 0]
    if not modes or rng.random() >= hp.mix_prob:
        return x, y, y, 1.0
    mode = rng.choice(modes)
    alpha = hp.mixup_alpha if mode == "mixup" else hp.cutmix_alpha
    lam = rng.betavariate(alpha, alpha)
    perm = torch.randperm(x.shape[0], generator=gen, device=x.device)
    if mode == "mixup":
        return x.lerp(x[perm], 1 - lam), y, y[perm], lam
    h, w = x.shape[-2:]
    ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = rng.randrange(h), rng.randrange(w)
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[..., y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually kept, after clipping at the border
    return x, y, y[perm], lam


def loss_fn(
    logits: torch.Tensor,
    y: torch.Tensor,
    hp: TrainCfg,
    weight: torch.Tensor | None,
    denom: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Cross-entropy (label smoothing, class weights) or focal loss, in float32.

    The (class-weighted) mean over `y`; with `denom`, the sum divided by `denom` instead: a
    micro-batch's share of the mean over the whole batch, whose `batch_denominator` it is.
    """
    logits = logits.float()
    if hp.loss == "focal":
        logp_y = F.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
        focal = -((1 - logp_y.exp()) ** hp.focal_gamma) * logp_y
        if weight is None:
            return focal.mean() if denom is None else focal.sum() / denom
        w = weight[y]
        return (w * focal).sum() / (w.sum() if denom is None else denom)  # the weighted mean, as cross_entropy's
    if denom is None:
        return F.cross_entropy(logits, y, weight=weight, label_smoothing=hp.label_smoothing)
    return F.cross_entropy(logits, y, weight=weight, label_smoothing=hp.label_smoothing, reduction="sum") / denom


def batch_denominator(y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor | int:
    """What the mean loss over labels `y` divides by: their count, or the sum of their class weights."""
    return len(y) if weight is None else weight[y].sum()


def mixed_loss(
    logits: torch.Tensor,
    ya: torch.Tensor,
    yb: torch.Tensor,
    lam: float,
    hp: TrainCfg,
    weight: torch.Tensor | None,
    denoms: tuple[Any, Any] | None = None,
) -> torch.Tensor:
    """Loss against the mixed target lam * y_a + (1 - lam) * y_b (cross-entropy is linear in it).

    `denoms`: the whole batch's `batch_denominator` of y_a and y_b, when these logits are one
    micro-batch of it.
    """
    da, db = denoms or (None, None)
    loss = loss_fn(logits, ya, hp, weight, da)
    if lam < 1.0:
        loss = lam * loss + (1 - lam) * loss_fn(logits, yb, hp, weight, db)
    return loss


def class_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, n / (K * count_c); classes absent from `y` get 0."""
    counts = torch.bincount(y, minlength=num_classes).float()
    return torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))


# ---------------------------------------------------------------------------
# device, seeds, freezing


_HOST_MEMORY_REUSED: bool | None = None


def _libc(name: str) -> Callable[..., int] | None:
    """A function of the process's C library, or None (no such function, or no C library handle: Windows)."""
    try:
        return getattr(ctypes.CDLL(None), name, None)
    except (OSError, TypeError):
        return None


def reuse_host_memory() -> bool:
    """Keep freed host memory in this process for the next batch (glibc; True when in effect).

    glibc serves every allocation over 32 MiB with a fresh `mmap` and unmaps it
    on free, so each CPU batch tensor (a 256-image float batch at 224 px is
    154 MB) page-faults all its pages again: on a 2-core machine that costs
    more than the augmentation itself. With mmap off for the heap and a 2 GB
    trim threshold, a freed batch is reused by the next. Process-wide; `fit`
    turns it on for the CPU (`host_memory`) and trims the heap when it ends.
    No effect (False) where the C library has no `mallopt`, such as macOS.
    """
    global _HOST_MEMORY_REUSED
    if _HOST_MEMORY_REUSED is None:
        mallopt = _libc("mallopt")
        m_trim_threshold, m_mmap_max = -1, -4
        _HOST_MEMORY_REUSED = bool(mallopt and mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2**31 - 1))
    return _HOST_MEMORY_REUSED


@contextmanager
def host_memory(device: torch.device) -> Iterator[None]:
    """During a CPU fit, freed batches are reused; after it, the free heap goes back to the system.

    Without the trim a worker's memory would grow trial by trial: blocks freed
    under longer-lived small objects can only serve requests that fit them, and
    searched batch sizes and resolutions differ from trial to trial.
    """
    if device.type != "cpu" or not reuse_host_memory():
        yield
        return
    try:
        yield
    finally:
        trim = _libc("malloc_trim")
        if trim:
            trim(0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


class Stopped(Exception):
    """stop() said so, at a step boundary."""


def rng_states(gen: torch.Generator, rng: random.Random, cuda: bool) -> dict[str, Any]:
    """Every random state a fit draws from, in types `torch.load(weights_only=True)` reads back:
    the fit's generator and host Random, and torch's and Python's global ones (dropout, drop-path)."""
    return {
        "gen": gen.get_state(),
        "host": list(rng.getstate()[1]),
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "cuda": torch.cuda.get_rng_state_all() if cuda else [],
    }


def set_rng_states(states: dict[str, Any], gen: torch.Generator, rng: random.Random, cuda: bool) -> None:
    gen.set_state(states["gen"])
    rng.setstate((3, tuple(states["host"]), None))
    torch.set_rng_state(states["torch"])
    random.setstate((3, tuple(states["python"]), None))
    if cuda and states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


@contextmanager
def determinism(on: bool, cuda: bool) -> Iterator[None]:
    """Deterministic kernels (`on`) or cuDNN autotuning (off, CUDA) for one fit; restores the previous state."""
    prev = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    if on:
        # cuBLAS needs a fixed workspace for reproducible GEMMs; read when its handle is created.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # warn, not fail, on ops without one
    torch.backends.cudnn.deterministic = on or prev[3]
    torch.backends.cudnn.benchmark = cuda and not on  # shapes are fixed (last partial batch dropped)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev[2], prev[3]


def set_backbone_frozen(model: nn.Module, head: tuple[str, ...], frozen: bool) -> None:
    """requires_grad off for every non-head parameter: no gradient, hence no optimizer state."""
    for name, p in model.named_parameters():
        if not in_head(name, head):
            p.requires_grad_(not frozen)


def train_mode(model: nn.Module, head: tuple[str, ...], frozen: bool) -> None:
    """model.train(), but a frozen backbone keeps its BatchNorm statistics."""
    model.train()
    if frozen:
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not in_head(name, head):
                m.eval()


INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def inductor_cache() -> Path:
    """The directory inductor caches compiled kernels in: $TORCHINDUCTOR_CACHE_DIR, else
    <temp dir>/search-inductor-<uid>, made 700 and refused unless the user's alone (as the GPU
    ledger's). Inductor loads pickled code from it: its own default, /tmp/torchinductor_<user>,
    is checked by nobody, and another user who creates it first decides what runs. Set in the
    environment, where inductor and its compile workers read it (a value equal to inductor's
    default is taken as unset: torch writes it there on import)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # torch-free module

    chosen = os.environ.get(INDUCTOR_CACHE_ENV)
    if chosen and Path(chosen) == Path(default_cache_dir()):
        chosen = None  # not the user's choice: importing torch._dynamo fills in inductor's default
    path = Path(chosen) if chosen else Path(tempfile.gettempdir()) / f"search-inductor-{os.getuid()}"
    own_directory(path.absolute(), "inductor cache directory", INDUCTOR_CACHE_ENV)
    os.environ[INDUCTOR_CACHE_ENV] = str(path.absolute())
    return path


def compiled(model: nn.Module, backend: bool | str) -> nn.Module:
    """torch.compile'd forward. Dynamo caches graphs on the forward's code, so every model of
    one architecture, input shape, dropout and frozen state reuses one compilation per process."""
    inductor_cache()
    import torch._dynamo  # noqa: F401 - loaded lazily by torch; its config is needed first

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # A compiled Module is an OptimizedModule (a Module); torch's stubs type the result as a callable.
    return torch.compile(  # type: ignore[return-value]
        model, backend="inductor" if isinstance(backend, bool) else backend, dynamic=False
    )


def free_memory(model: nn.Module, opt: torch.optim.Optimizer, cuda: bool) -> None:
    """After an out-of-memory error: drop gradients and optimizer state, return cached blocks."""
    opt.state.clear()
    model.zero_grad(set_to_none=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def release_step(cuda: bool) -> None:
    """After an out-of-memory error in a step that is retried: return the failed step's blocks."""
    gc.collect()  # frames of the failed forward may sit in reference cycles
    if cuda:
        torch.cuda.empty_cache()  # smaller micro-batches need differently sized blocks


def backward(
    net: nn.Module,
    xb: torch.Tensor,
    ya: torch.Tensor,
    yb: torch.Tensor,
    lam: float,
    hp: TrainCfg,
    weight: torch.Tensor | None,
    micro: int,
    scaler: torch.amp.GradScaler,
    dev: torch.device,
    amp_dtype: torch.dtype | None,
) -> torch.Tensor:
    """Gradients of the batch's mean loss, accumulated over micro-batches of `micro` images; the loss.

    Each micro-batch's loss is its share of the mean over the whole batch (its summed loss over
    the batch's denominator), so the accumulated gradient is the whole batch's: the effective
    batch size is kept. The one difference: BatchNorm normalises each micro-batch by its own
    statistics (and updates its running statistics once per micro-batch).
    """
    if micro >= len(xb):
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = net(xb)
        loss = mixed_loss(logits, ya, yb, lam, hp, weight)
        scaler.scale(loss).backward()
        return loss.detach()
    denoms = (batch_denominator(ya, weight), batch_denominator(yb, weight))
    total = torch.zeros((), device=dev)
    for xc, yac, ybc in zip(xb.split(micro), ya.split(micro), yb.split(micro), strict=True):
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = net(xc)
        loss = mixed_loss(logits, yac, ybc, lam, hp, weight, denoms)
        scaler.scale(loss).backward()
        total += loss.detach()
    return total


# ---------------------------------------------------------------------------
# the loop


@torch.inference_mode()
def predict(
    model: nn.Module,
    x: torch.Tensor,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    batch: int | None = None,
) -> torch.Tensor:
    """Logits (N, K) in float32 for uint8 images x (N, C, H, W), in batches of `batch` images or
    (None) as many as fit the memory budget, measured once per model and size (`search.infer`)."""
    outs = infer.forward_batches(
        model, x, size, mean=mean, std=std, device=device, amp_dtype=amp_dtype, channels_last=channels_last, batch=batch
    )
    return torch.cat([out.float() for out in outs])


@dataclass
class FitContext:
    """What every step of one fit uses, fixed for the whole fit: the model and its optimizer, the
    data where it lives (uint8), the input pipeline's constants and the random generators."""

    model: nn.Module
    net: nn.Module  # the model's forward, compiled or not
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    hp: TrainCfg
    dev: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    size: int  # input pixels
    mean: tuple[float, ...]
    std: tuple[float, ...]
    head: tuple[str, ...]
    pretrained: bool
    train_x: torch.Tensor  # uint8 (N, C, H, W), on the device when it fits its share
    train_y: torch.Tensor  # on the device
    val_x: torch.Tensor
    aug: augment.AugmentCfg
    weight: torch.Tensor | None  # class weights of the loss
    sample_w: torch.Tensor | None  # per-image weights of balanced sampling
    gen: torch.Generator  # batch order, augmentation, mix permutations
    rng: random.Random  # host-side draws (mix lam, cutmix box): no device sync

    @property
    def cuda(self) -> bool:
        return self.dev.type == "cuda"

    @property
    def clip_params(self) -> list[torch.Tensor]:
        return [p for g in self.opt.param_groups for p in g["params"]]


@dataclass
class FitState:
    """What a fit carries from epoch to epoch: the state a resumed fit starts from (`restore`)
    and each finished epoch saves (`snapshot`), in one place."""

    micro: int  # images per forward/backward (smaller after out of memory)
    frozen: bool  # the backbone is frozen (linear probe, lp_ft's first epochs)
    epoch: int = 0  # the last finished epoch
    step: int = 0  # optimizer steps taken
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)  # validation metrics of the best epoch
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None  # CPU copy of the best weights (keep_best)

    def snapshot(self, ctx: FitContext) -> dict[str, Any]:
        """The resume state after epoch `self.epoch`: plain types `torch.load(weights_only=True)` reads."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "micro_batch": self.micro,
            "frozen": self.frozen,
            "model": ctx.model.state_dict(),
            "optimizer": ctx.opt.state_dict(),
            "scaler": ctx.scaler.state_dict(),
            "rng": rng_states(ctx.gen, ctx.rng, ctx.cuda),
            "history": self.history,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
        }

    @classmethod
    def restore(cls, state: dict[str, Any], ctx: FitContext) -> FitState:
        """Weights, optimizer, scaler and every random state back as `snapshot` left them."""
        ctx.model.load_state_dict(state["model"])
        ctx.opt.load_state_dict(state["optimizer"])
        ctx.scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"], ctx.gen, ctx.rng, ctx.cuda)
        return cls(
            micro=int(state["micro_batch"]),
            frozen=bool(state["frozen"]),
            epoch=int(state["epoch"]),
            step=int(state["step"]),
            history=list(state["history"]),
            best=dict(state["best"]),
            best_epoch=int(state["best_epoch"]),
            best_state=state.get("best_state"),
        )


def prepare(
    model: nn.Module,
    data: Data,
    hp: TrainCfg,
    dev: torch.device,
    seed: int,
    amp: bool,
    compile: bool | str,
    gpu_memory_share: float,
    cpu_format: str = "nchw",
) -> FitContext:
    """The model on the device (channels_last on CUDA; on the CPU as `cpu_format` says), its
    precision, the data where it will live, the generators and the optimizer over the parameter
    groups."""
    cuda = dev.type == "cuda"
    info = getattr(model, "info", None)
    head = info.head if info else ()
    pretrained = bool(info and info.pretrained)
    channels_last = cuda or (dev.type == "cpu" and cpu_format.startswith("channels_last"))
    amp_dtype = None
    if amp and cuda:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    elif dev.type == "cpu" and cpu_format.endswith("bf16"):
        amp_dtype = torch.bfloat16  # autocast around the forward only: loss, weights, optimizer in float32
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)  # fp16 underflows without it
    # torch accepts Module.to(device, memory_format=...); its stubs lack that form.
    model.to(dev, memory_format=torch.channels_last if channels_last else torch.preserve_format)  # type: ignore[call-overload]
    # Data: resident on the device as uint8 when it fits the allowed share of free memory.
    train_x, val_x = data.train.x, data.val.x
    if cuda and train_x.numel() + val_x.numel() <= gpu_memory_share * torch.cuda.mem_get_info(dev)[0]:
        train_x, val_x = train_x.to(dev), val_x.to(dev)
    weights = class_weights(data.train.y, data.num_classes)
    set_backbone_frozen(model, head, frozen_at_start(hp, pretrained))
    return FitContext(
        model=model,
        net=compiled(model, compile) if compile else model,
        opt=make_optimizer(param_groups(model, hp, head, pretrained), hp, fused=cuda),
        scaler=scaler,
        hp=hp,
        dev=dev,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        size=info.resolution if info else data.resolution,
        mean=info.mean if info else (0.5,) * data.in_chans,
        std=info.std if info else (0.25,) * data.in_chans,
        head=head,
        pretrained=pretrained,
        train_x=train_x,
        train_y=data.train.y.to(dev),
        val_x=val_x,
        aug=data.augment.scaled(hp.aug_scale),
        weight=weights.to(dev) if hp.class_weights else None,
        sample_w=weights[data.train.y].to(dev) if hp.balanced_sampling else None,
        gen=torch.Generator(device=dev).manual_seed(seed),
        rng=random.Random(seed),
    )


def frozen_at_start(hp: TrainCfg, pretrained: bool) -> bool:
    """A pretrained backbone starts frozen under a linear probe, and under lp_ft's probe epochs."""
    return pretrained and (hp.finetune == "linear_probe" or (hp.finetune == "lp_ft" and hp.lp_epochs > 0))


def schedule(hp: TrainCfg, steps_per_epoch: int) -> Callable[[int, int], float]:
    """The learning-rate factor as a function of (optimizer step, plateau decays so far)."""
    total = steps_per_epoch * hp.epochs
    warmup = round(hp.warmup_epochs * steps_per_epoch)
    step_every = hp.step_size * steps_per_epoch
    return lambda step, decays: lr_factor(
        step,
        total,
        warmup,
        hp.schedule,
        step_every=step_every,
        gamma=hp.gamma,
        min_ratio=hp.min_lr_ratio,
        decays=decays,
    )


def train_step(
    ctx: FitContext, fs: FitState, xb: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor, lam: float
) -> torch.Tensor:
    """One optimizer step on a batch; out of memory retries the same step in micro-batches half as
    large (`fs.micro`, kept for the rest of the fit) until MIN_MICRO_BATCH fails too (raised)."""
    while True:
        ctx.opt.zero_grad(set_to_none=True)
        try:
            loss = backward(ctx.net, xb, ya, yb, lam, ctx.hp, ctx.weight, fs.micro, ctx.scaler, ctx.dev, ctx.amp_dtype)
            if ctx.hp.grad_clip:
                ctx.scaler.unscale_(ctx.opt)
                torch.nn.utils.clip_grad_norm_(ctx.clip_params, ctx.hp.grad_clip)
            ctx.scaler.step(ctx.opt)
            ctx.scaler.update()
            return loss
        except torch.OutOfMemoryError:  # in practice in forward/backward, before the update
            if fs.micro <= MIN_MICRO_BATCH:
                raise
        # outside the except: its traceback no longer pins the failed step's tensors
        ctx.opt.zero_grad(set_to_none=True)
        release_step(ctx.cuda)
        fs.micro = max(MIN_MICRO_BATCH, fs.micro // 2)


def train_epoch(
    ctx: FitContext,
    fs: FitState,
    epoch: int,
    bs: int,
    lr_at: Callable[[int, int], float],
    decays: int,
    stop: Callable[[], bool] | None,
    on_step: Callable[[int, int, int, int], None] | None,
) -> float:
    """One epoch of steps over a fresh order of the training images; the mean training loss.

    Stopped is raised at a step boundary when `stop()` says so."""
    hp, n = ctx.hp, len(ctx.train_y)
    steps = n // bs  # the last partial batch is dropped: constant shapes, no tiny noisy steps
    mixing = epoch <= hp.epochs - hp.mix_off_epochs
    if ctx.sample_w is not None:
        order = torch.multinomial(ctx.sample_w, n, replacement=True, generator=ctx.gen)
    else:
        order = torch.randperm(n, generator=ctx.gen, device=ctx.dev)
    order_x = order.to(ctx.train_x.device)  # host-resident data: one copy per epoch, no per-step sync
    loss_sum = torch.zeros((), device=ctx.dev)
    for i in range(steps):
        if stop is not None and stop():
            raise Stopped
        f = lr_at(fs.step, decays)
        for g in ctx.opt.param_groups:
            g["lr"] = g["base_lr"] * f
        xb = ctx.train_x.index_select(0, order_x[i * bs : (i + 1) * bs])  # a row copy; [idx] is far slower
        if xb.device != ctx.dev:  # host-resident data (too big for its GPU share): pin this batch only
            xb = xb.pin_memory()
        xb = xb.to(ctx.dev, non_blocking=True)
        yb = ctx.train_y[order[i * bs : (i + 1) * bs]]
        xb = augment.augment(
            xb, ctx.aug, ctx.size, ctx.gen, mean=ctx.mean, std=ctx.std, channels_last=ctx.channels_last
        )
        ya, yb2, lam = yb, yb, 1.0
        if mixing:
            xb, ya, yb2, lam = mix_batch(xb, yb, hp, ctx.gen, ctx.rng)
        loss_sum += train_step(ctx, fs, xb, ya, yb2, lam)
        fs.step += 1
        if on_step is not None:
            on_step(epoch, i + 1, steps, bs)
    return float(loss_sum) / max(1, steps)  # the one sync of the epoch


def fit(
    model: nn.Module,
    data: Data,
    hparams: TrainCfg,
    *,
    device: str | torch.device = "auto",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    monitor: str = "accuracy",
    seed: int = 0,
    amp: bool = True,
    compile: bool | str = False,
    keep_best: bool = False,
    gpu_memory_share: float = 0.5,
    micro_batch: int | None = None,
    on_state: Callable[[dict[str, Any]], None] | None = None,
    state: dict[str, Any] | None = None,
    stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, int, int, int], None] | None = None,
    cpu_format: str = "nchw",
) -> FitResult:
    """Train `model` on data.train, validate on data.val every epoch.

    `model.info` (set by build_model) gives the input size, normalisation and
    head; a plain module is trained at the data's resolution with 0.5/0.25
    stats, all of it as "head". The result's `best` is the epoch with the best
    `monitor` value, `last` the final epoch. `compile`: True for torch.compile
    (inductor) or a backend name. `keep_best` keeps a CPU copy of the best
    weights in the result (`search.artifacts.save_checkpoint` writes them).
    Each epoch's record goes to `on_epoch`, which may raise (pruning) to stop
    the fit.

    Out of memory in a training step retries that step in micro-batches of half
    the size (gradients accumulated: the same effective batch) until it fits or
    fails at MIN_MICRO_BATCH, which ends the fit as 'oom'. The size that fit is
    kept for the rest of the fit, in each record (`micro_batch`) and the result.
    `micro_batch` starts there instead of at the full batch.

    Resuming: `on_state` gets, after every epoch that does not end the fit, the
    state a later fit resumes from when passed as `state` (with the same model,
    data, hparams and seed): epochs already run are not run again, and on the
    CPU the resumed history equals the uninterrupted one exactly (timings
    aside). `stop()` true at a step boundary ends the fit as 'interrupted'; the
    epoch in progress is lost, the last state stands. `on_step(epoch, i, steps,
    batch)` after each step (live progress; nothing is read from the device).

    `cpu_format` (on the CPU only; search.cpu_format chooses it): the memory format and precision
    of the model and its inputs, one of CPU_FORMATS: `nchw` (float32, the default),
    `channels_last`, `bf16` (bf16 autocast around the forward, the loss in float32) or
    `channels_last_bf16`.
    """
    hp = hparams
    if monitor not in METRICS:
        raise SearchError(f"monitor '{monitor}' is not a metric; allowed: {', '.join(METRICS)}")
    if cpu_format not in CPU_FORMATS:
        raise SearchError(f"cpu_format '{cpu_format}' is not a format; allowed: {', '.join(CPU_FORMATS)}")
    dev = resolve_device(device)
    seed_everything(seed)
    ctx = prepare(model, data, hp, dev, seed, amp, compile, gpu_memory_share, cpu_format)
    bs = min(hp.batch_size, len(ctx.train_y))
    lr_at = schedule(hp, len(ctx.train_y) // bs)
    micro = bs if micro_batch is None else max(MIN_MICRO_BATCH, min(micro_batch, bs))
    fs = FitState(micro, frozen_at_start(hp, ctx.pretrained))
    if state is not None:
        fs = FitState.restore(state, ctx)
        set_backbone_frozen(model, ctx.head, fs.frozen)
    status: FitStatus = "ok"
    reason, t_start = "", time.perf_counter()
    with determinism(hp.deterministic, ctx.cuda), host_memory(dev):
        for epoch in range(fs.epoch + 1, hp.epochs + 1):
            if fs.frozen and hp.finetune == "lp_ft" and epoch > hp.lp_epochs:
                fs.frozen = False
                set_backbone_frozen(model, ctx.head, False)
            train_mode(model, ctx.head, fs.frozen)
            values = [h[f"val_{monitor}"] for h in fs.history]
            decays = plateau_decays(values, monitor) if hp.schedule == "plateau" else 0
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            t0, phase = time.perf_counter(), "train"
            try:
                train_loss = train_epoch(ctx, fs, epoch, bs, lr_at, decays, stop, on_step)
                seconds, phase = time.perf_counter() - t0, "validation"
                val_logits = predict(
                    model, ctx.val_x, ctx.size, ctx.mean, ctx.std, dev, ctx.amp_dtype, ctx.channels_last, EVAL_BATCH
                )
            except torch.OutOfMemoryError:
                status, reason = "oom", oom_reason(phase, bs, fs.micro)
            except Stopped:
                status, reason = "interrupted", f"stopped in epoch {epoch}; {epoch - 1} epochs done"
                break
            if status == "oom":  # outside the except: its traceback no longer pins the step's tensors
                free_memory(model, ctx.opt, ctx.cuda)
                break
            val = metrics.evaluate(val_logits, data.val.y)
            if not (math.isfinite(train_loss) and math.isfinite(val["loss"])):
                status, reason = "diverged", f"diverged at epoch {epoch}"
                break
            record = epoch_record(ctx, fs, epoch, train_loss, val, seconds, len(ctx.train_y) // bs * bs)
            fs.history.append(record)
            fs.epoch = epoch
            if not fs.best or better(val[monitor], fs.best[monitor], monitor):
                fs.best, fs.best_epoch = val, epoch
                fs.best_state = cpu_copy(model) if keep_best else None
            if on_epoch is not None:
                on_epoch(epoch, record)  # may raise (pruning): nothing after this needs cleanup
            if hp.patience and epoch - fs.best_epoch >= hp.patience:
                status, reason = "early_stopped", f"no improvement of {monitor} for {hp.patience} epochs"
                break
            if on_state is not None and epoch < hp.epochs:
                on_state(fs.snapshot(ctx))
            if stop is not None and epoch < hp.epochs and stop():
                status, reason = "interrupted", f"stopped after epoch {epoch}"
                break
    last = {k[4:]: v for k, v in fs.history[-1].items() if k.startswith("val_")} if fs.history else {}
    best_state = fs.best_state if keep_best else None
    seconds = time.perf_counter() - t_start
    return FitResult(status, reason, fs.best_epoch, fs.best, last, fs.history, best_state, seconds, seed, fs.micro)


def oom_reason(phase: str, bs: int, micro: int) -> str:
    if phase == "train":
        return f"out of memory at batch size {bs} in micro-batches of {micro}"
    return "out of memory in validation (batches sized by measured memory)"


def epoch_record(
    ctx: FitContext, fs: FitState, epoch: int, train_loss: float, val: dict[str, float], seconds: float, images: int
) -> dict[str, float]:
    """What an epoch reports: losses, validation metrics, learning rate, speed, memory, micro-batch."""
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        **{f"val_{k}": v for k, v in val.items()},
        "lr": ctx.opt.param_groups[0]["lr"],
        "backbone_frozen": float(fs.frozen),
        "seconds": seconds,
        "images_per_s": images / max(seconds, 1e-9),
        "peak_memory_mb": (torch.cuda.max_memory_allocated(ctx.dev) if ctx.cuda else 0) / 2**20,
        "micro_batch": fs.micro,
    }


def cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights, copied to host memory (a best epoch kept while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
