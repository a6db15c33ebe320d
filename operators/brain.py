"""A seeded procedural brain phantom: a T1-weighted-like head in axial slices, with tissue labels.

:func:`brain_phantom` returns a :class:`~operators.phantoms.Phantom` ``(D, H, W)``, D the slice
axis. Like :mod:`operators.phantoms` it is deterministic for a seed and never touches global RNG
state; unlike the random ellipsoids it has the fine structure of real anatomy (folded cortex,
thin sulci, partial volume, tissue texture), which is what limits compressed sensing on real
scans.

Geometry. World coordinates ``p = (z, y, x)``: ``y`` (H, anterior at row 0) and ``x`` (W) span
``[-1, 1]`` over the field of view, ``z`` spans ``[-z_extent, z_extent]`` in the same units
(one unit is about 110 mm; ``z = 0`` is near the bodies of the lateral ventricles). The head
frame is ``u = R (p - c)`` with a small random rotation ``R`` and offset ``c``. Every structure
is a signed distance ``sd(p)`` (negative inside):

* head: an egg-shaped ellipsoid, ``ρ(u) = |u / (A_z, A_y, A_x (1 + ε u_y / A_y))|``,
  ``sd_head = (ρ - 1) / |∇ρ| - m(p)`` with ``m`` a low-frequency random field; scalp, skull,
  cerebrospinal fluid (CSF) and the pial surface are parallel layers
  ``sd_head + t_scalp(p)``, ``+ t_skull(p)``, ``+ t_csf(p)`` (smoothly varying thicknesses);
* sulci: thin CSF sheets ``|s| < w/2`` around the zero set of a band-limited random wave
  ``g(u) = Σ_k a cos(k_k · R₀ u/|u| + κ_k |u| + φ_k)``, ``|k_k| ≈ k₀`` (the radial projection
  makes the sheets run across the surface, the random radial rates ``κ_k`` tilt and bend them
  with depth), with ``s = g / |∇g|``, down to a random depth
  ``D_s(p)`` below the pial surface; the interhemispheric fissure is a sheet ``|u_x - δ(p)| < w_f/2``
  outside the central core;
* cortical grey matter: the ribbon within ``t_gm(p)`` of CSF,
  ``d_c = min(depth, sd_sulci, sd_fissure) < t_gm``; white matter is the rest of the brain;
* deep structures, ellipsoids in brain-relative coordinates: the lateral ventricles (curved
  bodies, frontal, occipital and temporal horns) and the third ventricle, scaled by a subject's
  atrophy; thalamus, caudate head and lentiform nucleus (bilateral);
* vessels: the superior sagittal sinus along the inner table, paired internal cerebral veins and
  a few cortical veins as tubes around smooth random curves; lesions: 0-3 small ellipsoids, most
  in white matter, bright or dark.

Appearance. Each structure covers a fraction ``α ∈ [0, 1]`` of a voxel, from its signed
distance and the voxel's footprint along the surface normal ``h = Σ_i |n_i| Δ_i``:
``α = clip(1/2 - sd/h, 0, 1)`` for solids, the exact overlap of ``[s - h/2, s + h/2]`` with
``[-w/2, w/2]`` for thin sheets. Layers are painted in order, ``I ← I + α (v - I)``, with tissue
values ``v = μ_c (1 + τ_c T(p))``: ``μ_c`` T1-like means jittered by a few percent per subject
(white matter brightest, grey darker, CSF dark, scalp fat bright, skull dark around a brighter
diploë) and ``T`` a soft-limited, unit-variance Gaussian field (white noise smoothed at two
scales, ``τ_c`` a few percent). Finally ``I ← I · (1 + b f(p))``, ``f`` a sum of low-frequency
cosines with ``|f| <= 1`` and ``b = bias_strength``. Labels (:data:`BRAIN_CLASSES`) are the hard
classes: each layer claims the voxels it covers at least half.

Between subjects (seeds) the head size, shape and pose, the folding pattern and sulcal depth,
the atrophy (ventricle size, sulcal and subarachnoid width), the tissue contrast, the texture
amplitude and grain, the vessels and the lesions all vary. The anatomy is drawn in continuous
coordinates, so one seed gives the same head at any resolution; only the texture is drawn on
the grid.

Example:
    >>> p = brain_phantom((16, 96, 96), seed=0)
    >>> p.image.shape, p.image.dtype, p.labels.dtype
    ((16, 96, 96), dtype('float32'), dtype('uint8'))
    >>> BRAIN_CLASSES[int(p.labels[8, 48, 38])]
    'white_matter'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from operators.errors import ParameterError, ShapeError
from operators.phantoms import Phantom

__all__ = ["BRAIN_CLASSES", "brain_phantom"]

#: Label values of :func:`brain_phantom`: ``labels == i`` is the class ``BRAIN_CLASSES[i]``.
BRAIN_CLASSES = (
    "background",
    "scalp",
    "skull",
    "csf",
    "grey_matter",
    "white_matter",
    "ventricles",
    "deep_grey",
    "vessels",
    "lesions",
)
_LABEL = {name: i for i, name in enumerate(BRAIN_CLASSES)}

#: Smallest size of every dimension (finite differences and the folded cortex need a few voxels).
MIN_SIZE = 8

# T1-like mean intensities; each is jittered by a few percent per subject.
_MEANS = {
    "fat": 0.82, "skin": 0.50, "galea": 0.40, "bone": 0.06, "diploe": 0.38, "csf": 0.10,
    "grey_matter": 0.46, "white_matter": 0.72, "deep_grey": 0.58, "vessels": 0.85,
    "lesion_bright": 0.86, "lesion_dark": 0.28,
}  # fmt: skip

# Relative texture amplitude per tissue (times the subject's τ).
_TEXTURE = {"scalp": 2.0, "skull": 2.0, "csf": 0.5, "grey_matter": 1.3, "white_matter": 1.0, "deep_grey": 1.2}

Box = tuple[slice, slice, slice]


# -- geometry ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Grid:
    """Voxel-centre world coordinates and spacing of a ``(D, H, W)`` volume."""

    z: np.ndarray  # (D,)
    y: np.ndarray  # (H,)
    x: np.ndarray  # (W,)
    spacing: np.ndarray  # (3,) (Δz, Δy, Δx)

    @classmethod
    def make(cls, shape: tuple[int, int, int], z_extent: float) -> _Grid:
        extents = (z_extent, 1.0, 1.0)
        axes = [
            ((np.arange(n) + 0.5) * (2 * e / n) - e).astype(np.float32)
            for n, e in zip(shape, extents, strict=True)
        ]
        return cls(*axes, spacing=np.array([2 * e / n for n, e in zip(shape, extents, strict=True)]))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z.size, self.y.size, self.x.size)

    def box(self, centre: np.ndarray, half: np.ndarray) -> Box | None:
        """Index ranges of the voxels within ``centre ± half`` (world, (z, y, x)); None if empty."""
        out = []
        for axis, c, e in zip((self.z, self.y, self.x), centre, half, strict=True):
            lo, hi = np.searchsorted(axis, c - e), np.searchsorted(axis, c + e, side="right")
            if hi <= lo:
                return None
            out.append(slice(int(lo), int(hi)))
        return (out[0], out[1], out[2])

    def local(self, m: np.ndarray, origin: np.ndarray, box: Box | None = None) -> list[np.ndarray]:
        """Coordinates ``l = M (p - origin)`` over the grid (or a box), three arrays ``(d, h, w)``."""
        sz, sy, sx = box if box is not None else (slice(None),) * 3
        d = (
            (self.z[sz] - origin[0])[:, None, None],  # (d, 1, 1)
            (self.y[sy] - origin[1])[None, :, None],  # (1, h, 1)
            (self.x[sx] - origin[2])[None, None, :],  # (1, 1, w)
        )
        return [(m[i, 0] * d[0] + m[i, 1] * d[1] + m[i, 2] * d[2]).astype(np.float32) for i in range(3)]

    def footprint(self, n: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """Voxel width ``Σ_i |n_i| Δ_i`` along unit normals ``n`` (three arrays, world axes)."""
        dz, dy, dx = self.spacing
        return (np.abs(n[0]) * dz + np.abs(n[1]) * dy + np.abs(n[2]) * dx).astype(np.float32)


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation (3, 3) of (z, y, x) vectors: ``yaw`` in the axial (y, x) plane, then pitch and roll."""
    cy, sy, cp, sp, cr, sr = (math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch),
                              math.cos(roll), math.sin(roll))  # fmt: skip
    r_yaw = np.array([[1, 0, 0], [0, cy, -sy], [0, sy, cy]])
    r_pitch = np.array([[cp, -sp, 0], [sp, cp, 0], [0, 0, 1]])
    r_roll = np.array([[cr, 0, -sr], [0, 1, 0], [sr, 0, cr]])
    return r_yaw @ r_pitch @ r_roll


