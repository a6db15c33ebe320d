"""Low-resolution acquisition: area down-sampling by an integer factor, and bicubic up-sampling.

A voxel ``f`` times larger in-plane measures the mean of the ``f x f`` fine pixels it covers
(area sampling). For an image ``x`` of shape ``(..., H, W)`` with ``H = f h`` and ``W = f w``::

    (A x)[i, j] = 1/f² Σ_{a,b < f} x[f i + a, f j + b]          A: (..., H, W) -> (..., h, w)
    (Aᴴ y)[f i + a, f j + b] = y[i, j] / f²                      (replicate each pixel, divided by f²)

Rows of ``A`` have disjoint supports, so ``A Aᴴ = I / f²`` and the minimum-norm least-squares
solution is ``A⁺ y = Aᴴ (A Aᴴ)⁻¹ y = f² Aᴴ y``: nearest-neighbour up-sampling (each low-res
pixel replicated over its block). :meth:`Downsample.pseudo_inverse` returns that; it is exact
in the sense ``A A⁺ y = y``. ``‖A‖₂ = 1/f``.

The classical baseline for super-resolution is :func:`bicubic_upsample` (``torch`` bicubic,
``align_corners=False``: low-res pixel ``i`` sits at the centre of its block,
``f i + (f - 1)/2`` in fine pixels, as area sampling puts it). It is not linear in the
operator's sense of a matched pair, so it is a function, not an operator.

Example:
    >>> import torch
    >>> A = Downsample((6, 8), 2)
    >>> x = torch.arange(48.0).reshape(6, 8)
    >>> A(x)[0]
    tensor([ 4.5000,  6.5000,  8.5000, 10.5000])
    >>> A.pseudo_inverse(A(x)).shape, bicubic_upsample(A(x), 2).shape
    (torch.Size([6, 8]), torch.Size([6, 8]))
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from operators.errors import DTypeError, ParameterError, ShapeError
from operators.linear import LinearOperator

__all__ = ["Downsample", "bicubic_upsample"]


def _check_factor(factor: object, owner: str) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ParameterError(f"{owner}: factor must be a positive integer (2, 3, 4, ...); found {factor!r}")
    return factor


class Downsample(LinearOperator):
    """Area down-sampling ``(..., H, W) -> (..., H/f, W/f)``: the mean of each ``f x f`` block.

    Real in, real out (float32 or float64). Leading dimensions are batch dimensions.

    Args:
        image_shape: the high-resolution ``(H, W)``; both must be multiples of ``factor``.
        factor: the integer down-sampling factor ``f`` (1 is the identity).

    Raises:
        ShapeError: ``image_shape`` is not two positive sizes, or a size is not a multiple of ``factor``.
        ParameterError: ``factor`` is not a positive integer.
    """

    def __init__(self, image_shape: tuple[int, int], factor: int) -> None:
        f = _check_factor(factor, "Downsample")
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ShapeError(
                f"Downsample: image_shape must be two positive sizes (H, W); found {image_shape}"
            )
        if shape[0] % f or shape[1] % f:
            raise ShapeError(
                f"Downsample: image_shape {shape} is not divisible by factor {f} "
                f"(remainders {shape[0] % f} and {shape[1] % f}); crop or pad the image to multiples "
                f"of {f}, e.g. {(shape[0] - shape[0] % f, shape[1] - shape[1] % f)}"
            )
        super().__init__(shape, (shape[0] // f, shape[1] // f))
        self.factor = f

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factor
        h, w = self.out_shape
        blocks = x.reshape(*x.shape[:-2], h, f, w, f)  # (..., h, f, w, f)
        return blocks.mean(dim=(-3, -1))  # (..., h, w)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._replicate(y) / self.factor**2

    def _replicate(self, y: torch.Tensor) -> torch.Tensor:
        f = self.factor
        h, w = self.out_shape
        up = y[..., :, None, :, None].expand(*y.shape[:-2], h, f, w, f)  # (..., h, f, w, f)
        return up.reshape(*y.shape[:-2], h * f, w * f)  # (..., H, W)

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``A⁺ y = f² Aᴴ y``: each low-res pixel replicated over its ``f x f`` block (nearest neighbour)."""
        y = self._check(y, self.out_shape, False, "input of pseudo_inverse")
        return self._replicate(y)

    def __repr__(self) -> str:
        return f"Downsample(in_shape={self.in_shape}, out_shape={self.out_shape}, factor={self.factor})"


def bicubic_upsample(lowres: torch.Tensor, factor: int) -> torch.Tensor:
    """Bicubic up-sampling ``(..., h, w) -> (..., h f, w f)`` of real images (the classical baseline).

    ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``: Keys' cubic with
    ``a = -0.75``, edges replicated; low-res pixel centres sit at the centres of the fine blocks,
    matching :class:`Downsample`. Differentiable; keeps the dtype (float32 or float64).

    Raises:
        DTypeError: ``lowres`` is not a real floating tensor.
        ShapeError: ``lowres`` has fewer than two dimensions.
        ParameterError: ``factor`` is not a positive integer.
    """
    f = _check_factor(factor, "bicubic_upsample")
    if not isinstance(lowres, torch.Tensor) or not lowres.is_floating_point():
        found = lowres.dtype if isinstance(lowres, torch.Tensor) else type(lowres).__name__
        raise DTypeError(f"bicubic_upsample: lowres must be a real float32/float64 tensor; found {found}")
    if lowres.ndim < 2:
        raise ShapeError(f"bicubic_upsample: lowres must be (..., h, w); found shape {tuple(lowres.shape)}")
    lead, (h, w) = lowres.shape[:-2], lowres.shape[-2:]
    flat = lowres.reshape(-1, 1, h, w)  # (N, 1, h, w)
    up = F.interpolate(flat, scale_factor=f, mode="bicubic", align_corners=False)  # (N, 1, h f, w f)
    return up.reshape(*lead, h * f, w * f)  # (..., h f, w f)
