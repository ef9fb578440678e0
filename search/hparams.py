"""Training hyperparameters: the recipe's `train` section, which `fit` consumes and the search
space samples (`search.space`), with units in the comments."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from search.section import Section


class TrainCfg(Section):
    """Training defaults; sampled hyperparameters replace these per trial."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)  # per batch, not scaled with batch size
    weight_decay: float = Field(5e-4, ge=0)  # not applied to norm and bias parameters
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    nesterov: bool = True  # sgd only
    schedule: Literal["cosine", "step", "plateau", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    step_size: int = Field(10, ge=1)  # step schedule: epochs between decays
    gamma: float = Field(0.1, gt=0, le=1)  # step / plateau decay factor
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine floor as a fraction of lr
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)  # max global gradient norm
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    mix_prob: float = Field(1.0, ge=0, le=1)
    mix_off_epochs: int = Field(0, ge=0)  # last epochs without mixup/cutmix
    aug_scale: float = Field(1.0, ge=0, le=3)  # strength of the dataset's augmentations (1 = as set)
    loss: Literal["ce", "focal"] = "ce"
    focal_gamma: float = Field(2.0, ge=0)
    class_weights: bool = False  # inverse-frequency weighted loss
    balanced_sampling: bool = False  # inverse-frequency weighted batch sampling
    finetune: Literal["full", "linear_probe", "lp_ft"] = "full"
    lp_epochs: int = Field(1, ge=0)  # lp_ft: epochs with the backbone frozen
    backbone_lr_mult: float = Field(1.0, gt=0)
    patience: int | None = Field(None, ge=1)  # early stopping on the monitor metric
    channel_reduce: Literal["mean", "sum"] = "mean"  # 3 -> 1 channel stem weights
    deterministic: bool = False
