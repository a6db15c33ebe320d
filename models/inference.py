"""Applying a trained ``model(y, op)`` to a stack of slices: what reconstruction and validation share."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from operators.linear import LinearOperator

__all__ = ["apply_slices", "reconstruct_slices"]


@torch.no_grad()
def apply_slices(
    model: nn.Module, y: torch.Tensor, op: LinearOperator, batch: int = 8, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """``model(y, op)`` on a stack of slices ``(S, *op.out_shape)``, ``batch`` at a time; on the CPU.

    Returns the model's own output ``(S, *op.in_shape)``: complex for MRI operators, real for CT.
    """
    op = op.to(device) if torch.device(device).type != "cpu" else op
    parts = [model(y[start : start + batch].to(device), op).cpu() for start in range(0, y.shape[0], batch)]
    return torch.cat(parts)


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
    return apply_slices(model, y, op, batch, device).abs().float().numpy()
