"""fastMRI HDF5 files: measured k-space as acquired, its column mask, the reference and the geometry.

A fastMRI file (https://fastmri.org, ``data/mri_data.py`` of the fastMRI repository) holds:

* ``kspace``: complex64 ``(slices, H, W)`` single-coil or ``(slices, coils, H, W)`` multi-coil,
  centred (zero frequency at ``N // 2``, as :mod:`operators.fft`), ``H`` the read-out direction
  (usually 640, twice over-sampled) and ``W`` the phase-encode direction (e.g. 368), zero in the
  columns that were not acquired;
* ``mask`` (test and challenge files only): the column mask ``(W,)``;
* ``reconstruction_rss`` (multi-coil) or ``reconstruction_esc`` (single-coil): float32 reference
  images ``(slices, 320, 320)``, the centre crop (:func:`operators.transforms.on_grid`) of the fully sampled
  reconstruction;
* ``ismrmrd_header``: the ISMRMRD XML header (a bytes string); file attributes ``acquisition``,
  ``max``, ``norm``, ``patient_id`` (hashed) and, in test files, ``acceleration`` and
  ``num_low_frequency``.

:func:`open_item` gives the k-space itself, ``(D, H, W)`` or ``(D, C, H, W)`` complex64, read
slab by slab; ``extra["mask"]`` the column mask, bool ``(W,)`` (from ``mask``, or the columns of
``kspace`` with any non-zero sample); ``extra["reference"]`` the reference, float32 ``(D, h, w)``.
Only geometry leaves the header (:func:`header_geometry`) and only whitelisted file attributes
(:data:`FILE_ATTRS`) reach ``attrs``: never ``patient_id`` nor any free text of the header.

``spacing`` is that of the image grid of the k-space array: ``(fov_z, fov_x / H, fov_y / W)`` mm
from the header's ``encodedSpace`` (fastMRI's ``matrixSize`` x, y equal ``H``, ``W``; ``fov_z``
is the slice thickness), or 1 mm where the header lacks a field.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.sources.base import (
    MAX_VOXELS,
    QuarantineError,
    SourceItem,
    SourceVolume,
    resolve_inside,
    walk_source,
)

__all__ = ["discover", "open_item", "header_geometry", "FILE_ATTRS", "REFERENCES"]

#: File attributes copied into ``attrs`` (acquisition protocol, intensity scale, test-set sampling).
FILE_ATTRS = ("acquisition", "max", "norm", "acceleration", "num_low_frequency")

#: Reference datasets, in order of preference for multi-coil files (single-coil files prefer ESC).
REFERENCES = ("reconstruction_rss", "reconstruction_esc")

#: Bytes of k-space read at a time while finding the sampled columns of a file without ``mask``.
_SCAN_BYTES = 64 << 20

#: Largest header accepted (bytes); fastMRI headers are about 10 kB.
_MAX_HEADER_BYTES = 1 << 20


def discover(root: str) -> list[SourceItem]:
    """Every ``.h5``/``.hdf5`` file under ``root``, walked as :func:`~pipelines.sources.base.walk_source`
    walks (symlinked files included; folder links followed only while they stay in the source).

    Each item's key and only path is the file's path relative to ``root``, with ``/`` separators.
    No file is opened: a bad file is quarantined by :func:`open_item`.
    """
    files, _ = walk_source(root)  # folder links leaving the source: the NIfTI reader lists them
    return [SourceItem("fastmri", (rel,), rel) for rel in files if rel.lower().endswith((".h5", ".hdf5"))]


# -- the ISMRMRD header ----------------------------------------------------------------------------
def _local(tag: str) -> str:
    """An element's name without its namespace (``{http://www.ismrm.org/ISMRMRD}x`` -> ``x``)."""
    return tag.rsplit("}", 1)[-1]


def _child(element: ET.Element | None, name: str) -> ET.Element | None:
    if element is None:
        return None
    return next((c for c in element if _local(c.tag) == name), None)


