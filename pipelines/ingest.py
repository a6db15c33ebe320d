"""Real scans into the archive: NIfTI files, DICOM series (de-identified) and fastMRI k-space, on Ray.

What happens, per ``ingest`` stage (or ``medrecon ingest`` command, which runs the same stage):

1. **Discover** (driver, no pixel data read): every file or series under ``sources``
   (:mod:`pipelines.sources`), or exactly the files a manifest lists. ``format: auto`` takes
   ``.nii``/``.nii.gz`` as NIfTI, ``.h5`` as fastMRI and every other file as DICOM.
2. **Name** each item: a manifest's ``scan_id``; for DICOM a keyed hash of the study and series
   UIDs (:func:`pipelines.sources.deid.keyed_scan_id`, key from ``MEDRECON_DEID_KEY`` or
   ``MEDRECON_DEID_KEY_FILE``, never from the spec); for NIfTI ``nii-`` (fastMRI ``fmri-``) and a
   hash of the path relative to its source (file names can hold patient names, so they are
   hashed, not stored).
3. **Write** (one Ray task per item): the task checks the item's files stay inside their source,
   hashes their bytes (the source checksum), opens the item and writes ``image`` (float32
   ``(D, H, W)``) and, from a manifest, ``labels``, one slab at a time: no task holds more
   than one slab plus the file's own decoding buffer.
4. **Commit or quarantine**: a readable item commits the ``source`` unit with a fingerprint of
   its source checksum, so re-ingesting the same files is a no-op, and adding files to a source
   ingests only those. A bad item (:data:`pipelines.sources.base.REASONS`) is quarantined with
   its reason and the file's name; the others are committed.
   A fastMRI file is measured k-space: it is written as the scan's measurements (``kspace`` in
   the archive's layout, as acquired, the column ``mask``, and for multi-coil files ``coil_maps``
   estimated per slice from the calibration lines by ESPIRiT, :mod:`operators.coils`), with its
   ``reconstruction_rss``/``_esc`` as ``image``, the reference. So a pipeline reads it without a
   simulate stage; evaluation centre-crops reconstructions to the reference's grid (320x320), as
   fastMRI does.
5. **Catalog** (driver): rows are appended with the ingestion time; rows already there are never
   rewritten. Splits come from the manifest, else from a seeded hash of the scan ID with the
   spec's fractions, so a scan keeps its split whatever else is ingested.

Nothing identifying leaves a reader: array attributes hold geometry and acquisition facts only
(the DICOM reader keeps a whitelist), and no source path is stored.
"""

from __future__ import annotations

import csv
import hashlib
import os
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np

from pipelines.context import StageContext, StageResult
from pipelines.errors import IntegrityError, SpecError
from pipelines.fanout import ScanOutcome, gather, process_scan, summarise
from pipelines.fingerprint import combine
from pipelines.sources.base import QuarantineError, SourceItem, resolve_inside
from pipelines.spec import IngestStage
from pipelines.store import SOURCE, Archive, CatalogRow, record_digest, validate_scan_id

__all__ = [
    "Planned",
    "discover",
    "ingest_item",
    "ingest_spec",
    "path_scan_id",
    "plan_items",
    "run",
    "source_listing",
    "split_of",
]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class Planned:
    """One item to ingest: where it is, its scan ID and what the catalog needs before it is read."""

    root: str  # the source directory (absolute)
    item: SourceItem
    scan_id: str
    split: str
    modality: str | None  # from the manifest or the spec; the reader's wins for DICOM


def _reader(fmt: str) -> Any:
    if fmt == "nifti":
        from pipelines.sources import nifti

        return nifti
    if fmt == "dicom":
        from pipelines.sources import dicom

        return dicom
    if fmt == "fastmri":
        from pipelines.sources import fastmri

        return fastmri
    raise SpecError(f"ingest: unknown format {fmt!r}; expected nifti, dicom or fastmri")


def _is_nifti(path: str) -> bool:
    return path.lower().endswith(_NIFTI_SUFFIXES)


def _is_hdf5(path: str) -> bool:
    return path.lower().endswith((".h5", ".hdf5"))


def _format_of(path: str) -> str:
    return "nifti" if _is_nifti(path) else "fastmri" if _is_hdf5(path) else "dicom"


_PREFIX = {"nifti": "nii", "fastmri": "fmri"}


