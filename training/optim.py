"""The optimiser every training loop builds from ``TrainConfig``, and its learning-rate schedule (the job and the benchmarks)."""

from __future__ import annotations

import torch
from torch import nn

from training.config import TrainConfig


def make_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the paper), or AdamW with ``train.weight_decay`` on the weight matrices and kernels.

    Only tensors of two or more dimensions decay: the convolutions before a BatchNorm are scale-free,
    so decay only holds their norm (and with it Adam's effective step) in check, while shrinking
    biases and norm scales would change what the model computes.
    """
    if not train.weight_decay:
        return torch.optim.Adam(model.parameters(), lr=train.lr)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": train.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train.lr)


def warmup_factor(train: TrainConfig, images: int) -> float:
    """The share of ``train.lr`` after ``images`` training images (counting the current step's):
    a linear ramp over ``train.warmup_images``, then 1."""
    if not train.warmup_images:
        return 1.0
    return min(1.0, max(images, 1) / train.warmup_images)


def lr_at(train: TrainConfig, epoch: int, images: int | None = None) -> float:
    """Adam's step schedule of the paper: x lr_decay once lr_decay_at of the epochs have passed; with
    ``images`` (trained so far, all ranks, this step's included) also ``train.warmup_images``' ramp."""
    lr = train.lr * (train.lr_decay if epoch >= int(train.lr_decay_at * train.epochs) else 1.0)
    return lr * (warmup_factor(train, images) if images is not None else 1.0)
