"""Where pretrained weights come from, and what happens when they are missing.

Weights go through the libraries' own caches so that a cache filled on one
machine works on another:

- torchvision: the weight enum's URL, cached as `$TORCH_HOME/hub/checkpoints/<file>`;
- timm: the Hugging Face cache (`$HF_HUB_CACHE`, `models--timm--<name>/snapshots/...`),
  or, for the few timm weights hosted elsewhere, the torch hub directory.

`python -m search prefetch RECIPE` fills both on a connected machine. When a
file is missing and the network is off (no route within a few seconds, or
`HF_HUB_OFFLINE=1` / `SEARCH_OFFLINE=1`), loading fails with one line naming
the model, the file, the cache and the prefetch command; `missing` gives the
checklist entry (path, URL, size) that `prefetch` and `validate` print. Nothing
ever falls back to random weights.

Caches are copied between machines, so a cached file is data, never code:
every one is read with `torch.load(weights_only=True)` or as safetensors (never
through torchvision's own loader, which unpickles anything). A file whose
unpickling would import or call something else is refused, naming the file.
A trial reads its weights file once: timm builds from the tensors read here,
never from the path, so the bytes checked are the bytes used.

A pool entry may name a local file instead (`{model: resnet_18, weights: FILE, source: ssl}`):
it is read the same safe way, its state dict picked as timm picks one (a `retrain` model.pt
or an `export` model.safetensors as they are), its sha256 recorded on every trial
(`file_sha256`); a missing one is listed by `validate` and `prefetch` as a local file.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import pickle
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from search.archs import BUILTINS
from search.errors import SearchError
from search.pool import PoolEntry
from search.reach import Missing, network_up, offline
from search.text import command

HF_FILES = ("model.safetensors", "pytorch_model.bin")


def torch_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_cache() -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (read now, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home) / "hub"


def _torchvision_name(entry: PoolEntry) -> str | None:
    """The torchvision weight enum member of a built-in's weights (the registry's), None where timm has them."""
    if not entry.builtin or entry.tag is None:
        return None
    return BUILTINS[entry.arch].weights[entry.tag].torchvision


def torchvision_weights(entry: PoolEntry) -> Any:
    from torchvision.models import get_weight

    return get_weight(_torchvision_name(entry))


def timm_cfg(entry: PoolEntry) -> Any:
    import timm

    cfg = timm.models.get_pretrained_cfg(entry.timm_name, allow_unregistered=False)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise SearchError(
            f"{entry.label}: timm lists no pretrained weights for '{entry.timm_name}'; "
            "pick a tag from `timm.list_pretrained()` or set pretrained: false"
        )
    return cfg


LOCAL_FIX = "copy the file there, or correct the pool entry's weights: path"


def _location(entry: PoolEntry) -> tuple[str, str, Path, str]:
    """(kind 'url'|'hf'|'file', URL or repo id, expected file, cache description) of an entry's weights."""
    if entry.weights:
        return "file", entry.weights, Path(entry.weights), "a local file"
    if _torchvision_name(entry):
        url = torchvision_weights(entry).url
        return "url", url, torch_checkpoints() / Path(urlparse(url).path).name, "$TORCH_HOME/hub/checkpoints"
    cfg = timm_cfg(entry)
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id.split("@")[0]
        folder = hf_cache() / f"models--{repo.replace('/', '--')}"
        return "hf", repo, folder / "snapshots" / "<revision>" / HF_FILES[0], "$HF_HUB_CACHE"
    return "url", cfg.url, torch_checkpoints() / Path(urlparse(cfg.url).path).name, "$TORCH_HOME/hub/checkpoints"


def cached_file(entry: PoolEntry) -> Path | None:
    """The weight file in its cache, or None."""
    kind, where, path, _ = _location(entry)
    if kind in ("url", "file"):
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    for name in HF_FILES:
        found = try_to_load_from_cache(where, name, cache_dir=hf_cache())
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def weights_name(entry: PoolEntry) -> str:
    if entry.weights:
        return entry.weights
    return f"{entry.arch}.{entry.tag}" if _torchvision_name(entry) else entry.timm_name


def missing_error(entry: PoolEntry, why: str) -> SearchError:
    kind, _, path, cache = _location(entry)
    if kind == "file":
        return SearchError(f"{entry.label}: weights file {path} is not on this machine; {LOCAL_FIX}")
    return SearchError(
        f"{entry.label}: pretrained weights {weights_name(entry)} are not cached ({why}): "
        f"expected {path} (cache {cache}); on a machine with internet run "
        f"`{command('prefetch RECIPE')}` and copy the cache over, or set pretrained: false"
    )


def fetch(entry: PoolEntry) -> Path:
    """Download an entry's weights into their cache (no-op when cached)."""
    found = cached_file(entry)
    if found:
        return found
    kind, where, path, _ = _location(entry)
    if kind == "file":
        raise missing_error(entry, "not found")
    host = "huggingface.co" if kind == "hf" else urlparse(where).hostname or ""
    if offline():
        raise missing_error(entry, "offline mode is on")
    if not network_up(host):
        raise missing_error(entry, f"no network: {host} unreachable")
    if kind == "hf":
        from huggingface_hub import hf_hub_download

        errors = []
        for name in HF_FILES:
            try:
                return Path(hf_hub_download(where, name, cache_dir=hf_cache()))
            except Exception as e:  # noqa: BLE001 - try the next file name, then report all
                errors.append(f"{name}: {e}")
        raise missing_error(entry, "download failed: " + "; ".join(errors))

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(where, str(path), progress=True)  # writes a temp file, then renames
    return path


