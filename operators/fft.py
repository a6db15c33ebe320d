"""Centred, orthonormal FFTs over the trailing dimensions, without the cost of fftshift.

The centred transform puts the zero frequency (and the image origin) in the middle of the
array, as in fastMRI k-space::

    Fc x = fftshift(F(ifftshift(x)))          F: unitary DFT (norm="ortho")

``torch.fft.fftshift`` is a roll, which copies the array twice per transform. For even sizes
the shifts are a modulation instead. Per dimension of even size ``N``, with
``D = diag((-1)^n)``::

    ifftshift(x)[n] = x[n + N/2]           (indices mod N; for even N ifftshift == fftshift)
    F(ifftshift x)[k] = (-1)^k (F x)[k]                              (shift theorem)
    fftshift(F ifftshift x)[k] = (-1)^(k + N/2) (F x)[k + N/2]
                                = (-1)^(N/2) (-1)^k F(D x)[k]        (F(D x)[k] = (F x)[k + N/2])

so ``Fc = s · D F D`` with the global sign ``s = (-1)^(N/2)``: ``+1`` when ``4 | N`` and ``-1``
when ``N ≡ 2 (mod 4)``. Over several dimensions the transform is separable, ``D`` becomes the
chequerboard ``(-1)^(n_1 + ... + n_d)`` and ``s = Π_d (-1)^(N_d/2)``. The inverse is the adjoint,
``Fc⁻¹ = Fcᴴ = D Fᴴ (s D)``. This module caches the two modulations per
``(shape, dtype, device)`` (:func:`modulations`) and applies them in cache-sized blocks of the
batch (:func:`modulated_fft`), so a centred FFT costs about one bare FFT. Sizes with an odd
dimension fall back to ``fftshift``/``ifftshift`` (rolls).

Layout: any leading batch dimensions, then the ``ndim`` transformed dimensions, e.g.
``(B, H, W)`` with ``ndim=2`` or ``(C, D, H, W)`` with ``ndim=3``. Inputs are complex
(real inputs are promoted); outputs are complex of the same precision.

Example:
    >>> import torch
    >>> from operators.fft import fftc, ifftc
    >>> x = torch.randn(2, 8, 8, dtype=torch.complex64)
    >>> bool(torch.allclose(ifftc(fftc(x, 2), 2), x, atol=1e-6))
    True
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator

import torch

from operators.errors import ParameterError, ShapeError

__all__ = [
    "fftc",
    "ifftc",
    "modulations",
    "modulated_fft",
    "fft_filter",
    "batch_blocks",
    "broadcast_shape",
    "is_even",
    "BLOCK_ELEMENTS",
]

#: Elements per block of the batch loop in :func:`modulated_fft` (2 MiB of complex64): a block
#: is modulated, transformed and weighted while it is still in cache.
BLOCK_ELEMENTS = 1 << 18


def broadcast_shape(*shapes: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """The broadcast of ``shapes`` (numpy rules); ``ValueError`` if they do not broadcast.

    Plain Python: ``torch.broadcast_shapes`` imports ``torch._refs`` on first use (about a second).
    """
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for shape in shapes:
        for i, n in enumerate(shape, start=ndim - len(shape)):
            if n != 1:
                if out[i] not in (1, n):
                    raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
                out[i] = n
    return tuple(out)


def is_even(shape: tuple[int, ...]) -> bool:
    """True when every size in ``shape`` is even (the modulation identity applies)."""
    return all(s % 2 == 0 for s in shape)


def _check_ndim(x: torch.Tensor, ndim: int, what: str) -> tuple[int, ...]:
    if not isinstance(ndim, int) or ndim < 1:
        raise ParameterError(
            f"{what}: ndim must be a positive int (2 for slices, 3 for volumes); found {ndim!r}"
        )
    if x.ndim < ndim:
        raise ShapeError(
            f"{what}: input must have at least ndim={ndim} dimensions to transform; "
            f"found shape {tuple(x.shape)}"
        )
    return tuple(range(-ndim, 0))


@functools.lru_cache(maxsize=64)
def _modulations_cached(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # D[n] = (-1)^(n_1 + ... + n_d): a sum of broadcast aranges, parity taken once.
    parity = torch.zeros((), dtype=torch.int64, device=device)
    for axis, size in enumerate(shape):
        view = [1] * len(shape)
        view[axis] = size
        parity = parity + torch.arange(size, device=device).reshape(view)  # broadcasts up to ``shape``
    d = (1 - 2 * (parity % 2)).to(dtype)  # (*shape), ±1
    sign = -1 if sum(s // 2 for s in shape) % 2 else 1  # Π_d (-1)^(N_d/2)
    return d, d if sign == 1 else -d


def modulations(
    shape: tuple[int, ...], dtype: torch.dtype = torch.complex64, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chequerboards ``(D, s·D)`` with ``Fc = (s·D) F D`` for even ``shape``; cached.

    Args:
        shape: the transformed dimensions, all even, e.g. ``(H, W)``.
        dtype: dtype of the returned tensors (real or complex).
        device: device of the returned tensors.

    Returns:
        ``(pre, post)``, each of ``shape`` with entries ±1. The tensors are shared by every
        caller (a cache): never modify them in place.
    """
    shape = tuple(int(s) for s in shape)
    if not is_even(shape):
        raise ShapeError(
            f"modulations: every transformed size must be even for the chequerboard identity; found {shape}. "
            "Odd sizes use fftshift/ifftshift (fftc does this for you)."
        )
    return _modulations_cached(shape, dtype, torch.device(device))


