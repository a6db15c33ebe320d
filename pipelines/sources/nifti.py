"""NIfTI-1/2 reader (``.nii``, ``.nii.gz``): canonical RAS+ volumes, read slab by slab.

Canonical layout
    Every volume is reoriented to the closest RAS+ orientation by axis permutations and flips only
    (what :func:`nibabel.as_closest_canonical` does; never a resampling), then handed out as
    ``(D, H, W) = (S, A, R)``: the canonical RAS array ``(x, y, z)`` transposed to ``(z, y, x)``.
    D runs inferior -> superior (the slice axis of an axial scan), H posterior -> anterior, W
    left -> right. ``spacing`` is the header's zooms reordered the same way.

    A single-slice image (a 2D file, or a 3D one with exactly one spatial axis of length 1) is
    ``(1, H, W)``: its singleton axis becomes D and the two in-plane RAS axes follow in the same
    later-axis-first order, so a sagittal slice is ``(1, S, A)``.

    ``attrs`` keeps what the file said: ``affine`` (the original 4x4, nested lists) and
    ``orientation`` (its axis codes, e.g. ``"LAS"``), plus ``axes`` (what D, H, W run towards,
    ``"SAR"`` for a volume) and ``affine_dhw`` (voxel ``(d, h, w, 1)`` -> RAS mm of the array handed
    out).

Slab reading
    :meth:`SourceVolume.read` slices nibabel's array proxy (``img.dataobj[..., i0:i1]`` along the
    input axis that becomes D), so a slab never loads the whole volume. For ``.nii`` only the
    slab's bytes are read (one contiguous run when D is the file's last axis, as it is for axial
    scans). ``.nii.gz`` has no random access: the stream is decoded from the start up to the slab
    (zlib's 32 KiB window plus the slab itself; nothing else is kept), and the file stays open
    between reads so slabs read in increasing order of the file's D axis decode the file once
    (a file whose D axis is stored reversed, e.g. ``LPI``, re-decodes from the start for each slab).
    Intensities are float32 with ``scl_slope``/``scl_inter`` applied (by the proxy).

4D files
    :func:`open_item` refuses a 4D file (``not_3d``) unless ``frame=k`` picks one 3D frame;
    :func:`open_frames` opens them all. :func:`discover` stays one item per file: the caller names
    frame ``k`` of item ``key`` itself (e.g. ``f"{key}#{k}"``).

Quarantine (:class:`QuarantineError`, every message names the file): ``unreadable`` (not NIfTI,
empty, unsupported data type, singular affine), ``too_large`` (the header declares more than
``MAX_VOXELS`` voxels; checked before any read), ``truncated`` (a ``.nii`` shorter than
``vox_offset`` + data size, from its length alone; a ``.nii.gz`` only shows it when the slab past
its end is decoded, so :meth:`SourceVolume.read` raises it), ``not_3d``, ``not_finite`` (raised by
:meth:`SourceVolume.read` on the slab that holds NaN or Inf), and ``outside_source``.

Links: ``walk_source`` lists symlinked files like files, follows symlinked folders that stay in
the source, and lists a folder link that leaves it as an entry of its own. Both kinds of escape
become items that :func:`open_item` quarantines as ``outside_source``, so nothing outside the
source is ever read and the caller still gets a named item to quarantine. ``walk_source`` and
:func:`resolve_inside` live in :mod:`pipelines.sources.base`, shared by every reader and ingest.

NIfTI does not record a modality: volumes are ``mri`` unless the caller overrides it.
"""

from __future__ import annotations

import math
import os
import zlib

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import aff2axcodes, apply_orientation, inv_ornt_aff, io_orientation

from pipelines.sources.base import (
    MAX_VOXELS,
    QuarantineError,
    SourceItem,
    SourceVolume,
    resolve_inside,
    walk_source,
)

__all__ = ["SUFFIXES", "discover", "open_frames", "open_item"]

#: File names the NIfTI source picks up (compared case-insensitively).
SUFFIXES = (".nii", ".nii.gz")

_RAS = "RAS"


def discover(root: str) -> list[SourceItem]:
    """One item per ``.nii``/``.nii.gz`` file under ``root`` (key: its relative POSIX path), plus one
    per folder link leaving the source (quarantined by :func:`open_item`). Reads no file."""
    files, escaping = walk_source(root)
    rels = [rel for rel in files if rel.lower().endswith(SUFFIXES)] + escaping
    return [SourceItem(format="nifti", paths=(rel,), key=rel) for rel in sorted(rels)]