def _path(element: ET.Element | None, *names: str) -> ET.Element | None:
    for name in names:
        element = _child(element, name)
    return element


def _numbers(element: ET.Element | None, names: tuple[str, ...], kind: type) -> list[Any] | None:
    """``[kind(x), kind(y), ...]`` of ``element``'s children ``names``; None unless all are finite numbers."""
    values = []
    for name in names:
        child = _child(element, name)
        try:
            values.append(kind(float(child.text)))  # type: ignore[union-attr, arg-type]
        except (AttributeError, TypeError, ValueError, OverflowError):  # missing, empty, text, nan, inf
            return None
    return values


def header_geometry(xml: str | bytes) -> dict[str, Any]:
    """The geometry of an ISMRMRD header: matrix sizes, fields of view and encoding limits.

    Reads only ``encoding/encodedSpace`` and ``encoding/reconSpace`` (``matrixSize`` x, y, z and
    ``fieldOfView_mm`` x, y, z) and ``encoding/encodingLimits/kspace_encoding_step_1`` (minimum,
    maximum, centre: fastMRI's phase-encode padding) of the first ``encoding``, in the ISMRMRD
    namespace or none. Nothing else of the header (patient, study, institution, protocol text)
    is returned.

    Returns:
        A JSON-able dict with any of ``encoded_matrix``, ``encoded_fov_mm``, ``recon_matrix``,
        ``recon_fov_mm`` (lists ``[x, y, z]``) and ``kspace_encoding_step_1`` (dict).

    Raises:
        ValueError: the text is not well-formed XML, declares a DTD or entities, or is over 1 MiB.
    """
    text = xml.decode("utf-8", errors="replace") if isinstance(xml, bytes) else str(xml)
    if len(text) > _MAX_HEADER_BYTES:
        raise ValueError(
            f"the ISMRMRD header is {len(text)} characters; expected at most {_MAX_HEADER_BYTES}"
        )
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise ValueError("the ISMRMRD header declares a DTD or entities; expected plain XML")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ValueError(f"the ISMRMRD header is not well-formed XML ({e})") from None
    encoding = _child(root, "encoding")
    out: dict[str, Any] = {}
    for space, prefix in (("encodedSpace", "encoded"), ("reconSpace", "recon")):
        matrix = _numbers(_path(encoding, space, "matrixSize"), ("x", "y", "z"), int)
        fov = _numbers(_path(encoding, space, "fieldOfView_mm"), ("x", "y", "z"), float)
        if matrix is not None:
            out[f"{prefix}_matrix"] = matrix
        if fov is not None:
            out[f"{prefix}_fov_mm"] = fov
    limits = _path(encoding, "encodingLimits", "kspace_encoding_step_1")
    step1 = _numbers(limits, ("minimum", "maximum", "center"), int)
    if step1 is not None:
        out["kspace_encoding_step_1"] = dict(zip(("minimum", "maximum", "center"), step1, strict=True))
    return out


# -- opening a file --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SlabReader:
    """``(z0, z1) -> kspace[z0:z1]`` as complex64, opening the file per call (picklable, no open handle)."""

    path: str
    depth: int

    def __call__(self, z0: int, z1: int) -> np.ndarray:
        if not 0 <= z0 <= z1 <= self.depth:
            raise ValueError(
                f"{os.path.basename(self.path)}: slices z0:z1 must satisfy 0 <= z0 <= z1 <= {self.depth}; "
                f"found {z0}:{z1}"
            )
        import h5py

        with h5py.File(self.path, "r") as f:
            return np.asarray(f["kspace"][z0:z1], dtype=np.complex64)  # (z1 - z0, [C,] H, W)