def batch_blocks(batch: tuple[int, ...], per_item: int) -> Iterator[tuple[int | slice, ...]]:
    """Index tuples that tile a batch of shape ``batch`` in blocks of about :data:`BLOCK_ELEMENTS`.

    Every leading batch dimension but the last is looped over one index at a time; the last
    is cut into slices of ``max(1, BLOCK_ELEMENTS // per_item)`` items. Each tuple indexes
    the batch dimensions of an array of shape ``(*batch, ...)`` and gives a view.
    """
    if not batch:
        yield ()
        return
    step = max(1, BLOCK_ELEMENTS // max(1, per_item))
    last = batch[-1]
    for outer in itertools.product(*(range(b) for b in batch[:-1])):
        for start in range(0, last, step):
            yield (*outer, slice(start, min(start + step, last)))


def _fft(x: torch.Tensor, dims: tuple[int, ...], inverse: bool) -> torch.Tensor:
    fn = torch.fft.ifftn if inverse else torch.fft.fftn
    return fn(x, dim=dims, norm="ortho")


def _interleaved(w: torch.Tensor) -> torch.Tensor:
    """A real weight ``(..., n)`` as ``(..., n, 2)``, each value twice, to scale ``view_as_real`` data.

    Multiplying the real view by this is a plain real multiply, which vectorises better than a
    complex-by-real multiply or a broadcast over the trailing pair.
    """
    return torch.stack((w, w), dim=-1)  # (..., n, 2)


def _weigh_into(z: torch.Tensor, w: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out = w ⊙ z`` for complex ``z``; a real ``w`` comes interleaved (see :func:`_interleaved`)."""
    if w is None:
        out.copy_(z)
    elif w.is_complex():
        torch.mul(z, w, out=out)
    else:
        torch.mul(torch.view_as_real(z), w, out=torch.view_as_real(out))  # (..., n, 2) real multiply


def modulated_fft(
    x: torch.Tensor,
    pre: torch.Tensor | None,
    post: torch.Tensor | None,
    ndim: int,
    *,
    inverse: bool = False,
) -> torch.Tensor:
    """``post ⊙ F(pre ⊙ x)`` over the last ``ndim`` dimensions (``F`` orthonormal; ``Fᴴ`` if ``inverse``).

    ``x``, ``pre`` and ``post`` broadcast against each other; the result has the broadcast
    shape. ``None`` skips a multiplication. Weights may be real or complex.

    Without autograd, the batch is processed in blocks of about :data:`BLOCK_ELEMENTS`: each
    block is weighted into one reused buffer, transformed, and weighted into one preallocated
    output, so a call allocates one full-size array, as a bare ``torch.fft.fftn`` does (fresh
    large allocations cost page faults), and real weights scale the real view of the data.
    With autograd it is three plain, differentiable torch calls. Both give the same numbers.

    Args:
        x: ``(..., *spatial)`` array, complex or real.
        pre: weights applied before the transform, ``(..., *spatial)`` or None.
        post: weights applied after the transform, ``(..., *spatial)`` or None.
        ndim: number of trailing dimensions transformed.
        inverse: apply the inverse (adjoint) transform.
    """
    dims = _check_ndim(x, ndim, "modulated_fft")
    operands = [t for t in (x, pre, post) if t is not None]
    full = broadcast_shape(*(t.shape for t in operands))
    batch = tuple(full[: len(full) - ndim])
    spatial = tuple(full[len(full) - ndim :])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in operands)
    blocks = [] if needs_grad else list(batch_blocks(batch, math.prod(spatial)))
    if len(blocks) < 2:
        y = _fft(x if pre is None else x * pre, dims, inverse)
        return y if post is None else y * post

    dtype = x.dtype if x.is_complex() else complex_dtype(x.dtype)
    for t in operands[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    out = torch.empty(full, dtype=dtype, device=x.device)  # (*batch, *spatial)
    xe = x.to(dtype).expand(full)  # (*batch, *spatial), a view unless x was real
    step = max(b[-1].stop - b[-1].start for b in blocks)  # type: ignore[union-attr]
    buf = torch.empty((step, *spatial), dtype=dtype, device=x.device) if pre is not None else None  # reused

    def prepare(w: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
        # -> (weight, has batch dimensions); real weights interleaved for the real-view multiply.
        if w is None:
            return None, False
        if w.ndim > ndim:
            return w.expand(full), True  # (*batch, *spatial), a view; interleaved per block
        return (w if w.is_complex() else _interleaved(w)), False

    p, p_batched = prepare(pre)
    q, q_batched = prepare(post)
    for idx in blocks:
        pb = p[idx] if p_batched else p  # type: ignore[index]
        qb = q[idx] if q_batched else q  # type: ignore[index]
        if p_batched and pb is not None and not pb.is_complex():
            pb = _interleaved(pb)
        if q_batched and qb is not None and not qb.is_complex():
            qb = _interleaved(qb)
        xb = xe[idx]  # (n, *spatial)
        if pb is not None:
            assert buf is not None
            _weigh_into(xb, pb, buf[: xb.shape[0]])
            xb = buf[: xb.shape[0]]
        _weigh_into(_fft(xb, dims, inverse), qb, out[idx])
    return out


def fft_filter(x: torch.Tensor, weight: torch.Tensor, ndim: int) -> torch.Tensor:
    """``Fᴴ(weight ⊙ F x)`` over the last ``ndim`` dimensions: a normal operator ``AᴴA`` of a masked FFT.

    Blocked like :func:`modulated_fft` without autograd (one full-size allocation), plain
    differentiable torch calls with it.

    Args:
        x: ``(..., *spatial)`` array, complex or real.
        weight: ``(..., *spatial)`` real or complex, in the uncentred FFT layout.
        ndim: number of trailing dimensions transformed.
    """
    dims = _check_ndim(x, ndim, "fft_filter")
    full = broadcast_shape(x.shape, weight.shape)
    batch, spatial = tuple(full[: len(full) - ndim]), tuple(full[len(full) - ndim :])
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    blocks = [] if needs_grad else list(batch_blocks(batch, math.prod(spatial)))
    if len(blocks) < 2:
        return _fft(_fft(x, dims, False) * weight, dims, True)

    dtype = torch.promote_types(x.dtype if x.is_complex() else complex_dtype(x.dtype), weight.dtype)
    out = torch.empty(full, dtype=dtype, device=x.device)  # (*batch, *spatial)
    xe = x.to(dtype).expand(full)  # (*batch, *spatial), a view unless x was real
    batched = weight.ndim > ndim
    w = weight.expand(full) if batched else (weight if weight.is_complex() else _interleaved(weight))
    for idx in blocks:
        k = _fft(xe[idx], dims, False)  # (n, *spatial), a fresh block
        wb = w[idx] if batched else w
        if batched and not wb.is_complex():
            wb = _interleaved(wb)
        _weigh_into(k, wb, k)  # in place
        out[idx].copy_(_fft(k, dims, True))
    return out


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """complex64 for float32 (and smaller), complex128 for float64."""
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _shift_fallback(x: torch.Tensor, dims: tuple[int, ...], inverse: bool) -> torch.Tensor:
    fn = torch.fft.ifftn if inverse else torch.fft.fftn
    return torch.fft.fftshift(fn(torch.fft.ifftshift(x, dim=dims), dim=dims, norm="ortho"), dim=dims)


def fftc(x: torch.Tensor, ndim: int = 2) -> torch.Tensor:
    """Centred orthonormal FFT ``fftshift(F(ifftshift(x)))`` over the last ``ndim`` dimensions.

    Args:
        x: ``(..., *spatial)``, complex (real is promoted).
        ndim: number of trailing dimensions transformed (2 for slices, 3 for volumes).

    Returns:
        Complex array of the same shape (and precision). Differentiable.
    """
    dims = _check_ndim(x, ndim, "fftc")
    spatial = tuple(x.shape[x.ndim - ndim :])
    if not is_even(spatial):
        return _shift_fallback(x, dims, inverse=False)
    pre, post = modulations(spatial, x.dtype, x.device)
    return modulated_fft(x, pre, post, ndim)


def ifftc(x: torch.Tensor, ndim: int = 2) -> torch.Tensor:
    """Centred orthonormal inverse FFT ``fftshift(Fᴴ(ifftshift(x)))``, the inverse and adjoint of ``fftc``.

    Args:
        x: ``(..., *spatial)`` k-space, complex (real is promoted).
        ndim: number of trailing dimensions transformed.
    """
    dims = _check_ndim(x, ndim, "ifftc")
    spatial = tuple(x.shape[x.ndim - ndim :])
    if not is_even(spatial):
        return _shift_fallback(x, dims, inverse=True)
    d, sd = modulations(spatial, x.dtype, x.device)
    return modulated_fft(x, sd, d, ndim, inverse=True)