def open_item(root: str, item: SourceItem, frame: int | None = None) -> SourceVolume:
    """Read the header of a NIfTI item and return its canonical ``(D, H, W)`` float32 volume.

    Args:
        root: the source directory ``item`` was discovered in.
        item: a NIfTI item from :func:`discover`.
        frame: for a 4D file, the 3D frame to read (``0 <= frame < T``); must be ``None`` otherwise.

    Raises:
        QuarantineError: see the module docstring (``not_finite`` and a ``.nii.gz``'s ``truncated``
            come later, from :meth:`SourceVolume.read`).
        ValueError: ``item`` is not a one-file NIfTI item, or ``frame`` does not fit the file.
    """
    rel, img, shape, spatial, n_frames = _header(root, item)
    index: tuple[int, ...] = (0,) * (len(shape) - len(spatial))  # trailing axes of length 1
    if n_frames:
        if frame is None:
            raise QuarantineError(
                "not_3d",
                f"{rel}: shape {shape} is 4D ({n_frames} frames of {spatial}); expected 2D or 3D, or pass "
                "frame=k to open_item (open_frames opens every frame)",
            )
        if not 0 <= frame < n_frames:
            raise ValueError(f"{rel}: frame={frame} out of range; expected 0 <= frame < {n_frames}")
        index = (frame,) + index[1:]
    elif frame is not None:
        raise ValueError(f"{rel}: frame={frame} given, but the file is {len(spatial)}D; expected frame=None")
    return _volume(img, rel, shape, spatial, index, frame, n_frames)


def open_frames(root: str, item: SourceItem) -> list[SourceVolume]:
    """Every 3D volume of an item: ``[open_item(root, item)]`` for a 3D file, one per frame for 4D."""
    n_frames = _header(root, item)[4]
    if not n_frames:
        return [open_item(root, item)]
    return [open_item(root, item, frame=k) for k in range(n_frames)]


def _header(
    root: str, item: SourceItem
) -> tuple[str, nib.Nifti1Image, tuple[int, ...], tuple[int, ...], int]:
    """``(rel, img, shape, spatial shape, frames)`` after every check that needs no data read."""
    if item.format != "nifti" or len(item.paths) != 1:
        raise ValueError(
            f"item {item.key!r}: expected a NIfTI item with one path, found {item.format!r} {item.paths}"
        )
    rel = item.paths[0]
    path = resolve_inside(root, rel)
    img = _load(path, rel)
    shape = tuple(int(n) for n in img.shape)
    spatial, n_frames = _split_shape(shape, rel)
    declared = math.prod(shape)
    if declared > MAX_VOXELS:
        raise QuarantineError(
            "too_large",
            f"{rel}: header declares shape {shape} = {declared} voxels; expected at most {MAX_VOXELS}",
        )
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind not in "iuf":
        raise QuarantineError(
            "unreadable", f"{rel}: data type {dtype} is not supported; expected integers or reals"
        )
    if path.lower().endswith(".nii"):  # uncompressed: the length alone shows a truncation
        offset = int(img.dataobj.offset)
        need, have = offset + declared * dtype.itemsize, os.path.getsize(path)
        if have < need:
            raise QuarantineError(
                "truncated",
                f"{rel}: file is {have} bytes; the header declares {need} (vox_offset {offset} + "
                f"{declared} voxels x {dtype.itemsize} bytes)",
            )
    return rel, img, shape, spatial, n_frames


def _load(path: str, rel: str) -> nib.Nifti1Image:
    """The image with its header parsed and no data read."""
    try:
        img = nib.load(path, keep_file_open=path.lower().endswith(".gz"))
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as e:
        raise QuarantineError(
            "unreadable", f"{rel}: expected a NIfTI-1/2 file, its header does not parse ({e})"
        ) from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise QuarantineError("unreadable", f"{rel}: expected a NIfTI-1/2 image, found {type(img).__name__}")
    return img


def _split_shape(shape: tuple[int, ...], rel: str) -> tuple[tuple[int, ...], int]:
    """``(spatial shape, number of frames)``; frames is 0 for a 2D/3D file.

    Trailing axes of length 1 are dropped (``(X, Y, Z, 1)`` is 3D); a 4th axis of length ``T > 1``
    makes ``T`` frames; anything else is ``not_3d``.
    """
    if any(n <= 0 for n in shape):
        raise QuarantineError("unreadable", f"{rel}: header declares shape {shape}; expected positive sizes")
    spatial, extra = shape[:3], shape[3:]
    if len(spatial) < 2 or any(n != 1 for n in extra[1:]):
        raise QuarantineError(
            "not_3d", f"{rel}: shape {shape}; expected a 2D or 3D image, or 4D frames (X, Y, Z, T)"
        )
    n_frames = extra[0] if extra and extra[0] > 1 else 0
    return spatial, n_frames