def _ramp(sd: np.ndarray, h: np.ndarray | float) -> np.ndarray:
    """Covered fraction of a voxel of footprint ``h`` at signed distance ``sd`` from a surface."""
    return np.clip(0.5 - sd / h, 0.0, 1.0).astype(np.float32)


def _slab(s: np.ndarray, w: np.ndarray | float, h: np.ndarray | float) -> np.ndarray:
    """Covered fraction of a voxel ``[s - h/2, s + h/2]`` by a sheet ``[-w/2, w/2]`` (exact in 1D)."""
    overlap = np.minimum(s + h / 2, w / 2) - np.maximum(s - h / 2, -w / 2)
    return np.clip(overlap / h, 0.0, 1.0).astype(np.float32)


# -- random fields -------------------------------------------------------------------------------------
def _wave_field(
    rng: np.random.Generator, grid: _Grid, k_lo: float, k_hi: float, modes: int = 16
) -> np.ndarray:
    """A smooth unit-variance random field ``sqrt(2/K) Σ_k cos(k_k · p + φ_k)``, ``(D, H, W)`` float32.

    Wave vectors have random directions and ``|k| ∈ [k_lo, k_hi]`` (radians per unit). Each mode
    is separable, so the sum is one real matrix product over the (z, y) plane and x.
    """
    k = rng.standard_normal((modes, 3))
    k *= (rng.uniform(k_lo, k_hi, modes) / np.linalg.norm(k, axis=1))[:, None]  # (K, 3)
    phase = rng.uniform(0, 2 * np.pi, modes)
    ez = np.exp(1j * (np.outer(k[:, 0], grid.z) + phase[:, None]))  # (K, D)
    ey = np.exp(1j * np.outer(k[:, 1], grid.y))  # (K, H)
    ex = np.exp(1j * np.outer(k[:, 2], grid.x))  # (K, W)
    d, h, w = grid.shape
    zy = (ez[:, :, None] * ey[:, None, :]).reshape(modes, d * h)  # (K, D·H)
    field = zy.real.T @ ex.real - zy.imag.T @ ex.imag  # (D·H, W)
    return (math.sqrt(2.0 / modes) * field).reshape(d, h, w).astype(np.float32)  # (D, H, W)


