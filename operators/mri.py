"""Cartesian MRI forward models: single-coil, and multi-coil SENSE as a composition.

Layouts (complex64 or complex128 everywhere, centred k-space as in :mod:`operators.fft`):

* image ``(..., *spatial)``: ``(..., H, W)`` with ``ndim=2`` (a volume ``(D, H, W)`` is then
  ``D`` slices), or ``(..., D, H, W)`` with ``ndim=3`` (a full 3D Cartesian FFT);
* single-coil k-space ``(..., *spatial)``; multi-coil k-space ``(..., C, *spatial)``, e.g.
  ``(C, H, W)`` for a slice and ``(C, D, H, W)`` for a volume;
* mask ``(*batch, *spatial)``, real (bool masks become float32): its leading dimensions, if any,
  broadcast against the data's leading dimensions, so one operator can carry a different mask
  per sample of a batch ``(B, H, W)``; an ``(H, W)`` mask applies to every sample;
* coil maps ``(*batch, C, *spatial)``, complex.

Models::

    CartesianMRI:  A x = M ⊙ Fc x                    Aᴴ y = Fcᴴ (M ⊙ y)
    SENSE:         A x = P F S x,  (S x)_c = S_c ⊙ x,  F = Fc per coil,  P = M ⊙ ·
                   Aᴴ y = Σ_c conj(S_c) ⊙ Fcᴴ (M ⊙ y_c)

For even sizes ``Fc = (s·D) F D`` (see :mod:`operators.fft`), so ``CartesianMRI`` applies
``D``, one FFT and the folded weight ``M ⊙ s·D``; its normal operator needs no modulation at
all: ``AᴴA = Fᴴ diag(ifftshift(M²)) F``.

Example:
    >>> import torch
    >>> from operators.mri import CartesianMRI, birdcage_maps, sense
    >>> mask = torch.zeros(16, 16, dtype=torch.bool); mask[:, ::2] = True
    >>> A = CartesianMRI(mask)
    >>> x = torch.randn(3, 16, 16, dtype=torch.complex64)
    >>> A.forward(x).shape
    torch.Size([3, 16, 16])
    >>> E = sense(mask, birdcage_maps((16, 16), 4))
    >>> E.forward(x).shape, E.adjoint(E.forward(x)).shape
    (torch.Size([3, 4, 16, 16]), torch.Size([3, 16, 16]))
"""

from __future__ import annotations

import math

import torch

from operators import fft as _fft
from operators.errors import DTypeError, ParameterError, ShapeError
from operators.fft import broadcast_shape, fft_filter, fftc, ifftc, is_even, modulated_fft, modulations
from operators.linear import LinearOperator, complex_dtype_for

__all__ = ["CartesianMRI", "FFTc", "Mask", "CoilExpand", "SENSE", "sense", "birdcage_maps"]


# -- helpers -------------------------------------------------------------------------------------
def _as_mask(mask: torch.Tensor, owner: str) -> torch.Tensor:
    """A real floating mask (bool and integer masks become float32)."""
    if not isinstance(mask, torch.Tensor):
        raise DTypeError(f"{owner}: mask must be a torch.Tensor; found {type(mask).__name__}")
    if mask.is_complex():
        raise DTypeError(
            f"{owner}: mask must be real (bool or float); found {mask.dtype}. Pass mask.abs() or .real."
        )
    return mask if mask.is_floating_point() else mask.to(torch.float32)


def _as_maps(maps: torch.Tensor, ndim: int, owner: str) -> torch.Tensor:
    if not isinstance(maps, torch.Tensor):
        raise DTypeError(f"{owner}: coil_maps must be a torch.Tensor; found {type(maps).__name__}")
    if maps.ndim < ndim + 1:
        raise ShapeError(
            f"{owner}: coil_maps must have shape (C, *spatial) with {ndim} spatial dimensions "
            f"(optionally with leading batch dimensions); found shape {tuple(maps.shape)}"
        )
    return maps if maps.is_complex() else maps.to(complex_dtype_for(maps.dtype))


