"""The archive: a Zarr v3 group of scans, a Parquet catalog, and checksummed commit records.

Layout under the archive root (a local directory or an fsspec URI), layout version 2::

    zarr.json                          root group; attributes {"medrecon": {"layout_version": 2}}
    scans/<scan_id>/image              float32 (D, H, W)
    scans/<scan_id>/labels             uint8   (D, H, W), optional
    scans/<scan_id>/kspace             complex64 (D, C, H, W), or (D, C, H, n) acquired columns
    scans/<scan_id>/sinogram           float32 (D, views, detectors)
    scans/<scan_id>/lowres             float32 (D, H/f, W/f), the mean of each f x f block
    scans/<scan_id>/mask, coil_maps    the acquisition's (H, W) mask and (C, H, W) maps
    scans/<scan_id>/recon/<key>        float32 (D, H, W), one per method (and model version)
    scans/<scan_id>/recon/<key>.std    float32 (D, H, W), its MC-dropout std (optional, same unit)
    scans/<scan_id>/seg/<stage>.<input>  uint8 (D, H, W), a segment stage's classes of one input
    catalog.parquet                    one row per scan (see CATALOG_SCHEMA)
    _meta/commits/<unit>/<scan_id>.json     per-scan commit records
    _meta/quarantine/<unit>/<scan_id>.json  errors of scans that failed
    _meta/stages/<stage name>.json          stage records (fingerprints, outputs later stages need)
    _meta/lease.json                        the writer lease of the run that holds the archive

A **unit** is what one commit covers for one scan: ``source`` (image, labels), ``measurements``
(k-space, sinogram or low-res image, mask, coil maps), ``recon/<key>`` (one reconstruction) and
``evaluate/<stage name>`` (scores), ``segment/<stage name>`` (segmentations and their
scores). :func:`unit_of` maps an array to its unit.

Rules that keep it correct under Ray's at-least-once retries:

* Scan IDs are validated (:func:`validate_scan_id`) before they become path parts.
* One task owns a scan's arrays for a unit; a shard never spans two scans, so two processes
  never write one shard.
* An output counts only once its commit record exists; the record is written after its data,
  in one atomic put (rename on local disk). A re-run skips units whose record carries the
  current fingerprint and redoes the rest.
* Every array is written through a :class:`SlabWriter`, which refuses NaN/Inf and records a
  CRC-32 per slab (along the first axis); the commit record keeps them. Every read goes through
  :meth:`Archive.read_array`, which checks them: a deleted chunk (which Zarr would read as zeros),
  a truncated or altered one becomes an :class:`~pipelines.errors.IntegrityError` naming the
  scan, the array and the chunk, never silently wrong data.
* Volumes never travel through the Ray object store: tasks get scan IDs and the archive (which
  pickles as its URI), and read and write Zarr themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import ZstdCodec

from pipelines.errors import ArchiveError, ScanIdError
from pipelines.integrity import ArrayReader, SlabWriter

__all__ = [
    "locate",
    "fs_options",
    "OBJECT_STORES",
    "LAYOUT_VERSION",
    "SOURCE",
    "MEASUREMENTS",
    "validate_scan_id",
    "unit_of",
    "Archive",
    "SlabWriter",
    "ArrayReader",
    "CATALOG_SCHEMA",
    "CatalogRow",
    "chunk_layout",
    "record_digest",
]

#: The archive layout this code reads and writes. Version 1 (before 2026-12) stored k-space coil-first
#: ``(C, D, H, W)`` and one commit marker per stage; it is refused, never misread.
LAYOUT_VERSION = 2
_LAYOUTS = {
    1: "k-space (C, D, H, W), commit markers per stage, no checksums",
    2: "k-space (D, C, H, W), checksummed commit records per output",
}

SOURCE = "source"
STD_SUFFIX = ".std"  # recon/<key>.std: a learned method's per-voxel standard deviation, in its unit
MEASUREMENTS = "measurements"
_UNIT_OF = {
    "image": SOURCE,
    "labels": SOURCE,
    "kspace": MEASUREMENTS,
    "sinogram": MEASUREMENTS,
    "lowres": MEASUREMENTS,
    "mask": MEASUREMENTS,
    "coil_maps": MEASUREMENTS,
}

_SCAN_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_ARRAY_NAME = re.compile(r"^[A-Za-z0-9_]+(/[A-Za-z0-9_.-]+)?$")
_UNIT = re.compile(r"^[a-z_]+(/[A-Za-z0-9_.-]+)?$")

CATALOG_SCHEMA = pa.schema(
    [
        ("scan_id", pa.string()),
        ("modality", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("spacing", pa.list_(pa.float64())),
        ("source", pa.string()),
        ("checksum", pa.string()),
        ("split", pa.string()),
        ("status", pa.string()),
        ("ingested_at", pa.string()),
    ]
)


def validate_scan_id(scan_id: str) -> str:
    """Return ``scan_id`` if it may become a path part, else raise :class:`ScanIdError`.

    A scan ID is 1-128 characters of ``[A-Za-z0-9._-]`` and not ``.`` or ``..``, so it can
    never climb out of ``scans/`` (``../etc``) or name a hidden meta folder.
    """
    if (
        not isinstance(scan_id, str)
        or not _SCAN_ID.match(scan_id)
        or scan_id in (".", "..")
        or scan_id.startswith("_")
    ):
        raise ScanIdError(
            f"invalid scan ID {scan_id!r}: expected 1-128 characters of [A-Za-z0-9._-], "
            "not '.', '..' or starting with '_'"
        )
    return scan_id


def unit_of(name: str) -> str:
    """The commit unit that owns array ``name``: ``source``, ``measurements``, ``recon/<key>`` or
    ``derived/<name>`` (an image a preprocess stage derived from ``image``)."""
    if name.startswith("recon/") and name.endswith(STD_SUFFIX):  # a learned method's uncertainty
        return name.removesuffix(STD_SUFFIX)
    if name.startswith(("recon/", "derived/")):
        return name
    if name.startswith("seg/"):  # seg/<segment stage>.<input>: the segment stage's unit
        return f"segment/{name[4:].split('.', 1)[0]}"
    if name not in _UNIT_OF:
        raise ArchiveError(f"array {name!r} belongs to no commit unit; expected one of {sorted(_UNIT_OF)}")
    return _UNIT_OF[name]


@dataclass(frozen=True)
class CatalogRow:
    """One row of ``catalog.parquet``: a reference to a scan, never its data."""

    scan_id: str
    modality: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    source: str
    checksum: str
    split: str
    status: str = "ok"
    ingested_at: str = (
        ""  # ISO 8601 UTC, when ingest added the row (nightly retraining finds new scans by it)
    )


def _instant(text: str) -> datetime:
    """An ISO 8601 time; one without a zone is UTC."""
    t = datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def record_digest(records: dict[str, dict[str, Any]]) -> str:
    """One short digest of the arrays of a commit record (their shapes, dtypes and slab CRCs)."""
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]


def chunk_layout(
    shape: tuple[int, ...], itemsize: int, target_chunk_bytes: int = 1 << 20
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Chunks and shards for an array whose first axis is the slice axis.

    Chunks are whole slices stacked to about ``target_chunk_bytes`` along the first
    axis, so reading one slice reads one chunk; the shard is the whole array, so a
    scan's array is one shard owned by one writer.
    """
    if len(shape) < 2:
        return tuple(shape), tuple(shape)
    plane = int(np.prod(shape[1:])) * itemsize
    depth = max(1, min(shape[0], target_chunk_bytes // max(plane, 1)))
    chunks = (depth, *shape[1:])
    shards = (int(np.ceil(shape[0] / depth)) * depth, *shape[1:])
    return chunks, shards


#: fsspec protocols of object stores: keys without folders, and listings cached (see :func:`fs_options`).
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az"})


def fs_options(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fsspec options an archive at ``uri`` opens its filesystem with: ``storage_options``, and on
    object stores no directory-listing cache.

    s3fs caches every non-empty listing for the life of its (process-wide, shared) instance, and
    answers ``info``/``open``/``exists`` of a file from its folder's cached listing. Several
    processes write one archive (the driver, Ray workers that live across tasks), so a cached
    listing hid records written since: on moto, a driver that had listed
    ``_meta/commits/measurements`` did not see a commit another process wrote next
    (``committed()`` lacked it, ``is_committed()`` was False).
    """
    options = dict(storage_options or {})
    if fsspec.core.split_protocol(uri)[0] in OBJECT_STORES:
        options.setdefault("use_listings_cache", False)
    return options


def locate(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str, str, bool]:
    """``(filesystem, root path, canonical URI, is local)`` of an archive location; nothing is created.

    A local path becomes absolute (Ray workers do not share the driver's working directory).
    """
    fs, root = fsspec.core.url_to_fs(uri, **fs_options(uri, storage_options))
    is_local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    if is_local:
        root = os.path.abspath(root.rstrip("/"))
        return fs, root, root, True
    return fs, root.rstrip("/"), uri.rstrip("/"), False


class Archive:
    """A Zarr v3 archive of scans with a Parquet catalog and checksummed commit records.

    Args:
        uri: a local directory or an fsspec URI (``s3://bucket/prefix``).
        storage_options: passed to fsspec (credentials, endpoint_url, ...).
        create: create the root group if missing; otherwise a missing archive is an error.

    Raises:
        ArchiveError: the archive is missing (and not ``create``), the path is a file, or the
            archive was written in another layout version.
    """

    def __init__(
        self, uri: str, storage_options: dict[str, Any] | None = None, *, create: bool = False
    ) -> None:
        self.storage_options = dict(storage_options or {})
        self.fs, self.root, self.uri, self.is_local = locate(uri, self.storage_options)
        if self.fs.isfile(self.root):
            raise ArchiveError(
                f"archive path {self.uri} is a file; expected a directory holding a Zarr archive "
                "(or a new path for one). Check archive.path"
            )
        root_meta = self._read_json(self._path("zarr.json"))
        if root_meta is None and not create:
            raise ArchiveError(
                f"archive {self.uri} not found (no zarr.json there); run a pipeline with a phantoms "
                "or ingest stage first, or check archive.path"
            )
        if root_meta is None:
            group = zarr.open_group(self._zarr_store(), mode="a")
            group.attrs["medrecon"] = {"layout_version": LAYOUT_VERSION}
            return
        found = (root_meta.get("attributes") or {}).get("medrecon", {}).get("layout_version", 1)
        if found != LAYOUT_VERSION:
            raise ArchiveError(
                f"archive {self.uri} was written in layout version {found} "
                f"({_LAYOUTS.get(found, 'unknown')}); this medrecon reads layout version "
                f"{LAYOUT_VERSION} ({_LAYOUTS[LAYOUT_VERSION]}). Re-run the pipeline into a new "
                "archive path; nothing was read or changed"
            )

    # -- paths ---------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _zarr_store(self) -> Any:
        if self.is_local:
            return zarr.storage.LocalStore(self.root)
        return zarr.storage.FsspecStore.from_url(
            self.uri, storage_options=fs_options(self.uri, self.storage_options)
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (Archive, (self.uri, self.storage_options))

    # -- arrays ----------------------------------------------------------------------------------
    @staticmethod
    def _check_name(name: str) -> str:
        if not _ARRAY_NAME.match(name):
            raise ArchiveError(
                f"invalid array name {name!r}: expected 'name' or 'group/name' of [A-Za-z0-9_.-]"
            )
        return name

    def _array_path(self, scan_id: str, name: str) -> str:
        return f"scans/{validate_scan_id(scan_id)}/{self._check_name(name)}"

    def write_array(
        self, scan_id: str, name: str, data: np.ndarray, attrs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write ``data`` as ``scans/<scan_id>/<name>`` (replacing it), one shard; return its record."""
        data = np.asarray(data)
        chunks, shards = chunk_layout(data.shape, data.dtype.itemsize)
        arr = zarr.create_array(
            self._zarr_store(),
            name=self._array_path(scan_id, name),
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunks,
            shards=shards,
            compressors=ZstdCodec(level=1),
            overwrite=True,
            attributes=dict(attrs or {}),
        )
        writer = SlabWriter(arr, arr.path, chunks[0] if data.ndim else 1)  # a CRC per chunk of slices
        writer.write(0, data)
        return writer.record()

    def create_array(
        self,
        scan_id: str,
        name: str,
        shape: tuple[int, ...],
        dtype: Any,
        *,
        slab: int,
        attrs: dict[str, Any] | None = None,
        compress: bool = True,
        slab_chunks: bool = False,
    ) -> SlabWriter:
        """Create an empty ``scans/<scan_id>/<name>`` whose shards are slabs of ``slab`` slices (axis 0).

        A slab is exactly one shard, so writing a slab never touches another slab's shard: zarr
        re-encodes a whole shard on a partial write, so slab-aligned shards keep a writer's memory
        at one slab, and let one task own each shard. Chunks inside a shard are whole slices
        stacked to about 1 MB. ``compress=False`` stores raw bytes: noisy k-space compresses
        ~1.08x with zstd, so compression would cost write speed for nothing.

        ``slab_chunks=True`` makes each slab one plain chunk instead (no sharding codec): for a
        raw array written once, slab by slab, zarr 3.1's shard assembly about doubles the write
        time (16 MB of k-space: 31 ms sharded, 16 ms as plain chunks, on the 2-core VM), at the
        price of a single-slice read fetching its whole slab.
        """
        shape = tuple(int(s) for s in shape)
        slab = max(1, min(int(slab), shape[0]))
        itemsize = np.dtype(dtype).itemsize
        plane = int(np.prod(shape[1:])) * itemsize
        depth = max(1, min(slab, (1 << 20) // max(plane, 1)))
        while slab % depth:  # a chunk must divide its shard
            depth -= 1
        shards = (slab, *shape[1:])
        chunks = (slab if slab_chunks else depth, *shape[1:])
        arr = zarr.create_array(
            self._zarr_store(),
            name=self._array_path(scan_id, name),
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            shards=None if slab_chunks else shards,
            compressors=ZstdCodec(level=1) if compress else None,
            overwrite=True,
            attributes=dict(attrs or {}),
            config={"write_empty_chunks": True},  # skip zarr's all-fill scan of every chunk
        )
        return SlabWriter(arr, arr.path, slab)

    def open_array(self, scan_id: str, name: str) -> zarr.Array:
        """The lazy Zarr array ``scans/<scan_id>/<name>``, for its shape and attributes.

        Read data with :meth:`read_array`, which checks it against its commit record.
        """
        path = self._array_path(scan_id, name)
        try:
            return zarr.open_array(self._zarr_store(), path=path, mode="r")
        except (FileNotFoundError, KeyError, zarr.errors.ArrayNotFoundError) as exc:
            raise ArchiveError(
                f"scan {scan_id!r}: array '{name}' not found in archive {self.uri} ({path})"
            ) from exc

    def array_record(self, scan_id: str, name: str) -> dict[str, Any]:
        """What the commit of ``name``'s unit recorded of it (shape, dtype, slab, CRCs)."""
        unit = unit_of(name)
        record = self.commit_record(unit, scan_id)
        if record is None or name not in record.get("arrays", {}):
            raise ArchiveError(
                f"scans/{scan_id}/{name}: no commit records it (unit '{unit}' of scan {scan_id!r} is "
                "not committed); run the stage that writes it, and read only committed data"
            )
        return record["arrays"][name]

    def reader(self, scan_id: str, name: str, record: dict[str, Any] | None = None) -> ArrayReader:
        """Verified, lazy access to a committed array (see :class:`ArrayReader`).

        ``record`` is the array's entry of its commit record, when the caller has already read it.
        """
        return ArrayReader(self, scan_id, name, record)

    def read_array(self, scan_id: str, name: str, z0: int | None = None, z1: int | None = None) -> np.ndarray:
        """Slices ``z0:z1`` (default all) of ``scans/<scan_id>/<name>``, checked against its commit.

        Raises:
            ArchiveError: the array is missing or was never committed.
            IntegrityError: a chunk is missing, truncated or altered (named in the message).
        """
        return self.reader(scan_id, name).read(z0, z1)

    def has_array(self, scan_id: str, name: str) -> bool:
        return self.fs.exists(self._path(self._array_path(scan_id, name), "zarr.json"))

    def delete_array(self, scan_id: str, name: str) -> None:
        """Remove an array (used to clean up a scan that failed part-way)."""
        path = self._path(self._array_path(scan_id, name))
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # -- records ---------------------------------------------------------------------------------
    def _write_json(self, path: str, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, indent=1, sort_keys=True, default=str).encode()
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on one filesystem
        else:
            self.fs.pipe_file(path, data)  # one PUT: atomic on object stores

    def _read_json(self, path: str) -> dict[str, Any] | None:
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArchiveError(f"{path}: not valid JSON ({exc}); the file is damaged") from exc

    @staticmethod
    def _unit(unit: str) -> str:
        if not _UNIT.match(unit):
            raise ArchiveError(f"invalid commit unit {unit!r}: expected 'name' or 'name/key'")
        return unit

    def _commit_path(self, unit: str, scan_id: str) -> str:
        return self._path("_meta", "commits", self._unit(unit), f"{validate_scan_id(scan_id)}.json")

    def _quarantine_path(self, unit: str, scan_id: str) -> str:
        return self._path("_meta", "quarantine", self._unit(unit), f"{validate_scan_id(scan_id)}.json")

    def commit(
        self,
        unit: str,
        scan_id: str,
        fingerprint: str,
        info: dict[str, Any] | None = None,
        arrays: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Mark ``scan_id``'s ``unit`` complete, with its arrays' records. Call only after the data."""
        payload = {"fingerprint": fingerprint, "time": time.time(), **(info or {}), "arrays": arrays or {}}
        self._write_json(self._commit_path(unit, scan_id), payload)
        self._clear(self._quarantine_path(unit, scan_id))

    def commit_record(self, unit: str, scan_id: str) -> dict[str, Any] | None:
        return self._read_json(self._commit_path(unit, scan_id))

    def is_committed(self, unit: str, scan_id: str, fingerprint: str) -> bool:
        rec = self.commit_record(unit, scan_id)
        return rec is not None and rec.get("fingerprint") == fingerprint

    def uncommit(self, unit: str, scan_id: str) -> None:
        self._clear(self._commit_path(unit, scan_id))

    def committed(self, unit: str) -> dict[str, str]:
        """``{scan_id: fingerprint}`` of every scan with a commit record for ``unit``."""
        folder = self._path("_meta", "commits", self._unit(unit))
        return {
            os.path.basename(path)[: -len(".json")]: (self._read_json(path) or {}).get("fingerprint", "")
            for path in self._json_files(folder)
        }

    def units(self) -> list[str]:
        """Every unit with a commit or quarantine record, sorted."""
        found = set()
        for kind in ("commits", "quarantine"):
            base = self._path("_meta", kind)
            if not self.fs.exists(base):
                continue
            for path in self.fs.find(base):
                if path.endswith(".json"):
                    found.add(os.path.dirname(path)[len(base) + 1 :].replace(os.sep, "/"))
        return sorted(found)

    def quarantine(self, unit: str, scan_id: str, error: str, stage: str | None = None) -> None:
        """Record that ``scan_id`` failed ``unit`` (in ``stage``) with ``error``; the batch goes on."""
        payload = {"error": error, "stage": stage or unit, "time": time.time()}
        self._write_json(self._quarantine_path(unit, scan_id), payload)

    def quarantined(self, unit: str) -> dict[str, str]:
        """``{scan_id: error}`` of the scans quarantined in ``unit``."""
        folder = self._path("_meta", "quarantine", self._unit(unit))
        return {
            os.path.basename(path)[: -len(".json")]: (self._read_json(path) or {}).get("error", "")
            for path in self._json_files(folder)
        }

    def quarantine_record(self, unit: str, scan_id: str) -> dict[str, Any] | None:
        return self._read_json(self._quarantine_path(unit, scan_id))

    def commit_stage(
        self,
        name: str,
        fingerprint: str,
        outputs: dict[str, Any] | None = None,
        *,
        kind: str,
        units: dict[str, Any] | None = None,
        complete: bool = True,
        run: tuple[str, str] | None = None,
    ) -> None:
        """Record a stage's run: its fingerprint, what later stages need, and its units' fingerprints.

        ``complete`` is False when some scans failed: a re-run then redoes the stage, which skips
        the committed scans and retries the failed ones. ``run`` = ``(pipeline, run_key)`` also keeps
        the record under that key, so re-running an earlier key finds its own records
        (:meth:`stage_record`) after later keys ran.
        """
        payload = {
            "fingerprint": fingerprint,
            "kind": kind,
            "time": time.time(),
            "complete": complete,
            "outputs": outputs or {},
            "units": units or {},
        }
        self._write_json(self._path("_meta", "stages", f"{name}.json"), payload)
        if run is not None:
            self._write_json(self._path("_meta", "runs", run[0], run[1], f"{name}.json"), payload)

    def stage_record(self, name: str, run: tuple[str, str] | None = None) -> dict[str, Any] | None:
        """The latest record of stage ``name``, or the one it wrote under ``run`` = (pipeline, key)."""
        if run is not None:
            return self._read_json(self._path("_meta", "runs", run[0], run[1], f"{name}.json"))
        return self._read_json(self._path("_meta", "stages", f"{name}.json"))

    def stage_records(self) -> dict[str, dict[str, Any]]:
        """Every stage record, by stage name."""
        folder = self._path("_meta", "stages")
        return {
            os.path.basename(p)[: -len(".json")]: self._read_json(p) or {} for p in self._json_files(folder)
        }

    def current_fingerprints(self) -> dict[str, Any]:
        """``{unit: fingerprint}`` of the latest stage run that wrote each unit: one fingerprint, or
        ``{scan_id: fingerprint}`` for a stage that fingerprints per scan."""
        latest: dict[str, tuple[float, str]] = {}
        for rec in self.stage_records().values():
            for unit, fp in rec.get("units", {}).items():
                if unit not in latest or rec.get("time", 0) >= latest[unit][0]:
                    latest[unit] = (rec.get("time", 0), fp)
        return {u: fp for u, (_, fp) in latest.items()}

    def record_run(self, pipeline: str, run_key: str, record: dict[str, Any]) -> None:
        """Record a keyed run (a night) of ``pipeline``: ``started_at``, ``finished_at``, ``status``."""
        self._write_json(
            self._path("_meta", "runs", pipeline, f"{run_key}.json"), {"run_key": run_key, **record}
        )

    def run_record(self, pipeline: str, run_key: str) -> dict[str, Any] | None:
        """The record of one keyed run of ``pipeline``, or None."""
        return self._read_json(self._path("_meta", "runs", pipeline, f"{run_key}.json"))

    def runs(self, pipeline: str) -> list[dict[str, Any]]:
        """Every recorded keyed run of ``pipeline``, oldest start first."""
        folder = self._path("_meta", "runs", pipeline)
        records = [self._read_json(p) or {} for p in self._json_files(folder)]
        return sorted(records, key=lambda r: str(r.get("started_at", "")))

    def last_success(self, pipeline: str, run_key: str | None) -> str | None:
        """When the latest successful keyed run of ``pipeline`` other than ``run_key`` finished
        (ISO 8601 UTC), or None if there was none."""
        done = [
            str(r["finished_at"])
            for r in self.runs(pipeline)
            if r.get("status") == "FINISHED" and r.get("run_key") != run_key and r.get("finished_at")
        ]
        return max(done, key=_instant) if done else None

    def scans_since(self, instant: str | None, split: str = "all") -> list[str]:
        """Scans of ``split`` the catalog says were ingested after ``instant`` (all when None)."""
        if instant is None:
            return self.scans(split)
        after = _instant(instant)
        return [
            r.scan_id
            for r in self.catalog()
            if r.status == "ok"
            and (split == "all" or r.split == split)
            and r.ingested_at
            and _instant(r.ingested_at) > after
        ]

    def uncommit_stage(self, name: str) -> None:
        self._clear(self._path("_meta", "stages", f"{name}.json"))

    def _json_files(self, folder: str) -> list[str]:
        if not self.fs.exists(folder):
            return []
        return sorted(p for p in self.fs.ls(folder, detail=False) if p.endswith(".json"))

    def _clear(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path)

    # -- catalog ---------------------------------------------------------------------------------
    def write_catalog(self, rows: list[CatalogRow]) -> None:
        """Replace ``catalog.parquet`` with ``rows`` (written by the driver only)."""
        for r in rows:
            validate_scan_id(r.scan_id)
        table = pa.Table.from_pylist(
            [{**r.__dict__, "shape": list(r.shape), "spacing": list(r.spacing)} for r in rows],
            schema=CATALOG_SCHEMA,
        )
        tmp = self._path(f"catalog.{uuid.uuid4().hex}.parquet")
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        self.fs.mv(tmp, self._path("catalog.parquet"))

    def catalog(self) -> list[CatalogRow]:
        """All rows of ``catalog.parquet``; a clear error when it is missing."""
        path = self._path("catalog.parquet")
        if not self.fs.exists(path):
            raise ArchiveError(
                f"archive {self.uri} has no catalog.parquet; run a phantoms or ingest stage first"
            )
        with self.fs.open(path, "rb") as f:
            table = pq.read_table(f)
        known = set(CatalogRow.__dataclass_fields__)  # columns added later default (e.g. ingested_at)
        return [
            CatalogRow(
                **{k: v for k, v in row.items() if k in known}
                | {"shape": tuple(row["shape"]), "spacing": tuple(row["spacing"])}
            )
            for row in table.to_pylist()
        ]

    def append_catalog(self, rows: list[CatalogRow]) -> list[CatalogRow]:
        """Add ``rows`` whose scan IDs the catalog lacks; existing rows are never rewritten.

        A row for a scan ID already present is dropped, except that a quarantined row is replaced
        when the same scan now ingested ``ok`` (a fixed file). Returns the rows added.
        """
        existing = self.catalog() if self.fs.exists(self._path("catalog.parquet")) else []
        by_id = {r.scan_id: i for i, r in enumerate(existing)}
        added = []
        for row in rows:
            i = by_id.get(row.scan_id)
            if i is None:
                by_id[row.scan_id] = len(existing)
                existing.append(row)
                added.append(row)
            elif existing[i].status != "ok" and row.status == "ok":
                existing[i] = row
                added.append(row)
        if added:
            self.write_catalog(existing)
        return added

    def reference_name(self, scan_id: str) -> str:
        """The image a scan's measurements were simulated from (``image``, or a ``derived/<name>``):
        the reference that training, tuning and evaluation compare against."""
        record = self.commit_record(MEASUREMENTS, scan_id) or {}
        return str(record.get("reference") or "image")

    def scans(self, split: str = "all") -> list[str]:
        """Scan IDs of ``split`` ("train", "val", "test" or "all") with status ok, in catalog order."""
        return [
            r.scan_id for r in self.catalog() if r.status == "ok" and (split == "all" or r.split == split)
        ]
