"""Rank the pool before fine-tuning: scores of each entry's frozen backbone features.

For every pretrained entry the backbone (the model without its classifier head,
built as in training: the entry's input size and normalisation, the data's
channels morphed) embeds a stratified sample of train (`rank.max_images`) and
of val (`rank.max_val_images`). Three scores, higher is better:

- **LogME** (You et al., ICML 2021): the log marginal evidence of a Bayesian
  linear model from the train features to each one-hot label column, with the
  prior precision alpha and noise precision beta that maximise it (a one-dimensional
  search over alpha / beta, beta closed-form), divided by n and averaged over classes.
  Invariant to a global scale and to rotations of the features, not to per-dimension scaling.
- **probe**: validation accuracy of a closed-form ridge classifier on the
  standardised train features (one-hot targets); the ridge strength is picked
  from a fixed grid by generalised cross-validation on train, so it is
  deterministic.
- **knn**: validation accuracy of a k-nearest-neighbour vote on cosine
  similarity (`rank.knn_k`, default 10; a tie goes to the class whose
  neighbours are closer).

Features are cached as `.npz` files under the data root
(`<data root>/rank-features/<dataset>/<entry>-<digest>.npz`); the digest covers
the entry, its weight file (path, size, modification time), input size, channel
reduction, the split, the seed, the sample and its images, so a second `rank`
reads them back in milliseconds and anything that changes them computes anew.
The score functions are pure numpy in float64.

About 460 lines: the three scores (pure functions, tested against a reference) and the
feature pass they share; splitting them would separate each formula from its only caller.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from search import infer, weights
from search.data import Data, data_root, load_data, stratified_split
from search.device import resolve_device
from search.errors import SearchError
from search.files import replacing
from search.models import build_model, info_of, input_resolution
from search.pool import parse_pool
from search.recipe import RankCfg, Recipe
from search.train import host_memory

log = logging.getLogger(__name__)

SCORES = ("logme", "probe", "knn")


LOG_T_SPAN = (-12.0, 8.0)  # log10 of (alpha / beta) / largest eigenvalue searched, plus the limit at infinity
T_GRID = 241  # points on that span (1/12 decade apart) before each local maximum is refined
RIDGE_GRID = tuple(10.0**k for k in range(-4, 5))  # x mean eigenvalue of the train Gram matrix
TIE = 1e-9  # relative difference below which two criteria are a tie (decided the same way on every host)
WIDTH = 100  # columns of the table
CACHE_VERSION = 1  # bump when the features of an unchanged key would change
KNN_BYTES = 256 * 2**20  # similarities held at once by the kNN vote (rows of val x all of train)
CHANNELS_LAST = True  # frozen forwards in channels_last on every device (scripts/bench_rank.py)


# ---------------------------------------------------------------------------
# scores: pure functions of feature matrices (n, d) and integer labels (n,)


def _profile(s: np.ndarray, sigma: np.ndarray, x2: np.ndarray, res: float, n: int) -> np.ndarray:
    """Log evidence / n of one target at alpha / beta = s (in units of the largest eigenvalue of
    F^T F), with beta at its optimum for that ratio, for every s.

    For a fixed t = alpha / beta the posterior mean m = (F^T F + t I)^-1 F^T y does not depend on
    beta, and the evidence is d/2 log t - 1/2 sum log(t + sigma_i) + n/2 log beta - beta/2 E(t)
    - n/2 log 2 pi with E(t) = |F m - y|^2 + t |m|^2 = res + sum x_i t / (t + sigma_i); so
    beta = n / E(t). Zero eigenvalues cancel between the first two terms and are left out.
    sigma: the nonzero eigenvalues / the largest; x2: squared projections of y on their left
    singular vectors; res: |y|^2 minus their sum (the part of y outside the span of F).
    """
    ratio = sigma / np.asarray(s, dtype=np.float64)[..., None]
    e = res + (x2 / (1.0 + ratio)).sum(-1)
    return (-0.5 * np.log1p(ratio).sum(-1) - n / 2 * np.log(e / n) - n / 2 * (1 + np.log(2 * np.pi))) / n


def _golden_max(f: Callable[[float], float], lo: float, hi: float, steps: int = 60) -> float:
    """The maximum of a function unimodal on [lo, hi], by golden-section search."""
    g = (np.sqrt(5.0) - 1) / 2
    a, b = lo + (1 - g) * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(steps):
        if fa >= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - g) * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return max(fa, fb)


def _max_evidence(sigma: np.ndarray, x2: np.ndarray, res: float, y2: float, n: int) -> float:
    """The maximum over alpha, beta > 0 of the log evidence / n of one target.

    The profile over u = log10(alpha / beta / sigma_max) is scanned on T_GRID points of
    LOG_T_SPAN, every local maximum of the scan refined by golden-section search between its
    neighbours, and the best compared with the limit alpha / beta -> infinity (the prior pins the
    weights at 0: F carries nothing of y), where the evidence tends to that of y ~ N(0, |y|^2/n I).
    Working in units of the largest eigenvalue makes a global scale of F exactly irrelevant.
    """
    limit = (-n / 2 * np.log(y2 / n) - n / 2 * (1 + np.log(2 * np.pi))) / n
    if len(sigma) == 0:
        return float(limit)
    u = np.linspace(*LOG_T_SPAN, T_GRID)
    p = _profile(10.0**u, sigma, x2, res, n)
    best = float(limit)
    padded = np.concatenate([[-np.inf], p, [-np.inf]])
    for i in np.flatnonzero((p >= padded[:-2]) & (p >= padded[2:])).tolist():  # the ends included
        lo, hi = float(u[max(i - 1, 0)]), float(u[min(i + 1, len(u) - 1)])
        top = _golden_max(lambda v: float(_profile(10.0**v, sigma, x2, res, n)), lo, hi)
        best = max(best, top, float(p[i]))
    return best


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of features (n, d) for integer labels (n,): the mean over classes of the log evidence
    / n of y_k = [label == k], maximised over the prior precision alpha and noise precision beta.

    One SVD of the features; per class, a one-dimensional search over alpha / beta with beta
    optimal for each ratio (`_max_evidence`), so the result is the global maximum whatever the
    feature scale, not the fixed point the paper's iteration reaches from alpha = beta = 1.

    Degenerate inputs: singular values below max(n, d) x machine epsilon x the largest count as 0
    (duplicate rows, constant or collinear features); with n <= d every label column lies in the
    span of F and the maximum stays finite as alpha / beta -> 0, unless F has rank below n
    (duplicate rows): then the evidence grows without bound there and the value at the lower end
    of LOG_T_SPAN is returned. All-zero features, or a target F carries nothing of, give the
    limit alpha / beta -> infinity. One class gives the evidence of a constant column.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    n, d = f.shape
    if n != len(y) or n < 2:
        raise ValueError(f"logme needs n >= 2 features with one label each, got {f.shape} and {y.shape}")
    u, s, _ = np.linalg.svd(f, full_matrices=False)  # u: (n, k), k = min(n, d)
    keep = s > (s[0] if len(s) else 0.0) * max(n, d) * np.finfo(np.float64).eps
    u, s = u[:, keep], s[keep]
    sigma = (s / s[0]) ** 2 if len(s) else s  # eigenvalues of F^T F / the largest
    out = []
    for c in np.unique(y):
        yc = (y == c).astype(np.float64)
        x = u.T @ yc
        y2 = float(yc @ yc)
        out.append(_max_evidence(sigma, x**2, max(y2 - float(x @ x), 0.0), y2, n))
    return float(np.mean(out))


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)  # constant dimensions stay 0
    return [(a - mu) / sd for a in (train, *others)]


def linear_probe(train_f: np.ndarray, train_y: np.ndarray, val_f: np.ndarray, val_y: np.ndarray) -> float:
    """Validation accuracy of ridge regression onto one-hot labels (argmax), with an intercept.

    The ridge strength is the one of RIDGE_GRID (times the mean eigenvalue of the Gram matrix)
    with the least generalised cross-validation error on train; strengths within a relative TIE
    of that least error count as equal and the strongest of them is taken, so rounding on another
    host cannot flip the choice between two near-equal ones. No randomness, no iteration.

    Degenerate inputs: constant features are left at 0 after standardising; with n <= d or
    duplicate rows the fit interpolates at the weakest strengths and GCV (whose denominator
    n - dof stays positive) picks a stronger one; one class in train predicts that class; one
    class in val is scored like any other (the accuracy on it).
    """
    tr, va = _standardise(np.asarray(train_f, np.float64), np.asarray(val_f, np.float64))
    classes, yi = np.unique(train_y, return_inverse=True)
    t = np.eye(len(classes))[yi]
    t_mean = t.mean(0)
    u, s, vt = np.linalg.svd(tr, full_matrices=False)
    uty = u.T @ (t - t_mean)
    s2 = s**2
    scale = float(s2.sum() / max(tr.shape[1], 1)) or 1.0
    n = len(tr)
    lams = np.array(RIDGE_GRID) * scale
    gcv = np.empty(len(lams))
    for i, lam in enumerate(lams):
        shrink = s2 / (s2 + lam)
        fitted = u @ (shrink[:, None] * uty)
        gcv[i] = float(((t - t_mean - fitted) ** 2).sum()) / max(n - float(shrink.sum()), 1e-9) ** 2
    lam = lams[np.flatnonzero(gcv <= gcv.min() * (1 + TIE))[-1]]
    w = vt.T @ ((s / (s2 + lam))[:, None] * uty)
    pred = classes[np.argmax(va @ w + t_mean, axis=1)]
    return float((pred == np.asarray(val_y)).mean())


def knn_accuracy(train_f: np.ndarray, train_y: np.ndarray, val_f: np.ndarray, val_y: np.ndarray, k: int = 10) -> float:
    """Validation accuracy of a k-nearest-neighbour majority vote on cosine similarity.

    Ties go to the class whose neighbours have the larger summed similarity (the tie-break
    term is below half a vote, so it never overrules a majority). Similarities are rounded to
    12 decimals first, so equal ones are equal on every host: among equally similar training
    images the earlier ones are the neighbours, and a vote still tied goes to the smaller label.

    Degenerate inputs: an all-zero feature row has similarity 0 to everything; duplicate rows
    are separate neighbours; k is capped at the train size; one class in val is scored as any.
    """

    def unit(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, np.float64)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    tr, va = unit(train_f), unit(val_f)
    classes, yi = np.unique(train_y, return_inverse=True)
    k = max(1, min(k, len(tr)))
    correct = 0
    chunk = max(1, min(1024, KNN_BYTES // (24 * len(tr))))  # similarities, their rounding and order: 24 B each
    for start in range(0, len(va), chunk):  # (chunk, n_train) similarities at a time
        sim = np.round(va[start : start + chunk] @ tr.T, 12)
        nn = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        near = np.take_along_axis(sim, nn, axis=1)
        votes = np.zeros((len(sim), len(classes)))
        rows = np.repeat(np.arange(len(sim)), k)
        np.add.at(votes, (rows, yi[nn].ravel()), 1.0 + near.ravel() / (2 * (k + 1)))
        correct += int((classes[votes.argmax(1)] == np.asarray(val_y)[start : start + chunk]).sum())
    return correct / len(va)


def scores(
    train_f: np.ndarray, train_y: np.ndarray, val_f: np.ndarray, val_y: np.ndarray, k: int = 10
) -> dict[str, float]:
    """All three scores of one entry's features."""
    return {
        "logme": logme(train_f, train_y),
        "probe": linear_probe(train_f, train_y, val_f, val_y),
        "knn": knn_accuracy(train_f, train_y, val_f, val_y, k),
    }