@dataclass(frozen=True)
class _Folding:
    """The folding wave ``g(u) = sqrt(2/K) Σ_k cos(k_k · r₀ u/|u| + κ_k |u| + φ_k)`` in the head frame.

    On the sphere ``r₀ u/|u|`` it is a random wave with ``|k_k| ≈ k₀``; constant along rays
    (``κ = 0``) its zero set would be radial sheets, and the random radial phase rates ``κ_k`` tilt
    and bend them with depth, so sulci do not look like spokes in a slice.
    """

    k: np.ndarray  # (K, 4): tangential wave vector (3) and radial rate κ
    phase: np.ndarray  # (K,)
    r0: float

    @classmethod
    def draw(cls, rng: np.random.Generator, k0: float, tilt: float, r0: float, modes: int = 128) -> _Folding:
        k = rng.standard_normal((modes, 3))
        k *= (k0 * rng.uniform(0.8, 1.2, modes) / np.linalg.norm(k, axis=1))[:, None]
        kappa = tilt * k0 * rng.standard_normal((modes, 1))
        phase = rng.uniform(0, 2 * np.pi, modes).astype(np.float32)
        return cls(np.concatenate([k, kappa], axis=1).astype(np.float32), phase, r0)

    def sheets(self, u: np.ndarray, rot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Signed distance ``g / |∇g|`` ``(N,)`` to the zero set and its unit normal ``(N, 3)`` (world axes).

        Args:
            u: head-frame points ``(N, 3)``.
            rot: the head rotation (world -> head frame), ``(3, 3)``.
        """
        amp = np.float32(math.sqrt(2.0 / len(self.phase)))
        dist = np.empty(len(u), np.float32)
        normal = np.empty((len(u), 3), np.float32)
        for start in range(0, len(u), 16384):
            p = u[start : start + 16384]  # (n, 3)
            r = np.linalg.norm(p, axis=1, keepdims=True) + 1e-6  # (n, 1)
            radial = p / r  # (n, 3)
            q = np.concatenate([self.r0 * radial, r], axis=1)  # (n, 4)
            phase = q @ self.k.T + self.phase  # (n, K)
            g = np.cos(phase) @ np.full(len(self.phase), amp, np.float32)  # (n,)
            dq = -(np.sin(phase) * amp) @ self.k  # (n, 4): ∂g/∂q
            tangential = dq[:, :3] - (dq[:, :3] * radial).sum(axis=1, keepdims=True) * radial
            grad = tangential * (self.r0 / r) + dq[:, 3:] * radial  # (n, 3): ∂g/∂u
            world = grad @ rot  # (n, 3)
            length = np.linalg.norm(world, axis=1) + 1e-6
            dist[start : start + len(p)] = g / length
            normal[start : start + len(p)] = world / length[:, None]
        return dist, normal


def _texture(rng: np.random.Generator, grid: _Grid, fine: float, coarse: float, p_fine: float) -> np.ndarray:
    """Unit-variance Gaussian texture ``(D, H, W)``: white noise smoothed at two scales, soft-limited."""
    out = np.zeros(grid.shape, np.float32)
    for sigma, weight in ((fine, math.sqrt(p_fine)), (coarse, math.sqrt(1 - p_fine))):
        field = gaussian_filter(
            rng.standard_normal(grid.shape, np.float32), sigma / grid.spacing, mode="wrap"
        )
        out += weight * field / max(float(field.std()), 1e-12)
    return 2.5 * np.tanh(out / 2.5)


# -- the subject -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Subject:
    """The per-seed anatomy and contrast, all drawn before any grid-sized random numbers."""

    axes: np.ndarray  # head semi-axes (z, y, x)
    egg: float  # posterior widening of the x semi-axis
    rot: np.ndarray  # (3, 3) world -> head frame
    centre: np.ndarray  # (3,) head centre, world
    t_scalp: float
    t_skull: float
    t_csf: float
    t_gm: float
    atrophy: float  # 0 young .. 1 atrophic: ventricles, sulci and the subarachnoid space widen
    sulcus_width: float
    sulcus_depth: float
    fissure_width: float
    fissure_core: float  # the fissure exists where the head's ρ exceeds this
    folding: _Folding
    means: dict[str, float]
    tau: float
    grain: tuple[float, float, float]  # texture: fine σ, coarse σ (units), share of the fine part
    asym: np.ndarray  # (16,) relative size differences of the deep structures, left and right

    @property
    def brain_axes(self) -> np.ndarray:
        return self.axes - (self.t_scalp + self.t_skull + self.t_csf)

    def to_world(self, u: np.ndarray) -> np.ndarray:
        """Head-frame points ``(..., 3)`` to world points ``(..., 3)``."""
        return u @ self.rot + self.centre


def _draw_subject(rng: np.random.Generator) -> _Subject:
    axes = rng.uniform(0.90, 1.0) * np.array([0.98, 0.90, 0.74]) * rng.uniform(0.96, 1.04, 3)
    atrophy = float(rng.beta(1.5, 2.5))
    jitter = np.clip(rng.standard_normal(len(_MEANS)), -2, 2)
    return _Subject(
        axes=axes,
        egg=rng.uniform(0.02, 0.07),
        rot=_rotation(rng.uniform(-0.12, 0.12), rng.uniform(-0.06, 0.06), rng.uniform(-0.05, 0.05)),
        centre=np.array([rng.uniform(-0.16, -0.08), rng.uniform(-0.03, 0.03), rng.uniform(-0.02, 0.02)]),
        t_scalp=rng.uniform(0.040, 0.055),
        t_skull=rng.uniform(0.045, 0.065),
        t_csf=rng.uniform(0.010, 0.016) * (1 + 0.8 * atrophy),
        t_gm=rng.uniform(0.023, 0.029),
        atrophy=atrophy,
        sulcus_width=rng.uniform(0.008, 0.013) * (1 + 1.2 * atrophy),
        sulcus_depth=rng.uniform(0.12, 0.17),
        fissure_width=rng.uniform(0.007, 0.012) * (1 + atrophy),
        fissure_core=rng.uniform(0.42, 0.52),
        folding=_Folding.draw(rng, rng.uniform(32.0, 40.0), 0.4, float(np.mean(axes)) - 0.11),
        means={name: m * (1 + 0.04 * j) for (name, m), j in zip(_MEANS.items(), jitter, strict=True)},
        tau=rng.uniform(0.015, 0.035),
        grain=(rng.uniform(0.008, 0.014), rng.uniform(0.03, 0.05), rng.uniform(0.4, 0.7)),
        asym=rng.uniform(-0.06, 0.06, 16),
    )


# -- structures ------------------------------------------------------------------------------------------
def _head_rho(
    u: list[np.ndarray] | np.ndarray, s: _Subject
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Ellipsoidal radius ``ρ`` of head-frame points, ``|∇ρ|`` and the unit normal (head frame)."""
    a = [s.axes[0], s.axes[1], s.axes[2] * (1 + s.egg * u[1] / s.axes[1])]
    rho = np.sqrt(sum((u[i] / a[i]) ** 2 for i in range(3))) + 1e-6
    grad = [u[i] / (a[i] ** 2 * rho) for i in range(3)]
    norm = np.sqrt(sum(g**2 for g in grad)) + 1e-6
    return rho, norm, [g / norm for g in grad]


def _ellipsoid(
    grid: _Grid,
    s: _Subject,
    centre: np.ndarray,
    axes: np.ndarray,
    q: np.ndarray,
    bend: float = 0.0,
    blur: float = 0.0,
) -> tuple[Box, np.ndarray] | None:
    """Coverage of an ellipsoid given in the head frame (centre, semi-axes, local rotation ``q``), on its box.

    ``bend`` curves it (a banana: its x shifts by ``bend (l_y / a_y)²``); ``blur`` widens the edge.
    """
    m = q @ s.rot  # world -> local
    world = s.to_world(centre)
    half = np.sqrt(((m.T * axes) ** 2).sum(axis=1)) + abs(bend) + 2 * grid.spacing + blur
    box = grid.box(world, half)
    if box is None:
        return None
    l0, l1, l2 = grid.local(m, world, box)
    l2 = l2 - bend * (l1 / axes[1]) ** 2
    rho = np.sqrt((l0 / axes[0]) ** 2 + (l1 / axes[1]) ** 2 + (l2 / axes[2]) ** 2) + 1e-6
    g = [l0 / (axes[0] ** 2 * rho), l1 / (axes[1] ** 2 * rho), l2 / (axes[2] ** 2 * rho)]
    norm = np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2) + 1e-6
    normal = [sum(m[j, i] * g[j] for j in range(3)) / norm for i in range(3)]  # world axes
    return box, _ramp((rho - 1) / norm, grid.footprint(normal) + blur)


