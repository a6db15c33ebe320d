"""Seeded Cartesian undersampling masks, following fastMRI's conventions.

Every sampler takes ``(shape, acceleration, center_fraction, seed)`` and returns a
``torch.bool`` mask of exactly ``shape``, ``(H, W)`` for a slice or ``(D, H, W)`` for a volume,
in the centred k-space layout of :func:`operators.fft.fftc` (zero frequency at index
``N // 2``). True means "sampled".

* ``random_1d`` and ``equispaced_1d`` choose phase-encode lines along the last dimension
  ``W`` (the mask is constant along every other dimension), like fastMRI's ``RandomMaskFunc``
  and ``EquispacedMaskFractionFunc``.
* ``variable_density_2d`` and ``poisson_disc`` choose points over the last two dimensions
  ``(H, W)`` (constant along ``D``), as for 3D Cartesian acquisitions with two phase-encode
  directions.

Conventions shared by all four:

* ``center_fraction`` in ``[0, 1)``: the ``round(center_fraction · N)`` central lines (per
  sampled dimension, a centred rectangle for the 2D samplers) are always sampled.
* ``acceleration`` ``R >= 1``: about ``1/R`` of the lines (points) are sampled *in total*,
  centre included. If the centre alone exceeds that budget, only the centre is sampled.
* Randomness comes only from ``np.random.default_rng(seed)`` (an int seed or a
  ``np.random.Generator``); the same seed gives the same mask, and no global RNG is touched.

Example:
    >>> from operators.masks import make_mask
    >>> m = make_mask("random_1d", (64, 64), acceleration=4, center_fraction=0.08, seed=0)
    >>> m.shape, m.dtype, bool(m[:, 30:34].all())
    (torch.Size([64, 64]), torch.bool, True)
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np
import torch

from operators.errors import ParameterError

__all__ = [
    "MASK_KINDS",
    "MaskKind",
    "random_1d",
    "equispaced_1d",
    "variable_density_2d",
    "poisson_disc",
    "make_mask",
    "center_slice",
]

MaskKind = Literal["random_1d", "equispaced_1d", "variable_density_2d", "poisson_disc"]
MASK_KINDS: tuple[str, ...] = get_args(MaskKind)

Seed = int | np.random.Generator


# -- validation and shared pieces ----------------------------------------------------------------
def _validate(
    shape: tuple[int, ...], acceleration: float, center_fraction: float, min_dims: int
) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise ParameterError(
            f"shape must be a tuple of ints like (H, W) or (D, H, W); found {shape!r}"
        ) from exc
    if len(shape) not in (2, 3) or len(shape) < min_dims or any(s < 1 for s in shape):
        raise ParameterError(f"shape must be (H, W) or (D, H, W) with positive sizes; found {shape}")
    if not (isinstance(acceleration, (int, float)) and math.isfinite(acceleration) and acceleration >= 1):
        raise ParameterError(
            f"acceleration must be >= 1 (R = 4 samples about a quarter of k-space); found {acceleration!r}"
        )
    if not (isinstance(center_fraction, (int, float)) and 0 <= center_fraction < 1):
        raise ParameterError(
            f"center_fraction must be in [0, 1) (e.g. 0.08 for 8% of lines); found {center_fraction!r}"
        )
    return shape


def _rng(seed: Seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (bool, float)) or not isinstance(seed, (int, np.integer)):
        raise ParameterError(f"seed must be an int or a numpy Generator; found {seed!r}")
    return np.random.default_rng(int(seed))


def center_slice(n: int, center_fraction: float) -> slice:
    """The ``round(center_fraction · n)`` central indices of a centred axis of length ``n`` (fastMRI)."""
    n_low = int(round(n * center_fraction))
    start = (n - n_low + 1) // 2
    return slice(start, start + n_low)


def _lines_to_mask(lines: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """A ``(W,)`` boolean line pattern broadcast to ``shape`` (constant along all but the last dim)."""
    return torch.from_numpy(np.broadcast_to(lines, shape).copy())


def _plane_to_mask(plane: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """An ``(H, W)`` boolean pattern broadcast to ``shape`` (constant along ``D``)."""
    return torch.from_numpy(np.broadcast_to(plane, shape).copy())


# -- 1D line samplers ----------------------------------------------------------------------------
def random_1d(
    shape: tuple[int, ...], acceleration: float, center_fraction: float, seed: Seed
) -> torch.Tensor:
    """Random phase-encode lines along ``W`` plus a fully sampled centre (fastMRI ``RandomMaskFunc``).

    Each line outside the centre is sampled independently with probability
    ``p = (W/R - n_low) / (W - n_low)``, so the expected total is ``W/R`` lines.

    Args:
        shape: ``(H, W)`` or ``(D, H, W)``.
        acceleration: ``R >= 1``.
        center_fraction: fraction of central lines always sampled, in ``[0, 1)``.
        seed: int seed or ``np.random.Generator``.

    Returns:
        Boolean mask of ``shape``, constant along all dimensions but the last.
    """
    shape = _validate(shape, acceleration, center_fraction, 2)
    rng = _rng(seed)
    w = shape[-1]
    centre = center_slice(w, center_fraction)
    n_low = centre.stop - centre.start
    prob = (w / acceleration - n_low) / (w - n_low) if w > n_low else 0.0
    lines = rng.uniform(size=w) < max(prob, 0.0)
    lines[centre] = True
    return _lines_to_mask(lines, shape)


def equispaced_1d(
    shape: tuple[int, ...], acceleration: float, center_fraction: float, seed: Seed
) -> torch.Tensor:
    """Equispaced phase-encode lines along ``W`` at a seeded random offset, plus a full centre.

    The spacing is ``(W - n_low) / (W/R - n_low)`` (fractional, floored per line), so that the
    lines outside the centre number ``W/R - n_low`` and the total is about ``W/R`` (fastMRI's
    ``EquispacedMaskFractionFunc``). The offset is drawn uniformly in ``[0, spacing)``.

    Args:
        shape: ``(H, W)`` or ``(D, H, W)``.
        acceleration: ``R >= 1``.
        center_fraction: fraction of central lines always sampled, in ``[0, 1)``.
        seed: int seed or ``np.random.Generator``.
    """
    shape = _validate(shape, acceleration, center_fraction, 2)
    rng = _rng(seed)
    w = shape[-1]
    centre = center_slice(w, center_fraction)
    n_low = centre.stop - centre.start
    lines = np.zeros(w, dtype=bool)
    outside = w / acceleration - n_low
    if outside > 0:
        spacing = (w - n_low) / outside
        offset = rng.uniform(0.0, spacing)
        lines[np.floor(np.arange(offset, w, spacing)).astype(np.int64)] = True  # offset + k·spacing < W
    lines[centre] = True
    return _lines_to_mask(lines, shape)


# -- 2D point samplers ---------------------------------------------------------------------------
def _radius(h: int, w: int) -> np.ndarray:
    """Normalised distance from the k-space centre, ``(H, W)`` in ``[0, 1]`` (1 at the corners)."""
    ky = (np.arange(h) - h // 2) / max(h / 2, 1)
    kx = (np.arange(w) - w // 2) / max(w / 2, 1)
    return np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2) / math.sqrt(2)  # (H, W)


def _centre_box(h: int, w: int, center_fraction: float) -> np.ndarray:
    box = np.zeros((h, w), dtype=bool)
    box[center_slice(h, center_fraction), center_slice(w, center_fraction)] = True
    return box  # (H, W)


def variable_density_2d(
    shape: tuple[int, ...],
    acceleration: float,
    center_fraction: float,
    seed: Seed,
    *,
    power: float = 2.0,
) -> torch.Tensor:
    """Random points over ``(H, W)`` with polynomial density ``p(r) ∝ (1 - r)^power``, plus a full centre.

    ``r`` is the distance from the k-space centre normalised to 1 at the corners. The density
    is scaled (``min(1, c·(1 - r)^power)``, ``c`` by bisection) so the expected number of points,
    centre box included, is ``H·W/R``; each point is then drawn independently.

    Args:
        shape: ``(H, W)`` or ``(D, H, W)``; the pattern is constant along ``D``.
        acceleration: ``R >= 1``.
        center_fraction: side of the fully sampled central box, as a fraction of ``H`` and ``W``.
        seed: int seed or ``np.random.Generator``.
        power: exponent of the polynomial density (larger: more concentrated at the centre).
    """
    shape = _validate(shape, acceleration, center_fraction, 2)
    if not power >= 0:
        raise ParameterError(f"power must be >= 0; found {power!r}")
    rng = _rng(seed)
    h, w = shape[-2:]
    if acceleration == 1:
        return _plane_to_mask(np.ones((h, w), dtype=bool), shape)
    box = _centre_box(h, w, center_fraction)
    density = (1.0 - _radius(h, w)) ** power  # (H, W)
    density[box] = 0.0
    budget = h * w / acceleration - box.sum()
    if budget <= 0 or density.sum() == 0:
        prob = np.zeros_like(density)
    else:
        lo, hi = 0.0, 1.0
        while np.minimum(1.0, hi * density).sum() < budget and hi < 1e12:
            hi *= 2.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if np.minimum(1.0, mid * density).sum() < budget else (lo, mid)
        prob = np.minimum(1.0, hi * density)
    plane = (rng.uniform(size=(h, w)) < prob) | box
    return _plane_to_mask(plane, shape)


def _disc_offsets(radius: float, row: int) -> np.ndarray:
    """Flat offsets (for rows of length ``row``) of the grid points strictly within ``radius`` of 0."""
    r = int(math.ceil(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = dy**2 + dx**2 < radius**2
    return (dy[keep] * row + dx[keep]).astype(np.int64)


def _dart_throw(order: np.ndarray, radii: np.ndarray, h: int, w: int, first: np.ndarray) -> np.ndarray:
    """Greedy Poisson-disc selection of grid points visited in ``order``.

    A point is kept unless it lies strictly within ``radii[q]`` of a point ``q`` kept before
    it; the points ``first`` are kept before all others. Works on a grid padded by the largest
    radius, so a disc's flat offsets never wrap around a row.
    """
    pad = int(math.ceil(radii.max())) + 1
    row = w + 2 * pad
    blocked = np.zeros((h + 2 * pad) * row, dtype=bool)  # padded (H + 2 pad, W + 2 pad), flat
    levels = (np.round(radii * 4) / 4).tolist()  # quarter-pixel radius steps share one footprint
    discs: dict[float, np.ndarray] = {}
    index = np.arange(h * w)
    padded = ((index // w + pad) * row + index % w + pad).tolist()  # flat index in the padded grid
    keep = np.zeros(h * w, dtype=bool)
    forced = set(first.tolist())
    for p in first.tolist() + order.tolist():
        q = padded[p]
        if keep[p] or (blocked[q] and p not in forced):
            continue
        keep[p] = True
        offsets = discs.get(levels[p])
        if offsets is None:
            offsets = discs[levels[p]] = _disc_offsets(levels[p], row)
        blocked[q + offsets] = True
    return keep


def poisson_disc(
    shape: tuple[int, ...],
    acceleration: float,
    center_fraction: float,
    seed: Seed,
    *,
    density_slope: float = 2.0,
    tolerance: float = 0.02,
) -> torch.Tensor:
    """Variable-density Poisson-disc points over ``(H, W)``, plus a fully sampled centre box.

    Dart throwing on the grid: points are visited in a seeded random order (the centre box
    first) and kept unless they fall within the exclusion radius of a point already kept.
    The radius grows with the distance ``r`` from the centre (normalised to 1 at the corners),
    ``ρ(r) = ρ₀ (1 + density_slope · r)``, so the density falls about as ``1/ρ(r)²``. The
    scale ``ρ₀`` is found by bisection so that about ``H·W/R`` points are kept (within
    ``tolerance`` relative, when the grid allows it). 256 × 256 takes about a second.

    Args:
        shape: ``(H, W)`` or ``(D, H, W)``; the pattern is constant along ``D``.
        acceleration: ``R >= 1``.
        center_fraction: side of the fully sampled central box, as a fraction of ``H`` and ``W``.
        seed: int seed or ``np.random.Generator``.
        density_slope: growth of the exclusion radius from centre to corner (0: uniform).
        tolerance: relative tolerance on the number of points.
    """
    shape = _validate(shape, acceleration, center_fraction, 2)
    if not density_slope >= 0:
        raise ParameterError(f"density_slope must be >= 0; found {density_slope!r}")
    rng = _rng(seed)
    h, w = shape[-2:]
    box = _centre_box(h, w, center_fraction)
    target = h * w / acceleration
    if acceleration == 1:
        return _plane_to_mask(np.ones((h, w), dtype=bool), shape)
    if box.sum() >= target:
        return _plane_to_mask(box, shape)
    order = rng.permutation(h * w)
    first = np.flatnonzero(box.ravel())
    profile = (1.0 + density_slope * _radius(h, w)).ravel()  # (H·W,)

    def run(rho0: float) -> np.ndarray:
        return _dart_throw(order, rho0 * profile, h, w, first)

    # Radius 1 keeps every point; the count falls as the radius grows. Bisect on log(ρ₀).
    lo, hi = 1.0 / profile.max(), max(2.0, math.sqrt(h * w / target) * 2)
    best = run(lo)
    for _ in range(30):
        mid = math.sqrt(lo * hi)
        keep = run(mid)
        n = keep.sum()
        if abs(n - target) < abs(best.sum() - target):
            best = keep
        if abs(n - target) <= tolerance * target:
            break
        lo, hi = (mid, hi) if n > target else (lo, mid)
    return _plane_to_mask(best.reshape(h, w), shape)


# -- dispatcher ----------------------------------------------------------------------------------
_SAMPLERS = {
    "random_1d": random_1d,
    "equispaced_1d": equispaced_1d,
    "variable_density_2d": variable_density_2d,
    "poisson_disc": poisson_disc,
}


def make_mask(
    kind: MaskKind, shape: tuple[int, ...], acceleration: float, center_fraction: float, seed: Seed
) -> torch.Tensor:
    """The mask of ``kind`` (one of :data:`MASK_KINDS`); see the sampler of that name."""
    if kind not in _SAMPLERS:
        raise ParameterError(f"kind must be one of {MASK_KINDS}; found {kind!r}")
    return _SAMPLERS[kind](shape, acceleration, center_fraction, seed)
