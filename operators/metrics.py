"""Image-quality metrics: PSNR, SSIM (2D and 3D), NMSE.

Conventions (those of fastMRI's evaluation, so numbers are comparable):

* inputs are real magnitude arrays (take ``abs`` of complex reconstructions first);
* ``data_range`` defaults to ``ref.max() - ref.min()`` of the reference;
* SSIM uses a uniform window of 7 pixels, K1 = 0.01, K2 = 0.03 and sample
  covariances, matching ``skimage.metrics.structural_similarity``; for a volume
  ``(D, H, W)`` :func:`ssim` averages 2D SSIM over slices, :func:`ssim3d` uses a
  7³ window.

All functions take numpy arrays or torch tensors and return Python floats.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from operators.errors import ShapeError

__all__ = ["psnr", "nmse", "ssim", "ssim3d", "score"]


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.is_complex():
        raise ShapeError("metrics take real magnitude images; found a complex array (take .abs() first)")
    return t.to(torch.float64)


def _pair(x: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_tensor(x), _as_tensor(ref)
    if a.shape != b.shape:
        raise ShapeError(
            f"image and reference must have the same shape; found {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return a, b


def _range(ref: torch.Tensor, data_range: float | None) -> float:
    return float(ref.max() - ref.min()) if data_range is None else float(data_range)


def psnr(
    x: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, data_range: float | None = None
) -> float:
    """Peak signal-to-noise ratio ``10 log10(range² / MSE)`` in dB."""
    a, b = _pair(x, ref)
    mse = float(torch.mean((a - b) ** 2))
    if mse == 0:
        return float("inf")
    return 10.0 * float(np.log10(_range(b, data_range) ** 2 / mse))


def nmse(x: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> float:
    """Normalised mean squared error ``‖x - ref‖² / ‖ref‖²``."""
    a, b = _pair(x, ref)
    return float(torch.sum((a - b) ** 2) / torch.sum(b**2))


def _ssim_map(a: torch.Tensor, b: torch.Tensor, data_range: float, ndim: int, win: int) -> torch.Tensor:
    """Mean SSIM of each item of a batch ``(N, *spatial)`` with a uniform window of ``win`` pixels."""
    conv = F.avg_pool2d if ndim == 2 else F.avg_pool3d
    a, b = a.unsqueeze(1), b.unsqueeze(1)  # (N, 1, *spatial)
    n = win**ndim
    cov_norm = n / (n - 1)
    ux, uy = conv(a, win, 1), conv(b, win, 1)
    vx = cov_norm * (conv(a * a, win, 1) - ux * ux)
    vy = cov_norm * (conv(b * b, win, 1) - uy * uy)
    vxy = cov_norm * (conv(a * b, win, 1) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1)


def ssim(
    x: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    data_range: float | None = None,
    win: int = 7,
) -> float:
    """Structural similarity of a 2D image ``(H, W)``, or the mean over slices of a volume ``(D, H, W)``."""
    a, b = _pair(x, ref)
    if a.ndim not in (2, 3) or min(a.shape[-2:]) < win:
        raise ShapeError(f"ssim needs (H, W) or (D, H, W) with H, W >= {win}; found {tuple(a.shape)}")
    if a.ndim == 2:
        a, b = a[None], b[None]
    return float(_ssim_map(a, b, _range(b, data_range), 2, win).mean())


def ssim3d(
    x: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    data_range: float | None = None,
    win: int = 7,
) -> float:
    """Structural similarity of a volume ``(D, H, W)`` with a ``win³`` window."""
    a, b = _pair(x, ref)
    if a.ndim != 3 or min(a.shape) < win:
        raise ShapeError(f"ssim3d needs (D, H, W) with every size >= {win}; found {tuple(a.shape)}")
    return float(_ssim_map(a[None], b[None], _range(b, data_range), 3, win).mean())


def score(
    x: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, metrics: list[str]
) -> dict[str, float]:
    """``{metric: value}`` of ``x`` against ``ref`` for ``psnr``, ``ssim`` and ``nmse``; PSNR and SSIM
    use the reference's range."""
    data_range = _range(_as_tensor(ref), None)
    funcs = {"psnr": psnr, "ssim": ssim, "nmse": nmse}
    unknown = [m for m in metrics if m not in funcs]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; expected any of {sorted(funcs)}")
    return {
        m: funcs[m](x, ref) if m == "nmse" else funcs[m](x, ref, data_range=data_range)  # type: ignore[operator]
        for m in metrics
    }