def _yaw(angle: float) -> np.ndarray:
    return _rotation(angle, 0.0, 0.0)


def _ventricle_parts(v: float) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """Lateral ventricle parts ``(centre, semi-axes, yaw degrees, bend)``, (z, y, x) in brain semi-axes.

    Right side (x > 0; mirrored for the left); ``v`` is the subject's ventricle size. In order: the
    body, the frontal, occipital and temporal horns.
    """
    return [
        (np.array([0.17, 0.02, 0.03 + 0.06 * v]), np.array([0.09 * v, 0.36, 0.055 * v]), 0.0, 0.05),
        (np.array([0.06, -0.28, 0.03 + 0.065 * v]), np.array([0.13 * v, 0.14, 0.065 * v]), -15.0, 0.0),
        (np.array([0.06, 0.38, 0.12 + 0.06 * v]), np.array([0.11 * v, 0.17, 0.05 * v]), 25.0, 0.0),
        (np.array([-0.30, 0.04, 0.40]), np.array([0.06 * v, 0.22, 0.035 * v]), 10.0, 0.0),
    ]  # fmt: skip


_NUCLEI = [  # thalamus, caudate head, lentiform nucleus: (centre, semi-axes, yaw degrees), as above
    (np.array([-0.02, 0.12, 0.11]), np.array([0.13, 0.17, 0.09]), 0.0),
    (np.array([0.06, -0.20, 0.21]), np.array([0.12, 0.12, 0.06]), -10.0),
    (np.array([-0.07, -0.02, 0.33]), np.array([0.14, 0.22, 0.075]), 8.0),
]