def _volume(
    img: nib.Nifti1Image,
    rel: str,
    shape: tuple[int, ...],
    spatial: tuple[int, ...],
    index: tuple[int, ...],
    frame: int | None,
    n_frames: int,
) -> SourceVolume:
    """Geometry of the canonical array and its slab reader (no data read here)."""
    shape3 = spatial + (1,) * (3 - len(spatial))  # (X, Y, Z) of the file, a 2D file gets Z = 1
    affine = np.asarray(img.affine, dtype=np.float64)
    ornt = io_orientation(affine)  # (3, 2): file axis a -> (RAS axis, +1 or -1 for a flip)
    if not np.all(np.isfinite(ornt)):
        raise QuarantineError(
            "unreadable", f"{rel}: affine {affine.tolist()} is singular; expected 3 independent axes"
        )
    ras_of = ornt[:, 0].astype(int)  # file axis -> RAS axis
    ras_len = [0, 0, 0]
    for a in range(3):
        ras_len[ras_of[a]] = shape3[a]
    singles = [c for c in range(3) if ras_len[c] == 1]
    if len(singles) == 1 and singles[0] != 2:  # one slice, not axial: its singleton axis becomes D
        perm = (singles[0], *sorted((c for c in range(3) if c != singles[0]), reverse=True))
    else:
        perm = (2, 1, 0)  # (x, y, z) -> (z, y, x)
    zooms = [float(z) for z in img.header.get_zooms()[: len(spatial)]]
    if len(zooms) == 2:
        thickness = float(img.header["pixdim"][3])
        zooms.append(thickness if math.isfinite(thickness) and thickness > 0 else 1.0)
    ras_zoom = [0.0, 0.0, 0.0]
    for a in range(3):
        ras_zoom[ras_of[a]] = zooms[a]
    spacing = tuple(ras_zoom[c] for c in perm)
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise QuarantineError("unreadable", f"{rel}: voxel sizes {zooms}; expected positive finite pixdim")
    out_shape = tuple(ras_len[c] for c in perm)  # (D, H, W)
    canonical_affine = affine @ inv_ornt_aff(ornt, shape3)  # RAS index -> mm
    affine_dhw = canonical_affine[:, [*perm, 3]]  # (d, h, w, 1) -> mm
    axis_d = int(np.flatnonzero(ras_of == perm[0])[0])  # the file axis that becomes D
    flip_d = bool(ornt[axis_d, 1] < 0)
    n_d = shape3[axis_d]
    dataobj = img.dataobj

    def read(z0: int, z1: int) -> np.ndarray:
        if not 0 <= z0 <= z1 <= n_d:
            raise ValueError(f"{rel}: slab {z0}:{z1}; expected 0 <= z0 <= z1 <= {n_d}")
        i0, i1 = (n_d - z1, n_d - z0) if flip_d else (z0, z1)  # file indices of canonical z0:z1
        slicer = [slice(None)] * len(spatial)
        if axis_d < len(spatial):
            slicer[axis_d] = slice(i0, i1)
        try:
            block = np.asarray(dataobj[(*slicer, *index)], dtype=np.float32)  # file axes, D axis cut
        except EOFError as e:
            raise QuarantineError(
                "truncated", f"{rel}: compressed data ends before slab {z0}:{z1} of the declared {shape}"
            ) from e
        except (OSError, ValueError, zlib.error) as e:
            raise QuarantineError("unreadable", f"{rel}: data of slab {z0}:{z1} does not decode ({e})") from e
        if len(spatial) == 2:
            block = block[:, :, None]  # (X, Y) -> (X, Y, 1)
        ras = apply_orientation(block, ornt)  # (x, y, z) in RAS+, D axis cut to z1 - z0
        slab = np.ascontiguousarray(ras.transpose(perm))  # (z1 - z0, H, W)
        finite = np.isfinite(slab)
        if not finite.all():
            raise QuarantineError(
                "not_finite",
                f"{rel}: slab {z0}:{z1} holds {slab.size - int(np.count_nonzero(finite))} NaN/Inf voxels; "
                "expected finite intensities",
            )
        return slab

    attrs = {
        "source_format": "nifti",
        "nifti_version": 2 if isinstance(img, nib.Nifti2Image) else 1,
        "affine": affine.tolist(),
        "orientation": "".join(aff2axcodes(affine)),
        "canonical_orientation": _RAS,
        "axes": "".join(_RAS[c] for c in perm),
        "affine_dhw": affine_dhw.tolist(),
        "original_shape": list(shape),
        "original_dtype": str(np.dtype(img.get_data_dtype())),
        "spacing": list(spacing),
    }
    if frame is not None:
        attrs.update(frame=frame, n_frames=n_frames)
    return SourceVolume(
        shape=out_shape,
        dtype=np.dtype(np.float32),
        spacing=spacing,  # type: ignore[arg-type]
        modality="mri",
        attrs=attrs,
        reader=read,
    )