def discover(root: str, fmt: str) -> list[SourceItem]:
    """Items under ``root`` of format ``fmt`` (``auto``: NIfTI files, and DICOM series of the rest)."""
    if fmt != "auto":
        return list(_reader(fmt).discover(root))
    items = list(_reader("nifti").discover(root)) + list(_reader("fastmri").discover(root))
    others = [
        i for i in _reader("dicom").discover(root) if not any(_is_nifti(p) or _is_hdf5(p) for p in i.paths)
    ]
    return items + others


def source_listing(sources: list[str], manifest: str | None) -> str:
    """A digest of what the sources hold now (relative paths, sizes, modification times).

    It enters the stage's fingerprint, so adding a file to a source re-runs the stage (which
    then ingests only what is new) and an unchanged source skips it.
    """
    entries: list[tuple[str, str, int, int]] = []
    for root in sources:
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:  # a dangling link: listed by name, quarantined at ingest
                    entries.append((root, os.path.relpath(path, root), -1, -1))
                    continue
                entries.append((root, os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    if manifest is not None and os.path.isfile(manifest):
        st = os.stat(manifest)
        entries.append(("manifest", manifest, st.st_size, st.st_mtime_ns))
    return combine({"files": sorted(entries)})


def split_of(scan_id: str, seed: int, fractions: Any) -> str:
    """A split for ``scan_id`` from a seeded hash: stable whatever else is in the archive."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{scan_id}".encode()).digest()[:8], "big") / 2**64
    if h < fractions.train:
        return "train"
    if h < fractions.train + fractions.val:
        return "val"
    return "test"


def path_scan_id(prefix: str, key: str) -> str:
    """``<prefix>-`` and 16 hex digits of SHA-256 of ``key`` (a relative path): stable, no file name kept."""
    return validate_scan_id(f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")


def _secret() -> bytes:
    """The de-identification key: ``$MEDRECON_DEID_KEY``, or the file ``$MEDRECON_DEID_KEY_FILE`` names."""
    from pipelines.sources.deid import DeidKeyError, load_secret

    try:
        return load_secret(key_file=os.environ.get("MEDRECON_DEID_KEY_FILE"))
    except DeidKeyError as exc:
        raise SpecError(
            f"ingest: DICOM scan IDs are keyed hashes of the study and series UIDs, and no key was found "
            f"({exc}). Set MEDRECON_DEID_KEY to a secret of at least 16 bytes, or MEDRECON_DEID_KEY_FILE "
            "to a file holding one; keep it to re-ingest under the same IDs. It is never read from the spec"
        ) from None


class _ScanIds:
    """The scan ID of an item without one from a manifest: a keyed hash of a DICOM series' UIDs (the
    key read once, when the first DICOM item needs it), else a hash of the path."""

    def __init__(self) -> None:
        self._secret: bytes | None = None

    def __call__(self, item: SourceItem) -> str:
        if item.format != "dicom":
            return path_scan_id(_PREFIX[item.format], item.key)
        from pipelines.sources.deid import keyed_scan_id

        if self._secret is None:
            self._secret = _secret()
        return keyed_scan_id(item.key, self._secret)


def _read_manifest(path: str, sources: list[str]) -> list[dict[str, str]]:
    """Rows of a manifest CSV, paths made absolute (relative ones are relative to the CSV's folder)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise SpecError(f"ingest manifest {path}: cannot read it ({exc.strerror})") from None
    if not rows or "path" not in rows[0]:
        raise SpecError(
            f"ingest manifest {path}: expected a CSV with a header naming at least the column 'path' "
            f"(and optionally scan_id, split, labels, modality); found columns "
            f"{list(rows[0]) if rows else 'none (empty file)'}"
        )
    base = os.path.dirname(os.path.abspath(path))
    for n, row in enumerate(rows, start=2):
        if not (row.get("path") or "").strip():
            raise SpecError(f"ingest manifest {path}, line {n}: empty 'path'")
        split = (row.get("split") or "").strip()
        if split and split not in ("train", "val", "test"):
            raise SpecError(
                f"ingest manifest {path}, line {n}: split {split!r}; expected train, val, test or empty"
            )
        modality = (row.get("modality") or "").strip()
        if modality and modality not in ("mri", "ct"):
            raise SpecError(f"ingest manifest {path}, line {n}: modality {modality!r}; expected mri or ct")
        for col in ("path", "labels"):
            value = (row.get(col) or "").strip()
            row[col] = os.path.normpath(os.path.join(base, value)) if value else ""
    return rows


def _root_of(path: str, roots: list[str]) -> str:
    """The source directory that holds ``path`` (by its written path), else the manifest's folder."""
    for root in roots:
        if os.path.commonpath([root, path]) == root:
            return root
    return os.path.dirname(path)


def plan_items(stage: IngestStage, seed: int) -> list[Planned]:
    """Every item the stage ingests, named and assigned a split (see the module docstring)."""
    roots = [os.path.abspath(s) for s in stage.sources]
    for root in roots:
        if not os.path.isdir(root):
            raise SpecError(f"ingest source {root}: not a directory; expected a folder of scans")
    scan_ids = _ScanIds()
    planned: list[Planned] = []
    if stage.manifest is not None:
        for row in _read_manifest(stage.manifest, roots):
            path = row["path"]
            root = _root_of(path, roots)
            rel = os.path.relpath(path, root)
            fmt = stage.format if stage.format != "auto" else _format_of(path)
            if fmt == "dicom" and os.path.isdir(path):  # a series folder
                items = [
                    replace(i, paths=tuple(os.path.join(rel, p) for p in i.paths))
                    for i in _reader("dicom").discover(path)
                ]
            else:
                items = [SourceItem(fmt, (rel,), rel)]
            labels = os.path.relpath(row["labels"], root) if row["labels"] else None
            for item in items:
                item = replace(item, label_path=labels)
                scan_id = validate_scan_id((row.get("scan_id") or "").strip() or scan_ids(item))
                split = (row.get("split") or "").strip() or split_of(scan_id, seed, stage.split)
                modality = (row.get("modality") or "").strip() or stage.modality
                planned.append(Planned(root, item, scan_id, split, modality))
    else:
        for root in roots:
            for item in discover(root, stage.format):
                scan_id = scan_ids(item)
                planned.append(
                    Planned(root, item, scan_id, split_of(scan_id, seed, stage.split), stage.modality)
                )
    first: dict[str, Planned] = {}
    for p in planned:  # the same series in two folders, or one file listed twice: ingest it once
        first.setdefault(p.scan_id, p)
    return list(first.values())


def source_checksum(root: str, paths: tuple[str, ...]) -> str:
    """SHA-256 (20 hex digits) of the bytes of ``paths`` under ``root``, streamed 1 MiB at a time."""
    h = hashlib.sha256()
    for rel in paths:
        h.update(rel.encode())
        with open(resolve_inside(root, rel), "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:20]


def _write_volume(archive: Archive, scan_id: str, name: str, volume: Any, slab: int, dtype: Any) -> dict:
    """Write ``volume`` (a SourceVolume) as ``scans/<scan_id>/<name>``, one slab at a time."""
    depth = int(volume.shape[0])
    writer = archive.create_array(scan_id, name, tuple(volume.shape), dtype, slab=slab, attrs=volume.attrs)
    for z0 in range(0, depth, writer.slab):
        z1 = min(depth, z0 + writer.slab)
        data = np.asarray(volume.read(z0, z1))  # (z1 - z0, H, W); readers raise not_finite themselves
        try:
            writer.write(z0, data.astype(dtype, copy=False))
        except IntegrityError as exc:  # the writer's own NaN/Inf check, for any reader that has none
            raise QuarantineError("not_finite", str(exc)) from None
    return writer.record()


def _write_kspace(archive: Archive, scan_id: str, volume: Any, slab: int, fingerprint: str) -> dict[str, Any]:
    """Write measured k-space (a fastMRI file) as the scan's measurements, and its reference as ``image``.

    K-space ``(D, [C,] H, W)`` goes through :meth:`Acquisition.measured`, so it is stored as the
    simulate stage stores it (the acquired columns only); multi-coil slabs get ESPIRiT maps, one
    set per slice. The measurements are committed here (their fingerprint is the source's).
    """
    import torch

    from operators.coils import estimate_sensitivities
    from pipelines.physics import Acquisition
    from pipelines.store import MEASUREMENTS

    torch.set_num_threads(1)  # one task per CPU

    shape = tuple(int(n) for n in volume.shape)
    depth, (h, w) = shape[0], shape[-2:]
    coils = shape[1] if len(shape) == 4 else 1
    cols = np.asarray(volume.extra["mask"], dtype=bool)
    acq = Acquisition.measured(cols, (h, w), coils)
    attrs = {**acq.attrs(), "producer": "ingest", "slab": slab, "source": volume.attrs}
    kspace = archive.create_array(
        scan_id, "kspace", acq.stored_shape(depth), np.complex64, slab=slab, attrs=attrs,
        compress=False, slab_chunks=True,
    )  # fmt: skip
    maps = None
    if coils > 1:
        maps = archive.create_array(scan_id, "coil_maps", (depth, coils, h, w), np.complex64, slab=slab)
    for z0 in range(0, depth, kspace.slab):
        y = torch.from_numpy(np.ascontiguousarray(volume.read(z0, min(depth, z0 + kspace.slab))))
        if maps is not None:
            maps.write(z0, estimate_sensitivities(y, mask=cols).numpy())  # (S, C, H, W)
        kspace.write(z0, acq.to_stored(y))
    arrays = {"kspace": kspace.record(), "mask": archive.write_array(scan_id, "mask", acq.mask.numpy())}
    if maps is not None:
        arrays["coil_maps"] = maps.record()
    out: dict[str, Any] = {}
    reference = volume.extra.get("reference")
    if reference is not None:
        ref_attrs = {"spacing": list(volume.spacing), "modality": "mri", "grid": "reference"}
        out["image"] = archive.write_array(scan_id, "image", np.asarray(reference, np.float32), ref_attrs)
    archive.commit(
        MEASUREMENTS,
        scan_id,
        fingerprint,
        {"reference": "image", "noise_sigma": 0.0, "measured": True},
        arrays,
    )
    return out


def _write_item(
    archive: Archive, scan_id: str, *, planned: Planned, slab: int, fingerprint: str = ""
) -> dict[str, Any]:
    """Open one item and write its image (and labels), or its k-space; the commit record's facts."""
    item = planned.item
    reader = _reader(item.format)
    try:
        volume = reader.open_item(planned.root, item)
        if item.format == "fastmri":
            arrays = _write_kspace(archive, scan_id, volume, slab, fingerprint)
            return {
                "arrays": arrays,
                "checksum": record_digest(arrays),
                "format": item.format,
                "modality": "mri",
                "shape": [int(volume.shape[0]), *(int(n) for n in volume.shape[-2:])],
                "spacing": list(volume.spacing),
            }
        if len(volume.shape) != 3:
            raise QuarantineError(
                "not_3d", f"{item.paths[0]}: a volume of shape {tuple(volume.shape)}; expected (D, H, W)"
            )
        modality = volume.modality if item.format == "dicom" else (planned.modality or volume.modality)
        volume.attrs = {**volume.attrs, "spacing": list(volume.spacing), "modality": modality}
        arrays = {"image": _write_volume(archive, scan_id, "image", volume, slab, np.float32)}
        if item.label_path:
            labels = _reader("nifti").open_item(
                planned.root, SourceItem("nifti", (item.label_path,), item.label_path)
            )
            if tuple(labels.shape) != tuple(volume.shape):
                raise QuarantineError(
                    "mixed_sizes",
                    f"{item.label_path}: label volume of shape {tuple(labels.shape)}; expected the image's "
                    f"shape {tuple(volume.shape)}",
                )
            arrays["labels"] = _write_volume(archive, scan_id, "labels", labels, slab, np.int16)
    except QuarantineError as exc:  # the reason leads the message the quarantine records
        name = (
            item.paths[0]
            if len(item.paths) == 1
            else f"series of {len(item.paths)} files from {item.paths[0]}"
        )
        text = str(exc) if any(p in str(exc) for p in item.paths) else f"{name}: {exc}"
        raise QuarantineError(exc.reason, f"[{exc.reason}] {text}") from None
    return {
        "arrays": arrays,
        "checksum": record_digest(arrays),
        "format": item.format,
        "modality": modality,
        "shape": list(volume.shape),
        "spacing": list(volume.spacing),
    }


def ingest_item(archive: Archive, planned: Planned, slab: int) -> ScanOutcome:
    """One Ray task: checksum the item's files, then write and commit it, or quarantine it.

    A scan already committed from the same bytes is skipped; one committed from other bytes is
    left as it is and reported (re-ingest a changed file under a new scan ID).
    """
    item = planned.item
    t0 = time.perf_counter()
    try:
        checksum = source_checksum(planned.root, item.paths + ((item.label_path,) if item.label_path else ()))
    except (QuarantineError, OSError) as exc:
        reason = exc.reason if isinstance(exc, QuarantineError) else "unreadable"
        text = str(exc) if isinstance(exc, QuarantineError) else f"{item.paths[0]}: {exc}"
        message = f"QuarantineError: [{reason}] {text}"
        archive.quarantine(SOURCE, planned.scan_id, message, "ingest")
        return ScanOutcome(planned.scan_id, "failed", time.perf_counter() - t0, error=message)
    fingerprint = combine({"source": checksum, "format": item.format, "modality": planned.modality})
    record = archive.commit_record(SOURCE, planned.scan_id)
    if record is not None and record.get("fingerprint") != fingerprint:
        return ScanOutcome(
            planned.scan_id,
            "failed",
            0.0,
            error=f"[changed] {item.paths[0]}: scan {planned.scan_id} was ingested from other bytes; "
            "its committed data is kept. Ingest the changed file under a new scan ID (manifest scan_id)",
        )
    return process_scan(
        archive,
        SOURCE,
        planned.scan_id,
        fingerprint,
        _write_item,
        ["image", "labels", "kspace", "mask", "coil_maps"],
        {"planned": planned, "slab": slab, "fingerprint": fingerprint},
        stage="ingest",
    )


def run(ctx: StageContext, stage: IngestStage, fingerprint: str) -> StageResult:
    """Ingest every item of the stage (see the module docstring); append the catalog."""
    items = plan_items(stage, ctx.spec.seed)
    if not items:
        raise SpecError(
            f"ingest stage {stage.name!r}: no files found in {stage.sources}"
            + (f" listed by {stage.manifest}" if stage.manifest else "")
            + "; expected NIfTI (.nii, .nii.gz), fastMRI (.h5) or DICOM files"
        )
    import ray

    task = ray.remote(ingest_item).options(num_cpus=1, max_retries=2)
    outcomes = gather([task.remote(ctx.archive, p, stage.slab) for p in items], ctx.console, "ingest")
    now = datetime.now(UTC).isoformat(timespec="microseconds")
    by_id = {p.scan_id: p for p in items}
    rows = []
    for o in outcomes:
        info = o.info or {}
        p = by_id[o.scan_id]
        if o.status == "failed" and (o.error or "").startswith("[changed]"):
            continue  # the committed scan and its row stay as they are
        rows.append(
            CatalogRow(
                scan_id=o.scan_id,
                modality=str(info.get("modality") or p.modality or "mri"),
                shape=tuple(info.get("shape", ())),
                spacing=tuple(info.get("spacing", ())),
                source=p.item.format,
                checksum=str(info.get("checksum", "")),
                split=p.split,
                status="ok" if o.status != "failed" else "quarantined",
                ingested_at=now,
            )
        )
    added = ctx.archive.append_catalog(rows)
    ctx.tracker.log_metrics(
        {
            "ingest/items": len(items),
            "ingest/added": len(added),
            "ingest/quarantined": sum(r.status != "ok" for r in rows),
        }
    )
    # Each scan's commit carries its own source checksum, never the stage's fingerprint: no unit
    # is listed, so `medrecon show` never calls an ingested scan stale.
    result = summarise(outcomes, {"n_scans": len(items), "added": len(added)}, {})
    return result


def ingest_spec(
    sources: list[str],
    archive: str,
    *,
    fmt: str = "auto",
    manifest: str | None = None,
    modality: str | None = None,
    seed: int = 0,
    tracking_uri: str | None = None,
) -> Any:
    """The pipeline a ``medrecon ingest`` command runs: one ingest stage, nothing else.

    Raises:
        SpecError: a bad option, named as the command line wrote it.
    """
    from pydantic import ValidationError

    from pipelines.spec import PipelineSpec
    from pipelines.specfile import format_validation_error

    stage: dict[str, Any] = {"kind": "ingest", "sources": list(sources), "format": fmt, "manifest": manifest}
    if modality is not None:
        stage["modality"] = modality
    raw = {
        "name": "ingest",
        "seed": seed,
        "archive": {"path": archive},
        "tracking": {"uri": tracking_uri, "experiment": "medrecon-ingest"},
        "stages": [stage],
    }
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(
            format_validation_error(err, raw, "ingest").replace("stages[0] (ingest", "options (ingest")
        ) from None
