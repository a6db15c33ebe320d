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
from pipelines.spec import CTSpec
from pipelines.store import Archive

__all__ = ["ct_operator", "mri_operator", "measurement_name", "operator_for_scan"]


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


def operator_for_scan(archive: Archive, scan_id: str) -> tuple[LinearOperator, str, dict[str, Any]]:
    """Rebuild the operator of a simulated (or ingested) scan from its recorded acquisition.

    Returns ``(operator, measurement array name, acquisition attributes)``.
    """
    for name in ("kspace", "sinogram"):
        if archive.has_array(scan_id, name):
            attrs = archive.open_array(scan_id, name).attrs.asdict()
            break
    else:
        from pipelines.errors import ArchiveError

        raise ArchiveError(
            f"scan {scan_id!r} has no measurements (kspace or sinogram); run the simulate stage first"
        )
    if name == "sinogram":
        image_shape = tuple(attrs["image_shape"])
        return ct_operator(CTSpec.model_validate(attrs["ct"]), image_shape), name, attrs
    mask = archive.read_array(scan_id, "mask")
    maps = archive.read_array(scan_id, "coil_maps") if attrs.get("coils", 1) > 1 else None
    return mri_operator(mask, maps), name, attrs
