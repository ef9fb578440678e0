"""One trial's training loop: `fit(model, data, hparams, device=...)`.

Reads top to bottom: the data goes to the device once as uint8, each batch is
augmented there, the model runs in `channels_last` with bf16 autocast on CUDA,
the step never waits for the host (losses are summed on the device and read
once per epoch), and evaluation runs under `inference_mode`. Failures
(divergence, out of memory) end the fit with a reason instead of raising, so a
study records them and goes on. `fit` knows nothing of Optuna: the study
passes `on_epoch(epoch, record)`, which may raise to prune.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from search import augment, metrics
from search.data import Data
from search.recipe import METRICS, TrainCfg

PLATEAU_EPOCHS = 2  # plateau schedule: epochs without improvement before decaying
EVAL_BATCH = 512


@dataclass
class FitResult:
    status: str  # 'ok', 'early_stopped', 'diverged', 'oom'
    reason: str  # '' when status is ok
    best_epoch: int  # 1-based; 0 when no epoch finished
    best: dict[str, float]  # validation metrics of the best epoch
    last: dict[str, float]  # validation metrics of the last finished epoch
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None  # CPU copy of the best weights (keep_best)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status in ("diverged", "oom")


# ---------------------------------------------------------------------------
# pure helpers


def lr_factor(step: int, total: int, warmup: int, schedule: str, *, step_every: int = 1,
              gamma: float = 0.1, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based).

    Linear warm-up from 1/warmup to 1 over `warmup` steps, then:
    cosine: min + (1 - min) * (1 + cos(pi * t)) / 2 with t the post-warm-up progress;
    step: gamma ** (steps since warm-up // step_every); constant and plateau: 1
    (plateau decays are applied by the loop from validation results).
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    if schedule == "step":
        return gamma ** ((step - warmup) // max(1, step_every))
    return 1.0


def in_head(name: str, head: tuple[str, ...]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in head)


def param_groups(model: nn.Module, hp: TrainCfg, head: tuple[str, ...], pretrained: bool) -> list[dict[str, Any]]:
    """Head and backbone groups, each split into decay / no decay (norms and biases: ndim <= 1).

    Backbone parameters of a pretrained model train at lr * backbone_lr_mult;
    under `linear_probe` they are left out entirely (no optimizer state).
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        is_head = in_head(name, head) or not pretrained
        if not is_head and hp.finetune == "linear_probe":
            continue
        groups.setdefault((is_head, p.ndim > 1), []).append(p)
    out = []
    for (is_head, decay), params in sorted(groups.items(), reverse=True):
        mult = 1.0 if is_head else hp.backbone_lr_mult
        out.append({
            "params": params, "lr": hp.lr * mult, "base_lr": hp.lr * mult,
            "weight_decay": hp.weight_decay if decay else 0.0,
            "name": f"{'head' if is_head else 'backbone'}{'' if decay else '_no_decay'}",
        })
    return out


def make_optimizer(groups: list[dict[str, Any]], hp: TrainCfg, fused: bool) -> torch.optim.Optimizer:
    if hp.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov and hp.momentum > 0)
    return torch.optim.AdamW(groups, lr=hp.lr, fused=fused or None)