def missing(entry: PoolEntry) -> Missing | None:
    """The checklist entry of an entry's weights when they are not cached, else None."""
    if cached_file(entry) is not None:
        return None
    kind, where, path, _ = _location(entry)
    if kind == "file":
        return Missing(f"{entry.label} weights", path, "a local file (nothing to download)", None, LOCAL_FIX)
    if kind == "hf":
        return Missing(
            f"{entry.label} weights",
            path,
            f"https://huggingface.co/{where}/resolve/main/{HF_FILES[0]}",
            _timm_bytes(entry),
            "<revision>: any snapshot directory; pytorch_model.bin is accepted too",
        )
    size = None
    if _torchvision_name(entry):
        mb = torchvision_weights(entry).meta.get("_file_size")  # torchvision's own record, in MB
        size = int(mb * 2**20) if mb else None
    return Missing(f"{entry.label} weights", path, where, size)


def _timm_bytes(entry: PoolEntry) -> int | None:
    """About how large a timm checkpoint is: 4 bytes per parameter, counted without allocating any."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(entry.timm_name, pretrained=False)
    except Exception:  # noqa: BLE001 - a size estimate is not worth failing the checklist over
        return None
    return 4 * sum(p.numel() for p in model.parameters())


def safe_load(path: Path, mmap: bool = False, fix: str | None = None) -> Any:
    """A weight file's contents without running code: safetensors, or torch.load(weights_only=True).

    `mmap` reads the pickle but maps the tensors (a cheap check of a large file); `fix` replaces
    the advice of the errors (a cached file is fetched again, a local file is the user's).
    """
    fix = fix or f"delete it and run `{command('prefetch RECIPE')}` again"
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if path.suffix == ".npz":  # a few timm weights (Google's ViTs): arrays only, no pickles allowed
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        # timm's training checkpoints keep their argparse.Namespace; timm allows it too.
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not mmap or "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # the old, unmappable format
    except (pickle.UnpicklingError, ValueError) as e:  # ValueError: an .npz holding pickled objects
        code = re.search(
            r"unsupported (?:global:? )?GLOBAL (\S+)|(Object arrays cannot be loaded)", str(e), re.IGNORECASE
        )
        if code:
            what = f"it would call {code.group(1)}" if code.group(1) else "it holds pickled objects"
            raise SearchError(
                f"weights file {path} needs code to be unpickled, and is refused ({what}); it is "
                f"not a plain checkpoint: {fix}"
            ) from None
        raise _unreadable(path, e, fix) from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise _unreadable(path, e, fix) from None


def _unreadable(path: Path, e: Exception, fix: str) -> SearchError:
    # torch's weights_only errors are paragraphs; the unpickler's own words follow this mark.
    text = str(e).split("WeightsUnpickler error:")[-1]
    why = " ".join(text.split("Check the documentation")[0].split())[:120]
    return SearchError(f"weights file {path} cannot be read ({type(e).__name__}: {why}); {fix}")


def _fix(entry: PoolEntry) -> str | None:
    """The advice of a bad file's error: None (fetch it again) for a cache, the user's own file otherwise."""
    if not entry.weights:
        return None
    return f"check that it is a plain state dict (safetensors, or torch.save of tensors) at {entry.weights}"


def check(entry: PoolEntry) -> Path:
    """Fetch an entry's weights if needed and refuse a cached file that is not plain data."""
    path = fetch(entry)
    safe_load(path, mmap=True, fix=_fix(entry))
    return path


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The file's sha256 (hex), read once per process while its size and mtime stay the same."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def timm_state(checkpoint: Any, path: Path) -> dict[str, Any]:
    """The state dict in a timm checkpoint `path` held, picked as timm's own file loader picks it
    (timm.models.load_state_dict: EMA weights first, then 'state_dict', then 'model'; the
    DataParallel and torch.compile prefixes dropped)."""
    import timm

    if not isinstance(checkpoint, dict):
        raise SearchError(
            f"weights file {path} holds a {type(checkpoint).__name__}, not a state dict; delete it and run "
            f"`{command('prefetch RECIPE')}` again"
        )
    key = next((k for k in ("state_dict_ema", "model_ema") if checkpoint.get(k) is not None), None)
    # "model" holds the state dict in timm's files; in a `retrain` model.pt it is the build record.
    key = key or next((k for k in ("state_dict", "model") if isinstance(checkpoint.get(k), dict)), None)
    return timm.models.clean_state_dict(checkpoint[key] if key else checkpoint)


def source_state(entry: PoolEntry) -> dict[str, Any]:
    """The pretrained state dict as published (3 channels, original head and size).

    The file is read once, by `safe_load`: timm gets the tensors read there (its pretrained
    config's `state_dict`), never the path, so what was checked is what is used, whatever
    happens to the file meanwhile. timm still adapts them as it does a file of its own (the
    family's checkpoint filter, the stem's channels, the classifier).
    """
    path = fetch(entry)
    if entry.weights:  # the user's own tensors, as the file holds them: build_model morphs them
        return timm_state(safe_load(path, fix=_fix(entry)), path)
    if _torchvision_name(entry):
        return safe_load(path)
    import timm

    state = timm_state(safe_load(path), path)
    # source "": the registry's default, where an in-memory state dict comes before any file, URL or hub.
    overlay = {"state_dict": state, "source": ""}
    model = timm.create_model(entry.timm_name, pretrained=True, pretrained_cfg_overlay=overlay)
    with torch.no_grad():
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