# ---------------------------------------------------------------------------
# features of a frozen backbone


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its classifier head (`model.info.head`) replaced by the identity, in eval mode."""
    for name in info_of(model).head:
        model.set_submodule(name, torch.nn.Identity())
    return model.eval()


def embed(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int | None = None,
    amp: bool = True,
    channels_last: bool | None = None,
) -> np.ndarray:
    """Backbone features (N, D) float32 of uint8 images (N, C, H, W), at the model's size and normalisation.

    Batches of `batch_size` images, or (None) as many as fit the memory budget (`search.infer`);
    channels_last by default on CUDA and on the CPU (measured faster there for convolutions, the same
    features to float rounding). Freed CPU batches are reused, not handed back to the system.
    """
    info = info_of(model)
    cuda = device.type == "cuda"
    layout = CHANNELS_LAST if channels_last is None else channels_last
    model.to(device)
    if layout:
        model.to(memory_format=torch.channels_last)
    out = np.empty((len(x), 0), np.float32)
    done = 0
    with host_memory(device):
        for f in infer.forward_batches(
            model,
            x,
            info.resolution,
            mean=info.mean,
            std=info.std,
            device=device,
            amp_dtype=torch.bfloat16 if cuda and amp else None,
            channels_last=layout,
            batch=batch_size,
        ):
            f = f.float().flatten(1).cpu()
            if out.shape[1] != f.shape[1]:
                out = np.empty((len(x), f.shape[1]), np.float32)  # filled batch by batch: no list, no concatenation
            out[done : done + len(f)] = f.numpy()
            done += len(f)
    return out


def sample(split: Any, max_images: int, seed: int) -> Any:
    """A stratified, seeded sample of at most `max_images` of a split (the whole split if smaller)."""
    if len(split) <= max_images:
        return split
    _, idx = stratified_split(split.y, max_images / len(split), seed)
    return split.take(idx)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", text)[:80]


def _images_digest(split: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(tuple(split.x.shape)).encode())
    h.update(np.ascontiguousarray(split.x.numpy()).data)
    h.update(np.ascontiguousarray(split.y.numpy()).data)
    return h.hexdigest()


def cache_path(root: Path, dataset: str, entry: Any, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    folder = root / "rank-features" / _safe(dataset.replace("folder:", "folder-"))
    return folder / f"{_safe(entry.label)}-{digest}.npz"


def _weights_key(entry: Any) -> dict[str, Any]:
    path = weights.fetch(entry)  # the same cache and the same errors as training
    st = path.stat()
    return {"file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as f:  # readers never see half a file
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stubs match **arrays against allow_pickle


def entry_features(
    entry: Any,
    data: Any,
    splits: dict[str, Any],
    *,
    cfg: RankCfg,
    channel_reduce: str,
    device: torch.device,
    amp: bool,
    cache_root: Path,
    seed: int,
) -> tuple[dict[str, np.ndarray], bool, Path]:
    """{split: features} of one pretrained entry, from the cache or computed; (features, cached, path)."""
    res = input_resolution(entry, data.resolution)
    key = {
        "v": CACHE_VERSION,
        "entry": entry.attrs(),
        "model": entry.model,
        "resolution": res,
        "channel_reduce": channel_reduce,
        "in_chans": data.in_chans,
        "dataset": data.name,
        "seed": seed,
        "weights": _weights_key(entry),
        "splits": {n: _images_digest(s) for n, s in splits.items()},
    }
    path = cache_path(cache_root, data.name, entry, key)
    if path.is_file():
        try:
            with np.load(path) as z:
                return {n: z[n] for n in splits}, True, path
        except (OSError, ValueError, KeyError) as e:  # a damaged file is computed again
            log.warning("feature cache %s unreadable (%s); computing the features again", path, e)
    model = backbone(
        build_model(
            entry, num_classes=data.num_classes, in_chans=data.in_chans, resolution=res, channel_reduce=channel_reduce
        )
    )
    feats = {n: embed(model, s.x, device=device, batch_size=cfg.batch_size, amp=amp) for n, s in splits.items()}
    try:
        _write_npz(path, **feats)
    except OSError as e:  # a read-only data root costs only the recomputation
        log.warning("feature cache not written to %s: %s", path, e)
    return feats, False, path


# ---------------------------------------------------------------------------
# the pool


def rank_pool(
    recipe: Recipe, data: Data | None = None, *, on_row: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Score every pool entry; rows sorted by `rank.by` (best first), then unrankable entries.

    Each row: entry, status (`ok`, `scratch` or `failed`), the three scores, feature dimension,
    seconds, whether the features came from the cache, and a note (why an entry failed).
    A failure of one entry (missing weights, a model that cannot take the data) is its row's
    note; the others are still ranked.
    """
    cfg = recipe.rank
    seed = recipe.study.seed
    data = data or load_data(recipe.data, seed)
    splits = {
        "train": sample(data.train, cfg.max_images, seed + 7),
        "val": sample(data.val, cfg.max_val_images, seed + 8),
    }
    device = resolve_device(recipe.hardware.device)
    root = data_root(recipe.data)
    rows = []
    for entry in parse_pool(recipe.pool):
        row: dict[str, Any] = {
            "entry": entry.label,
            "source": entry.source,
            "status": "ok",
            **dict.fromkeys(SCORES),
            "dim": None,
            "seconds": None,
            "cached": False,
            "note": "",
        }
        if not entry.pretrained:
            row.update(status="scratch", note="scratch: not rankable")
        else:
            start = time.perf_counter()
            try:
                feats, cached, _ = entry_features(
                    entry,
                    data,
                    splits,
                    cfg=cfg,
                    channel_reduce=recipe.train.channel_reduce,
                    device=device,
                    amp=recipe.hardware.amp,
                    cache_root=root,
                    seed=seed,
                )
                ftr, fva = feats["train"], feats["val"]
                if not (np.isfinite(ftr).all() and np.isfinite(fva).all()):
                    raise ValueError("the backbone gave non-finite features")
                row.update(
                    scores(ftr, splits["train"].y.numpy(), fva, splits["val"].y.numpy(), cfg.knn_k),
                    dim=int(ftr.shape[1]),
                    cached=cached,
                )
            except SearchError as e:
                row.update(status="failed", note=str(e))
            except (RuntimeError, ValueError, np.linalg.LinAlgError) as e:
                row.update(status="failed", note=f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
            row["seconds"] = time.perf_counter() - start
        rows.append(row)
        if on_row:
            on_row(row)
    return sort_rows(rows, cfg.by)


def sort_rows(rows: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """Ranked rows first (best `by` score first; ties keep pool order), then the unrankable ones."""
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -r[by])
    return ok + [r for r in rows if r["status"] != "ok"]


def _num(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]], by: str, n_train: int | None = None, n_val: int | None = None) -> str:
    """The ranked rows as text, under 100 columns."""
    head = f"{'#':>2}  {'pool entry':<30} {'logme':>8} {'probe':>6} {'knn':>6} {'dim':>5} {'seconds':>8}  note"
    lines = [head, "-" * len(head)]
    place = 0
    for r in rows:
        place += r["status"] == "ok"
        note = "cached" if r["cached"] else r["note"]
        line = (
            f"{place if r['status'] == 'ok' else '-':>2}  {r['entry'][:30]:<30} {_num(r['logme'], '.4f'):>8} "
            f"{_num(r['probe'], '.3f'):>6} {_num(r['knn'], '.3f'):>6} {_num(r['dim'], 'd'):>5} "
            f"{_num(r['seconds'], '.1f'):>8}  {note}"
        )
        lines.append(line if len(line) <= WIDTH else line[: WIDTH - 3] + "...")
    sizes = f" on {n_train} train / {n_val} val images" if n_train is not None else ""
    lines += [
        f"ranked by {by}{sizes}; higher is better for all three:",
        "  logme: evidence per image, probe: ridge probe val accuracy, knn: cosine kNN val accuracy",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# the decision a study takes from the ranking


def decide(rows: list[dict[str, Any]], keep: int | None, by: str) -> dict[str, Any]:
    """Which entries a study keeps, in which order, and why.

    Ranked entries are kept best first up to `keep` (all without `keep`); entries that could not
    be ranked (scratch, or a failed rank) are always kept, after the ranked ones, with the reason.
    """
    ranked = [r["entry"] for r in rows if r["status"] == "ok"]
    unranked = [r["entry"] for r in rows if r["status"] != "ok"]
    kept = ranked[:keep] if keep else ranked
    dropped = ranked[len(kept) :]
    reasons = {r["entry"]: r["note"] for r in rows if r["status"] != "ok"}
    return {"by": by, "keep": keep, "order": kept + unranked, "dropped": dropped, "unranked": reasons}


def decision_text(decision: dict[str, Any]) -> str:
    lines = [
        f"rank: keeping {', '.join(decision['order'])}"
        + (f"; dropped {', '.join(decision['dropped'])}" if decision["dropped"] else "")
    ]
    for label, why in decision["unranked"].items():
        lines.append(f"rank: {label} kept unranked ({why})")
    return "\n".join(lines)