def mix_batch(x: torch.Tensor, y: torch.Tensor, hp: TrainCfg, gen: torch.Generator | None,
              rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup or cutmix (chosen at random when both are on) -> (x, y_a, y_b, lam)."""
    modes = [m for m, a in (("mixup", hp.mixup_alpha), ("cutmix", hp.cutmix_alpha)) if a > 0]
    if not modes or rng.random() >= hp.mix_prob:
        return x, y, y, 1.0
    mode = rng.choice(modes)
    alpha = hp.mixup_alpha if mode == "mixup" else hp.cutmix_alpha
    lam = float(np.random.default_rng(rng.getrandbits(32)).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=gen, device=x.device)
    if mode == "mixup":
        return lam * x + (1 - lam) * x[perm], y, y[perm], lam
    h, w = x.shape[-2:]
    ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = rng.randrange(h), rng.randrange(w)
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually kept
    return x, y, y[perm], lam


def loss_fn(logits: torch.Tensor, y: torch.Tensor, hp: TrainCfg, weight: torch.Tensor | None) -> torch.Tensor:
    if hp.loss == "focal":
        logp = F.log_softmax(logits.float(), dim=1)
        logp_y = logp.gather(1, y[:, None]).squeeze(1)
        focal = (1 - logp_y.exp()) ** hp.focal_gamma
        ce = -logp_y if weight is None else -logp_y * weight[y]
        return (focal * ce).mean()
    return F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=hp.label_smoothing)


def class_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, normalised to mean 1 over the classes present."""
    counts = torch.bincount(y, minlength=num_classes).float()
    w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return w


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def set_backbone_frozen(model: nn.Module, head: tuple[str, ...], frozen: bool) -> None:
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


def better(a: float, b: float, monitor: str) -> bool:
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a < b if METRICS[monitor] == "minimize" else a > b


# ---------------------------------------------------------------------------
# the loop


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...],
            device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool) -> torch.Tensor:
    """Logits (N, K) in float32 for uint8 images x (N, C, H, W), batched."""
    model.eval()
    out = []
    for i in range(0, len(x), EVAL_BATCH):
        xb = augment.normalize(augment.eval_input(x[i : i + EVAL_BATCH].to(device, non_blocking=True), size), mean, std, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out.append(model(xb).float())
    return torch.cat(out)


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
    compile: bool = False,
    keep_best: bool = False,
    gpu_memory_share: float = 0.5,
) -> FitResult:
    """Train `model` on data.train, validate on data.val every epoch.

    `model.info` (set by build_model) gives the input size, normalisation and
    head; a plain module is trained at the data's resolution with [0.5] stats.
    The result's `best` is the epoch with the best `monitor` value.
    """
    hp = hparams
    dev = resolve_device(device)
    seed_everything(seed, hp.deterministic)
    info = getattr(model, "info", None)
    size = info.resolution if info else data.resolution
    mean = info.mean if info else (0.5,) * data.in_chans
    std = info.std if info else (0.25,) * data.in_chans
    head = info.head if info else ()
    pretrained = bool(info and info.pretrained)
    cuda = dev.type == "cuda"
    channels_last = cuda
    amp_dtype = None
    if amp and cuda:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    model.to(dev, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    net = torch.compile(model) if compile else model

    # Data: resident on the device when it fits the allowed share of its memory.
    train_x, train_y = data.train.x, data.train.y
    if cuda:
        free = torch.cuda.mem_get_info(dev)[0]
        if train_x.numel() <= gpu_memory_share * free:
            train_x = train_x.to(dev)
        else:
            train_x = train_x.pin_memory()
    train_y = train_y.to(dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    rng = random.Random(seed)
    weight = class_weights(data.train.y, data.num_classes).to(dev) if hp.class_weights else None
    sample_w = class_weights(data.train.y, data.num_classes)[data.train.y].to(dev) if hp.balanced_sampling else None
    aug = data.augment

    frozen = pretrained and hp.finetune in ("linear_probe", "lp_ft") and (hp.finetune == "linear_probe" or hp.lp_epochs > 0)
    set_backbone_frozen(model, head, frozen)
    groups = param_groups(model, hp, head, pretrained)
    opt = make_optimizer(groups, hp, fused=cuda)

    n = len(train_y)
    bs = min(hp.batch_size, n)
    steps_per_epoch = n // bs  # drop the last partial batch: constant shapes, no tiny noisy steps
    total = steps_per_epoch * hp.epochs
    warmup = round(hp.warmup_epochs * steps_per_epoch)
    plateau_scale, since_best = 1.0, 0

    history: list[dict[str, float]] = []
    best: dict[str, float] = {}
    best_epoch, best_state, status, reason = 0, None, "ok", ""
    t_start = time.perf_counter()
    step = 0
    for epoch in range(1, hp.epochs + 1):
        if frozen and hp.finetune == "lp_ft" and epoch > hp.lp_epochs:
            frozen = False
            set_backbone_frozen(model, head, False)
        train_mode(model, head, frozen)
        mixing = epoch <= hp.epochs - hp.mix_off_epochs
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        if sample_w is not None:
            order = torch.multinomial(sample_w, n, replacement=True, generator=gen)
        else:
            order = torch.randperm(n, generator=gen, device=dev)
        loss_sum = torch.zeros((), device=dev)
        try:
            for i in range(steps_per_epoch):
                f = lr_factor(step, total, warmup, hp.schedule, step_every=hp.step_size * steps_per_epoch,
                              gamma=hp.gamma, min_ratio=hp.min_lr_ratio) * plateau_scale
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * f
                idx = order[i * bs : (i + 1) * bs]
                xb = train_x[idx.to(train_x.device)].to(dev, non_blocking=True)
                yb = train_y[idx]
                xb = augment.normalize(augment.augment(xb, aug.scaled(hp.aug_scale), size, gen), mean, std, channels_last)
                if mixing:
                    xb, ya, yb2, lam = mix_batch(xb, yb, hp, gen, rng)
                else:
                    ya, yb2, lam = yb, yb, 1.0
                with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = net(xb)
                loss = loss_fn(logits, ya, hp, weight)
                if lam < 1.0:
                    loss = lam * loss + (1 - lam) * loss_fn(logits, yb2, hp, weight)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if hp.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], hp.grad_clip)
                scaler.step(opt)
                scaler.update()
                loss_sum += loss.detach()
                step += 1
        except torch.OutOfMemoryError:
            status, reason = "oom", f"out of memory at batch size {bs}"
            opt.zero_grad(set_to_none=True)
            del opt
            if cuda:
                torch.cuda.empty_cache()
            break
        train_loss = float(loss_sum) / max(1, steps_per_epoch)  # the one sync per epoch
        if not math.isfinite(train_loss):
            status, reason = "diverged", f"diverged at epoch {epoch}"
            break
        seconds = time.perf_counter() - t0
        logits = predict(net, data.val.x, size, mean, std, dev, amp_dtype, channels_last)
        val = metrics.evaluate(logits, data.val.y)
        if not math.isfinite(val["loss"]):
            status, reason = "diverged", f"diverged at epoch {epoch}"
            break
        record = {
            "epoch": epoch, "train_loss": train_loss, **{f"val_{k}": v for k, v in val.items()},
            "lr": opt.param_groups[0]["lr"], "seconds": seconds,
            "images_per_s": steps_per_epoch * bs / max(seconds, 1e-9),
            "peak_memory_mb": (torch.cuda.max_memory_allocated(dev) if cuda else 0) / 2**20,
        }
        history.append(record)
        improved = not best or better(val[monitor], best[monitor], monitor)
        if improved:
            best, best_epoch, since_best = val, epoch, 0
            if keep_best:
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            since_best += 1
            if hp.schedule == "plateau" and since_best % PLATEAU_EPOCHS == 0:
                plateau_scale *= hp.gamma
        if on_epoch is not None:
            on_epoch(epoch, record)  # may raise (pruning): nothing after this needs cleanup
        if hp.patience and since_best >= hp.patience:
            status, reason = "early_stopped", f"no improvement of {monitor} for {hp.patience} epochs"
            break
    last = {k[4:]: v for k, v in history[-1].items() if k.startswith("val_")} if history else {}
    return FitResult(status, reason, best_epoch, best, last, history, best_state, time.perf_counter() - t_start)

