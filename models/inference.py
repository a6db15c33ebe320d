"""Applying a trained ``model(y, op)`` to a stack of slices: what reconstruction and validation share."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from operators.linear import LinearOperator

__all__ = ["reconstruct_slices"]


@torch.no_grad()
def reconstruct_slices(
    model: nn.Module, y: torch.Tensor, op: LinearOperator, batch: int = 8, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Magnitude images of measurements with ``model(y, op)``, ``batch`` slices at a time.

    Args:
        model: a network taking ``(measurements, operator)``, already on ``device`` and in eval mode.
        y: measurements ``(S, *op.out_shape)`` (complex k-space or a real sinogram).
        op: the per-slice operator.
        batch: slices per forward pass (bounds the activation memory).
        device: where to run; ``y`` and ``op`` are moved there.

    Returns:
        float32 ``(S, *op.in_shape)`` on the CPU: ``|x|``, as every reconstruction is stored.
    """
    op = op.to(device) if torch.device(device).type != "cpu" else op
    out = [
        model(y[start : start + batch].to(device), op).abs().float().cpu().numpy()
        for start in range(0, y.shape[0], batch)
    ]
    return np.concatenate(out).astype(np.float32, copy=False)
