"""Integrity of archive arrays: every write records a CRC-32 per slab, every read checks it.

:class:`SlabWriter` writes an array slab by slab along its first axis, refuses NaN/Inf, and
returns the record a commit keeps (``{shape, dtype, slab, crc32}``). :class:`ArrayReader` reads a
committed array range by range and compares every slab it touches with that record. Zarr reads a
deleted chunk as its fill value and says nothing; here a deleted, truncated or altered chunk is an
:class:`~pipelines.errors.IntegrityError` naming the scan, the array, the chunk, and what was
expected. The check costs one CRC-32 pass over the bytes read (zlib, ~7 GB/s on the 2-core VM).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from pipelines.errors import ArchiveError, IntegrityError

if TYPE_CHECKING:
    from pipelines.store import Archive

__all__ = ["SlabWriter", "ArrayReader", "slab_crc", "slab_record"]


def slab_crc(block: np.ndarray) -> int:
    """CRC-32 of a slab's bytes, C order: what :class:`SlabWriter` records for it."""
    return zlib.crc32(memoryview(np.ascontiguousarray(block)).cast("B"))


def _non_finite(block: np.ndarray) -> bool:
    """True when a float/complex block holds NaN or Inf (one float64 pass, no boolean temporary)."""
    if block.dtype.kind not in "fc":
        return False
    total = np.sum(block, dtype=np.complex128 if block.dtype.kind == "c" else np.float64)
    return not np.isfinite(total)