def _check_ndim(ndim: int, owner: str) -> None:
    if not isinstance(ndim, int) or ndim < 1:
        raise ParameterError(f"{owner}: ndim must be 2 (slices) or 3 (volumes); found {ndim!r}")


def _dims(ndim: int) -> tuple[int, ...]:
    return tuple(range(-ndim, 0))


def _check_broadcast(
    owner: str, data: torch.Tensor, weight: torch.Tensor, what: str, name: str = "mask"
) -> None:
    """ShapeError unless ``weight`` broadcasts against ``data`` (batch dimensions 1 or equal)."""
    try:
        broadcast_shape(data.shape, weight.shape)
    except ValueError:
        raise ShapeError(
            f"{owner}: {name} of shape {tuple(weight.shape)} does not broadcast against the {what} of shape "
            f"{tuple(data.shape)}; the {name}'s leading (batch) dimensions must be 1 or equal the data's"
        ) from None


def _scale(k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``k ⊙ w``, in place when that is safe (``k`` is a fresh intermediate of the final shape and dtype)."""
    if (
        broadcast_shape(k.shape, w.shape) == k.shape
        and torch.promote_types(k.dtype, w.dtype) == k.dtype
        and not w.requires_grad
    ):
        return k.mul_(w)
    return k * w


def _chequerboard(op: CartesianMRI | SENSE, device: torch.device) -> torch.Tensor:
    """The centred FFT's modulation ``D`` over ``op``'s image shape, in the dtype of its mask weight."""
    assert op._weight is not None
    return modulations(op.in_shape, op._weight.dtype, device)[0]  # (*spatial), ±1


def _check_spatial(owner: str, mask: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    n = len(expected)
    if mask.ndim < n or tuple(mask.shape[mask.ndim - n :]) != expected:
        raise ShapeError(
            f"{owner}: mask of shape {tuple(mask.shape)} must end with the {what} {expected} "
            "(any leading batch dimensions)"
        )


# -- single coil ---------------------------------------------------------------------------------
class CartesianMRI(LinearOperator):
    """Single-coil Cartesian MRI ``A x = M ⊙ Fc x``, complex ``(..., *spatial) -> (..., *spatial)``.

    Args:
        mask: sampling mask ``(*batch, *spatial)``, bool or real; leading dimensions broadcast
            against the data's.
        ndim: 2 (per 2D slice, for any leading dimensions) or 3 (full 3D FFT).

    ``pseudo_inverse`` is the zero-filled reconstruction ``Aᴴ y``.
    """

    def __init__(self, mask: torch.Tensor, ndim: int = 2) -> None:
        _check_ndim(ndim, "CartesianMRI")
        mask = _as_mask(mask, "CartesianMRI")
        if mask.ndim < ndim:
            raise ShapeError(
                f"CartesianMRI: mask must have at least ndim={ndim} dimensions; "
                f"found shape {tuple(mask.shape)}"
            )
        spatial = tuple(mask.shape[mask.ndim - ndim :])
        super().__init__(spatial, spatial, complex_in=True, complex_out=True)
        self.mask = mask  # (*batch, *spatial)
        self.ndim = ndim
        self.even = is_even(spatial)
        self._weight: torch.Tensor | None = None
        self._normal_weight: torch.Tensor | None = None
        if self.even:
            _, sd = modulations(spatial, mask.dtype, mask.device)
            self._weight = mask * sd  # M ⊙ s·D, (*batch, *spatial)
            self._normal_weight = torch.fft.ifftshift(mask * mask, dim=_dims(ndim))  # ifftshift(M²)

    def with_mask(self, mask: torch.Tensor) -> CartesianMRI:
        """The same model with another mask (same image shape)."""
        _check_spatial("CartesianMRI.with_mask", mask, self.in_shape, "operator's image shape")
        return CartesianMRI(mask, self.ndim)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_broadcast("CartesianMRI", x, self.mask, "input of forward")
        if self._weight is None:
            return fftc(x, self.ndim) * self.mask
        return modulated_fft(x, _chequerboard(self, x.device), self._weight, self.ndim)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        _check_broadcast("CartesianMRI", y, self.mask, "input of adjoint")
        if self._weight is None:
            return ifftc(y * self.mask, self.ndim)
        return modulated_fft(y, self._weight, _chequerboard(self, y.device), self.ndim, inverse=True)

    def _normal(self, x: torch.Tensor) -> torch.Tensor:
        _check_broadcast("CartesianMRI", x, self.mask, "input of normal")
        if self._normal_weight is None:
            return self._adjoint(self._forward(x))
        return fft_filter(x, self._normal_weight, self.ndim)

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Zero-filled reconstruction ``Aᴴ y``."""
        return self.adjoint(y)

    def __repr__(self) -> str:
        return f"CartesianMRI(mask={tuple(self.mask.shape)}, ndim={self.ndim})"


# -- the parts of SENSE --------------------------------------------------------------------------
class FFTc(LinearOperator):
    """The centred orthonormal FFT over the last ``ndim`` of ``shape`` as an operator (unitary).

    Args:
        shape: trailing data shape, e.g. ``(C, H, W)`` with ``ndim=2``.
        ndim: number of trailing dimensions transformed.
    """

    def __init__(self, shape: tuple[int, ...], ndim: int = 2) -> None:
        _check_ndim(ndim, "FFTc")
        shape = tuple(int(s) for s in shape)
        if len(shape) < ndim:
            raise ShapeError(f"FFTc: shape must have at least ndim={ndim} dimensions; found {shape}")
        super().__init__(shape, shape, complex_in=True, complex_out=True)
        self.ndim = ndim

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return fftc(x, self.ndim)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return ifftc(y, self.ndim)

    def _normal(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The exact inverse ``Fcᴴ y``."""
        return self.adjoint(y)


class Mask(LinearOperator):
    """Diagonal k-space sampling ``P y = M ⊙ y`` with a real mask (self-adjoint).

    Args:
        mask: real or bool mask whose trailing ``len(shape)`` dimensions broadcast to ``shape``
            (extra leading dimensions are batch dimensions), e.g. ``(1, H, W)`` for ``(C, H, W)``.
        shape: trailing data shape; defaults to ``mask.shape``.
    """

    def __init__(self, mask: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
        mask = _as_mask(mask, "Mask")
        shape = tuple(mask.shape) if shape is None else tuple(int(s) for s in shape)
        n = len(shape)
        trailing = (1,) * max(0, n - mask.ndim) + tuple(mask.shape[max(0, mask.ndim - n) :])
        if any(m not in (1, s) for m, s in zip(trailing, shape, strict=True)):
            raise ShapeError(
                f"Mask: mask of shape {tuple(mask.shape)} does not broadcast to the data shape {shape}; "
                "each trailing mask dimension must be 1 or equal the data's"
            )
        super().__init__(shape, shape, complex_in=True, complex_out=True)
        self.mask = mask

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_broadcast("Mask", x, self.mask, "input")
        return x * self.mask

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._forward(y)

    def _normal(self, x: torch.Tensor) -> torch.Tensor:
        _check_broadcast("Mask", x, self.mask, "input")
        return x * (self.mask * self.mask)


class CoilExpand(LinearOperator):
    """Coil sensitivity weighting ``(S x)_c = S_c ⊙ x``: ``(..., *spatial) -> (..., C, *spatial)``.

    The adjoint is the coil combination ``Σ_c conj(S_c) ⊙ y_c``.

    Args:
        coil_maps: complex ``(*batch, C, *spatial)``.
        ndim: number of spatial dimensions.
    """

    def __init__(self, coil_maps: torch.Tensor, ndim: int = 2) -> None:
        _check_ndim(ndim, "CoilExpand")
        maps = _as_maps(coil_maps, ndim, "CoilExpand")
        spatial = tuple(maps.shape[maps.ndim - ndim :])
        super().__init__(spatial, (maps.shape[-ndim - 1], *spatial), complex_in=True, complex_out=True)
        self.maps = maps  # (*batch, C, *spatial)
        self.ndim = ndim

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_broadcast("CoilExpand", x.unsqueeze(-self.ndim - 1), self.maps, "input", name="coil_maps")
        return x.unsqueeze(-self.ndim - 1) * self.maps  # (..., 1, *spatial) * (*batch, C, *spatial)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        _check_broadcast("CoilExpand", y, self.maps, "input of adjoint", name="coil_maps")
        return (torch.conj(self.maps) * y).sum(dim=-self.ndim - 1)  # (..., *spatial)

    def _normal(self, x: torch.Tensor) -> torch.Tensor:
        sos = (self.maps.real**2 + self.maps.imag**2).sum(
            dim=-self.ndim - 1
        )  # Σ_c |S_c|², (*batch, *spatial)
        return x * sos


# -- multi-coil ----------------------------------------------------------------------------------
#: SENSE keeps a materialised copy of conj(coil maps) for its adjoint when the maps are at most
#: this big (2D maps of 8 coils at 256² are 4 MiB; 3D maps at 256³ would be 1 GiB and are not copied).
SENSE_CONJ_CACHE_BYTES = 64 << 20


class SENSE(LinearOperator):
    """Multi-coil Cartesian MRI ``A = P F S``, complex ``(..., *spatial) -> (..., C, *spatial)``.

    For even sizes all three are fused rather than run as the composition
    ``Mask @ FFTc @ CoilExpand`` (``self.op``, used for odd sizes). With ``Fc = (s·D) F D`` and
    ``W = M ⊙ s·D``::

        A x  = W ⊙ F(S_c ⊙ (D x))                  (D applied to the image: 1/C of the data)
        Aᴴ y = D ⊙ Σ_c conj(S_c) ⊙ Fᴴ(W ⊙ y_c)
        AᴴA x = Σ_c conj(S_c) Fᴴ(ifftshift(M²) ⊙ F(S_c x))   (no modulation at all)

    each in cache-sized blocks of coils (:func:`operators.fft.modulated_fft`), so a call makes
    one pass over the multi-coil data besides its FFTs.

    Args:
        mask: ``(*batch, *spatial)`` real or bool.
        coil_maps: ``(*batch, C, *spatial)`` complex.
        ndim: 2 (per slice) or 3 (3D FFT).

    ``pseudo_inverse`` is the zero-filled coil combination ``Aᴴ y`` (exact coil combination
    when ``Σ_c |S_c|² = 1``, as for :func:`birdcage_maps`).
    """

    def __init__(self, mask: torch.Tensor, coil_maps: torch.Tensor, ndim: int = 2) -> None:
        _check_ndim(ndim, "SENSE")
        maps = _as_maps(coil_maps, ndim, "SENSE")
        mask = _as_mask(mask, "SENSE")
        spatial = tuple(maps.shape[maps.ndim - ndim :])
        _check_spatial(
            "SENSE", mask, spatial, f"coil maps' image shape (coil_maps shape {tuple(maps.shape)})"
        )
        kspace = (maps.shape[-ndim - 1], *spatial)
        super().__init__(spatial, kspace, complex_in=True, complex_out=True)
        self.ndim = ndim
        sampling = Mask(mask.unsqueeze(-ndim - 1), shape=kspace)  # mask (*batch, 1, *spatial)
        self.op = sampling @ FFTc(kspace, ndim) @ CoilExpand(maps, ndim)
        self._normal_weight: torch.Tensor | None = None
        self._weight: torch.Tensor | None = None
        if is_even(spatial):
            self._normal_weight = torch.fft.ifftshift(mask * mask, dim=_dims(ndim)).unsqueeze(
                -ndim - 1
            )  # ifftshift(M²), (*batch, 1, *spatial)
            _, sd = modulations(spatial, mask.dtype, mask.device)
            self._weight = (mask * sd).unsqueeze(-ndim - 1)  # M ⊙ s·D, (*batch, 1, *spatial)
        # conj(S) materialised for the adjoint: a multiply by torch.conj's lazy view costs ~15x one
        # by a plain tensor (1.5 ms against 0.1 ms for (8, 256, 256) complex64). Kept only when small.
        small = maps.numel() * maps.element_size() <= SENSE_CONJ_CACHE_BYTES
        self._maps_conj = maps.conj().resolve_conj() if small else None  # (*batch, C, *spatial)

    @property
    def parts(self) -> tuple[Mask, FFTc, CoilExpand]:
        """``(P, F, S)`` with ``self.op == P @ F @ S``."""
        outer, expand = self.op.outer, self.op.inner_op  # type: ignore[attr-defined]
        return outer.outer, outer.inner_op, expand

    @property
    def coil_maps(self) -> torch.Tensor:
        """Coil sensitivities ``(*batch, C, *spatial)``."""
        return self.parts[2].maps

    @property
    def mask(self) -> torch.Tensor:
        """The sampling mask ``(*batch, *spatial)``."""
        return self.parts[0].mask.squeeze(-self.ndim - 1)

    def with_mask(self, mask: torch.Tensor) -> SENSE:
        """The same coils with another mask (same image shape)."""
        _check_spatial("SENSE.with_mask", mask, self.in_shape, "operator's image shape")
        return SENSE(mask, self.coil_maps, self.ndim)

    def with_maps(self, coil_maps: torch.Tensor) -> SENSE:
        """The same mask with other coil maps ``(*batch, C, *spatial)`` (same image shape; any coil count)."""
        maps = _as_maps(coil_maps, self.ndim, "SENSE.with_maps")
        spatial = tuple(maps.shape[maps.ndim - self.ndim :])
        if spatial != self.in_shape:
            raise ShapeError(
                f"SENSE.with_maps: coil_maps of shape {tuple(maps.shape)} must end with the operator's "
                f"image shape {self.in_shape} (shape (*batch, C, *spatial))"
            )
        return SENSE(self.mask, maps, self.ndim)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._weight is None:
            return self.op._forward(x)
        coil_dim = -self.ndim - 1
        maps = self.coil_maps
        _check_broadcast("SENSE", x.unsqueeze(coil_dim), maps, "input of forward", name="coil_maps")
        _check_broadcast("SENSE", x.unsqueeze(coil_dim), self._weight, "input of forward")
        xd = (x * _chequerboard(self, x.device)).unsqueeze(coil_dim)  # D x, (..., 1, *spatial)
        return modulated_fft(xd, maps, self._weight, self.ndim)  # (..., C, *spatial)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        if self._weight is None:
            return self.op._adjoint(y)
        coil_dim = -self.ndim - 1
        maps = self.coil_maps
        _check_broadcast("SENSE", y, maps, "input of adjoint", name="coil_maps")
        _check_broadcast("SENSE", y, self._weight, "input of adjoint")
        conj = self._maps_conj if self._maps_conj is not None else torch.conj(maps)
        z = modulated_fft(y, self._weight, conj, self.ndim, inverse=True)  # (..., C, *spatial)
        return z.sum(dim=coil_dim) * _chequerboard(self, y.device)  # (..., *spatial)

    def _normal(self, x: torch.Tensor) -> torch.Tensor:
        if self._normal_weight is None:
            return self.op._adjoint(self.op._forward(x))
        maps = self.coil_maps
        nd = self.ndim
        coil_dim, dims = -nd - 1, _dims(nd)
        _check_broadcast("SENSE", x.unsqueeze(coil_dim), maps, "input of normal", name="coil_maps")
        _check_broadcast("SENSE", x.unsqueeze(coil_dim), self._normal_weight, "input of normal")
        xe = x.unsqueeze(coil_dim)  # (..., 1, *spatial)
        batch = broadcast_shape(x.shape[: x.ndim - nd], maps.shape[: maps.ndim - nd - 1])
        n_coils = maps.shape[coil_dim]
        step = max(1, _fft.BLOCK_ELEMENTS // (math.prod(batch) * math.prod(self.in_shape)))
        total: torch.Tensor | None = None
        for c0 in range(0, n_coils, step):
            s = maps.narrow(coil_dim, c0, min(step, n_coils - c0))  # (*batch, c, *spatial)
            k = _scale(
                torch.fft.fftn(xe * s, dim=dims, norm="ortho"), self._normal_weight
            )  # (..., c, *spatial)
            sc = (
                self._maps_conj.narrow(coil_dim, c0, s.shape[coil_dim])
                if self._maps_conj is not None
                else torch.conj(s)
            )  # conj(S_c) of this block
            part = (sc * torch.fft.ifftn(k, dim=dims, norm="ortho")).sum(dim=coil_dim)
            total = part if total is None else total + part
        assert total is not None
        return total

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Zero-filled coil combination ``Aᴴ y``."""
        return self.adjoint(y)

    def __repr__(self) -> str:
        return f"SENSE(coils={self.out_shape[0]}, image={self.in_shape}, ndim={self.ndim})"


def sense(mask: torch.Tensor, coil_maps: torch.Tensor, ndim: int = 2) -> SENSE:
    """SENSE ``P F S`` for ``mask`` ``(*batch, *spatial)`` and ``coil_maps`` ``(*batch, C, *spatial)``."""
    return SENSE(mask, coil_maps, ndim)


# -- simulated coils -----------------------------------------------------------------------------
def birdcage_maps(
    shape: tuple[int, ...], n_coils: int, *, dtype: torch.dtype = torch.complex64, radius: float = 1.5
) -> torch.Tensor:
    """Smooth simulated coil sensitivities ``(C, *shape)`` for ``shape`` ``(H, W)`` or ``(D, H, W)``.

    Coil ``c`` is a straight conductor along the slice normal at angle ``θ_c = 2πc/C`` on a circle
    of ``radius`` (in units of the half field of view, so ``radius > √2`` keeps it outside the
    image) around the centre of the ``(H, W)`` plane, at the centre of ``D``. Its field, written
    as a complex number, is ``B_c(r) = i (Δx + i Δy) / |Δr|²`` with ``Δr = r - r_c`` (``Δr``
    includes the ``D`` offset for volumes): the magnitude falls as ``1/|Δr|`` and the phase
    turns smoothly around the coil. The maps are then normalised so that
    ``Σ_c |S_c|² = 1`` at every voxel (everywhere, not only inside an object). Deterministic.

    Args:
        shape: image shape ``(H, W)`` or ``(D, H, W)``.
        n_coils: number of coils ``C >= 1``.
        dtype: complex dtype of the result.
        radius: coil circle radius in half fields of view.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or any(s < 1 for s in shape):
        raise ParameterError(
            f"birdcage_maps: shape must be (H, W) or (D, H, W) with positive sizes; found {shape}"
        )
    if not isinstance(n_coils, int) or n_coils < 1:
        raise ParameterError(f"birdcage_maps: n_coils must be an int >= 1; found {n_coils!r}")
    if not dtype.is_complex:
        raise DTypeError(f"birdcage_maps: dtype must be complex64 or complex128; found {dtype}")

    def axis(n: int) -> torch.Tensor:  # centred coordinate, 0 at index n // 2, ±1 at the edges
        return (torch.arange(n, dtype=torch.float64) - n // 2) / max(n / 2, 1)

    y = axis(shape[-2]).reshape(-1, 1)  # (H, 1)
    x = axis(shape[-1]).reshape(1, -1)  # (1, W)
    z = axis(shape[0]).reshape(-1, 1, 1) if len(shape) == 3 else torch.zeros(())  # (D, 1, 1) or ()
    theta = 2 * math.pi * torch.arange(n_coils, dtype=torch.float64) / n_coils  # (C,)
    view = (-1,) + (1,) * len(shape)
    dx = x - (radius * torch.cos(theta)).reshape(view)  # (C, 1.., 1, W)
    dy = y - (radius * torch.sin(theta)).reshape(view)  # (C, 1.., H, 1)
    dist2 = dx**2 + dy**2 + z**2  # (C, *shape) by broadcasting
    maps = 1j * torch.complex(dx, dy) / dist2  # (C, *shape)
    maps = maps.expand(n_coils, *shape)
    sos = torch.sqrt((maps.abs() ** 2).sum(dim=0, keepdim=True))  # (1, *shape), > 0 (coils outside the image)
    return (maps / sos).to(dtype).contiguous()
