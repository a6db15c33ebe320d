"""Volume transforms in NumPy, slab-sized and exact: resampling, crop/pad, moments, histogram percentiles.

The preprocess stage (:mod:`pipelines.preprocess`) runs these on Dask chunks of a volume that no
task may hold whole, so each one works on a slab and the statistics merge exactly across slabs:

* resampling: linear interpolation along each axis, voxel centres aligned (``scipy.ndimage.zoom``
  with ``order=1, grid_mode=True, mode="nearest"``), reading only the input slices a slab needs;
* centre crop or zero pad to a shape;
* :class:`Moments` (count, mean, variance, min, max) merged pairwise from slabs;
* percentiles of the whole volume from a merged histogram (:func:`histogram_percentiles`);
* :class:`Intensity`: clip, then shift and scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Shape3 = tuple[int, int, int]

__all__ = [
    "HISTOGRAM_BINS",
    "Moments",
    "Intensity",
    "resampled_size",
    "linear_weights",
    "interpolate_axis",
    "input_slices",
    "resample_slab",
    "centre_offset",
    "crop_or_pad",
    "on_grid",
    "histogram",
    "histogram_percentiles",
]

#: Bins of the whole-volume histogram the clip percentiles come from: they are exact to one bin,
#: ``(max - min) / HISTOGRAM_BINS``. Each slab's histogram is 512 KiB of int64.
HISTOGRAM_BINS = 1 << 16


# -- resampling ------------------------------------------------------------------------------------
def resampled_size(n: int, old: float, new: float) -> int:
    """``round(n · old / new)``, halves up, at least 1: the size of an axis resampled to ``new`` mm."""
    return max(1, int(math.floor(n * old / new + 0.5)))


def linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each of ``n_out`` output voxels samples an axis of ``n_in`` (module docs, step 1).

    Returns:
        ``(lo, hi, w)``, each ``(n_out,)``: output ``i`` is ``(1 - w[i]) · x[lo[i]] + w[i] · x[hi[i]]``,
        with ``lo`` and ``hi = min(lo + 1, n_in - 1)`` int64 and ``w`` float32 in ``[0, 1)``.
    """
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5  # (n_out,) input positions
    x = np.clip(x, 0.0, n_in - 1)
    lo = np.floor(x).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (x - lo).astype(np.float32)


