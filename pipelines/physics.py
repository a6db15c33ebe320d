"""The typed acquisition of a scan: its operator, and how its measurements are stored and read.

:class:`Acquisition` is the one place that knows measurement layouts. Simulation builds it from
the spec and writes through it; training, validation and reconstruction rebuild the same one from
the array's attributes (with the mask and coil maps stored beside it), so a scan's physics is
stated once and the stages cannot drift apart. Everything outside reads measurements in
**operator layout**, ``(S, *op.out_shape)`` for a slab of ``S`` slices.

Stored layouts (archive layout version 2, :data:`pipelines.store.LAYOUT_VERSION`):

* k-space: complex64 ``(D, C, H, W)``, slice-first (a slab is one contiguous block), ``C = 1`` for
  a single coil. With a 1D Cartesian mask only the acquired columns are stored,
  ``(D, C, H, n)`` with attributes ``layout: columns`` and ``columns``, as a scanner records
  them (4x less to write and read at 4x); :meth:`Acquisition.read` zero-fills the rest.
* sinogram: float32 ``(D, views, detectors)``.
* lowres: float32 ``(D, H/f, W/f)``, each voxel the mean of an ``f x f`` block of the image
  (attributes ``factor`` and ``image_shape``, the high-resolution ``(H, W)``).

All operators act per 2D slice: ``CartesianMRI`` ``(S, H, W) -> (S, H, W)``, SENSE
``(S, H, W) -> (S, C, H, W)``, CT ``(S, H, W) -> (S, views, detectors)``, ``Downsample``
``(S, H, W) -> (S, H/f, W/f)``.

Coil maps are one set per scan ``(C, H, W)`` (simulated: the same coils for every slice), or one
per slice ``(D, C, H, W)`` (measured k-space, maps estimated from each slice's calibration lines):
then :meth:`Acquisition.slab_op` gives the operator of a slab, and ``op`` is slice 0's, for shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from operators.ct import FanBeam, ParallelBeam, sparse_view_angles
from operators.errors import ShapeError
from operators.linear import LinearOperator
from operators.resolution import Downsample
from pipelines.errors import ArchiveError, StageError
from pipelines.spec import CTSpec, SimulateStage
from pipelines.store import MEASUREMENTS, Archive

__all__ = [
    "Acquisition",
    "ct_operator",
    "mri_operator",
    "lowres_operator",
    "sampled_columns",
    "MEASUREMENT_ARRAYS",
]

#: The array that holds each modality's measurements.
MEASUREMENT_ARRAYS = {"mri": "kspace", "ct": "sinogram", "lowres": "lowres"}


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


def mri_operator(mask: torch.Tensor, coil_maps: torch.Tensor | None = None) -> LinearOperator:
    """Single-coil (``coil_maps`` None) or SENSE Cartesian MRI for ``mask`` ``(*batch, H, W)``."""
    from operators.mri import CartesianMRI, sense

    m = mask.to(torch.float32)
    return CartesianMRI(m) if coil_maps is None else sense(m, coil_maps)


def lowres_operator(image_shape: tuple[int, int], factor: int, where: str = "lowres.factor") -> Downsample:
    """Area down-sampling of ``(H, W)`` slices by ``factor``; ``where`` names the setting in errors.

    Raises:
        StageError: ``factor`` does not divide ``H`` and ``W``.
    """
    try:
        return Downsample(image_shape, factor)
    except ShapeError:
        h, w = image_shape
        raise StageError(
            f"{where} must divide the slices' H and W; found factor {factor} for (H, W) = ({h}, {w}) "
            f"(remainders {h % factor} and {w % factor}). Crop or pad the images to multiples of {factor} "
            "(a preprocess stage's shape), or use another factor"
        ) from None


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


@dataclass(frozen=True)
class _SliceMaps:
    """Slices ``z0:z1`` of a scan's per-slice coil maps, read (and checked) on demand."""

    reader: Any

    def __call__(self, z0: int, z1: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.reader.read(z0, z1)))  # (S, C, H, W)


def _measurements(archive: Archive, scan_id: str, commit: dict[str, Any]) -> tuple[str, str]:
    """``(modality, array name)`` of a scan's measurements: the array its commit record names (an
    archive re-simulated with another modality may still hold the old array beside it), else
    whichever exists."""
    records = commit.get("arrays", {})
    found = [(m, n) for m, n in MEASUREMENT_ARRAYS.items() if n in records] or [
        (m, n) for m, n in MEASUREMENT_ARRAYS.items() if archive.has_array(scan_id, n)
    ]
    if not found:
        raise ArchiveError(
            f"scan {scan_id!r} has no measurements ({', '.join(MEASUREMENT_ARRAYS.values())}); "
            "run the simulate stage first"
        )
    return found[0]


