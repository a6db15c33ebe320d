"""DICOM series reader: one volume per series, slab by slab, de-identified.

Discovery
    :func:`discover` walks the source (see :func:`pipelines.sources.base.walk_source`; names
    starting with ``.`` are skipped) and reads every file's header with
    ``dcmread(stop_before_pixels=True)``. Images are grouped by ``SeriesInstanceUID`` into one item
    each, ``key = "<StudyInstanceUID>/<SeriesInstanceUID>"`` (ingest turns it into
    :func:`pipelines.sources.deid.keyed_scan_id`; the UIDs are never stored), ``paths`` sorted along
    the slice normal. Every file that is not part of a series (not DICOM, zero bytes, no UIDs, no
    ``Rows``: a report or a presentation state) and every link leaving the source becomes an item of
    its own, ``key`` = its relative path, which :func:`open_item` quarantines with that file's name
    (``unreadable``, ``no_pixel_data`` or ``outside_source``). ``DICOMDIR`` index files are skipped.

Canonical layout
    A DICOM volume is **not** reoriented (unlike NIfTI): ``(D, H, W)`` = (slices in increasing
    position along the normal ``n = row direction x column direction`` of
    ``ImageOrientationPatient``, rows, columns), so a slab is a set of whole files and
    :meth:`SourceVolume.read` of ``z0:z1`` reads only those slices' files, one decode each.
    ``spacing = (slice spacing, PixelSpacing[0] (between rows), PixelSpacing[1] (between
    columns))``; the slice spacing is the mean step of the sorted positions
    ``p = ImagePositionPatient . n``, or ``SliceThickness`` for a single slice. ``attrs["axes"]``
    says which way D, H, W run in RAS terms (e.g. ``"SPL"`` for an axial series) and
    ``attrs["affine_dhw"]`` maps ``(d, h, w, 1)`` to RAS mm, as for NIfTI. Intensities are float32
    ``stored * RescaleSlope + RescaleIntercept`` per slice: Hounsfield units for CT.

Multi-frame files
    A file with ``NumberOfFrames > 1`` (enhanced MR/CT) is a series on its own; its frames become
    slices. Geometry comes from the functional groups (per-frame, then shared): each frame's
    ``PlanePositionSequence`` position, ``PlaneOrientationSequence``, ``PixelMeasuresSequence`` and
    ``PixelValueTransformationSequence``. Without per-frame positions the frames are taken as
    equally spaced by ``SpacingBetweenSlices`` (else ``SliceThickness``) from the top-level
    ``ImagePositionPatient`` in file order (``attrs["positions_from"]`` says which). Frames sharing a
    position (echoes, phases) are refused as ``not_3d``, as are series holding several multi-frame
    files. Technical attributes are taken from the top level only.

Quarantine (every message names a file, relative to the root, and never a header value beyond
geometry): ``unreadable`` (not DICOM, no decoder for its compression, a modality other than CT or
MR, positions missing in a multi-slice series), ``no_pixel_data`` (any file of the series),
``truncated`` (pixel data shorter than declared or than ``Rows x Columns x frames x bits``),
``too_large``, ``mixed_sizes`` (rows, columns, pixel spacing, orientation or modality differ), ``not_3d``
(colour, duplicate positions), ``missing_slice``, ``uneven_spacing`` and ``outside_source``.
Gaps and unevenness are judged on the steps ``s_i`` between sorted positions against the smallest
step ``s0``: a step ``>= 1.5 s0`` within 0.25 of a whole multiple is a ``missing_slice``; else any
step off the median by more than 1 % is ``uneven_spacing``.

De-identification
    ``attrs`` holds only :data:`ATTRIBUTE_WHITELIST` (technical attributes of the first slice) and
    computed geometry. It is a whitelist on purpose: PS3.15's basic profile lists what to remove,
    and keeping only named technical attributes removes all of that, every private tag, and any
    attribute a future standard adds. :func:`pipelines.sources.deid.assert_no_phi` checks the
    result before it leaves. ``Manufacturer``/model, descriptions and dates are deliberately absent.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import MediaStorageDirectoryStorage

from pipelines.sources.base import (
    MAX_VOXELS,
    QuarantineError,
    SourceItem,
    SourceVolume,
    resolve_inside,
    walk_source,
)
from pipelines.sources.deid import assert_no_phi

__all__ = ["ATTRIBUTE_WHITELIST", "MODALITIES", "discover", "open_item"]

#: DICOM ``Modality`` -> ``SourceVolume.modality``; other modalities are quarantined (``unreadable``)
#: rather than mislabelled, since downstream physics depends on it.
MODALITIES = {"CT": "ct", "MR": "mri"}

#: The only DICOM attributes copied into ``attrs`` (by keyword): acquisition technique and pixel
#: encoding, nothing about the patient, the visit, the staff, the place, the device's identity or
#: time, and no free text or UID. A whitelist on purpose (see the module docstring).
ATTRIBUTE_WHITELIST: tuple[str, ...] = (
    "Modality", "Rows", "Columns", "NumberOfFrames", "PixelSpacing", "SliceThickness",
    "SpacingBetweenSlices", "ImageOrientationPatient", "SamplesPerPixel", "PhotometricInterpretation",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
    "RescaleType", "KVP", "XRayTubeCurrent", "ExposureTime", "Exposure", "MagneticFieldStrength",
    "ImagedNucleus", "ImagingFrequency", "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle",
    "EchoTrainLength", "NumberOfAverages", "PixelBandwidth", "ScanningSequence", "SequenceVariant",
    "MRAcquisitionType",
)  # fmt: skip

_GAP_RATIO = 1.5  # a step this many smallest steps or more, near a whole multiple, is a gap
_GAP_SNAP = 0.25  # how near a whole multiple a gap must be
_SPACING_TOLERANCE = 0.01  # relative deviation of a step from the median that makes it uneven
_DEFER = 4096  # bytes: header values larger than this (the pixel data) are not read at open
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class _Plane:
    """One 2D image of a series: a single-frame file or one frame of a multi-frame file."""

    rel: str
    path: str
    frame: int | None
    rows: int
    cols: int
    samples: int
    pixel_spacing: tuple[float, float] | None
    iop: tuple[float, ...] | None  # ImageOrientationPatient: row direction, column direction (LPS)
    ipp: tuple[float, float, float] | None  # ImagePositionPatient of the first pixel (LPS mm)
    slope: float
    intercept: float

    @property
    def where(self) -> str:
        return self.rel if self.frame is None else f"{self.rel} (frame {self.frame})"


def discover(root: str) -> list[SourceItem]:
    """Series under ``root`` and one item per file or link that is not part of one (see the
    module docstring). Reads headers only, never pixel data, and never a file outside ``root``."""
    files, escaping = walk_source(root)
    items = [_lone(rel) for rel in escaping]
    series: dict[tuple[str, str], list[tuple[tuple[Any, ...], str]]] = defaultdict(list)
    for rel in files:
        try:
            path = resolve_inside(root, rel)
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # any bad file is an item of its own; open_item says why
            items.append(_lone(rel))
            continue
        sop = ds.file_meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
        if sop == MediaStorageDirectoryStorage:
            continue  # a DICOMDIR: an index of the files, not an image
        study, uid = ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID")
        if not study or not uid or "Rows" not in ds:
            items.append(_lone(rel))
            continue
        series[(str(study), str(uid))].append((_sort_key(ds, rel), rel))
    for (study, uid), members in series.items():
        items.append(
            SourceItem(format="dicom", paths=tuple(rel for _, rel in sorted(members)), key=f"{study}/{uid}")
        )
    return sorted(items, key=lambda it: it.key)


def open_item(root: str, item: SourceItem) -> SourceVolume:
    """Read the headers of a series' files and return its de-identified ``(D, H, W)`` volume.

    Raises:
        QuarantineError: see the module docstring.
        ValueError: ``item`` is not a DICOM item with at least one path.
    """
    if item.format != "dicom" or not item.paths:
        raise ValueError(
            f"item {item.key!r}: expected a DICOM item with paths, found {item.format!r} {item.paths}"
        )
    headers = [(rel, *_read_header(root, rel)) for rel in item.paths]  # (rel, real path, dataset)
    multi = [rel for rel, _, ds in headers if _frames(ds) > 1]
    if multi and len(headers) > 1:
        raise QuarantineError(
            "not_3d",
            f"{multi[0]}: a multi-frame file in a series of {len(headers)} files; expected one multi-frame "
            "file or single-frame slices",
        )
    modality = _modality(headers[0][0], headers[0][2])
    for rel, _, ds in headers[1:]:
        if _modality(rel, ds) != modality:
            raise QuarantineError(
                "mixed_sizes", f"{rel}: modality differs from {headers[0][0]}; expected one"
            )
    if multi:
        planes, positions_from = _frame_planes(*headers[0])
    else:
        planes = [_plane(rel, path, ds, ds, None) for rel, path, ds in headers]
        positions_from = "image_position_patient"
    first = planes[0]
    if first.rows * first.cols * len(planes) > MAX_VOXELS:
        raise QuarantineError(
            "too_large",
            f"{first.rel}: {len(planes)} slices of {first.rows} x {first.cols} declare more than "
            f"{MAX_VOXELS} voxels",
        )
    _check_sizes(planes)
    planes, step, positions_from = _sort_planes(planes, positions_from)
    ds0 = headers[0][2]
    if len(planes) == 1:
        step = _first_float(ds0, "SliceThickness", "SpacingBetweenSlices") or 1.0
    ps = first.pixel_spacing or (1.0, 1.0)
    spacing = (float(step), ps[0], ps[1])
    affine = _affine_dhw(planes, spacing)
    attrs = _attrs(ds0, planes, spacing, affine, positions_from, n_files=len(headers))
    assert_no_phi(attrs)
    return SourceVolume(
        shape=(len(planes), first.rows, first.cols),
        dtype=np.dtype(np.float32),
        spacing=spacing,
        modality=MODALITIES[modality],
        attrs=attrs,
        reader=_reader(planes, first.rows, first.cols),
    )


def _lone(rel: str) -> SourceItem:
    return SourceItem(format="dicom", paths=(rel,), key=rel)


def _sort_key(ds: Dataset, rel: str) -> tuple[Any, ...]:
    """Discovery's order: position along the slice normal, then instance number, then name."""
    try:
        instance = int(ds.get("InstanceNumber") or 0)
        iop, ipp = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
        if iop is not None and ipp is not None and len(iop) == 6 and len(ipp) == 3:
            normal = np.cross([float(v) for v in iop[:3]], [float(v) for v in iop[3:]])
            return (0, float(np.dot([float(v) for v in ipp], normal)), instance, rel)
        return (1, 0.0, instance, rel)
    except (TypeError, ValueError):
        return (2, 0.0, 0, rel)