def _deep(grid: _Grid, s: _Subject) -> tuple[np.ndarray, np.ndarray]:
    """Coverage ``(D, H, W)`` of the deep grey nuclei and of the ventricles."""
    b = s.brain_axes
    v = 0.7 + 1.1 * s.atrophy
    nuclei = np.zeros(grid.shape, np.float32)
    ventricles = np.zeros(grid.shape, np.float32)
    parts = [(c, a, yaw, 0.0, nuclei, 0.015) for c, a, yaw in _NUCLEI]
    parts += [(c, a, yaw, bend, ventricles, 0.0) for c, a, yaw, bend in _ventricle_parts(v)]
    for i, (c, a, yaw, bend, target, blur) in enumerate(parts):
        for side in (1.0, -1.0):
            jitter = 1 + s.asym[2 * i + (side < 0)]
            centre = np.array([c[0], c[1], side * c[2]]) * b
            found = _ellipsoid(grid, s, centre, a * b * jitter, _yaw(math.radians(side * yaw)),
                               side * bend * b[2], blur)  # fmt: skip
            if found is not None:
                box, alpha = found
                target[box] = np.maximum(target[box], alpha)
    third = _ellipsoid(
        grid, s, np.array([-0.1, 0.0, 0.0]) * b, np.array([0.12, 0.15, 0.012 * v]) * b, np.eye(3)
    )
    if third is not None:
        ventricles[third[0]] = np.maximum(ventricles[third[0]], third[1])
    return nuclei, ventricles


def _tube(grid: _Grid, points: np.ndarray, radius: float, out: np.ndarray) -> None:
    """Raise ``out`` to the coverage of a tube of ``radius`` around a polyline (world points ``(n, 3)``)."""
    for a, b in zip(points[:-1], points[1:], strict=True):
        box = grid.box((a + b) / 2, np.abs(b - a) / 2 + radius + 2 * grid.spacing)
        if box is None:
            continue
        d = grid.local(np.eye(3), a, box)  # p - a, three arrays
        ab = b - a
        t = np.clip(sum(d[i] * ab[i] for i in range(3)) / max(float(ab @ ab), 1e-12), 0, 1)
        off = [d[i] - t * ab[i] for i in range(3)]  # from the closest point on the segment
        dist = np.sqrt(off[0] ** 2 + off[1] ** 2 + off[2] ** 2)
        h = np.maximum(grid.footprint([o / (dist + 1e-9) for o in off]), float(grid.spacing.min()))
        # Overlap of the voxel with [-r, r] across the tube, times its share along the other
        # cross-section axis, so a tube thinner than a voxel covers about π r² / h².
        alpha = _slab(dist, 2 * radius, h) * np.minimum(1.0, (math.pi / 2) * radius / h)
        out[box] = np.maximum(out[box], alpha)


def _surface_point(s: _Subject, direction: np.ndarray, depth: float) -> np.ndarray:
    """The head-frame point along ``direction`` at ``depth`` below the scalp surface."""
    rho, norm, _ = _head_rho(direction / np.linalg.norm(direction), s)
    return direction / np.linalg.norm(direction) * (1 - depth * norm) / rho


