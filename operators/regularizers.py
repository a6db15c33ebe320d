"""Sparsifying transforms, shrinkage and proximal maps for regularised reconstruction.

Transforms (LinearOperators, batched over leading dimensions, real or complex):

* :class:`FiniteDifference` ``D``: forward differences over the trailing ``ndim`` axes with a
  Neumann (replicate) boundary, ``(D x)_d[i] = x[i + e_d] - x[i]`` and ``0`` on the last slice
  of axis ``d``. Its adjoint is the negative divergence, ``Dᴴ = -div``. Isotropic total
  variation is ``TV(x) = Σ_i sqrt(Σ_d |(D x)_d[i]|²)`` (:meth:`FiniteDifference.tv`).
* :class:`Wavelet2D` ``W``: an orthonormal multilevel 2D discrete wavelet transform with a
  periodic boundary, so ``Wᴴ W = W Wᴴ = I`` exactly and ``Wᴴ`` is the inverse transform.

Shrinkage (complex-safe: the magnitude shrinks, the phase stays):

* :func:`soft_threshold` ``S_t(x) = x · max(0, 1 - t / |x|)``, the prox of ``t‖·‖₁``;
* :func:`group_soft_threshold`, the prox of ``t‖·‖₂,₁`` (l2 over one axis, l1 over the rest);
* :func:`project_group_ball`, the projection onto ``{‖z_i‖₂ <= r}``, which is the prox of the
  convex conjugate of ``r‖·‖₂,₁`` (the dual step of PDHG for TV).

Penalties for :class:`operators.solvers.FISTA` follow the :class:`Penalty` protocol: calling
one gives ``R(x)`` per batch item and ``prox(x, step)`` gives
``argmin_z step·R(z) + ½‖z - x‖²``. Weights ``lam`` are a float or a tensor of the batch shape
(one weight per item).

Example:
    >>> import torch
    >>> W = Wavelet2D((16, 16), levels=2, wavelet="db4")
    >>> x = torch.randn(3, 16, 16, dtype=torch.float64)
    >>> bool(torch.allclose(W.adjoint(W.forward(x)), x))
    True
"""

from __future__ import annotations

import math
from typing import Literal, Protocol, get_args

import torch
import torch.nn.functional as F

from operators.errors import ParameterError, ShapeError
from operators.linear import LinearOperator

__all__ = [
    "FiniteDifference",
    "Wavelet2D",
    "WaveletName",
    "WAVELETS",
    "wavelet_filter",
    "max_wavelet_levels",
    "soft_threshold",
    "group_soft_threshold",
    "project_group_ball",
    "per_item",
    "Penalty",
    "NoPenalty",
    "L1Penalty",
    "WaveletL1",
]

WaveletName = Literal["haar", "db4"]
WAVELETS: tuple[str, ...] = get_args(WaveletName)

# Reconstruction low-pass filters of orthonormal Daubechies wavelets (PyWavelets' ``rec_lo``
# naming: "db4" has 4 vanishing moments and 8 taps). Sum = sqrt(2), sum of squares = 1.
_LOWPASS: dict[str, tuple[float, ...]] = {
    "haar": (1 / math.sqrt(2), 1 / math.sqrt(2)),
    "db4": (
        0.23037781330885523,
        0.7148465705525415,
        0.6308807679295904,
        -0.02798376941698385,
        -0.18703481171888114,
        0.030841381835986965,
        0.032883011666982945,
        -0.010597401784997278,
    ),
}


# -- per-item weights ------------------------------------------------------------------------------
def per_item(value: float | torch.Tensor, like: torch.Tensor, event_ndim: int) -> float | torch.Tensor:
    """``value`` shaped to broadcast per batch item against ``like`` ``(*batch, *event)``.

    A float is returned as is. A tensor must have the batch shape ``like.shape[:-event_ndim]``
    (or be a scalar tensor); it is viewed as ``(*batch, 1, ..., 1)``.
    """
    if not isinstance(value, torch.Tensor):
        return value
    batch = tuple(like.shape[: like.ndim - event_ndim])
    if value.ndim == 0:
        return value.to(like.device)
    if tuple(value.shape) != batch:
        raise ShapeError(
            f"a per-item weight must be a float or a tensor of the batch shape {batch}; "
            f"found shape {tuple(value.shape)}"
        )
    return value.to(like.device).reshape(*batch, *([1] * event_ndim))  # (*batch, 1, ..., 1)


