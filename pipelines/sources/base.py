"""What every source format gives ingest: items found in a source, and volumes read slab by slab.

A **source item** is one scan to be: a NIfTI file, a DICOM series (many files), a fastMRI HDF5
file. Discovery (``discover``) walks a source directory and returns items without reading pixel
data. Opening an item (``open_item``) reads its header and returns a :class:`SourceVolume`, whose
:meth:`SourceVolume.read` returns slices ``z0:z1`` of the canonical ``(D, H, W)`` volume, so a
writer never holds more than one slab plus the file's own decoding buffer.

Bad input raises :class:`QuarantineError` with a short machine-readable ``reason`` (one of
:data:`REASONS`) and a message that names the file and says what was expected and what was
found. Ingest quarantines that item and commits the others.

Only whitelisted, non-identifying facts leave a reader (``SourceVolume.attrs``): geometry,
modality, the format, and never a DICOM patient, study or institution attribute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = [
    "REASONS",
    "QuarantineError",
    "SourceItem",
    "SourceVolume",
    "MAX_VOXELS",
    "resolve_inside",
    "walk_source",
]

#: Largest volume ingest accepts (voxels); a header claiming more is refused before any read.
MAX_VOXELS = 4 * 1024**3

#: Reasons an item is quarantined (``QuarantineError.reason``).
REASONS = {
    "unreadable": "not an image file of the expected format, or its header does not parse",
    "truncated": "the file ends before the data its header declares",
    "too_large": f"the header declares more than {MAX_VOXELS} voxels",
    "not_3d": "the volume is not 2D or 3D (e.g. a 4D NIfTI without an option to split it)",
    "no_pixel_data": "a DICOM file without pixel data",
    "missing_slice": "a DICOM series with a gap in its slice positions",
    "uneven_spacing": "a DICOM series whose slice positions are not evenly spaced",
    "mixed_sizes": "a DICOM series whose slices differ in rows, columns or pixel spacing",
    "no_kspace": "an HDF5 file without a 'kspace' dataset",
    "not_finite": "the volume holds NaN or Inf",
    "outside_source": "a path that leaves the source directory (e.g. through a symlink)",
}


class QuarantineError(Exception):
    """An item that cannot be ingested; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}; expected one of {sorted(REASONS)}")
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SourceItem:
    """One scan to be ingested, found without reading pixel data.

    Attributes:
        format: ``nifti``, ``dicom`` or ``fastmri``.
        paths: the files (relative to the source root: a NIfTI or HDF5 file, or a series' files).
        key: the stable text the scan ID is derived from (the relative path; for DICOM the
            study and series instance UIDs, which are hashed with a secret key, never stored).
        label_path: a label volume's path (relative to the source root), from a manifest.
    """

    format: str
    paths: tuple[str, ...]
    key: str
    label_path: str | None = None


@dataclass
class SourceVolume:
    """An opened item: the canonical ``(D, H, W)`` geometry and a slab reader.

    Attributes:
        shape: ``(D, H, W)``; for multi-coil k-space the coil axis follows: ``(D, C, H, W)``.
        dtype: numpy dtype of what :meth:`read` returns.
        spacing: voxel size in mm along ``(D, H, W)``.
        modality: ``mri`` or ``ct``.
        attrs: whitelisted facts to store on the array (JSON-able; never identifying).
        extra: other arrays of the item read whole (small ones: masks, references), by name.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    spacing: tuple[float, float, float]
    modality: str
    attrs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    reader: Any = None  # a callable (z0, z1) -> array of shape (z1 - z0, *shape[1:])

    def read(self, z0: int, z1: int) -> np.ndarray:
        """Slices ``z0:z1`` of the volume."""
        return self.reader(z0, z1)


class Reader(Protocol):
    """What a format module provides."""

    def discover(self, root: str) -> list[SourceItem]: ...

    def open_item(self, root: str, item: SourceItem) -> SourceVolume: ...


def walk_source(root: str) -> tuple[list[str], list[str]]:
    """Entries of a source directory, without reading any file.

    Returns ``(files, escaping)``, both sorted POSIX paths relative to ``root``. ``files`` holds
    every regular file and every link to a non-folder (in or out of the source, dangling included);
    folders, and folder links whose target stays inside the source, are walked (each real folder
    once, so link cycles end). ``escaping`` holds folder links whose target leaves the source; they
    are not walked. Names starting with ``.`` (``.DS_Store``, ``.git``) are skipped.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
    """
    real_root = os.path.realpath(root)
    if not os.path.isdir(real_root):
        raise FileNotFoundError(f"source root {root!r}: expected a directory, found none")
    files: list[str] = []
    escaping: list[str] = []
    seen = {real_root}
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(root, rel_dir)) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if not entry.is_dir(follow_symlinks=True):
                    files.append(rel)
                    continue
                real = os.path.realpath(entry.path)
                if not _is_inside(real, real_root):
                    escaping.append(rel)
                elif real not in seen:
                    seen.add(real)
                    stack.append(rel)
    return sorted(files), sorted(escaping)


def resolve_inside(root: str, rel: str) -> str:
    """The real path of ``root/rel``, checked to lie inside the real ``root``.

    Raises:
        QuarantineError: ``outside_source`` when links (or ``..``) lead out of the source;
            ``unreadable`` when nothing exists there (e.g. a dangling link).
    """
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, rel))
    if not _is_inside(real, real_root):
        raise QuarantineError(
            "outside_source",
            f"{rel}: resolves to {real}, outside the source {real_root}; expected a path inside the "
            "source (copy the file in rather than linking to it)",
        )
    if not os.path.exists(real):
        raise QuarantineError("unreadable", f"{rel}: expected a file, found nothing there (a dangling link?)")
    return real


def _is_inside(real: str, real_root: str) -> bool:
    return os.path.commonpath([real, real_root]) == real_root