def _vessels(rng: np.random.Generator, grid: _Grid, s: _Subject) -> np.ndarray:
    """Coverage ``(D, H, W)`` of the sinus, the internal cerebral veins and a few cortical veins."""
    out = np.zeros(grid.shape, np.float32)
    inner = s.t_scalp + s.t_skull
    # Superior sagittal sinus: along the midline under the inner table, front over the top to the back.
    theta = np.linspace(0.12 * np.pi, 1.12 * np.pi, 48)
    sinus = np.stack(
        [_surface_point(s, np.array([np.sin(t), -np.cos(t), 0.0]), inner + 0.012) for t in theta]
    )
    _tube(grid, s.to_world(sinus), rng.uniform(0.012, 0.018), out)
    # Internal cerebral veins: paired, along the roof of the third ventricle, front to back.
    b = s.brain_axes
    for side in (1.0, -1.0):
        line = np.stack(
            [np.linspace(0.06, 0.02, 12), np.linspace(-0.12, 0.42, 12), np.full(12, side * 0.03)], 1
        )
        _tube(grid, s.to_world(line * b), rng.uniform(0.005, 0.008), out)
    # Cortical veins: random walks along the surface, in the subarachnoid space.
    for _ in range(int(rng.integers(3, 7))):
        u = rng.standard_normal(3) * np.array([0.6, 1.0, 1.0])
        tangent = np.cross(u, rng.standard_normal(3))
        radius, steps = rng.uniform(0.004, 0.008), rng.normal(0, 0.3, 24)
        path = []
        for turn in steps:
            u = _surface_point(s, u, inner + s.t_csf / 2)
            path.append(u)
            normal = u / np.linalg.norm(u)
            tangent = tangent - (tangent @ normal) * normal
            tangent /= np.linalg.norm(tangent)
            side = np.cross(normal, tangent)
            tangent = math.cos(turn) * tangent + math.sin(turn) * side
            u = u + 0.02 * tangent
        _tube(grid, s.to_world(np.stack(path)), radius, out)
    return out


def _lesions(
    rng: np.random.Generator, grid: _Grid, s: _Subject, count: int | None = None, scale: float = 1.0
) -> list[tuple[Box, np.ndarray, float]]:
    """0-3 lesions (or ``count``), each ``(box, coverage, intensity)``: small ellipsoids, mostly in deep
    white matter, their axes times ``scale``."""
    b = s.brain_axes
    out = []
    n = int(rng.integers(0, 4))
    for _ in range(n if count is None else count):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        centre = direction * rng.uniform(0.35, 0.7) * b  # periventricular to juxtacortical
        axes = scale * rng.uniform(0.012, 0.035) * rng.uniform(0.7, 1.3, 3)
        q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        bright = rng.uniform() < 0.5
        value = s.means["lesion_bright" if bright else "lesion_dark"]
        found = _ellipsoid(grid, s, centre, axes, q)
        if found is not None:
            out.append((found[0], found[1], value))
    return out


