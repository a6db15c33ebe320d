"""Seeded 3D phantoms with label volumes.

Two families:

* :func:`random_ellipsoids`: a head-like outer ellipsoid filled with randomly placed,
  rotated ellipsoids of a few tissue classes, times a smooth multiplicative intensity
  field (like a receive-coil bias). The label volume gives each voxel its tissue class.
* :func:`shepp_logan_3d`: the modified 3D Shepp-Logan phantom (Kak & Slaney's 2D
  phantom extended to ellipsoids), additive intensities.

Both return a :class:`Phantom` of numpy arrays with layout ``(D, H, W)``. The same
arguments and seed always give the same arrays; the global RNG state is never used.

Example:
    >>> p = random_ellipsoids((8, 32, 32), seed=3)
    >>> p.image.shape, p.image.dtype, p.labels.dtype
    ((8, 32, 32), dtype('float32'), dtype('uint8'))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from operators.errors import ParameterError

__all__ = ["Phantom", "random_ellipsoids", "shepp_logan_3d", "TISSUE_CLASSES"]

#: Label values of :func:`random_ellipsoids`: 0 background, 1 outer tissue, 2.. inner classes.
TISSUE_CLASSES = ("background", "tissue", "fluid", "lesion", "dense")


@dataclass(frozen=True)
class Phantom:
    """A phantom volume.

    Attributes:
        image: float32 ``(D, H, W)`` intensities, roughly in [0, 1].
        labels: uint8 ``(D, H, W)`` tissue classes (see ``TISSUE_CLASSES``).
    """

    image: np.ndarray
    labels: np.ndarray


def _grid(shape: tuple[int, int, int]) -> np.ndarray:
    """Normalised coordinates in [-1, 1], shape (3, D, H, W) ordered (z, y, x)."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) if n > 1 else np.zeros(1, np.float32) for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix (3, 3) from Z-Y-Z Euler angles in radians."""
    a, b, c = angles

    def rz(t: float) -> np.ndarray:
        return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])

    def ry(t: float) -> np.ndarray:
        return np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])

    return (rz(a) @ ry(b) @ rz(c)).astype(np.float32)