def _read_header(root: str, rel: str) -> tuple[str, Dataset]:
    """``(real path, dataset)`` with everything but large values (the pixel data) read and checked."""
    path = resolve_inside(root, rel)
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER)
    except Exception as e:  # any failure to parse untrusted bytes means unreadable
        raise QuarantineError(
            "unreadable",
            f"{rel}: expected a DICOM (Part 10) file, it does not parse ({type(e).__name__}: {e})",
        ) from e
    tag = next((t for t in _PIXEL_TAGS if t in ds), None)
    if tag is None:
        kind = getattr(ds.get("SOPClassUID"), "name", "unknown")
        raise QuarantineError(
            "no_pixel_data", f"{rel}: no pixel data; expected an image, found a {kind!r} object"
        )
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows <= 0 or cols <= 0:
        raise QuarantineError(
            "unreadable", f"{rel}: Rows x Columns = {rows} x {cols}; expected positive sizes"
        )
    syntax = ds.file_meta.get("TransferSyntaxUID")
    compressed = syntax is not None and syntax.is_compressed
    if compressed:
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise QuarantineError(
                "unreadable",
                f"{rel}: pixel data is compressed ({syntax.name}) and no installed plugin decodes it; "
                "install pylibjpeg (with its openjpeg/libjpeg plugins) or python-gdcm",
            )
    element = ds.get_item(tag, keep_deferred=True)
    if isinstance(element, RawDataElement):
        declared = int(element.length)
        if declared != _UNDEFINED_LENGTH:  # encapsulated data has no length to check
            have = (
                len(element.value)
                if element.value is not None
                else os.path.getsize(path) - element.value_tell
            )
            if have < declared:
                raise QuarantineError(
                    "truncated", f"{rel}: pixel data declares {declared} bytes, the file holds {have}"
                )
    else:
        declared = len(element.value)
    if not compressed:
        bits = int(ds.get("BitsAllocated") or 0)
        need = (rows * cols * _frames(ds) * int(ds.get("SamplesPerPixel") or 1) * bits + 7) // 8
        if declared < need:
            raise QuarantineError(
                "truncated",
                f"{rel}: pixel data is {declared} bytes; Rows x Columns x frames x samples x BitsAllocated "
                f"declare {need}",
            )
    return path, ds


