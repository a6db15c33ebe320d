"""Optimisers and learning-rate schedules for training by name (the train stage's settings).

``adam`` and ``adamw`` (decoupled weight decay); schedules step once per optimiser step:
``constant``, ``cosine`` (annealed to 0 over the run) and ``onecycle`` (warm-up to ``lr`` over the
first 30% of steps, then cosine annealing, as in Smith & Topin 2019).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["make_optimizer", "make_schedule"]


def make_optimizer(
    params: Iterable[torch.nn.Parameter], kind: str, lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``adam`` or ``adamw`` over ``params``."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'adamw'; found {kind!r}")


def make_schedule(
    optimizer: torch.optim.Optimizer, kind: str, lr: float, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule ``kind`` for a run of ``total_steps`` optimiser steps."""
    total_steps = max(1, int(total_steps))
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.3
        )
    raise ValueError(f"schedule must be 'constant', 'cosine' or 'onecycle'; found {kind!r}")