class SlabWriter:
    """Writes one array slab by slab along its first axis, recording a CRC-32 per slab.

    A slab holding NaN or Inf is refused before it is written (:class:`IntegrityError` naming
    the slices); :meth:`record` is what the commit record keeps and what readers check.

    Args:
        array: the freshly created Zarr array.
        where: ``scans/<scan_id>/<name>``, for messages.
        slab: slices per slab; each write starts at a multiple of it.
    """

    def __init__(self, array: zarr.Array, where: str, slab: int) -> None:
        self.array = array
        self.where = where
        self.slab = max(1, int(slab))
        self.shape = tuple(array.shape)
        self._crcs: dict[int, int] = {}

    @property
    def attrs(self) -> Any:
        return self.array.attrs

    def write(self, z0: int, data: np.ndarray) -> None:
        """Write ``data`` at slices ``z0:z0+len(data)``: whole slabs (the last may be short)."""
        data = np.ascontiguousarray(data, dtype=self.array.dtype)
        z1 = z0 + data.shape[0]
        if z0 % self.slab or (z1 % self.slab and z1 != self.shape[0]) or z1 > self.shape[0]:
            raise ArchiveError(
                f"{self.where}: writes must cover whole slabs of {self.slab} slices; "
                f"found slices {z0}:{z1} of {self.shape[0]}"
            )
        if _non_finite(data):
            bad = ~np.isfinite(data).reshape(data.shape[0], -1)
            slices = [z0 + int(i) for i in np.flatnonzero(bad.any(axis=1))]
            raise IntegrityError(
                f"{self.where}: {int(bad.sum())} NaN/Inf values in slices {slices[:10]}"
                f"{' …' if len(slices) > 10 else ''} of the output; expected only finite values "
                "(nothing of this array was committed)"
            )
        self.array[z0:z1] = data
        for start in range(z0, z1, self.slab):
            self._crcs[start // self.slab] = slab_crc(data[start - z0 : start - z0 + self.slab])

    def record(self) -> dict[str, Any]:
        """``{shape, dtype, slab, crc32}``: what was written, for the commit record."""
        return slab_record(self.shape, self.array.dtype, self.slab, self._crcs, self.where)


def slab_record(
    shape: Sequence[int], dtype: Any, slab: int, crcs: Mapping[int, int], where: str
) -> dict[str, Any]:
    """``{shape, dtype, slab, crc32}`` from per-slab CRCs, what :meth:`SlabWriter.record` returns;
    writers that compute the CRCs elsewhere (one task per slab) build it with this.

    Raises:
        ArchiveError: a slab has no CRC (it was never written), naming ``where`` and the slabs.
    """
    n = -(-int(shape[0]) // slab) if len(shape) else 0
    missing = [i for i in range(n) if i not in crcs]
    if missing:
        raise ArchiveError(
            f"{where}: slabs {missing[:10]} (of {slab} slices) were never written; "
            "a stage must write every slab before it commits"
        )
    return {
        "shape": [int(s) for s in shape],
        "dtype": str(np.dtype(dtype)),
        "slab": int(slab),
        "crc32": [int(crcs[i]) for i in range(n)],
    }


class ArrayReader:
    """Reads one committed array slice range by slice range, checking each slab's CRC-32.

    The slabs covering a requested range are read whole and compared with the CRCs its commit
    recorded, so a chunk that is missing (Zarr would read fill values), truncated or altered
    raises an :class:`IntegrityError` naming the scan, the array, the chunk and what was expected.
    ``reader[z0:z1]`` is ``reader.read(z0, z1)``; ``shape``, ``dtype`` and ``attrs`` need no data read.
    """

    def __init__(
        self, archive: Archive, scan_id: str, name: str, record: dict[str, Any] | None = None
    ) -> None:
        self.archive = archive
        self.array = archive.open_array(scan_id, name)
        self.record = record if record is not None else archive.array_record(scan_id, name)
        self.where = f"scans/{scan_id}/{name}"
        if list(self.array.shape) != self.record["shape"] or str(self.array.dtype) != self.record["dtype"]:
            raise IntegrityError(
                f"{self.where}: stored as {list(self.array.shape)} {self.array.dtype} but committed as "
                f"{self.record['shape']} {self.record['dtype']}; the array was replaced after its commit. "
                "Re-run the stage that writes it"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def attrs(self) -> dict[str, Any]:
        return self.array.attrs.asdict()

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"{self.where}: read a range of slices, reader[z0:z1]; found {key!r}")
        return self.read(key.start, key.stop)

    def read(self, z0: int | None = None, z1: int | None = None) -> np.ndarray:
        """Slices ``z0:z1`` (default all), verified."""
        arr, slab = self.array, int(self.record["slab"])
        if arr.ndim == 0:
            return np.asarray(arr[...])
        depth = arr.shape[0]
        lo, hi, _ = slice(z0, z1).indices(depth)
        first, last = lo // slab, max(lo, hi - 1) // slab
        start, stop = first * slab, min(depth, (last + 1) * slab)
        try:
            block = np.asarray(arr[start:stop])
        except Exception as exc:  # zarr's decode errors: a truncated or garbled chunk
            bad = self._first_undecodable(start, stop, slab)
            raise IntegrityError(
                f"{self.where}: {self._describe(bad, slab)} could not be decoded "
                f"({type(exc).__name__}: {exc}); expected slices of {tuple(arr.shape[1:])} {arr.dtype}. "
                "Re-run the stage that writes it"
            ) from exc
        for i in range(first, last + 1):
            part = block[i * slab - start : (i + 1) * slab - start]
            found, expected = slab_crc(part), self.record["crc32"][i]
            if found != expected:
                raise IntegrityError(
                    f"{self.where}: {self._describe(i, slab)} does not match its commit "
                    f"(CRC-32 {found:08x}, expected {expected:08x}): {self._state(i, slab)}. "
                    "Re-run the stage that writes it"
                )
        return block[lo - start : hi - start]

    # -- diagnosis -------------------------------------------------------------------------------
    def _chunk_keys(self, index: int, slab: int) -> list[str]:
        """Storage keys of the chunks (or shards) holding slab ``index``."""
        arr = self.array
        outer = arr.shards or arr.chunks
        first = index * slab // outer[0]
        last = min(arr.shape[0] - 1, (index + 1) * slab - 1) // outer[0]
        rest = [-(-n // o) for n, o in zip(arr.shape[1:], outer[1:], strict=True)]
        return [
            arr.metadata.encode_chunk_key((c, *coords))
            for c in range(first, last + 1)
            for coords in np.ndindex(*rest)
        ]

    def _describe(self, index: int, slab: int) -> str:
        lo, hi = index * slab, min(self.array.shape[0], (index + 1) * slab)
        return f"chunk {', '.join(self._chunk_keys(index, slab))} (slices {lo}-{hi - 1})"

    def _state(self, index: int, slab: int) -> str:
        fs, path = self.archive.fs, self.archive._path(self.array.path)
        missing = [k for k in self._chunk_keys(index, slab) if not fs.exists(f"{path}/{k}")]
        if missing:
            return f"chunk {', '.join(missing)} is missing from the store (Zarr would have read it as zeros)"
        return "the chunk's bytes changed after it was committed"

    def _first_undecodable(self, start: int, stop: int, slab: int) -> int:
        for i in range(start // slab, -(-stop // slab)):
            try:
                self.array[i * slab : min(stop, (i + 1) * slab)]
            except Exception:
                return i
        return start // slab