def _frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _modality(rel: str, ds: Dataset) -> str:
    modality = str(ds.get("Modality") or "").upper()
    if modality not in MODALITIES:
        raise QuarantineError(
            "unreadable",
            f"{rel}: Modality {modality or 'missing'!r}; expected one of {sorted(MODALITIES)} "
            "(others are not ingested)",
        )
    return modality


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    """``value`` as ``n`` floats, or None when absent or malformed."""
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _first_float(ds: Dataset, *keywords: str) -> float | None:
    for keyword in keywords:
        try:
            value = float(ds.get(keyword))
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            return value
    return None


def _plane(rel: str, path: str, ds: Dataset, groups: Dataset, frame: int | None) -> _Plane:
    """A plane from ``groups`` (the dataset itself, or a frame's merged functional groups)."""
    slope = groups.get("RescaleSlope")
    intercept = groups.get("RescaleIntercept")
    return _Plane(
        rel=rel,
        path=path,
        frame=frame,
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        samples=int(ds.get("SamplesPerPixel") or 1),
        pixel_spacing=_floats(groups.get("PixelSpacing"), 2),  # type: ignore[arg-type]
        iop=_floats(groups.get("ImageOrientationPatient"), 6),
        ipp=_floats(groups.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        slope=1.0 if slope is None else float(slope),
        intercept=0.0 if intercept is None else float(intercept),
    )


def _frame_planes(rel: str, path: str, ds: Dataset) -> tuple[list[_Plane], str]:
    """The frames of a multi-frame file as planes, and where their positions came from."""
    n = _frames(ds)
    shared = ds.get("SharedFunctionalGroupsSequence")
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is not None and len(per) != n:
        raise QuarantineError(
            "unreadable", f"{rel}: {len(per)} per-frame functional groups; NumberOfFrames declares {n}"
        )
    macros = {
        "PixelSpacing": "PixelMeasuresSequence",
        "SliceThickness": "PixelMeasuresSequence",
        "SpacingBetweenSlices": "PixelMeasuresSequence",
        "ImageOrientationPatient": "PlaneOrientationSequence",
        "ImagePositionPatient": "PlanePositionSequence",
        "RescaleSlope": "PixelValueTransformationSequence",
        "RescaleIntercept": "PixelValueTransformationSequence",
    }

    def merged(i: int) -> Dataset:
        """Frame ``i``'s values: per-frame group, else shared group, else the top level."""
        out = Dataset()
        for keyword, macro in macros.items():
            for source in (per[i] if per else None, shared[0] if shared else None):
                seq = source.get(macro) if source is not None else None
                if seq and keyword in seq[0]:
                    setattr(out, keyword, seq[0][keyword].value)
                    break
            else:
                if keyword in ds:
                    setattr(out, keyword, ds[keyword].value)
        return out

    groups = [merged(i) for i in range(n)]
    planes = [_plane(rel, path, ds, g, i) for i, g in enumerate(groups)]
    if (
        per
        and all(p.ipp is not None for p in planes)
        and any("PlanePositionSequence" in per[i] for i in range(n))
    ):
        return planes, "per_frame_functional_groups"
    step = _first_float(groups[0], "SpacingBetweenSlices", "SliceThickness")
    first = planes[0]
    if step is None or first.iop is None or first.ipp is None:
        raise QuarantineError(
            "unreadable",
            f"{rel}: multi-frame file without per-frame positions, ImagePositionPatient, "
            "ImageOrientationPatient or SpacingBetweenSlices; expected a way to place its frames",
        )
    normal = np.cross(first.iop[:3], first.iop[3:])
    planes = [
        replace(p, ipp=tuple(float(v) for v in np.add(first.ipp, i * step * normal)))
        for i, p in enumerate(planes)
    ]
    return planes, "spacing_between_slices"


def _check_sizes(planes: Sequence[_Plane]) -> None:
    """Every plane like the first: rows, columns, pixel spacing, orientation; grayscale."""
    first = planes[0]
    for p in planes:
        if p.samples != 1:
            raise QuarantineError(
                "not_3d", f"{p.where}: {p.samples} samples per pixel (colour); expected grayscale (1)"
            )
        if (p.rows, p.cols) != (first.rows, first.cols):
            raise QuarantineError(
                "mixed_sizes",
                f"{p.where}: {p.rows} x {p.cols} pixels; expected {first.rows} x {first.cols} "
                f"like {first.where}",
            )
        if not _close(p.pixel_spacing, first.pixel_spacing, 1e-4):
            raise QuarantineError(
                "mixed_sizes",
                f"{p.where}: PixelSpacing {p.pixel_spacing}; expected {first.pixel_spacing} "
                f"like {first.where}",
            )
        if not _close(p.iop, first.iop, 1e-4):
            raise QuarantineError(
                "mixed_sizes",
                f"{p.where}: ImageOrientationPatient {p.iop}; expected {first.iop} like {first.where}",
            )


def _close(a: tuple[float, ...] | None, b: tuple[float, ...] | None, tol: float) -> bool:
    if a is None or b is None:
        return a is b
    return bool(np.allclose(a, b, rtol=tol, atol=tol))


def _sort_planes(planes: list[_Plane], positions_from: str) -> tuple[list[_Plane], float, str]:
    """Planes in increasing position along the normal, their mean step (mm), and ``positions_from``.

    Raises ``not_3d`` on duplicate positions, ``missing_slice`` on a gap and ``uneven_spacing`` on
    uneven steps (rules in the module docstring).
    """
    if len(planes) == 1:
        return planes, 0.0, positions_from if planes[0].ipp is not None else "none"
    lacking = next((p for p in planes if p.ipp is None or p.iop is None), None)
    if lacking is not None:
        raise QuarantineError(
            "unreadable",
            f"{lacking.where}: no ImagePositionPatient/ImageOrientationPatient in a series of {len(planes)} "
            "slices; expected both to order the slices",
        )
    iop = np.asarray(planes[0].iop)
    normal = np.cross(iop[:3], iop[3:])  # (3,) slice normal in LPS
    positions = np.array([np.dot(p.ipp, normal) for p in planes])  # (n,) mm along the normal
    order = np.argsort(positions, kind="stable")
    planes, positions = [planes[i] for i in order], positions[order]
    steps = np.diff(positions)  # (n - 1,)
    median = float(np.median(steps))
    dup = int(np.argmin(steps))
    if steps[dup] <= max(1e-4, 1e-3 * median):
        raise QuarantineError(
            "not_3d",
            f"{planes[dup].where} and {planes[dup + 1].where} share position {positions[dup]:.3f} mm; "
            "expected one slice per position (several echoes or phases make a 4D series)",
        )
    ratios = steps / steps[dup]
    for i, r in enumerate(ratios):
        if r >= _GAP_RATIO and abs(r - round(r)) <= _GAP_SNAP:
            raise QuarantineError(
                "missing_slice",
                f"{planes[i].where} at {positions[i]:.3f} mm and {planes[i + 1].where} at "
                f"{positions[i + 1]:.3f} mm are {steps[i]:.3f} mm apart: {round(r) - 1} slice(s) of "
                f"{steps[dup]:.3f} mm missing; expected evenly spaced slices",
            )
    deviation = np.abs(steps - median) / median
    worst = int(np.argmax(deviation))
    if deviation[worst] > _SPACING_TOLERANCE:
        raise QuarantineError(
            "uneven_spacing",
            f"{planes[worst].where} and {planes[worst + 1].where} are {steps[worst]:.4f} mm apart; "
            f"expected the median step {median:.4f} mm within {_SPACING_TOLERANCE:.0%}",
        )
    return planes, float((positions[-1] - positions[0]) / (len(planes) - 1)), positions_from


def _affine_dhw(planes: Sequence[_Plane], spacing: tuple[float, float, float]) -> np.ndarray:
    """``(4, 4)``: voxel ``(d, h, w, 1)`` -> RAS mm (DICOM patient space is LPS: x and y negated)."""
    first, last = planes[0], planes[-1]
    iop = np.asarray(first.iop if first.iop is not None else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    row_dir, col_dir = iop[:3], iop[3:]  # LPS directions of increasing column (W) and row (H) index
    origin = np.asarray(first.ipp if first.ipp is not None else (0.0, 0.0, 0.0))
    if len(planes) > 1 and last.ipp is not None:
        step = (np.asarray(last.ipp) - origin) / (len(planes) - 1)  # follows a gantry tilt too
    else:
        step = np.cross(row_dir, col_dir) * spacing[0]
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = step, col_dir * spacing[1], row_dir * spacing[2], origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _axes(affine: np.ndarray) -> str:
    """RAS axis codes of the directions the columns of ``affine`` point to (``"SPL"``, ...)."""
    codes = (("L", "R"), ("P", "A"), ("I", "S"))
    out = ""
    for j in range(3):
        k = int(np.argmax(np.abs(affine[:3, j])))
        out += codes[k][int(affine[k, j] > 0)]
    return out


def _jsonable(value: Any) -> Any:
    """A header value as JSON (numbers, code strings, lists of them), or None to leave it out."""
    if isinstance(value, (list, tuple, MultiValue)):
        items = [_jsonable(v) for v in value]
        return None if any(v is None for v in items) else items
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, (float, Decimal)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, str):
        return str(value)
    return None  # bytes, sequences, person names: never technical


def _attrs(
    ds: Dataset,
    planes: Sequence[_Plane],
    spacing: tuple[float, float, float],
    affine: np.ndarray,
    positions_from: str,
    n_files: int,
) -> dict[str, Any]:
    """Whitelisted attributes of ``ds`` plus computed geometry; nothing identifying."""
    attrs: dict[str, Any] = {}
    for keyword in ATTRIBUTE_WHITELIST:
        value = _jsonable(ds.get(keyword)) if keyword in ds else None
        if value is not None and value != "":
            attrs[keyword] = value
    first = planes[0]
    if first.pixel_spacing is not None:
        attrs["PixelSpacing"] = list(first.pixel_spacing)
    if first.iop is not None:
        attrs["ImageOrientationPatient"] = list(first.iop)
    rescale = {(p.slope, p.intercept) for p in planes}
    attrs.pop("RescaleSlope", None)
    attrs.pop("RescaleIntercept", None)
    if len(rescale) == 1:
        attrs["RescaleSlope"], attrs["RescaleIntercept"] = first.slope, first.intercept
    attrs.update(
        source_format="dicom",
        spacing=list(spacing),
        axes=_axes(affine),
        affine_dhw=affine.tolist(),
        n_files=n_files,
        multiframe=first.frame is not None,
        positions_from=positions_from,
        rescale_per_slice=len(rescale) > 1,
    )
    return attrs


def _reader(planes: Sequence[_Plane], rows: int, cols: int) -> Any:
    """``read(z0, z1) -> (z1 - z0, rows, cols)`` float32, decoding only those planes' files."""

    def read(z0: int, z1: int) -> np.ndarray:
        if not 0 <= z0 <= z1 <= len(planes):
            raise ValueError(f"slab {z0}:{z1}; expected 0 <= z0 <= z1 <= {len(planes)}")
        out = np.empty((z1 - z0, rows, cols), dtype=np.float32)  # (slices, H, W)
        for i, p in enumerate(planes[z0:z1]):
            try:
                stored = pixel_array(p.path, index=p.frame)  # (rows, cols) stored values
            except Exception as e:  # a decoder failure on untrusted bytes
                raise QuarantineError("unreadable", f"{p.where}: pixel data does not decode ({e})") from e
            if stored.shape != (rows, cols):
                raise QuarantineError(
                    "unreadable", f"{p.where}: decoded {stored.shape} pixels; expected ({rows}, {cols})"
                )
            out[i] = stored * p.slope + p.intercept  # stored -> HU for CT, in float64 then float32
        finite = np.isfinite(out)
        if not finite.all():
            raise QuarantineError(
                "not_finite",
                f"{planes[z0].where}..{planes[z1 - 1].where}: {out.size - int(np.count_nonzero(finite))} "
                "NaN/Inf pixels; expected finite intensities",
            )
        return out

    return read