def interpolate_axis(x: np.ndarray, axis: int, lo: np.ndarray, hi: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``x`` along ``axis`` with the weights of :func:`linear_weights`.

    The result has ``len(lo)`` entries along ``axis`` and ``x``'s dtype (float32 stays float32).
    """
    shape = [1] * x.ndim
    shape[axis] = len(w)
    weight = w.astype(x.dtype).reshape(shape)  # broadcasts along axis
    low = np.take(x, lo, axis=axis)
    return low + (np.take(x, hi, axis=axis) - low) * weight


def input_slices(n_in: int, n_out: int, z0: int, z1: int) -> tuple[int, int]:
    """The input slices ``[a, b)`` that output slices ``z0:z1`` of an ``n_in -> n_out`` resampling read.

    These are the slices between the floor of the first sample position and the ceiling of the
    last: the slab's own slices and one neighbour on each side, never the whole volume. An axis
    that keeps its size is read as it is: ``[z0, z1)``.
    """
    if n_in == n_out:
        return z0, z1
    lo, hi, _ = linear_weights(n_in, n_out)
    return int(lo[z0]), int(hi[z1 - 1]) + 1


def resample_slab(
    read: Callable[[int, int], np.ndarray], in_shape: Shape3, out_shape: Shape3, z0: int, z1: int
) -> np.ndarray:
    """Slices ``z0:z1`` of a volume ``in_shape`` resampled to ``out_shape``, reading only what they need.

    Args:
        read: ``read(a, b)`` returns input slices ``a:b`` ``(b - a, H, W)``; it is called once, with
            the range of :func:`input_slices`.
        in_shape, out_shape: ``(D, H, W)`` before and after.
        z0, z1: the output slices wanted.

    Returns:
        float32 ``(z1 - z0, H_out, W_out)``; the same values whatever slab the caller cuts.
    """
    a, b = input_slices(in_shape[0], out_shape[0], z0, z1)
    x = np.asarray(read(a, b), dtype=np.float32)  # (b - a, H, W)
    if out_shape[0] != in_shape[0]:
        lo, hi, w = linear_weights(in_shape[0], out_shape[0])
        x = interpolate_axis(x, 0, lo[z0:z1] - a, hi[z0:z1] - a, w[z0:z1])  # (z1 - z0, H, W)
    for axis in (1, 2):  # (z1 - z0, H_out, W) then (z1 - z0, H_out, W_out)
        if out_shape[axis] != in_shape[axis]:
            x = interpolate_axis(x, axis, *linear_weights(in_shape[axis], out_shape[axis]))
    return np.ascontiguousarray(x, dtype=np.float32)


# -- crop / pad ------------------------------------------------------------------------------------
def centre_offset(n_in: int, n_out: int) -> int:
    """Input index of output index 0 when ``n_in`` is centre-cropped or zero-padded to ``n_out``.

    ``(n_in - n_out) // 2`` when cropping; minus ``(n_out - n_in) // 2`` when padding (the odd one
    goes at the end either way).
    """
    return (n_in - n_out) // 2 if n_in >= n_out else -((n_out - n_in) // 2)


def crop_or_pad(x: np.ndarray, shape: Sequence[int | None]) -> np.ndarray:
    """``x`` centre-cropped or zero-padded to ``shape``; ``None`` leaves an axis as it is."""
    out_shape = tuple(n if s is None else int(s) for n, s in zip(x.shape, shape, strict=True))
    if out_shape == x.shape:
        return x
    out = np.zeros(out_shape, x.dtype)
    src, dst = [], []
    for n_in, n_out in zip(x.shape, out_shape, strict=True):
        off = centre_offset(n_in, n_out)
        length = min(n_in, n_out)
        src.append(slice(max(off, 0), max(off, 0) + length))
        dst.append(slice(max(-off, 0), max(-off, 0) + length))
    out[tuple(dst)] = x[tuple(src)]
    return out


# -- statistics ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Moments:
    """Count, mean, population variance, min and max of a volume, merged exactly from its slabs."""

    n: int
    mean: float
    var: float
    min: float
    max: float

    @staticmethod
    def row(block: np.ndarray) -> np.ndarray:
        """``[n, mean, M2, min, max]`` of one block, float64 (``M2 = Σ (x - mean)²``)."""
        if block.size == 0:
            return np.array([0.0, 0.0, 0.0, np.inf, -np.inf])
        mean = float(np.mean(block, dtype=np.float64))
        m2 = float(np.var(block, dtype=np.float64)) * block.size
        return np.array([block.size, mean, m2, float(block.min()), float(block.max())])

    @classmethod
    def merge(cls, rows: np.ndarray) -> Moments:
        """Combine ``(k, 5)`` rows of :meth:`row` (Chan et al.'s pairwise update: no cancellation)."""
        n, mean, m2 = 0.0, 0.0, 0.0
        for nb, mb, m2b, _, _ in np.asarray(rows, dtype=np.float64).reshape(-1, 5):
            if nb == 0:
                continue
            delta, total = mb - mean, n + nb
            mean += delta * nb / total
            m2 += m2b + delta * delta * n * nb / total
            n = total
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
        return cls(int(n), mean, m2 / n if n else math.nan, float(rows[:, 3].min()), float(rows[:, 4].max()))


def histogram_percentiles(
    counts: np.ndarray, lo: float, hi: float, percentiles: Sequence[float]
) -> list[float]:
    """Percentiles (NumPy's default, linear) of the values a histogram over ``[lo, hi]`` counts.

    Why a histogram: clipping needs the percentiles of the *whole* volume, and no task may hold
    it. ``dask.array.percentile`` computes each chunk's percentiles and merges them, which is
    approximate with no stated bound (and only for 1-D arrays). Here every slab contributes exact
    integer counts to one histogram over the volume's ``min..max``; the ``k``-th smallest value lies
    in the bin where the cumulative count passes ``k``, and is placed inside it as if that bin's
    values were spread evenly. With ``np.percentile``'s rank ``h = (N - 1) · p / 100`` the result is
    ``v[⌊h⌋] + (h - ⌊h⌋) · (v[⌊h⌋ + 1] - v[⌊h⌋])`` with those estimates.

    Accuracy: each estimate lies in the bin of the true value, so the result is within one bin
    width, ``(hi - lo) / len(counts)``, of ``np.percentile`` of the volume (1.5e-5 of the range with
    :data:`HISTOGRAM_BINS`; a value within float64 rounding of an edge may be counted in the bin
    beside it, which moves an estimate by no more than that rounding); percentiles 0 and 100 are
    exactly ``lo`` and ``hi``. The counts, and so the result, do not depend on the slab size.

    Args:
        counts: ``(bins,)`` counts over equal bins spanning ``[lo, hi]``.
        lo, hi: the volume's min and max.
        percentiles: in ``[0, 100]``.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        raise ValueError("percentiles of an empty histogram; expected at least one counted value")
    width = (hi - lo) / len(counts)
    cum = np.cumsum(counts)  # (bins,)

    def kth(k: int) -> float:
        if k <= 0:
            return lo
        if k >= total - 1:
            return hi
        b = int(np.searchsorted(cum, k, side="right"))  # the first bin holding more than k values
        before = int(cum[b] - counts[b])
        return min(hi, max(lo, lo + (b + (k - before + 0.5) / counts[b]) * width))

    out = []
    for p in percentiles:
        h = (total - 1) * float(p) / 100.0
        k = int(math.floor(h))
        low = kth(k)
        out.append(low + (h - k) * (kth(min(k + 1, total - 1)) - low))
    return out


@dataclass(frozen=True)
class Intensity:
    """The intensity steps of one scan: clip to ``[low, high]``, then ``(x - shift) / scale``.

    ``low``/``high`` None: no clipping; ``shift`` 0 and ``scale`` 1: no normalisation.
    """

    low: float | None = None
    high: float | None = None
    shift: float = 0.0
    scale: float = 1.0

    def __call__(self, block: np.ndarray) -> np.ndarray:
        """The steps applied to ``block`` (any shape); float32 out, computed in float64."""
        if self.low is not None and self.high is not None:
            block = np.clip(block, np.float32(self.low), np.float32(self.high))
        if self.shift == 0.0 and self.scale == 1.0:
            return np.asarray(block, dtype=np.float32)
        return ((block.astype(np.float64) - self.shift) / self.scale).astype(np.float32)


def histogram(block: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Counts ``(bins,)`` of ``block`` in ``bins`` equal bins over ``[lo, hi]`` (``hi`` in the last bin).

    ``np.histogram(block, bins, (lo, hi))`` up to float64 rounding at the edges, in a fifth of its
    time (one float64 index pass and ``np.bincount``; 16 MB: 15 ms against 90 ms).
    """
    index = (block.astype(np.float64).ravel() - lo) * (bins / (hi - lo))  # (n,) bin positions
    index = np.clip(index, 0, bins - 1, out=index).astype(np.intp)
    return np.bincount(index, minlength=bins)


def on_grid(image: np.ndarray, reference_shape: Sequence[int]) -> np.ndarray:
    """``image`` ``(..., H, W)`` centre-cropped (or zero-padded) to a reference's last two sizes.

    Measured k-space is reconstructed on its acquisition grid (fastMRI knees: 640 x 368), while
    the reference is on the reconstruction grid (320 x 320); fastMRI compares on the central crop,
    with the same convention as here (rows ``(H - h) // 2`` on).
    """
    h, w = (int(n) for n in reference_shape[-2:])
    if image.shape[-2:] == (h, w):
        return image
    return crop_or_pad(image, (*([None] * (image.ndim - 2)), h, w))