# -- shrinkage -------------------------------------------------------------------------------------
def _shrink_by_magnitude(x: torch.Tensor, mag: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """``x · max(0, 1 - t / mag)``, without 0/0 (also in autograd's unused branch)."""
    keep = mag > threshold
    safe = torch.where(keep, mag, torch.ones_like(mag))
    return x * torch.where(keep, 1 - threshold / safe, torch.zeros_like(mag))


def soft_threshold(x: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Soft thresholding ``S_t(x) = x · max(0, 1 - t / |x|)``, elementwise.

    For real ``x`` this is ``sign(x) · max(|x| - t, 0)``; for complex ``x`` the magnitude
    shrinks by ``t`` and the phase is kept. It is the prox of ``t‖·‖₁``.

    Args:
        x: any shape, real or complex.
        threshold: ``t >= 0``, a float or a tensor broadcastable against ``x``.
    """
    return _shrink_by_magnitude(x, x.abs(), threshold)


def _group_norm(z: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.sqrt(torch.sum(z.real**2 + z.imag**2 if z.is_complex() else z**2, dim=dim, keepdim=True))


def group_soft_threshold(z: torch.Tensor, threshold: float | torch.Tensor, dim: int) -> torch.Tensor:
    """Shrink the l2 norm over axis ``dim`` by ``threshold``: the prox of ``t Σ_i ‖z_i‖₂``.

    With ``z`` a gradient field ``(..., d, H, W)`` and ``dim=-3`` this is the isotropic-TV
    shrinkage of each pixel's gradient vector.
    """
    return _shrink_by_magnitude(z, _group_norm(z, dim), threshold)


def project_group_ball(z: torch.Tensor, radius: float | torch.Tensor, dim: int | None) -> torch.Tensor:
    """Project each group of ``z`` onto the l2 ball of ``radius``: ``z_i · min(1, r / ‖z_i‖₂)``.

    Groups are the vectors along axis ``dim``; with ``dim=None`` every element is its own group
    (a complex element keeps its phase). This is the prox of the conjugate of ``r‖·‖₂,₁``
    (``r‖·‖₁`` for ``dim=None``) for any step size.
    """
    mag = z.abs() if dim is None else _group_norm(z, dim)
    outside = mag > radius
    safe = torch.where(outside, mag, torch.ones_like(mag))
    return z * torch.where(outside, radius / safe, torch.ones_like(mag))


# -- finite differences ----------------------------------------------------------------------------
class FiniteDifference(LinearOperator):
    """Forward differences over the trailing ``ndim`` axes of ``shape`` (Neumann boundary).

    Model: ``(D x)[d, i] = x[i + e_d] - x[i]`` where ``i + e_d`` is inside the array, else ``0``,
    for ``d = 0..ndim-1`` over the last ``ndim`` axes of ``shape`` in order. The adjoint is the
    negative divergence ``Dᴴ g = -div g``, and ``‖D‖² = Σ_d (2 + 2 cos(π / n_d))`` exactly.

    Args:
        shape: trailing shape of the input, e.g. ``(H, W)`` or ``(D, H, W)``.
        ndim: how many trailing axes to differentiate (default: all of ``shape``); e.g.
            ``FiniteDifference((D, H, W), ndim=2)`` is slice-wise 2D.
        complex_data: the operator acts on complex arrays (MRI images).

    Shapes: input ``(..., *shape)``; output ``(..., ndim, *shape)``; the component axis of
    the output is :attr:`component_dim` (counted from the end).

    Example:
        >>> D = FiniteDifference((4,))
        >>> D.forward(torch.tensor([0.0, 1.0, 3.0, 6.0]))
        tensor([[1., 2., 3., 0.]])
    """

    def __init__(
        self, shape: tuple[int, ...], ndim: int | None = None, *, complex_data: bool = False
    ) -> None:
        shape = tuple(int(s) for s in shape)
        ndim = len(shape) if ndim is None else int(ndim)
        if not 1 <= ndim <= len(shape):
            raise ParameterError(
                f"FiniteDifference: ndim must be between 1 and len(shape) = {len(shape)} "
                f"(the trailing axes to differentiate); found ndim={ndim}"
            )
        if any(s < 1 for s in shape):
            raise ParameterError(f"FiniteDifference: shape must have positive sizes; found {shape}")
        super().__init__(shape, (ndim, *shape), complex_in=complex_data, complex_out=complex_data)
        self.ndim = ndim
        #: axis of the gradient components in the output, counted from the end (for group norms)
        self.component_dim = -(len(shape) + 1)

    def _axes(self) -> range:
        return range(-self.ndim, 0)  # the differentiated axes of an input, from the end

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for axis in self._axes():
            d = torch.diff(x, dim=axis)  # (..., n_axis - 1, ...)
            pad = [0, 0] * (-axis - 1) + [0, 1]  # one zero at the end of `axis`
            parts.append(F.pad(d, pad))  # (..., *shape)
        return torch.stack(parts, dim=self.component_dim)  # (..., ndim, *shape)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        out = None
        for k, axis in enumerate(self._axes()):
            g = y.select(self.component_dim, k)  # (..., *shape)
            n = g.shape[axis]
            g = g.narrow(axis, 0, n - 1)  # the last difference is identically zero: drop it
            before = [0, 0] * (-axis - 1)
            term = F.pad(g, before + [1, 0]) - F.pad(g, before + [0, 1])  # g[i-1] - g[i]
            out = term if out is None else out + term
        assert out is not None
        return out

    def _normal(self, x: torch.Tensor) -> torch.Tensor:
        return self._adjoint(self._forward(x))

    def norm(self, n_iter: int = 30, seed: int = 0, dtype: torch.dtype = torch.float64) -> float:
        """The exact spectral norm ``sqrt(Σ_d (2 + 2 cos(π / n_d)))`` (arguments are ignored)."""
        sizes = self.in_shape[len(self.in_shape) - self.ndim :]
        return math.sqrt(sum(2 + 2 * math.cos(math.pi / n) for n in sizes if n > 1))

    def tv(self, x: torch.Tensor) -> torch.Tensor:
        """Isotropic total variation ``Σ_i sqrt(Σ_d |(D x)_d[i]|²)`` per batch item.

        Args:
            x: ``(..., *shape)``.

        Returns:
            Real ``(...)``: one value per batch item.
        """
        g = self.forward(x)  # (..., ndim, *shape)
        mags = _group_norm(g, self.component_dim)  # (..., 1, *shape)
        return mags.flatten(start_dim=mags.ndim + self.component_dim).sum(-1)  # (...)


# -- wavelets --------------------------------------------------------------------------------------
def wavelet_filter(wavelet: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The analysis filter pair as an ``(L, 2)`` matrix ``[h, g]``.

    ``h`` is the low-pass filter; the high-pass is its quadrature mirror
    ``g[n] = (-1)^n h[L-1-n]``. One level of the transform along an axis of even length ``N``
    is ``a[k] = Σ_n h[n] x[(2k+n) mod N]``, ``d[k] = Σ_n g[n] x[(2k+n) mod N]``.
    """
    if wavelet not in _LOWPASS:
        raise ParameterError(f"wavelet must be one of {WAVELETS}; found {wavelet!r}")
    h = torch.tensor(_LOWPASS[wavelet], dtype=torch.float64)
    sign = torch.tensor([(-1.0) ** n for n in range(h.numel())], dtype=torch.float64)
    g = sign * h.flip(0)
    return torch.stack([h, g], dim=1).to(dtype)  # (L, 2)


def max_wavelet_levels(shape: tuple[int, int]) -> int:
    """The most levels a periodic 2D transform of ``shape`` allows (both sizes divisible by 2^levels)."""
    levels = 0
    h, w = shape
    while h % 2 == 0 and w % 2 == 0 and h > 1 and w > 1:
        h, w, levels = h // 2, w // 2, levels + 1
    return levels


def _analysis_last(x: torch.Tensor, filt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One periodic analysis level along the last axis: ``(..., N)`` -> low, high ``(..., N/2)``."""
    n = x.shape[-1]
    taps = filt.shape[0]
    reps = 1 + -(-(taps - 2) // n)  # copies of x so the periodic extension reaches N + L - 2
    ext = torch.cat([x] * reps, dim=-1)[..., : n + taps - 2] if taps > 2 else x  # (..., N + L - 2)
    windows = ext.unfold(-1, taps, 2)  # (..., N/2, L): windows[k, n] = x[(2k + n) mod N]
    coeffs = windows @ filt.to(x.dtype)  # (..., N/2, 2)
    return coeffs[..., 0], coeffs[..., 1]


def _synthesis_last(low: torch.Tensor, high: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """The adjoint (= inverse) of :func:`_analysis_last`: low, high ``(..., N/2)`` -> ``(..., N)``."""
    taps = filt.shape[0]
    contrib = torch.stack([low, high], dim=-1) @ filt.T.to(low.dtype)  # (..., N/2, L): c[k, n]
    # c[k, n] lands on x[(2k + n) mod N]; with n = 2j + p that is polyphase p at index k + j.
    even = sum(torch.roll(contrib[..., 2 * j], j, dims=-1) for j in range(taps // 2))  # (..., N/2)
    odd = sum(torch.roll(contrib[..., 2 * j + 1], j, dims=-1) for j in range(taps // 2))  # (..., N/2)
    out = torch.stack([even, odd], dim=-1)  # (..., N/2, 2)
    return out.flatten(start_dim=-2)  # (..., N)


class Wavelet2D(LinearOperator):
    """Orthonormal multilevel 2D discrete wavelet transform with a periodic boundary.

    Model: per level, the separable filter bank of :func:`wavelet_filter` is applied along
    ``W`` then ``H`` to the current approximation band, giving four bands of half the size.
    The coefficients are packed in the usual pyramid layout of the same ``(H, W)`` shape: the
    coarsest approximation in the top-left ``(H / 2^levels, W / 2^levels)`` corner
    (:attr:`approximation`), and at each level ``[[LL, LH], [HL, HH]]`` (first letter: along
    ``H``). The transform is orthonormal, so ``W.adjoint`` is the inverse, exactly.

    Args:
        shape: ``(H, W)``, both divisible by ``2**levels``.
        levels: number of decomposition levels, ``>= 1``.
        wavelet: ``"haar"`` or ``"db4"`` (Daubechies, 4 vanishing moments, 8 taps).
        complex_data: the operator acts on complex images (applied to real and imaginary
            parts alike, by linearity).

    Shapes: input ``(..., H, W)``; output ``(..., H, W)``.

    Example:
        >>> W = Wavelet2D((8, 8), levels=3, wavelet="haar")
        >>> round(W.forward(torch.ones(8, 8))[0, 0].item(), 4)  # all energy in the approximation
        8.0
    """

    def __init__(
        self,
        shape: tuple[int, int],
        levels: int = 3,
        wavelet: WaveletName = "db4",
        *,
        complex_data: bool = False,
    ) -> None:
        if len(shape) != 2:
            raise ShapeError(f"Wavelet2D: shape must be (H, W); found {tuple(shape)}")
        h, w = (int(s) for s in shape)
        if wavelet not in _LOWPASS:
            raise ParameterError(f"Wavelet2D: wavelet must be one of {WAVELETS}; found {wavelet!r}")
        if int(levels) < 1 or h % 2 ** int(levels) or w % 2 ** int(levels):
            raise ParameterError(
                f"Wavelet2D: levels must be >= 1 with H and W divisible by 2**levels; found "
                f"levels={levels} for shape {(h, w)}. Use levels <= max_wavelet_levels(shape) = "
                f"{max_wavelet_levels((h, w))}, or crop or pad the image"
            )
        super().__init__((h, w), (h, w), complex_in=complex_data, complex_out=complex_data)
        self.levels = int(levels)
        self.wavelet = wavelet
        self.filt = wavelet_filter(wavelet)  # (L, 2) float64; cast to the input's dtype per call

    @property
    def approximation(self) -> tuple[slice, slice]:
        """Index of the coarsest approximation band in the coefficient array ``(..., H, W)``."""
        h, w = self.in_shape
        return slice(0, h >> self.levels), slice(0, w >> self.levels)

    def _level(self, x: torch.Tensor) -> torch.Tensor:
        filt = self.filt.to(x.device)
        low_w, high_w = _analysis_last(x, filt)  # (..., h, w/2) each
        bands = []
        for band in (low_w, high_w):
            lo, hi = _analysis_last(band.transpose(-1, -2), filt)  # (..., w/2, h/2) each
            bands.append((lo.transpose(-1, -2), hi.transpose(-1, -2)))  # (..., h/2, w/2) each
        (ll, hl), (lh, hh) = bands
        top = torch.cat([ll, lh], dim=-1)  # (..., h/2, w)
        bottom = torch.cat([hl, hh], dim=-1)  # (..., h/2, w)
        return torch.cat([top, bottom], dim=-2)  # (..., h, w)

    def _level_inverse(self, c: torch.Tensor) -> torch.Tensor:
        filt = self.filt.to(c.device)
        h2, w2 = c.shape[-2] // 2, c.shape[-1] // 2
        ll, lh = c[..., :h2, :w2], c[..., :h2, w2:]  # (..., h/2, w/2) each
        hl, hh = c[..., h2:, :w2], c[..., h2:, w2:]
        # undo the transform along H, then along W
        low_w = _synthesis_last(ll.transpose(-1, -2), hl.transpose(-1, -2), filt).transpose(-1, -2)
        high_w = _synthesis_last(lh.transpose(-1, -2), hh.transpose(-1, -2), filt).transpose(-1, -2)
        return _synthesis_last(low_w, high_w, filt)  # (..., h, w)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._transform(x, self.levels)

    def _transform(self, x: torch.Tensor, levels: int) -> torch.Tensor:
        c = self._level(x)  # (..., h, w)
        if levels == 1:
            return c
        h2, w2 = x.shape[-2] // 2, x.shape[-1] // 2
        inner = self._transform(c[..., :h2, :w2], levels - 1)  # (..., h/2, w/2)
        top = torch.cat([inner, c[..., :h2, w2:]], dim=-1)  # (..., h/2, w)
        return torch.cat([top, c[..., h2:, :]], dim=-2)  # (..., h, w)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._inverse(y, self.levels)

    def _inverse(self, c: torch.Tensor, levels: int) -> torch.Tensor:
        if levels > 1:
            h2, w2 = c.shape[-2] // 2, c.shape[-1] // 2
            inner = self._inverse(c[..., :h2, :w2], levels - 1)  # (..., h/2, w/2)
            top = torch.cat([inner, c[..., :h2, w2:]], dim=-1)  # (..., h/2, w)
            c = torch.cat([top, c[..., h2:, :]], dim=-2)  # (..., h, w)
        return self._level_inverse(c)

    def _normal(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def norm(self, n_iter: int = 30, seed: int = 0, dtype: torch.dtype = torch.float64) -> float:
        """Exactly 1: the transform is orthonormal (arguments are ignored)."""
        return 1.0

    def __repr__(self) -> str:
        return f"Wavelet2D(shape={self.in_shape}, levels={self.levels}, wavelet={self.wavelet!r})"


# -- penalties -------------------------------------------------------------------------------------
class Penalty(Protocol):
    """A regulariser ``R`` with a cheap prox, for :class:`operators.solvers.FISTA`."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``R(x)`` per batch item: real ``(*batch)``."""
        ...

    def prox(self, x: torch.Tensor, step: float) -> torch.Tensor:
        """``argmin_z step · R(z) + ½‖z - x‖²``."""
        ...


def _check_lam(lam: float | torch.Tensor, who: str) -> None:
    bad = bool((lam < 0).any()) if isinstance(lam, torch.Tensor) else lam < 0
    if bad:
        raise ParameterError(f"{who}: lam must be >= 0 (a regularisation weight); found {lam}")


class NoPenalty:
    """``R = 0``: the prox is the identity, so FISTA is accelerated gradient descent.

    Args:
        ndim: number of trailing (non-batch) dimensions of ``x``, for the per-item value.
    """

    def __init__(self, ndim: int) -> None:
        self.ndim = int(ndim)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[: x.ndim - self.ndim], dtype=x.real.dtype, device=x.device)

    def prox(self, x: torch.Tensor, step: float) -> torch.Tensor:
        return x


class L1Penalty:
    """``R(x) = lam ‖x‖₁`` over the trailing ``ndim`` dimensions (complex: sum of magnitudes).

    Args:
        lam: weight, a float or a tensor of the batch shape.
        ndim: number of trailing (non-batch) dimensions of ``x``.
    """

    def __init__(self, lam: float | torch.Tensor, ndim: int) -> None:
        _check_lam(lam, "L1Penalty")
        self.lam = lam
        self.ndim = int(ndim)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        total = x.abs().flatten(start_dim=x.ndim - self.ndim).sum(-1)  # (*batch)
        lam = self.lam
        return total * (lam.to(x.device) if isinstance(lam, torch.Tensor) else lam)

    def prox(self, x: torch.Tensor, step: float) -> torch.Tensor:
        return soft_threshold(x, step * per_item(self.lam, x, self.ndim))


class WaveletL1:
    """``R(x) = lam ‖M ⊙ W x‖₁`` with ``W`` an orthonormal :class:`Wavelet2D`, optionally cycle-spun.

    With one shift, ``W`` orthonormal gives the exact prox ``Wᴴ S_{step·lam·M}(W x)``. With
    ``shifts = s > 1`` the prox is the average over the ``s²`` circular shifts
    ``T_k`` (``k ∈ {0..s-1}²``) of the shifted transform's prox::

        prox(x) = (1 / s²) Σ_k T_kᴴ Wᴴ S_{step·lam·M}(W T_k x)

    An average of proximal maps is itself the proximal map of a convex function (the
    *proximal average* of the ``R(T_k ·)``; Bauschke, Goebel, Lucet & Wang 2008), so FISTA
    still minimises a fixed convex objective. Shifting makes the decimated transform closer
    to translation invariant, which removes its block artefacts: on piecewise-constant images
    ``s = 2`` with Haar gains over 10 dB at 4x single-coil MRI (see ``tests/operators/test_recon.py``).
    Calling the penalty gives the arithmetic mean of the ``lam ‖M ⊙ W T_k x‖₁``, an upper bound
    of the proximal average.

    Args:
        transform: the wavelet transform (its ``complex_data`` must match the images).
        lam: weight, a float or a tensor of the batch shape of ``W``'s input.
        penalize_approximation: also shrink the coarsest approximation band (``M = 1``
            everywhere). Default False: ``M = 0`` there, so image contrast is not shrunk.
        shifts: ``s >= 1`` shifts per axis (``s²`` transforms per prox).
    """

    def __init__(
        self,
        transform: Wavelet2D,
        lam: float | torch.Tensor,
        *,
        penalize_approximation: bool = False,
        shifts: int = 1,
    ) -> None:
        _check_lam(lam, "WaveletL1")
        if isinstance(shifts, bool) or not isinstance(shifts, int) or shifts < 1:
            raise ParameterError(f"WaveletL1: shifts must be an int >= 1 (shifts per axis); found {shifts!r}")
        self.transform = transform
        self.lam = lam
        self.penalize_approximation = penalize_approximation
        self.shifts = shifts

    def _weights(self, like: torch.Tensor) -> torch.Tensor:
        m = torch.ones(self.transform.in_shape, dtype=like.real.dtype, device=like.device)  # (H, W)
        if not self.penalize_approximation:
            m[self.transform.approximation] = 0
        return m

    def _offsets(self) -> list[tuple[int, int]]:
        return [(i, j) for i in range(self.shifts) for j in range(self.shifts)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(x.shape[:-2], dtype=x.real.dtype, device=x.device)  # (*batch)
        for shift in self._offsets():
            c = self.transform.forward(torch.roll(x, shift, dims=(-2, -1)))  # (*batch, H, W)
            total = total + (c.abs() * self._weights(c)).flatten(start_dim=-2).sum(-1)
        lam = self.lam
        return total / len(self._offsets()) * (lam.to(x.device) if isinstance(lam, torch.Tensor) else lam)

    def prox(self, x: torch.Tensor, step: float) -> torch.Tensor:
        t = step * per_item(self.lam, x, 2) * self._weights(x)  # (*batch or 1, H, W)
        out = torch.zeros_like(x)
        for shift in self._offsets():
            c = self.transform.forward(torch.roll(x, shift, dims=(-2, -1)))  # (*batch, H, W)
            shrunk = self.transform.adjoint(soft_threshold(c, t))
            out = out + torch.roll(shrunk, (-shift[0], -shift[1]), dims=(-2, -1))
        return out / len(self._offsets())