@dataclass(frozen=True, eq=False)
class Acquisition:
    """How one scan was measured.

    Attributes:
        modality: ``"mri"``, ``"ct"`` or ``"lowres"``.
        op: the per-slice operator.
        image_shape: ``(H, W)`` of a slice.
        coils: receive coils (1 for single-coil MRI and for CT).
        mask: the ``(H, W)`` sampling mask (MRI), else None.
        maps: complex ``(C, H, W)`` coil sensitivities (SENSE) shared by all slices, else None.
        columns: the stored k-space columns of a 1D Cartesian mask, else None (full k-space).
        ct: the CT settings (CT), else None.
        records: what the measurements' commit recorded of each array (read once; reads check it).
        noise_sigma: the noise standard deviation the measurements were simulated with: complex
            (MRI), real (low resolution).
        slice_maps: for maps stored per slice ``(D, C, H, W)``, a reader of slices ``z0:z1`` of them
            (they are read a slab at a time, never whole), else None.
    """

    modality: str
    op: LinearOperator
    image_shape: tuple[int, int]
    coils: int = 1
    mask: torch.Tensor | None = None
    maps: torch.Tensor | None = None
    columns: np.ndarray | None = None
    ct: CTSpec | None = None
    records: dict[str, Any] = field(default_factory=dict)
    noise_sigma: float = 0.0
    slice_maps: Any = None

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def simulated(cls, stage: SimulateStage, mask_seed: int, image_shape: tuple[int, int]) -> Acquisition:
        """What ``stage`` simulates for slices of ``image_shape``; the mask is seeded by ``mask_seed``."""
        h, w = image_shape
        if stage.modality == "ct":
            return cls("ct", ct_operator(stage.ct_spec, (h, w)), (h, w), ct=stage.ct_spec)
        if stage.modality == "lowres":
            where = f"simulate stage {stage.name!r}: lowres.factor"
            return cls("lowres", lowres_operator((h, w), stage.lowres_spec.factor, where), (h, w))
        from operators.masks import make_mask
        from operators.mri import birdcage_maps

        mask = make_mask(
            stage.mask.kind, (h, w), stage.mask.acceleration, stage.mask.center_fraction, mask_seed
        )
        maps = birdcage_maps((h, w), stage.coils) if stage.coils > 1 else None
        return cls("mri", mri_operator(mask, maps), (h, w), stage.coils, mask, maps, sampled_columns(mask))

    @classmethod
    def measured(cls, columns_mask: np.ndarray, image_shape: tuple[int, int], coils: int) -> Acquisition:
        """The layout of measured Cartesian k-space: a column mask ``(W,)`` (whole lines, as fastMRI
        samples), the slice shape and the coil count. Ingest writes through it; its coil maps, one
        set per slice, are written beside it, so its ``op`` is not the scan's."""
        h, w = image_shape
        cols = np.asarray(columns_mask, dtype=bool).reshape(-1)
        if cols.shape != (w,):
            raise StageError(f"a column mask of {cols.shape[0]} entries for slices {h}x{w}; expected {w}")
        mask = torch.from_numpy(np.broadcast_to(cols, (h, w)).copy())
        return cls("mri", mri_operator(mask), (h, w), coils, mask, None, sampled_columns(mask))

    @staticmethod
    def modality_of(archive: Archive, scan_id: str) -> str:
        """A scan's modality (``mri``, ``ct`` or ``lowres``), from its measurements' name alone.

        Raises:
            ArchiveError: the scan has no measurements.
        """
        return _measurements(archive, scan_id, archive.commit_record(MEASUREMENTS, scan_id) or {})[0]

    @classmethod
    def from_archive(cls, archive: Archive, scan_id: str) -> Acquisition:
        """Rebuild a scan's acquisition from its measurement array's attributes, mask and coil maps.

        Raises:
            ArchiveError: the scan has no measurements, or their attributes are inconsistent.
        """
        commit = archive.commit_record(MEASUREMENTS, scan_id) or {}
        records = commit.get("arrays", {})
        modality, name = _measurements(archive, scan_id, commit)
        arr = archive.open_array(scan_id, name)
        attrs = arr.attrs.asdict()
        where = f"scans/{scan_id}/{name}"
        h, w = (int(v) for v in attrs["image_shape"])
        if modality == "ct":
            ct = CTSpec.model_validate(attrs["ct"])
            return cls("ct", ct_operator(ct, (h, w)), (h, w), ct=ct, records=records)
        if modality == "lowres":
            factor = attrs.get("factor")
            if not isinstance(factor, int) or factor < 1 or h % factor or w % factor:
                raise ArchiveError(
                    f"{where}: attribute 'factor' is {factor!r} for image_shape ({h}, {w}); expected a "
                    "positive integer that divides both"
                )
            op = Downsample((h, w), factor)
            if tuple(arr.shape[1:]) != op.out_shape:
                raise ArchiveError(
                    f"{where}: stored with shape {tuple(arr.shape)}; expected (D, {op.out_shape[0]}, "
                    f"{op.out_shape[1]}) for image_shape ({h}, {w}) at factor {factor}"
                )
            sigma = float(commit.get("noise_sigma") or 0.0)
            return cls("lowres", op, (h, w), records=records, noise_sigma=sigma)
        coils = int(attrs.get("coils", 1))
        if len(arr.shape) != 4 or arr.shape[1] != coils:
            raise ArchiveError(
                f"{where}: stored with shape {tuple(arr.shape)}; expected (D, C={coils}, H, W) k-space"
            )
        mask = torch.from_numpy(archive.reader(scan_id, "mask", records.get("mask")).read())
        maps, slice_maps = None, None
        if coils > 1:
            reader = archive.reader(scan_id, "coil_maps", records.get("coil_maps"))
            if len(reader.shape) == 4:  # one set per slice: read a slab at a time
                if reader.shape[0] != arr.shape[0]:
                    raise ArchiveError(
                        f"scans/{scan_id}/coil_maps: {reader.shape[0]} slices of maps for {arr.shape[0]} "
                        "slices of k-space; expected one set of maps per slice"
                    )
                slice_maps = _SliceMaps(reader)
            else:
                maps = torch.from_numpy(reader.read())
        columns = cls._stored_columns(attrs, arr.shape[-1], w, where)
        sigma = float(commit.get("noise_sigma") or 0.0)
        return cls(
            "mri",
            mri_operator(mask, maps if slice_maps is None else slice_maps(0, 1)[0]),
            (h, w),
            coils,
            mask,
            maps,
            columns,
            records=records,
            noise_sigma=sigma,
            slice_maps=slice_maps,
        )

    @staticmethod
    def _stored_columns(attrs: dict[str, Any], stored: int, width: int, where: str) -> np.ndarray | None:
        layout = attrs.get("layout", "full")
        if layout == "full":
            if stored != width:
                raise ArchiveError(f"{where}: stored with {stored} columns; expected the full width {width}")
            return None
        if layout != "columns":
            raise ArchiveError(
                f"{where}: unknown layout {layout!r} in its attributes; expected 'full' or 'columns'"
            )
        cols = np.asarray(attrs["columns"], dtype=np.int64)
        if stored != cols.size:
            raise ArchiveError(
                f"{where}: stored with {stored} columns but its 'columns' attribute lists {cols.size}"
            )
        return cols

    @property
    def per_slice(self) -> bool:
        """Whether slices have operators of their own (coil maps stored ``(D, C, H, W)``)."""
        return self.slice_maps is not None

    def slab_op(self, z0: int, z1: int) -> LinearOperator:
        """The operator of slices ``z0:z1``: ``op``, or with per-slice maps their batched SENSE."""
        if self.slice_maps is None:
            return self.op
        assert self.mask is not None
        maps = self.slice_maps(z0, z1)  # (S, C, H, W)
        return mri_operator(self.mask.expand(maps.shape[0], *self.mask.shape), maps)

    def with_mask(self, mask: torch.Tensor) -> Acquisition:
        """The same MRI acquisition (coil maps, noise level) with another ``(H, W)`` mask, in memory."""
        if self.modality != "mri":
            raise StageError(f"a new sampling mask applies to MRI; this acquisition is {self.describe()}")
        return Acquisition(
            "mri", mri_operator(mask, self.maps), self.image_shape, self.coils, mask, self.maps,
            sampled_columns(mask), noise_sigma=self.noise_sigma,
        )  # fmt: skip

    @property
    def factor(self) -> int | None:
        """The down-sampling factor of a low-resolution acquisition, else None."""
        return self.op.factor if isinstance(self.op, Downsample) else None

    def describe(self) -> str:
        """One line, for messages: modality, slice shape, coils, CT geometry or down-sampling factor."""
        what = f"{self.modality.upper()} {self.image_shape[0]}x{self.image_shape[1]}"
        if self.ct is not None:
            return f"{what} {self.ct.geometry}-beam {self.ct.views} views"
        if self.modality == "lowres":
            h, w = self.op.out_shape
            return f"{what} down-sampled {self.factor}x to {h}x{w}"
        return f"{what} {self.coils} coil(s)"

    # -- layout ------------------------------------------------------------------------------------
    @property
    def measurement(self) -> str:
        """The measurement array's name: ``kspace``, ``sinogram`` or ``lowres``."""
        return MEASUREMENT_ARRAYS[self.modality]

    @property
    def real(self) -> bool:
        """Whether the measurements are real (float32 sinograms and low-res images), not complex k-space."""
        return self.modality in ("ct", "lowres")

    def stored_shape(self, depth: int) -> tuple[int, ...]:
        """The measurement array's shape for ``depth`` slices."""
        if self.real:
            return (depth, *self.op.out_shape)
        h, w = self.image_shape
        return (depth, self.coils, h, w if self.columns is None else int(self.columns.size))

    def attrs(self) -> dict[str, Any]:
        """The attributes :meth:`from_archive` rebuilds the acquisition from."""
        out: dict[str, Any] = {"modality": self.modality, "image_shape": list(self.image_shape)}
        if self.modality == "ct":
            assert self.ct is not None
            return out | {"ct": self.ct.model_dump(), "angles": self.op.angles.tolist()}  # type: ignore[attr-defined]
        if self.modality == "lowres":
            return out | {"factor": self.factor, "axes": "D,h,w"}
        out |= {"coils": self.coils, "axes": "D,C,H,W", "layout": "full"}
        if self.columns is not None:
            out |= {"layout": "columns", "columns": self.columns.tolist()}
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays stored beside the measurements: the mask and the coil maps (MRI)."""
        out: dict[str, np.ndarray] = {}
        if self.mask is not None:
            out["mask"] = self.mask.numpy().astype(bool)
        if self.maps is not None:
            out["coil_maps"] = self.maps.to(torch.complex64).numpy()
        return out

    def to_stored(self, y: torch.Tensor) -> np.ndarray:
        """Measurements ``(S, *op.out_shape)`` in the stored layout (see the module docstring)."""
        if self.real:
            return y.to(torch.float32).numpy()
        if self.coils == 1:
            y = y.unsqueeze(1)  # (S, 1, H, W)
        if self.columns is not None:
            y = y[..., torch.from_numpy(self.columns)]  # (S, C, H, n): the acquired lines only
        return y.to(torch.complex64).numpy()

    def from_stored(self, block: np.ndarray) -> torch.Tensor:
        """Stored measurements of ``S`` slices in operator layout ``(S, *op.out_shape)``, zero-filled."""
        if self.real:
            return torch.from_numpy(np.ascontiguousarray(block))
        if self.columns is not None:
            full = np.zeros((*block.shape[:-1], self.image_shape[1]), dtype=block.dtype)
            full[..., self.columns] = block
            block = full
        y = torch.from_numpy(block)  # (S, C, H, W)
        return y[:, 0] if self.coils == 1 else y

    def read(
        self, archive: Archive, scan_id: str, z0: int | None = None, z1: int | None = None
    ) -> torch.Tensor:
        """Slices ``z0:z1`` of the scan's measurements in operator layout, checked against their commit."""
        record = self.records.get(self.measurement)
        return self.from_stored(archive.reader(scan_id, self.measurement, record).read(z0, z1))

    # -- batches -----------------------------------------------------------------------------------
    @staticmethod
    def stack(acquisitions: Sequence[Acquisition]) -> LinearOperator:
        """One operator for a batch whose item ``b`` was measured by ``acquisitions[b]``.

        MRI stacks the masks (and coil maps) into a batched operator; CT needs one geometry for
        the whole batch, and low resolution one factor.

        Raises:
            StageError: the acquisitions mix modalities, image shapes, coil counts, CT geometries or
                down-sampling factors.
        """
        first = acquisitions[0]
        if any(a.per_slice for a in acquisitions):
            raise StageError(
                f"training on {first.describe()} with coil maps estimated per slice (measured k-space) "
                "is not supported yet; train on simulated measurements, or reconstruct these scans"
            )
        for other in acquisitions[1:]:
            same = (other.modality, other.image_shape, other.coils) == (
                first.modality,
                first.image_shape,
                first.coils,
            )
            if not same or other.ct != first.ct or other.factor != first.factor:
                raise StageError(
                    f"training batches need one kind of acquisition; found {first.describe()} "
                    f"beside {other.describe()}"
                )
        if first.real or all(a is first for a in acquisitions):
            return first.op
        assert first.mask is not None
        masks = torch.stack([a.mask for a in acquisitions])  # type: ignore[misc]  # (B, H, W)
        maps = torch.stack([a.maps for a in acquisitions]) if first.maps is not None else None  # type: ignore[misc]
        return mri_operator(masks, maps)