def _cortex(
    grid: _Grid,
    s: _Subject,
    u: list[np.ndarray],
    rho: np.ndarray,
    grad_norm: np.ndarray,
    depth: np.ndarray,
    h_head: np.ndarray,
    t_gm: np.ndarray,
    d_sulcus: np.ndarray,
    f_fissure: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Coverage ``(D, H, W)`` of the CSF in sulci and the fissure, and of white matter.

    Args:
        u: head-frame coordinates, three ``(D, H, W)`` arrays.
        rho, grad_norm: the head's ellipsoidal radius ``ρ`` and ``|∇ρ|``.
        depth: distance below the pial surface (negative outside the brain).
        h_head: voxel footprint along the head layers' normal.
        t_gm, d_sulcus: cortical thickness and sulcal depth, smooth fields.
        f_fissure: a smooth field that wobbles the midline.
    """
    shape = grid.shape
    # Sulci: sheets around the zero set of the folding wave, in the cortical shell only.
    h_max = float(grid.spacing.max())
    shell = np.flatnonzero((depth > -2 * h_max) & (depth < 1.4 * s.sulcus_depth + 1.2 * s.t_gm + 2 * h_max))
    pts = np.stack([c.ravel()[shell] for c in u], axis=1)  # (N, 3) head frame
    s_sulcus, n_sulcus = s.folding.sheets(pts, s.rot)  # (N,), (N, 3)
    h_sulcus = grid.footprint(n_sulcus.T)
    below_n = (depth - d_sulcus).ravel()[shell]  # (N,): > 0 deeper than the sulcal fundus
    h_head_n = h_head.ravel()[shell]
    wall = np.abs(s_sulcus) - s.sulcus_width / 2
    alpha_csf = np.zeros(depth.size, np.float32)
    alpha_csf[shell] = np.minimum(_slab(s_sulcus, s.sulcus_width, h_sulcus), _ramp(below_n, h_head_n))
    sd_sulcus = np.full(depth.size, 1e3, np.float32)  # far from any sulcus outside the shell
    sd_sulcus[shell] = np.maximum(wall, below_n)
    h_sulcus_full = np.zeros(depth.size, np.float32)
    h_sulcus_full[shell] = np.where(wall > below_n, h_sulcus, h_head_n)
    alpha_csf, sd_sulcus, h_sulcus_full = (a.reshape(shape) for a in (alpha_csf, sd_sulcus, h_sulcus_full))

    # Interhemispheric fissure: a midline sheet outside the central core (corpus callosum, ventricles).
    s_fissure = u[2] - 0.012 * f_fissure
    h_fissure = float(grid.footprint(s.rot[2]))
    sd_gate = (s.fissure_core - rho) / grad_norm  # negative outside the core
    alpha_csf = np.maximum(
        alpha_csf, np.minimum(_slab(s_fissure, s.fissure_width, h_fissure), _ramp(sd_gate, h_head))
    )
    fissure_wall = np.abs(s_fissure) - s.fissure_width / 2
    sd_fissure = np.maximum(fissure_wall, sd_gate)
    h_fissure_full = np.where(fissure_wall > sd_gate, np.float32(h_fissure), h_head)

    # Distance to the nearest CSF inside the brain; white matter lies deeper than t_gm.
    dc = np.minimum(np.minimum(depth, sd_sulcus), sd_fissure)
    h_dc = np.where(dc == depth, h_head, np.where(dc == sd_sulcus, h_sulcus_full, h_fissure_full))
    return alpha_csf, _ramp(t_gm - dc, h_dc)


def _bias(rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """``f = Σ_i a_i cos(k_i · p + φ_i) / Σ_i a_i`` on the grid, ``|f| <= 1``: 3 cosines, ``|k| <= 1.5π``."""
    field = np.zeros(grid.shape, np.float32)
    amps = rng.uniform(0.5, 1.0, 3)
    for a in amps:
        k = rng.standard_normal(3)
        k *= rng.uniform(0.5, 1.5) * np.pi / np.linalg.norm(k)
        phase = rng.uniform(0, 2 * np.pi)
        field += a * np.cos(k[0] * grid.z[:, None, None] + k[1] * grid.y[None, :, None]
                            + k[2] * grid.x[None, None, :] + phase)  # fmt: skip
    return field / np.float32(amps.sum())


# -- the phantom -----------------------------------------------------------------------------------------
def _check(
    shape: tuple[int, ...], seed: int, bias_strength: float, texture: float, z_extent: float
) -> tuple[int, int, int]:
    try:
        dims = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        raise ShapeError(f"brain_phantom: shape must be three sizes (D, H, W); found {shape!r}") from None
    if len(dims) != 3 or min(dims) < MIN_SIZE:
        raise ShapeError(
            f"brain_phantom: shape must be three sizes (D, H, W), each >= {MIN_SIZE}; found {tuple(shape)}"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ParameterError(f"brain_phantom: seed must be an int; found {seed!r}")
    for name, value, ok, expected in (
        ("bias_strength", bias_strength, lambda v: 0 <= v < 0.5, "in [0, 0.5) (e.g. 0.15)"),
        ("texture", texture, lambda v: 0 <= v <= 3, "in [0, 3] (1: the default amplitude)"),
        (
            "z_extent",
            z_extent,
            lambda v: 0 < v <= 1,
            "in (0, 1] (half-height of the slab, in half fields of view)",
        ),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ParameterError(f"brain_phantom: {name} must be a number {expected}; found {value!r}")
    return (dims[0], dims[1], dims[2])


def brain_phantom(
    shape: tuple[int, int, int],
    seed: int,
    *,
    lesions: bool = True,
    lesion_count: int | None = None,
    lesion_scale: float = 1.0,
    bias_strength: float = 0.15,
    texture: float = 1.0,
    z_extent: float = 0.5,
) -> Phantom:
    """A seeded T1-weighted-like brain phantom, axial slices ``(D, H, W)``, with tissue labels.

    The model is in the module docstring. Intensities are roughly in ``[0, 1]`` (at most about
    ``1.15``), background exactly 0; labels are :data:`BRAIN_CLASSES`.

    Args:
        shape: ``(D, H, W)``, each at least 8; D is the slice axis.
        seed: the subject; the same seed gives the same phantom.
        lesions: include the subject's 0-3 lesions (the rest of the anatomy is the same without).
        lesion_count: draw exactly this many lesions instead of the subject's 0-3 (a lesion that falls
            outside the grid is dropped). They come from their own random stream, so the anatomy,
            texture and bias field are the same whatever the count.
        lesion_scale: multiply every lesion's axes (1: 1.3-3.9 mm semi-axes; 3 gives lesions of a
            few voxels at 96 x 96, large enough for a classifier to see), in ``(0, 10]``.
        bias_strength: amplitude ``b`` of the multiplicative bias field ``1 + b f``, in ``[0, 0.5)``.
        texture: scale of the tissue texture amplitude (0: each tissue flat), in ``[0, 3]``.
        z_extent: the slices span ``z ∈ [-z_extent, z_extent]`` (half fields of view; the head's
            vertical semi-axis is about 0.9), in ``(0, 1]``.

    Raises:
        ShapeError: ``shape`` is not three sizes of at least 8.
        ParameterError: an option out of range, or a seed that is not an int.
    """
    shape = _check(shape, seed, bias_strength, texture, z_extent)
    if lesion_count is not None and not (isinstance(lesion_count, int) and 0 <= lesion_count <= 20):
        raise ParameterError(f"brain_phantom: lesion_count must be an int in [0, 20]; found {lesion_count!r}")
    if not (0 < lesion_scale <= 10):
        raise ParameterError(f"brain_phantom: lesion_scale must be in (0, 10]; found {lesion_scale!r}")
    rng = np.random.default_rng(int(seed))
    s = _draw_subject(rng)
    grid = _Grid.make(shape, z_extent)
    # Smooth fields, drawn in a fixed order (independent of the grid's size).
    m_head, f_scalp, f_skull, f_csf, f_gm, f_depth, f_fissure, f_diploe = (
        _wave_field(rng, grid, lo, hi)
        for lo, hi in [(2, 5), (2, 5), (2, 5), (3, 8), (4, 10), (3, 8), (2, 5), (4, 10)]
    )

    # Head layers: signed distances (negative inside) and the footprint along their common normal.
    u = grid.local(s.rot, s.centre)
    rho, grad_norm, normal_u = _head_rho(u, s)
    h_head = grid.footprint([sum(s.rot[j, i] * normal_u[j] for j in range(3)) for i in range(3)])
    t_scalp = s.t_scalp * (1 + 0.2 * np.tanh(f_scalp))
    t_skull = s.t_skull * (1 + 0.25 * np.tanh(f_skull))
    t_csf = s.t_csf * (1 + 0.5 * np.tanh(f_csf))
    sd_head = (rho - 1) / grad_norm - 0.015 * m_head
    sd_skull = sd_head + t_scalp
    sd_cranial = sd_skull + t_skull
    depth = -(sd_cranial + t_csf)  # below the pial surface

    t_gm = s.t_gm * (1 + 0.15 * np.tanh(f_gm))
    d_sulcus = s.sulcus_depth * (1 + 0.35 * np.tanh(f_depth))
    alpha_csf, alpha_wm = _cortex(grid, s, u, rho, grad_norm, depth, h_head, t_gm, d_sulcus, f_fissure)
    nuclei, ventricles = _deep(grid, s)
    vessels = _vessels(rng, grid, s)
    lesion_list = _lesions(rng, grid, s, scale=lesion_scale)
    if lesion_count is not None:  # their own stream: the draws after this line stay the subject's
        lesion_rng = np.random.default_rng([int(seed), 0x1E5])
        lesion_list = _lesions(lesion_rng, grid, s, count=lesion_count, scale=lesion_scale)
    bias = _bias(rng, grid)

    # Appearance: texture (grid-sized random numbers, drawn last), tissue values, painting.
    tex = _texture(rng, grid, *s.grain) * np.float32(s.tau * texture)
    mu = s.means

    def value(mean: float, tissue: str) -> np.ndarray:
        return mean * (1 + _TEXTURE[tissue] * tex)

    q_scalp = np.clip(-sd_head / t_scalp, 0, 1)  # 0 at the skin, 1 at the skull
    scalp = (mu["fat"] - (mu["fat"] - mu["skin"]) * np.exp(-((q_scalp / 0.15) ** 2))
             - (mu["fat"] - mu["galea"]) * np.exp(-(((1 - q_scalp) / 0.2) ** 2)))  # fmt: skip
    q_skull = np.clip(-sd_skull / t_skull, 0, 1)
    diploe = np.exp(-(((q_skull - 0.5) / 0.18) ** 2)) * (0.65 + 0.35 * np.tanh(f_diploe))
    skull = mu["bone"] + (mu["diploe"] - mu["bone"]) * diploe
    image = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint8)

    def paint(alpha: np.ndarray, v: np.ndarray | float, label: str, box: Box | None = None) -> None:
        region = box if box is not None else (slice(None),) * 3
        target = image[region]
        target += alpha * (v - target)
        labels[region][alpha >= 0.5] = _LABEL[label]

    alpha_cranial = _ramp(sd_cranial, h_head)
    paint(_ramp(sd_head, h_head), scalp * (1 + _TEXTURE["scalp"] * tex), "scalp")
    paint(_ramp(sd_skull, h_head), skull * (1 + _TEXTURE["skull"] * tex), "skull")
    paint(alpha_cranial, value(mu["csf"], "csf"), "csf")
    paint(_ramp(-depth, h_head), value(mu["grey_matter"], "grey_matter"), "grey_matter")
    paint(np.minimum(alpha_csf, alpha_cranial), value(mu["csf"], "csf"), "csf")
    paint(alpha_wm, value(mu["white_matter"], "white_matter"), "white_matter")
    paint(nuclei, value(mu["deep_grey"], "deep_grey"), "deep_grey")
    paint(ventricles, value(mu["csf"], "csf"), "ventricles")
    paint(np.minimum(vessels, alpha_cranial), value(mu["vessels"], "white_matter"), "vessels")
    if lesions:
        for box, alpha, v in lesion_list:
            paint(alpha, v * (1 + _TEXTURE["white_matter"] * tex[box]), "lesions", box)

    image *= 1 + np.float32(bias_strength) * bias
    return Phantom(image=np.clip(image, 0, None).astype(np.float32), labels=labels)
