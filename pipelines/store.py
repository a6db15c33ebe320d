"""The archive: a Zarr v3 group of scans, a Parquet catalog, and commit markers.

Layout under the archive root (a local directory or an fsspec URI)::

    zarr.json                      root group
    scans/<scan_id>/image          float32 (D, H, W)
    scans/<scan_id>/labels         uint8   (D, H, W), optional
    scans/<scan_id>/kspace         complex64 (C, D, H, W)
    scans/<scan_id>/mask           bool (H, W) (or the mask's own shape)
    scans/<scan_id>/recon/<name>   float32 (D, H, W)
    catalog.parquet                one row per scan (see CATALOG_SCHEMA)
    _meta/commits/<stage>/<scan_id>.json    per-scan commit markers
    _meta/stages/<stage>.json               stage commit markers
    _meta/quarantine/<stage>/<scan_id>.json errors of scans that failed

Rules that keep it correct under Ray's at-least-once retries:

* Scan IDs are validated (:func:`validate_scan_id`) before they become path parts.
* One task owns a scan's arrays for a stage; a shard never spans two scans, so two
  processes never write one shard.
* An output counts only once its commit marker exists; a marker is written after
  its data, in one atomic put (rename on local disk). A re-run skips scans whose
  marker carries the current fingerprint and redoes the rest.
* Volumes never travel through the Ray object store: tasks get scan IDs and the
  archive URI, and read and write Zarr themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import ZstdCodec

from pipelines.errors import ArchiveError, ScanIdError

__all__ = ["validate_scan_id", "Archive", "CATALOG_SCHEMA", "CatalogRow", "chunk_layout", "checksum"]

_SCAN_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_ARRAY_NAME = re.compile(r"^[A-Za-z0-9_]+(/[A-Za-z0-9_.-]+)?$")

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


def checksum(array: np.ndarray) -> str:
    """SHA-256 of an array's bytes, shape and dtype (first 16 hex digits)."""
    h = hashlib.sha256()
    h.update(str((array.shape, str(array.dtype))).encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:16]


