"""Preprocess stage: derive a new image from each scan's ``image`` with Dask arrays scheduled on Ray.

For every scan with a committed source, ``scans/<id>/<output>`` (``derived/<name>``) is derived
from ``scans/<id>/image`` (float32 ``(D, H, W)``; attribute ``spacing`` ``[d, h, w]`` in mm, 1.0
where missing) by these steps, in this order, each optional (:class:`~pipelines.spec.PreprocessStage`):

1. **Resample** to ``spacing`` by linear interpolation along each axis in turn (separable
   trilinear). An axis of ``n_in`` voxels becomes ``n_out = round(n_in · old / new)`` (halves round
   up, at least 1). Voxel centres are aligned: output voxel ``i`` samples the input at
   ``x = (i + ½) · n_in / n_out - ½``, clamped to ``[0, n_in - 1]`` (the edge voxels repeat). This
   is ``scipy.ndimage.zoom(x, n_out / n_in, order=1, grid_mode=True, mode="nearest")`` and torch's
   ``interpolate(..., mode="trilinear", align_corners=False)``. The ``spacing`` written is the
   exact one, ``old · n_in / n_out``, which differs from the target by the rounding of ``n_out``.
2. **Clip** to the ``(low, high)`` percentiles of the whole resampled volume, never of one slab:
   :func:`histogram_percentiles` says how, and how exactly (one histogram bin, 1/65536 of the range).
3. **Normalise**: ``zscore`` is ``(x - mean) / std`` with the mean and population std of the whole
   clipped volume; ``minmax`` maps its min..max to ``[0, 1]``. A constant volume cannot be
   normalised: the scan is quarantined with the reason.
4. **Crop or pad** to ``shape``, centred: ``(n_in - n_out) // 2`` slices (or rows, columns) are
   removed, or zeros added, at the start, and the rest at the end.

How it runs, per scan, one scan after another (each scan uses every CPU through its slabs):

* The resampled volume is a lazy Dask array, chunked along D only. Each chunk is made by one
  task that reads from the **verified reader** (:meth:`Archive.reader`: every slab read is
  checked against the image's commit CRCs, so a damaged chunk quarantines the scan instead of
  producing wrong data) only the input slices it needs: those between the floor of its first
  sample position and the ceiling of its last, i.e. its own slices plus one neighbour on each
  side (:func:`input_slices`). The chunk boundaries are the output slabs' boundaries, shifted by
  the D crop offset, so each output slab is exactly one chunk and a task never holds more than one
  slab of output plus the input slices under it, whatever the volume's size. (The reader checks
  whole committed slabs of the image, 16 slices as ingest writes them, so a chunk that straddles
  two of them reads both.)
* The statistics are passes over that array (:func:`volume_statistics`): min/max and moments;
  then, when clipping, a histogram and the clipped moments. The last pass transforms each chunk
  and writes it (:func:`write_volume`). Every pass re-reads the image, so nothing the size of the
  volume is kept anywhere, and each task fuses read, resample and its reduction (Dask's
  blockwise fusion): slabs never enter Ray's object store, only per-slab statistics do.
* The graphs run on Ray through ``ray.util.dask.ray_dask_get``.
* The output is created with :meth:`Archive.create_array` with one shard per slab; each write
  task writes exactly one slab (``SlabWriter.write``) and returns its CRC-32.
  :class:`~pipelines.integrity.SlabWriter` keeps its CRCs in the object, which is copied into each
  task, so the record is rebuilt from the CRCs the tasks return (:func:`slab_record`, the same
  record ``SlabWriter.record`` makes). Commit, skip and quarantine are
  :func:`pipelines.fanout.process_scan`'s.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np

from operators.errors import NonFiniteError
from operators.transforms import (
    HISTOGRAM_BINS,
    Intensity,
    Moments,
    centre_offset,
    crop_or_pad,
    histogram,
    histogram_percentiles,
    resample_slab,
    resampled_size,
)
from pipelines.errors import ArchiveError
from pipelines.fingerprint import scan_fingerprint
from pipelines.integrity import slab_crc, slab_record
from pipelines.store import SOURCE, Archive

if TYPE_CHECKING:  # the stage's own imports stay light: Ray workers import this module for its tasks
    from pipelines.context import StageContext, StageResult
    from pipelines.integrity import ArrayReader, SlabWriter
    from pipelines.spec import PreprocessStage

__all__ = [
    "Plan",
    "source_spacing",
    "make_plan",
    "resampled_array",
    "volume_statistics",
    "write_volume",
    "preprocess_scan",
    "run",
]

Shape3 = tuple[int, int, int]
Spacing3 = tuple[float, float, float]


# -- the plan of one scan --------------------------------------------------------------------------
def source_spacing(attrs: Mapping[str, Any], where: str) -> Spacing3:
    """The ``spacing`` attribute ``[d, h, w]`` (mm) of an image; ``(1, 1, 1)`` when it has none.

    Raises:
        ArchiveError: the attribute is not three positive finite numbers (naming ``where``).
    """
    value = attrs.get("spacing")
    if value is None:
        return (1.0, 1.0, 1.0)
    try:
        spacing = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        spacing = ()
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ArchiveError(
            f"{where}: attribute 'spacing' must be 3 positive numbers [d, h, w] in mm; found {value!r}. "
            "Fix the image's attributes (or remove 'spacing' to assume 1 mm)"
        )
    return spacing  # type: ignore[return-value]


@dataclass(frozen=True)
class Plan:
    """Shapes and chunking of one scan's preprocessing (voxels along ``(D, H, W)``).

    Attributes:
        in_shape, in_spacing: the image's shape and spacing (mm).
        resampled: the shape after step 1 (``in_shape`` without resampling).
        spacing: the output's spacing (mm).
        shape: the output's shape (after step 4).
        slab: slices per output shard and per write task.
    """

    in_shape: Shape3
    in_spacing: Spacing3
    resampled: Shape3
    spacing: Spacing3
    shape: Shape3
    slab: int

    @property
    def offset(self) -> Shape3:
        """Index in the resampled volume of output index 0, per axis (negative: zero padding)."""
        return tuple(centre_offset(r, s) for r, s in zip(self.resampled, self.shape, strict=True))  # type: ignore[return-value]

    @property
    def n_slabs(self) -> int:
        return -(-self.shape[0] // self.slab)

    def chunks(self) -> tuple[int, ...]:
        """Chunk sizes along D of the resampled volume: cut at every output slab boundary (shifted
        by the crop offset) and at the output's end, so one output slab is at most one chunk and no
        chunk is longer than a slab, not even in the part a crop drops."""
        depth, off = self.resampled[0], self.offset[0]
        # output slice z is resampled slice z + off: slab starts k·slab map to off (mod slab)
        cuts = {0, depth, *range(off % self.slab, depth, self.slab)}
        cuts.add(self.shape[0] + off)  # the output's end
        edges = sorted(c for c in cuts if 0 <= c <= depth)
        return tuple(b - a for a, b in zip(edges[:-1], edges[1:], strict=True))

    def output_slab(self, c0: int) -> int | None:
        """The output slab holding the resampled chunk that starts at ``c0``; None if cropped away."""
        z = int(c0) - self.offset[0]
        return z // self.slab if 0 <= z < self.shape[0] else None


def make_plan(
    in_shape: Sequence[int],
    in_spacing: Spacing3,
    spacing: Spacing3 | None,
    shape: Sequence[int] | None,
    slab: int,
) -> Plan:
    """The :class:`Plan` for an image ``in_shape`` with ``in_spacing`` and a stage's target ``spacing``,
    ``shape`` and ``slab`` (None: that step is skipped)."""
    in_shape = tuple(int(n) for n in in_shape)
    if spacing is None:
        resampled, out_spacing = in_shape, tuple(in_spacing)
    else:
        resampled = tuple(
            resampled_size(n, o, t) for n, o, t in zip(in_shape, in_spacing, spacing, strict=True)
        )
        out_spacing = tuple(o * n / r for n, o, r in zip(in_shape, in_spacing, resampled, strict=True))
    out_shape = tuple(int(n) for n in shape) if shape is not None else resampled
    return Plan(
        in_shape, tuple(in_spacing), resampled, out_spacing, out_shape, max(1, min(int(slab), out_shape[0]))
    )  # type: ignore[arg-type]


# -- Dask graphs -----------------------------------------------------------------------------------
def _resampled_chunk(
    *, reader: ArrayReader, plan: Plan, block_info: dict[Any, Any] | None = None
) -> np.ndarray:
    """One chunk of the resampled volume, read (verified) and resampled in the task that needs it."""
    assert block_info is not None
    (c0, c1), _, _ = block_info[None]["array-location"]
    return resample_slab(reader.read, plan.in_shape, plan.resampled, c0, c1)


def resampled_array(reader: ArrayReader, plan: Plan) -> da.Array:
    """The resampled volume ``plan.resampled`` as a lazy Dask array, chunked by :meth:`Plan.chunks`.

    Each chunk's task reads its input slices (plus one neighbour each side) through ``reader``.
    """
    return da.map_blocks(
        _resampled_chunk,
        reader=reader,
        plan=plan,
        dtype=np.float32,
        chunks=(plan.chunks(), (plan.resampled[1],), (plan.resampled[2],)),
        meta=np.empty((0, 0, 0), np.float32),
        name=f"resampled-{uuid.uuid4().hex}",  # skips tokenising the reader
    )


def _moments_chunk(block: np.ndarray, clip: tuple[float, float] | None = None) -> np.ndarray:
    if clip is not None:
        block = np.clip(block, np.float32(clip[0]), np.float32(clip[1]))
    return Moments.row(block)[None, None, :]  # (1, 1, 5)


def _histogram_chunk(block: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    return histogram(block, lo, hi, bins)[None, None, :]  # (1, 1, bins)


def _per_chunk(
    volume: da.Array, fn: Callable[..., np.ndarray], width: int, dtype: Any, **kwargs: Any
) -> da.Array:
    """``fn(chunk, **kwargs)`` per chunk of ``volume``: ``(chunks, 1, width)``, fused with the read."""
    return volume.map_blocks(
        fn,
        **kwargs,
        dtype=dtype,
        chunks=((1,) * volume.numblocks[0], (1,), (width,)),
        meta=np.empty((0, 0, 0), dtype),
        name=f"{fn.__name__.strip('_')}-{uuid.uuid4().hex}",
    )


Compute = Callable[..., tuple[Any, ...]]


def volume_statistics(
    volume: da.Array,
    percentiles: tuple[float, float] | None,
    normalize: str | None,
    compute: Compute,
    where: str = "volume",
) -> tuple[Intensity, dict[str, Any]]:
    """The whole-volume statistics steps 2 and 3 need, in one to three passes over ``volume``.

    1. min, max and moments (needed by every step here, and to check the volume is finite);
    2. with ``percentiles``: a :data:`HISTOGRAM_BINS`-bin histogram over min..max, and the clip
       values from :func:`histogram_percentiles`;
    3. with ``percentiles`` and ``zscore``: the mean and std of the clipped volume.

    Returns:
        ``(intensity, facts)``: the :class:`Intensity` to apply, and the numbers found (for the
        output's attributes and the commit record).

    Raises:
        NonFiniteError: the volume holds NaN or Inf.
        ValueError: ``normalize`` is set and the (clipped) volume is constant.
    """
    facts: dict[str, Any] = {}
    if percentiles is None and normalize is None:
        return Intensity(), facts
    rows = compute(_per_chunk(volume, _moments_chunk, 5, np.float64))[0]  # (chunks, 1, 5)
    moments = Moments.merge(rows)
    if not (math.isfinite(moments.mean) and math.isfinite(moments.min) and math.isfinite(moments.max)):
        bad = [i for i, r in enumerate(rows.reshape(-1, 5)) if not np.isfinite(r).all()]
        starts = np.cumsum((0,) + volume.chunks[0])
        slices = [f"{starts[i]}-{starts[i + 1] - 1}" for i in bad][:10]
        raise NonFiniteError(
            f"{where}: the image holds NaN or Inf (in resampled slices {', '.join(slices)}); "
            "expected only finite values. Fix or re-ingest the scan"
        )
    facts.update(
        {"min": moments.min, "max": moments.max, "mean": moments.mean, "std": math.sqrt(moments.var)}
    )
    low = high = None
    if percentiles is not None:
        if moments.max > moments.min:
            hist = _per_chunk(volume, _histogram_chunk, HISTOGRAM_BINS, np.int64,
                              lo=moments.min, hi=moments.max, bins=HISTOGRAM_BINS)  # fmt: skip
            counts = compute(hist.sum(axis=(0, 1)))[0]  # (bins,)
            low, high = histogram_percentiles(counts, moments.min, moments.max, percentiles)
        else:
            low = high = moments.min
        facts["clip"] = {
            "percentiles": list(percentiles),
            "values": [low, high],
            "tolerance": (moments.max - moments.min) / HISTOGRAM_BINS,
        }
        if normalize == "zscore":
            clipped = Moments.merge(
                compute(_per_chunk(volume, _moments_chunk, 5, np.float64, clip=(low, high)))[0]
            )
        else:  # the clipped volume's min and max are the clip values (min <= low <= high <= max)
            clipped = Moments(moments.n, math.nan, math.nan, max(moments.min, low), min(moments.max, high))
        moments = clipped
    if normalize == "zscore":
        shift, scale = moments.mean, math.sqrt(moments.var)
        facts["normalize"] = {"kind": "zscore", "mean": shift, "std": scale}
    elif normalize == "minmax":
        shift, scale = moments.min, moments.max - moments.min
        facts["normalize"] = {"kind": "minmax", "min": moments.min, "max": moments.max}
    else:
        shift, scale = 0.0, 1.0
    if not scale > 0:
        raise ValueError(
            f"{where}: normalize={normalize!r} needs a volume that is not constant; found every value "
            f"{'clipped to ' if percentiles else ''}{moments.min:g}. "
            + ("Widen clip_percentiles, or " if percentiles else "")
            + "check the scan's image"
        )
    return Intensity(low, high, shift, scale), facts


def _write_chunk(
    block: np.ndarray,
    *,
    writer: SlabWriter,
    plan: Plan,
    intensity: Intensity,
    block_info: dict[Any, Any] | None = None,
) -> np.ndarray:
    """Transform one resampled chunk and write it as its output slab: ``[[[slab index, CRC-32]]]``
    (``[[[-1, 0]]]`` for a chunk a crop drops)."""
    assert block_info is not None
    c0, c1 = block_info[0]["array-location"][0]
    k = plan.output_slab(c0)
    if k is None:
        return np.array([[[-1, 0]]], np.int64)
    z0, z1 = k * plan.slab, min((k + 1) * plan.slab, plan.shape[0])
    slab = np.zeros((z1 - z0, *plan.shape[1:]), np.float32)  # (z1 - z0, H_out, W_out); D padding stays 0
    start = c0 - plan.offset[0] - z0
    slab[start : start + (c1 - c0)] = crop_or_pad(intensity(block), (None, *plan.shape[1:]))
    writer.write(z0, slab)
    return np.array([[[k, slab_crc(slab)]]], np.int64)


def _write_zeros(writer: SlabWriter, plan: Plan, k: int) -> tuple[int, int]:
    """Write output slab ``k``, which lies wholly in the D padding: zeros."""
    z0, z1 = k * plan.slab, min((k + 1) * plan.slab, plan.shape[0])
    slab = np.zeros((z1 - z0, *plan.shape[1:]), np.float32)
    writer.write(z0, slab)
    return k, slab_crc(slab)


def write_volume(
    volume: da.Array, writer: SlabWriter, plan: Plan, intensity: Intensity, compute: Compute
) -> dict[str, Any]:
    """Transform ``volume`` and write it through ``writer``, one task per output slab; return its record.

    The record is :func:`slab_record` of the CRCs the tasks return.
    """
    written = volume.map_blocks(
        _write_chunk,
        writer=writer,
        plan=plan,
        intensity=intensity,
        dtype=np.int64,
        chunks=((1,) * volume.numblocks[0], (1,), (2,)),
        meta=np.empty((0, 0, 0), np.int64),
        name=f"write-{uuid.uuid4().hex}",
    )
    covered = {plan.output_slab(c0) for c0 in np.cumsum((0,) + volume.chunks[0][:-1])} - {None}
    zeros = [dask.delayed(_write_zeros)(writer, plan, k) for k in range(plan.n_slabs) if k not in covered]
    pairs, *zero_pairs = compute(written, *zeros)
    crcs = {int(k): int(c) for k, c in pairs.reshape(-1, 2) if k >= 0}
    crcs.update({int(k): int(c) for k, c in zero_pairs})
    return slab_record(plan.shape, np.float32, writer.slab, crcs, writer.where)


# -- one scan, and the stage -----------------------------------------------------------------------
def _ray_compute(*collections: Any) -> tuple[Any, ...]:
    """``dask.compute`` on Ray; a task's exception is re-raised as itself, not wrapped in RayTaskError."""
    from ray.exceptions import RayTaskError
    from ray.util.dask import ray_dask_get

    try:
        return dask.compute(*collections, scheduler=ray_dask_get)  # type: ignore[no-any-return]
    except RayTaskError as exc:
        if isinstance(exc.cause, Exception):
            raise exc.cause from None
        raise


def preprocess_scan(
    archive: Archive, scan_id: str, stage: PreprocessStage, compute: Compute | None = None
) -> dict[str, Any]:
    """Derive ``stage.output`` of one scan (module docs); return its commit info, ``arrays`` included.

    Args:
        archive: the archive (the scan's source must be committed).
        scan_id: the scan.
        stage: the stage's spec.
        compute: runs Dask collections, ``dask.compute``-like; default: on Ray (``ray_dask_get``).

    Raises:
        ArchiveError: the image is missing, uncommitted, not 3-D, or its spacing is malformed.
        IntegrityError: a chunk of the image does not match its commit.
        NonFiniteError, ValueError: the image holds NaN/Inf, or is constant and cannot be normalised.
    """
    compute = compute or _ray_compute
    t0 = time.perf_counter()
    reader = archive.reader(scan_id, "image")
    where = f"scans/{scan_id}/image"
    if len(reader.shape) != 3:
        raise ArchiveError(f"{where}: expected a volume (D, H, W); found shape {list(reader.shape)}")
    plan = make_plan(
        reader.shape, source_spacing(reader.attrs, where), stage.spacing, stage.shape, stage.slab
    )
    volume = resampled_array(reader, plan)  # lazy (D_r, H_r, W_r)
    intensity, facts = volume_statistics(volume, stage.clip_percentiles, stage.normalize, compute, where)
    chosen = {
        "resample": stage.spacing,
        "clip": stage.clip_percentiles,
        f"normalize:{stage.normalize}": stage.normalize,
        "crop_pad": stage.shape,
    }
    attrs = {
        "spacing": list(plan.spacing),
        "producer": "preprocess",
        "stage": stage.name,
        "source": "image",
        "steps": [name for name, value in chosen.items() if value is not None],
        "source_shape": list(plan.in_shape),
        "source_spacing": list(plan.in_spacing),
        "resampled_shape": list(plan.resampled),
        "crop_pad_offset": list(plan.offset),
        **facts,
    }
    writer = archive.create_array(scan_id, stage.output, plan.shape, np.float32, slab=plan.slab, attrs=attrs)
    record = write_volume(volume, writer, plan, intensity, compute)
    seconds = time.perf_counter() - t0
    return {
        "arrays": {stage.output: record},
        "preprocess": {
            **{k: v for k, v in attrs.items() if k in ("steps", "clip", "normalize")},
            "plan": asdict(plan),
            "seconds": seconds,
        },
    }


def run(ctx: StageContext, stage: PreprocessStage, fingerprint: str) -> StageResult:
    """Preprocess every scan with a committed source, committing ``stage.output`` per scan.

    Scans whose ``stage.output`` is committed with ``fingerprint`` are skipped; a scan that fails is
    quarantined (its half-written output removed) and the others go on
    (:func:`pipelines.fanout.process_scan`).
    """
    from pipelines.fanout import process_scan, progress_bar, summarise

    archive = ctx.archive
    sources = archive.committed(SOURCE)
    scans = [s for s in archive.scans("all") if s in sources]
    fps = {s: scan_fingerprint(ctx.identity or fingerprint, sources[s]) for s in scans}
    outcomes = []
    t0 = time.perf_counter()
    with progress_bar(ctx.console) as progress:
        bar = progress.add_task(stage.name, total=len(scans))
        for scan_id in scans:
            outcomes.append(
                process_scan(
                    archive,
                    stage.output,
                    scan_id,
                    fps[scan_id],
                    preprocess_scan,
                    [stage.output],
                    {"stage": stage},
                    stage=stage.name,
                )
            )
            progress.advance(bar)
    done = [o for o in outcomes if o.status == "done"]
    voxels = sum(
        math.prod((o.info or {}).get("preprocess", {}).get("plan", {}).get("in_shape", [0])) for o in done
    )
    seconds = time.perf_counter() - t0
    ctx.tracker.log_metrics(
        {
            f"{stage.name}/scans_done": len(done),
            f"{stage.name}/scans_failed": sum(o.status == "failed" for o in outcomes),
            f"{stage.name}/scans_skipped": sum(o.status == "skipped" for o in outcomes),
            f"{stage.name}/seconds": seconds,
            f"{stage.name}/input_mb_per_s": voxels * 4 / 1e6 / seconds if done and seconds > 0 else 0.0,
        }
    )
    return summarise(outcomes, {"output": stage.output}, {stage.output: fps})