def _inside(grid: np.ndarray, center: np.ndarray, axes: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Boolean (D, H, W): points of ``grid`` inside the ellipsoid."""
    d = grid - center[:, None, None, None]  # (3, D, H, W)
    local = np.einsum("ij,jdhw->idhw", rot.T, d)  # (3, D, H, W) in the ellipsoid frame
    return np.sum((local / axes[:, None, None, None]) ** 2, axis=0) <= 1.0


def _check_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise ParameterError(f"phantom shape must be three positive sizes (D, H, W); found {tuple(shape)}")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def random_ellipsoids(
    shape: tuple[int, int, int],
    seed: int,
    *,
    n_ellipsoids: int = 10,
    bias_strength: float = 0.25,
) -> Phantom:
    """A random-ellipsoid phantom with smooth intensity variation and labels.

    The image is ``(Σ_k c_k 1[x ∈ E_k] painted in order) · (1 + b · f(x))`` where ``f`` is a
    smooth random field in [-1, 1] made of a few low-frequency cosines and ``b`` is
    ``bias_strength``. Each ellipsoid also adds a gentle linear intensity ramp so that
    regions are not perfectly flat.

    Args:
        shape: ``(D, H, W)``.
        seed: the seed; the same seed gives the same phantom.
        n_ellipsoids: number of inner ellipsoids.
        bias_strength: amplitude of the smooth multiplicative field, in [0, 1).
    """
    d, h, w = _check_shape(shape)
    if not 0 <= bias_strength < 1:
        raise ParameterError(f"bias_strength must be in [0, 1); found {bias_strength}")
    rng = np.random.default_rng(seed)
    grid = _grid((d, h, w))
    image = np.zeros((d, h, w), np.float32)
    labels = np.zeros((d, h, w), np.uint8)

    outer_axes = np.array([0.9, 0.85, 0.75]) * rng.uniform(0.9, 1.0, 3)
    outer = _inside(
        grid, np.zeros(3, np.float32), outer_axes.astype(np.float32), _rotation(rng.uniform(-0.2, 0.2, 3))
    )
    image[outer] = rng.uniform(0.35, 0.5)
    labels[outer] = 1

    for _ in range(n_ellipsoids):
        cls = int(rng.integers(2, len(TISSUE_CLASSES)))
        axes = rng.uniform(0.08, 0.35, 3).astype(np.float32)
        center = (rng.uniform(-0.5, 0.5, 3) * outer_axes).astype(np.float32)
        inside = _inside(grid, center, axes, _rotation(rng.uniform(0, np.pi, 3))) & outer
        level = {2: rng.uniform(0.05, 0.2), 3: rng.uniform(0.7, 1.0), 4: rng.uniform(0.55, 0.75)}[cls]
        ramp = 1.0 + 0.15 * np.tensordot(
            rng.uniform(-1, 1, 3).astype(np.float32), grid - center[:, None, None, None], 1
        )
        image[inside] = (level * ramp)[inside]
        labels[inside] = cls

    field = np.zeros((d, h, w), np.float32)
    for _ in range(3):
        k = rng.uniform(0.5, 2.0, 3).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi)
        field += np.cos(np.pi * np.tensordot(k, grid, 1) + phase)
    field /= max(float(np.abs(field).max()), 1e-6)
    image *= 1.0 + bias_strength * field
    return Phantom(image=np.clip(image, 0, None).astype(np.float32), labels=labels)


# Modified 3D Shepp-Logan: (A, a, b, c, x0, y0, z0, phi[deg]) with axes (x, y, z).
_SHEPP_LOGAN_3D = np.array(
    [
        [1.0, 0.6900, 0.920, 0.810, 0.0, 0.0, 0.0, 0.0],
        [-0.8, 0.6624, 0.874, 0.780, 0.0, -0.0184, 0.0, 0.0],
        [-0.2, 0.1100, 0.310, 0.220, 0.22, 0.0, 0.0, -18.0],
        [-0.2, 0.1600, 0.410, 0.280, -0.22, 0.0, 0.0, 18.0],
        [0.1, 0.2100, 0.250, 0.410, 0.0, 0.35, -0.15, 0.0],
        [0.1, 0.0460, 0.046, 0.050, 0.0, 0.1, 0.25, 0.0],
        [0.1, 0.0460, 0.046, 0.050, 0.0, -0.1, 0.25, 0.0],
        [0.1, 0.0460, 0.023, 0.050, -0.08, -0.605, 0.0, 0.0],
        [0.1, 0.0230, 0.023, 0.020, 0.0, -0.606, 0.0, 0.0],
        [0.1, 0.0230, 0.046, 0.020, 0.06, -0.605, 0.0, 0.0],
    ]
)


def shepp_logan_3d(shape: tuple[int, int, int]) -> Phantom:
    """The modified 3D Shepp-Logan phantom, ``(D, H, W)``; labels number the ellipsoids painted last."""
    d, h, w = _check_shape(shape)
    z, y, x = _grid((d, h, w))
    image = np.zeros((d, h, w), np.float32)
    labels = np.zeros((d, h, w), np.uint8)
    for i, (amp, a, b, c, x0, y0, z0, phi) in enumerate(_SHEPP_LOGAN_3D):
        t = np.deg2rad(phi)
        xr = (x - x0) * np.cos(t) + (-(y - y0)) * np.sin(t)
        yr = -(x - x0) * np.sin(t) + (-(y - y0)) * np.cos(t)
        inside = (xr / a) ** 2 + (yr / b) ** 2 + ((z - z0) / c) ** 2 <= 1.0
        image[inside] += amp
        labels[inside] = i + 1
    return Phantom(image=np.clip(image, 0, None), labels=labels)
