"""Applying a trained ``model(y, op)`` to a stack of slices: what reconstruction and validation share."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from operators.linear import LinearOperator

__all__ = ["SliceOperator", "apply_slices", "reconstruct_slices"]


SliceOperator = LinearOperator | Callable[[int, int], LinearOperator]


@torch.no_grad()
def apply_slices(
    model: nn.Module, y: torch.Tensor, op: SliceOperator, batch: int = 8, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """``model(y, op)`` on a stack of slices ``(S, *op.out_shape)``, ``batch`` at a time; on the CPU.

    ``op`` is one per-slice operator, or a function ``(start, stop) -> operator`` of slices
    ``start:stop`` of ``y`` (a scan whose slices differ, e.g. coil maps estimated per slice).
    Returns the model's own output ``(S, *op.in_shape)``: complex for MRI operators, real for CT.
    """
    on_gpu = torch.device(device).type != "cpu"
    parts = []
    for start in range(0, y.shape[0], batch):
        stop = min(y.shape[0], start + batch)
        part_op = op if isinstance(op, LinearOperator) else op(start, stop)
        part_op = part_op.to(device) if on_gpu else part_op
        parts.append(model(y[start:stop].to(device), part_op).cpu())
    return torch.cat(parts)


@torch.no_grad()
def reconstruct_slices(
    model: nn.Module, y: torch.Tensor, op: SliceOperator, batch: int = 8, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Magnitude images of measurements with ``model(y, op)``, ``batch`` slices at a time.

    Args:
        model: a network taking ``(measurements, operator)``, already on ``device`` and in eval mode.
        y: measurements ``(S, *op.out_shape)`` (complex k-space or a real sinogram).
        op: the per-slice operator, or a function of ``(start, stop)`` giving those slices' operator.
        batch: slices per forward pass (bounds the activation memory).
        device: where to run; ``y`` and ``op`` are moved there.

    Returns:
        float32 ``(S, *op.in_shape)`` on the CPU: ``|x|``, as every reconstruction is stored.
    """
    return apply_slices(model, y, op, batch, device).abs().float().numpy()
