"""Acquisitions: the parameters recorded with a measurement, and the operator they define.

Simulation records an :class:`Acquisition` in the attributes of the measurement array
(``kspace`` or ``sinogram``), with the mask and coil maps as arrays beside it.
Reconstruction rebuilds exactly the same operator from that record, so a scan's
physics is stated once and the two stages cannot drift apart.

All operators act per 2D slice: input ``(S, H, W)`` for a slab of ``S`` slices.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from operators.ct import FanBeam, ParallelBeam, sparse_view_angles
from operators.linear import LinearOperator
from pipelines.errors import ArchiveError
from pipelines.spec import CTSpec
from pipelines.store import Archive

__all__ = [
    "ct_operator",
    "mri_operator",
    "measurement_name",
    "operator_for_scan",
    "sampled_columns",
    "kspace_shape",
    "read_kspace",
]


def measurement_name(modality: str) -> str:
    """The array holding a modality's measurements: ``kspace`` or ``sinogram``."""
    return {"mri": "kspace", "ct": "sinogram"}[modality]


def ct_operator(ct: CTSpec, image_shape: tuple[int, int]) -> ParallelBeam | FanBeam:
    """The CT projector of ``ct`` for slices of ``image_shape`` (distances given in image widths)."""
    h, w = image_shape
    full = 180.0 if ct.geometry == "parallel" else 360.0
    arc = math.radians(ct.arc_degrees or full)
    angles = sparse_view_angles(ct.views, arc=arc)
    if ct.geometry == "parallel":
        return ParallelBeam((h, w), angles, ct.detectors)
    size = max(h, w)
    detectors = ct.detectors or int(math.ceil(1.5 * size))
    return FanBeam(
        (h, w),
        angles,
        detectors,
        source_distance=ct.source_distance * size,
        detector_distance=ct.detector_distance * size,
    )


def mri_operator(
    mask: np.ndarray | torch.Tensor, coil_maps: np.ndarray | torch.Tensor | None = None
) -> LinearOperator:
    """Single-coil (``coil_maps`` None) or SENSE Cartesian MRI, per 2D slice.

    Args:
        mask: ``(H, W)`` sampling mask.
        coil_maps: complex ``(C, H, W)`` sensitivities, or None.
    """
    from operators.mri import CartesianMRI, sense

    m = torch.as_tensor(np.asarray(mask)).to(torch.float32)
    if coil_maps is None:
        return CartesianMRI(m)
    return sense(m, torch.as_tensor(np.asarray(coil_maps)))


def sampled_columns(mask: np.ndarray | torch.Tensor) -> np.ndarray | None:
    """The sampled columns of a 1D Cartesian mask ``(H, W)``, ascending; None for any other mask.

    A mask is 1D Cartesian when every row is the same (whole phase-encoding lines are sampled,
    as in fastMRI). A fully sampled mask gives None too: nothing would be saved.
    """
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2 or not (m == m[:1]).all():
        return None
    cols = np.flatnonzero(m[0])
    return cols if 0 < cols.size < m.shape[1] else None


def _column_layout(arr: Any) -> tuple[np.ndarray, int] | None:
    """``(stored columns, full width)`` of a ``layout: columns`` k-space array; None for full k-space."""
    attrs = arr.attrs.asdict()
    layout = attrs.get("layout", "full")
    if layout == "full":
        return None
    if layout != "columns":
        raise ArchiveError(
            f"{arr.path}: unknown layout {layout!r} in its attributes; expected 'full' or 'columns'"
        )
    cols = np.asarray(attrs["columns"], dtype=np.int64)
    if arr.shape[-1] != cols.size:
        raise ArchiveError(
            f"{arr.path}: stored with {arr.shape[-1]} columns "
            f"but its 'columns' attribute lists {cols.size}"
        )
    return cols, int(attrs["image_shape"][1])


def kspace_shape(arr: Any) -> tuple[int, ...]:
    """The full k-space shape ``(C, D, H, W)`` of a stored ``kspace`` array, whatever its layout."""
    columns = _column_layout(arr)
    return tuple(arr.shape) if columns is None else (*arr.shape[:-1], columns[1])


def read_kspace(arr: Any, z0: int | None = None, z1: int | None = None) -> np.ndarray:
    """Slices ``z0:z1`` of a stored ``kspace`` array as full k-space ``(C, s, H, W)`` complex64.

    Simulation stores 1D-undersampled k-space as its sampled columns only (attribute
    ``layout: columns`` with the column indices in ``columns``): a scanner acquires only those
    lines, and at 4x the array is 4x smaller to write and read. This zero-fills the rest.
    """
    columns = _column_layout(arr)  # checked before the read
    stored = np.asarray(arr[:, z0:z1])  # (C, s, H, W or n_columns)
    if columns is None:
        return stored
    cols, width = columns
    full = np.zeros((*stored.shape[:-1], width), dtype=stored.dtype)
    full[..., cols] = stored
    return full


def operator_for_scan(archive: Archive, scan_id: str) -> tuple[LinearOperator, str, dict[str, Any]]:
    """Rebuild the operator of a simulated (or ingested) scan from its recorded acquisition.

    Returns ``(operator, measurement array name, acquisition attributes)``.
    """
    for name in ("kspace", "sinogram"):
        if archive.has_array(scan_id, name):
            attrs = archive.open_array(scan_id, name).attrs.asdict()
            break
    else:
        raise ArchiveError(
            f"scan {scan_id!r} has no measurements (kspace or sinogram); run the simulate stage first"
        )
    if name == "sinogram":
        image_shape = tuple(attrs["image_shape"])
        return ct_operator(CTSpec.model_validate(attrs["ct"]), image_shape), name, attrs
    mask = archive.read_array(scan_id, "mask")
    maps = archive.read_array(scan_id, "coil_maps") if attrs.get("coils", 1) > 1 else None
    return mri_operator(mask, maps), name, attrs
