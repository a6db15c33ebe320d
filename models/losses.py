"""Training losses between a reconstruction and a real reference image.

A reconstruction is complex (MRI) or real (CT); the reference is real. ``l1`` and ``mse`` compare
the images themselves (for complex output, the difference's modulus: phase errors count); ``ssim``
is ``1 − SSIM`` of the magnitude (MONAI's ``SSIMLoss``, 7×7 Gaussian window); ``l1+ssim`` adds the
two with both images scaled by the reference's maximum per item, so neither term depends on the
data's intensity scale.

Example:
    >>> import torch
    >>> loss = make_loss("l1+ssim")
    >>> float(loss(torch.ones(2, 16, 16), torch.ones(2, 16, 16)))
    0.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch

__all__ = ["LossName", "LOSSES", "make_loss"]

LossName = Literal["l1", "mse", "ssim", "l1+ssim"]
LOSSES: tuple[str, ...] = get_args(LossName)

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _l1(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (x - target.to(x.dtype)).abs().mean()


def _mse(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((x - target.to(x.dtype)).abs() ** 2).mean()


def _scaled(x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both divided by the reference's maximum per item; ``x`` as a magnitude ``(B, H, W)`` real."""
    scale = target.abs().flatten(1).amax(1).clamp_min(1e-12).reshape(-1, *([1] * (target.ndim - 1)))
    return x.abs() / scale, target / scale


def _ssim_loss() -> Loss:
    from monai.losses import SSIMLoss

    ssim = SSIMLoss(spatial_dims=2, data_range=1.0, win_size=7)

    def loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mag, ref = _scaled(x, target)  # (B, H, W) each
        return ssim(
            mag.flatten(0, -3).unsqueeze(1), ref.flatten(0, -3).unsqueeze(1).to(mag.dtype)
        )  # (N, 1, H, W)

    return loss


def make_loss(kind: str) -> Loss:
    """The loss called ``kind`` (one of :data:`LOSSES`): ``loss(x, target) -> scalar``."""
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}; found {kind!r}")
    if kind == "l1":
        return _l1
    if kind == "mse":
        return _mse
    ssim = _ssim_loss()
    if kind == "ssim":
        return ssim

    def l1_ssim(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mag, ref = _scaled(x, target)
        return (mag - ref).abs().mean() + ssim(x, target)

    return l1_ssim
