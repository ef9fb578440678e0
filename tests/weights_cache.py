"""Build small pretrained checkpoints in the libraries' real cache layouts."""

from __future__ import annotations

from pathlib import Path

import torch


def torchvision_checkpoint(torch_home: Path, filename: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`$TORCH_HOME/hub/checkpoints/<filename>` holding the model's (random) state dict."""
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, folder / filename)
    return state


def hf_checkpoint(
    hf_cache: Path, repo_id: str, model: torch.nn.Module, revision: str = "0" * 40
) -> dict[str, torch.Tensor]:
    """`$HF_HUB_CACHE/models--org--name/snapshots/<rev>/model.safetensors` + `refs/main`."""
    from safetensors.torch import save_file

    repo = hf_cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(snap / "model.safetensors"))
    return state
