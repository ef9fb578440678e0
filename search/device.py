"""Which device a run uses: the recipe's `hardware.device` resolved against what this machine has."""

from __future__ import annotations

import torch

from search.errors import SearchError


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda when visible, else cpu; a named CUDA device that is not there is a user error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SearchError(f"hardware.device: '{device}' but no CUDA device is visible; use device: auto or cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SearchError(f"hardware.device: '{device}' but MPS is not available; use device: auto or cpu")
    return dev