def _attr_value(value: Any) -> Any:
    """A file attribute as JSON: str, int, float or bool; None for anything else (arrays, objects)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, (str, int, float, bool)) else None


def _dataset(f: Any, key: str) -> Any:
    """``f[key]`` if it is a dataset, else None (absent, or a group)."""
    import h5py

    node = f.get(key)
    return node if isinstance(node, h5py.Dataset) else None


def _mask(f: Any, kspace: Any, name: str) -> tuple[np.ndarray, str]:
    """The column mask, bool ``(W,)``, and where it came from (``dataset`` or ``kspace``)."""
    w = kspace.shape[-1]
    stored = _dataset(f, "mask")
    if stored is not None:
        m = np.asarray(stored)
        if m.size != w or m.dtype.kind not in "biuf":
            raise QuarantineError(
                "unreadable",
                f"{name}: dataset 'mask' must be a real column mask of {w} entries (kspace's last axis W); "
                f"found shape {m.shape}, dtype {m.dtype}",
            )
        return m.reshape(w) != 0, "dataset"
    per_slice = int(np.prod(kspace.shape[1:])) * kspace.dtype.itemsize
    step = max(1, _SCAN_BYTES // max(1, per_slice))
    sampled = np.zeros(w, dtype=bool)
    for z0 in range(0, kspace.shape[0], step):
        slab = kspace[z0 : z0 + step]  # (slices, [C,] H, W)
        sampled |= (slab != 0).reshape(-1, w).any(axis=0)
    return sampled, "kspace"


def _reference(f: Any, multicoil: bool, depth: int, name: str) -> tuple[np.ndarray, str] | None:
    order = REFERENCES if multicoil else REFERENCES[::-1]
    key = next((k for k in order if _dataset(f, k) is not None), None)
    if key is None:
        return None
    ref = np.asarray(f[key])
    if ref.ndim != 3 or ref.shape[0] != depth or ref.dtype.kind not in "iuf":
        raise QuarantineError(
            "unreadable",
            f"{name}: dataset {key!r} must be real images (slices, h, w) with {depth} slices like kspace; "
            f"found shape {ref.shape}, dtype {ref.dtype}",
        )
    return ref.astype(np.float32, copy=False), key


def _geometry(f: Any, name: str) -> dict[str, Any]:
    header = _dataset(f, "ismrmrd_header")
    if header is None:
        return {}
    raw = header[()]
    if isinstance(raw, np.ndarray):
        raw = raw.reshape(-1)[0] if raw.size else b""
    try:
        return header_geometry(raw)
    except ValueError as e:
        raise QuarantineError("unreadable", f"{name}: dataset 'ismrmrd_header': {e}") from None


def _spacing(geometry: dict[str, Any], h: int, w: int) -> tuple[float, float, float]:
    fov = geometry.get("encoded_fov_mm")
    if fov is None:
        return (1.0, 1.0, 1.0)
    fx, fy, fz = fov
    return (fz if fz > 0 else 1.0, fx / h if fx > 0 else 1.0, fy / w if fy > 0 else 1.0)


@dataclass(frozen=True)
class _Contents:
    """What :func:`open_item` reads from a file before any slab: all small, all checked."""

    shape: tuple[int, ...]  # (D, H, W) or (D, C, H, W)
    mask: np.ndarray  # bool (W,)
    mask_source: str  # "dataset" or "kspace"
    reference: tuple[np.ndarray, str] | None  # float32 (D, h, w) and its dataset's name
    geometry: dict[str, Any]  # header_geometry(...)
    file_attrs: dict[str, Any]  # whitelisted, JSON-able


def _read_contents(f: Any, rel: str) -> _Contents:
    """Everything :func:`open_item` needs from the open file ``f``, checked (see its docstring)."""
    kspace = _dataset(f, "kspace")
    if kspace is None:
        found = sorted(f.keys())
        raise QuarantineError(
            "no_kspace", f"{rel}: no 'kspace' dataset; expected a fastMRI file; found datasets {found}"
        )
    shape, dtype = tuple(int(s) for s in kspace.shape), kspace.dtype
    if dtype.kind != "c" or len(shape) not in (3, 4) or min(shape) < 1:
        raise QuarantineError(
            "unreadable",
            f"{rel}: dataset 'kspace' must be complex (slices, H, W) single-coil or (slices, coils, H, W) "
            f"multi-coil with every size >= 1; found shape {shape}, dtype {dtype}",
        )
    if int(np.prod(shape)) > MAX_VOXELS:
        raise QuarantineError(
            "too_large", f"{rel}: kspace {shape} holds {int(np.prod(shape))} samples; at most {MAX_VOXELS}"
        )
    mask, mask_source = _mask(f, kspace, rel)
    attrs = {k: _attr_value(f.attrs[k]) for k in FILE_ATTRS if k in f.attrs}
    return _Contents(
        shape=shape,
        mask=mask,
        mask_source=mask_source,
        reference=_reference(f, len(shape) == 4, shape[0], rel),
        geometry=_geometry(f, rel),
        file_attrs={k: v for k, v in attrs.items() if v is not None},
    )


def open_item(root: str, item: SourceItem) -> SourceVolume:
    """Open a fastMRI file: its k-space as a :class:`SourceVolume` read slab by slab.

    The volume is ``(D, H, W)`` (single-coil) or ``(D, C, H, W)`` (multi-coil) complex64, the
    k-space as acquired (module docstring); ``extra`` holds ``mask`` (bool ``(W,)``) and, when the
    file has one, ``reference`` (float32 ``(D, h, w)``); ``attrs`` the geometry of the header,
    the whitelisted file attributes (:data:`FILE_ATTRS`), ``source_format``, ``coils``,
    ``layout``, ``mask_source`` and ``reference``.

    Only the header, mask and reference are read here, except in a file without a ``mask``
    dataset (fastMRI's training files): its k-space is read through once, 64 MiB at a time, to
    find the sampled columns (``attrs["mask_source"] == "kspace"``).

    Raises:
        QuarantineError: ``outside_source`` (a symlink or ``..`` leaving ``root``), ``unreadable``
            (not HDF5; ``kspace`` not complex of rank 3 or 4, or empty; a malformed mask,
            reference or header), ``truncated`` (the file ends early), ``no_kspace`` (no
            ``kspace`` dataset), ``too_large``.
    """
    import h5py

    rel = item.paths[0]
    path = resolve_inside(root, rel)
    if not os.path.isfile(path):
        raise QuarantineError(
            "unreadable", f"{rel}: not a regular file (a dangling link?); expected a fastMRI .h5"
        )
    if not h5py.is_hdf5(path):
        raise QuarantineError(
            "unreadable", f"{rel}: not an HDF5 file (no HDF5 signature); expected a fastMRI .h5"
        )
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        reason = "truncated" if "truncated" in str(e) else "unreadable"
        raise QuarantineError(
            reason, f"{rel}: the HDF5 file does not open ({e}); expected a fastMRI .h5"
        ) from None
    try:
        with f:
            c = _read_contents(f, rel)
    except OSError as e:  # a damaged dataset: HDF5 read errors
        raise QuarantineError("unreadable", f"{rel}: reading the HDF5 file failed ({e})") from None
    multicoil = len(c.shape) == 4
    attrs: dict[str, Any] = {
        "source_format": "fastmri",
        "coils": c.shape[1] if multicoil else 1,
        "layout": "slices, coils, H, W" if multicoil else "slices, H, W",
        "mask_source": c.mask_source,
        **c.geometry,
        **c.file_attrs,
    }
    extra = {"mask": c.mask}
    if c.reference is not None:
        extra["reference"], attrs["reference"] = c.reference
    return SourceVolume(
        shape=c.shape,
        dtype=np.dtype(np.complex64),
        spacing=_spacing(c.geometry, c.shape[-2], c.shape[-1]),
        modality="mri",
        attrs=attrs,
        extra=extra,
        reader=_SlabReader(path, c.shape[0]),
    )