def chunk_layout(
    shape: tuple[int, ...], itemsize: int, target_chunk_bytes: int = 1 << 20
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Chunks and shards for an array whose first axis (after coils) is the slice axis.

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


class Archive:
    """A Zarr v3 archive of scans with a Parquet catalog and commit markers.

    Args:
        uri: a local directory or an fsspec URI (``s3://bucket/prefix``).
        storage_options: passed to fsspec (credentials, endpoint_url, ...).
        create: create the root group if missing; otherwise a missing archive is an error.
    """

    def __init__(
        self, uri: str, storage_options: dict[str, Any] | None = None, *, create: bool = False
    ) -> None:
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(uri, **self.storage_options)
        self.root = root.rstrip("/")
        self.is_local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )
        self.uri = os.path.abspath(self.root) if self.is_local else uri.rstrip("/")
        if self.is_local:
            self.root = self.uri
        exists = self.fs.exists(self._path("zarr.json"))
        if not exists and not create:
            raise ArchiveError(
                f"archive {self.uri} not found (no zarr.json there); run a pipeline with a phantoms "
                "or ingest stage first, or check archive.path"
            )
        if not exists:
            zarr.open_group(self._zarr_store(), mode="a")

    # -- paths ---------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _zarr_store(self, sub: str = "") -> Any:
        if self.is_local:
            return zarr.storage.LocalStore(self._path(sub) if sub else self.root)
        return zarr.storage.FsspecStore.from_url(
            f"{self.uri}/{sub}" if sub else self.uri, storage_options=self.storage_options or None
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
    ) -> None:
        """Write ``data`` as ``scans/<scan_id>/<name>`` (replacing it), sharded one shard per array."""
        data = np.asarray(data)
        per_slice = data.shape[1:] if data.ndim == 4 else data.shape
        chunks, shards = chunk_layout(per_slice, data.dtype.itemsize)
        if data.ndim == 4:  # (C, D, H, W): one chunk row per coil
            chunks, shards = (1, *chunks), (data.shape[0], *shards)
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
        arr[...] = data

    def create_array(
        self,
        scan_id: str,
        name: str,
        shape: tuple[int, ...],
        dtype: Any,
        *,
        slab: int,
        slab_axis: int = 0,
        attrs: dict[str, Any] | None = None,
        compress: bool = True,
        slab_chunks: bool = False,
    ) -> zarr.Array:
        """Create an empty ``scans/<scan_id>/<name>`` whose shards are slabs of ``slab`` slices.

        A slab of slices along ``slab_axis`` is exactly one shard, so writing a slab never
        touches another slab's shard: zarr re-encodes a whole shard on a partial write,
        so slab-aligned shards keep a writer's memory at one slab, and let one task own
        each shard. Chunks inside a shard are whole slices stacked to about 1 MB.
        ``compress=False`` stores raw bytes: noisy k-space compresses ~1.08x with zstd, so
        compression would cost write speed for nothing.

        ``slab_chunks=True`` makes each slab one plain chunk instead (no sharding codec): for a
        raw array written once, slab by slab, zarr 3.1's shard assembly about doubles the write
        time (16 MB of k-space: 31 ms sharded, 16 ms as plain chunks, on the 2-core VM), at the
        price of a single-slice read fetching its whole slab.
        """
        shape = tuple(int(s) for s in shape)
        slab = max(1, min(int(slab), shape[slab_axis]))
        itemsize = np.dtype(dtype).itemsize
        plane = int(np.prod(shape)) // shape[slab_axis] * itemsize
        depth = max(1, min(slab, (1 << 20) // max(plane, 1)))
        while slab % depth:  # a chunk must divide its shard
            depth -= 1
        shards = tuple(slab if i == slab_axis else n for i, n in enumerate(shape))
        chunks = tuple(depth if i == slab_axis else (1 if i < slab_axis else n) for i, n in enumerate(shape))
        if slab_chunks:  # (1, ..., slab, ...): one file per slab (and per leading index, e.g. coil)
            chunks = tuple(
                slab if i == slab_axis else (1 if i < slab_axis else n) for i, n in enumerate(shape)
            )
        return zarr.create_array(
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

    def open_array(self, scan_id: str, name: str) -> zarr.Array:
        """The lazy Zarr array ``scans/<scan_id>/<name>``; a clear error if it is missing."""
        path = self._array_path(scan_id, name)
        try:
            return zarr.open_array(self._zarr_store(), path=path, mode="r")
        except (FileNotFoundError, KeyError, zarr.errors.ArrayNotFoundError) as exc:
            raise ArchiveError(
                f"scan {scan_id!r}: array '{name}' not found in archive {self.uri} ({path})"
            ) from exc

    def read_array(self, scan_id: str, name: str) -> np.ndarray:
        """Read the whole array ``scans/<scan_id>/<name>``."""
        return self.open_array(scan_id, name)[...]

    def has_array(self, scan_id: str, name: str) -> bool:
        return self.fs.exists(self._path(self._array_path(scan_id, name), "zarr.json"))

    def delete_array(self, scan_id: str, name: str) -> None:
        """Remove an array (used to clean up a scan that failed part-way)."""
        path = self._path(self._array_path(scan_id, name))
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # -- markers ---------------------------------------------------------------------------------
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

    def commit(self, stage: str, scan_id: str, fingerprint: str, info: dict[str, Any] | None = None) -> None:
        """Mark ``scan_id``'s output of ``stage`` as complete. Call only after its data is written."""
        payload = {"fingerprint": fingerprint, "time": time.time(), **(info or {})}
        self._write_json(self._path("_meta", "commits", stage, f"{validate_scan_id(scan_id)}.json"), payload)
        self._clear(self._path("_meta", "quarantine", stage, f"{scan_id}.json"))

    def commit_record(self, stage: str, scan_id: str) -> dict[str, Any] | None:
        return self._read_json(self._path("_meta", "commits", stage, f"{validate_scan_id(scan_id)}.json"))

    def is_committed(self, stage: str, scan_id: str, fingerprint: str) -> bool:
        rec = self.commit_record(stage, scan_id)
        return rec is not None and rec.get("fingerprint") == fingerprint

    def uncommit(self, stage: str, scan_id: str) -> None:
        self._clear(self._path("_meta", "commits", stage, f"{validate_scan_id(scan_id)}.json"))

    def commit_stage(
        self, stage: str, fingerprint: str, outputs: dict[str, Any] | None = None, *, complete: bool = True
    ) -> None:
        """Record a stage's run with what later stages need (e.g. a model URI).

        ``complete`` is False when some scans failed: a re-run then redoes the stage,
        which skips the committed scans and retries the failed ones.
        """
        payload = {
            "fingerprint": fingerprint,
            "time": time.time(),
            "complete": complete,
            "outputs": outputs or {},
        }
        self._write_json(self._path("_meta", "stages", f"{stage}.json"), payload)

    def stage_record(self, stage: str) -> dict[str, Any] | None:
        return self._read_json(self._path("_meta", "stages", f"{stage}.json"))

    def uncommit_stage(self, stage: str) -> None:
        self._clear(self._path("_meta", "stages", f"{stage}.json"))

    def quarantine(self, stage: str, scan_id: str, error: str) -> None:
        """Record that ``scan_id`` failed ``stage`` with ``error``; the batch goes on."""
        self._write_json(
            self._path("_meta", "quarantine", stage, f"{validate_scan_id(scan_id)}.json"),
            {"error": error, "time": time.time()},
        )

    def quarantined(self, stage: str) -> dict[str, str]:
        """``{scan_id: error}`` of the scans quarantined by ``stage``."""
        folder = self._path("_meta", "quarantine", stage)
        if not self.fs.exists(folder):
            return {}
        out = {}
        for path in sorted(self.fs.ls(folder, detail=False)):
            if path.endswith(".json"):
                rec = self._read_json(path) or {}
                out[os.path.basename(path)[: -len(".json")]] = rec.get("error", "")
        return out

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
            table = pq.read_table(f, schema=CATALOG_SCHEMA)
        return [
            CatalogRow(**{**row, "shape": tuple(row["shape"]), "spacing": tuple(row["spacing"])})
            for row in table.to_pylist()
        ]

    def scans(self, split: str = "all") -> list[str]:
        """Scan IDs of ``split`` ("train", "val", "test" or "all") with status ok, in catalog order."""
        return [
            r.scan_id for r in self.catalog() if r.status == "ok" and (split == "all" or r.split == split)
        ]
