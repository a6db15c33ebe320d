"""Test inputs written on the fly: good NIfTI and DICOM scans with known answers, and a bad corpus.

* :func:`write_good_nifti` writes one RAS phantom ``(x, y, z)`` stored in several orientations (and
  a scaled integer file, a 2D file, a sagittal single slice); each reads back as a known
  ``(D, H, W)`` array.
* :func:`write_good_dicom` writes a CT series with rescale slope/intercept (files named and numbered
  out of order), a sagittal MR series, an enhanced multi-frame MR file with per-frame positions and
  rescale, and a legacy multi-frame CT placed by ``SpacingBetweenSlices``.
* :func:`write_bad_corpus` writes ``nifti/``, ``dicom/`` and ``outside/`` (link targets) and returns
  ``{"nifti/<item key>" or "dicom/<item key>": expected quarantine reason}``.
* :func:`read_all` and :func:`quarantine_of` read an item the way ingest does: open, then slabs.

Every DICOM file carries the identifying strings of :data:`PHI_STRINGS` (in standard attributes and
in a private tag) so tests can check that none of them leaves a reader. UIDs are deterministic
(:func:`uid` of a name), so keys are stable between runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, ornt_transform
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from pipelines.sources.base import QuarantineError, SourceItem, SourceVolume

__all__ = [
    "PHI_STRINGS",
    "Expected",
    "quarantine_of",
    "read_all",
    "uid",
    "write_bad_corpus",
    "bad_corpus_of",
    "write_dicom",
    "write_good_dicom",
    "write_good_nifti",
]

#: Identifying values planted in every DICOM file written here.
PHI_STRINGS = (
    "PHI^Alice^Sample",
    "PHI-ID-4711",
    "19610203",
    "PHI General Hospital",
    "1 PHI Street, Phitown",
    "PHI^Referrer^Bob",
    "PHI^Operator^Carol",
    "ACC-PHI-0815",
    "PHI-STATION-7",
    "PHI-SERIAL-123",
    "PHI brain study of Alice",
    "PHI series for Alice",
    "PHI private note",
)

#: RAS phantom geometry: shape ``(x, y, z)`` and voxel size (mm); the answer is ``(D, H, W) = (z, y, x)``.
_SHAPE = (6, 7, 5)
_ZOOMS = (0.8, 1.1, 2.5)


@dataclass(frozen=True)
class Expected:
    """What a good item must read back as."""

    volume: np.ndarray  # (D, H, W) float32
    spacing: tuple[float, float, float]
    modality: str


def read_all(volume: SourceVolume, slab: int = 2) -> np.ndarray:
    """The whole ``(D, H, W)`` volume, read ``slab`` slices at a time."""
    parts = [volume.read(z, min(z + slab, volume.shape[0])) for z in range(0, volume.shape[0], slab)]
    return np.concatenate(parts, axis=0)


def quarantine_of(reader: ModuleType, root: str | Path, item: SourceItem) -> QuarantineError | None:
    """The error that opening and reading ``item`` raises, or None when it reads cleanly."""
    try:
        read_all(reader.open_item(str(root), item))
    except QuarantineError as e:
        return e
    return None


def uid(name: str) -> str:
    """A deterministic DICOM UID for ``name``."""
    return generate_uid(entropy_srcs=[name])


def _phantom() -> np.ndarray:
    """``(x, y, z)`` float32, every voxel distinct so any flip or transpose shows."""
    return np.arange(np.prod(_SHAPE), dtype=np.float32).reshape(_SHAPE) * 0.5 - 20.0


def _ras_affine(zooms: tuple[float, ...] = _ZOOMS) -> np.ndarray:
    return np.array(
        [[zooms[0], 0, 0, -10.0], [0, zooms[1], 0, 20.0], [0, 0, zooms[2], 5.0], [0, 0, 0, 1]], dtype=float
    )


def write_good_nifti(root: str | Path) -> dict[str, Expected]:
    """Good NIfTI files under ``root``, by item key (relative path)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Expected] = {}
    volume = _phantom()
    canonical = Expected(volume.transpose(2, 1, 0).copy(), (_ZOOMS[2], _ZOOMS[1], _ZOOMS[0]), "mri")
    ras = nib.Nifti1Image(volume, _ras_affine())
    for name, codes in [
        ("ras.nii", "RAS"),
        ("flipped_las.nii", "LAS"),
        ("flipped_lps.nii.gz", "LPS"),
        ("sub/permuted_pir.nii", "PIR"),
        ("sub/permuted_sla.nii", "SLA"),
    ]:
        stored = ras.as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(codes)))
        assert "".join(nib.aff2axcodes(stored.affine)) == codes
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        nib.save(stored, root / name)
        out[name] = canonical

    raw = np.arange(np.prod(_SHAPE), dtype=np.int16).reshape(_SHAPE) - 50  # (x, y, z)
    nib.save(nib.Nifti1Image(raw, _ras_affine()), root / "scaled_int16.nii")
    header = nib.load(root / "scaled_int16.nii").header.copy()
    header["scl_slope"], header["scl_inter"] = 0.5, -3.0
    with open(root / "scaled_int16.nii", "r+b") as f:
        header.write_to(f)  # same layout, new scaling: stored values now mean raw * 0.5 - 3
    out["scaled_int16.nii"] = Expected(
        (raw.astype(np.float32) * 0.5 - 3.0).transpose(2, 1, 0).copy(), canonical.spacing, "mri"
    )

    plane = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)  # (x, y)
    nib.save(nib.Nifti1Image(plane, _ras_affine((0.7, 0.9, 1.0))), root / "plane_2d.nii")
    out["plane_2d.nii"] = Expected(plane.T[None].copy(), (1.0, 0.9, 0.7), "mri")  # (1, y, x)

    sagittal = volume[:1]  # (1, y, z): one sagittal slice
    nib.save(nib.Nifti1Image(sagittal, _ras_affine()), root / "sagittal_slice.nii")
    out["sagittal_slice.nii"] = Expected(  # (1, S, A): the singleton x first, then z, then y
        sagittal[0].T[None].copy(), (_ZOOMS[0], _ZOOMS[2], _ZOOMS[1]), "mri"
    )
    return out


def write_dicom(
    path: str | Path,
    pixels: np.ndarray | None,
    *,
    study: str,
    series: str,
    modality: str = "CT",
    sop_class: str = CTImageStorage,
    photometric: str = "MONOCHROME2",
    **attrs: object,
) -> None:
    """One DICOM file with planted PHI. ``pixels``: ``(rows, cols)``, ``(frames, rows, cols)`` with
    ``NumberOfFrames`` in ``attrs``, ``(rows, cols, 3)`` uint8 for RGB, or None for no pixel data.
    ``attrs`` are set last, by keyword (geometry, rescale, overrides)."""
    sop = uid(f"{path}-sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.FrameOfReferenceUID = uid(f"{study}-for")
    ds.Modality = modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI_STRINGS[0], PHI_STRINGS[1], PHI_STRINGS[2]
    ds.PatientSex, ds.PatientAge = "F", "063Y"
    ds.InstitutionName, ds.InstitutionAddress = PHI_STRINGS[3], PHI_STRINGS[4]
    ds.ReferringPhysicianName, ds.OperatorsName = PHI_STRINGS[5], PHI_STRINGS[6]
    ds.AccessionNumber, ds.StationName, ds.DeviceSerialNumber = PHI_STRINGS[7], PHI_STRINGS[8], PHI_STRINGS[9]
    ds.StudyDescription, ds.SeriesDescription = PHI_STRINGS[10], PHI_STRINGS[11]
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20240229", "101112", "PHI-STUDY-9"
    ds.Manufacturer, ds.ManufacturerModelName = "ACME", "Scanner 3000"
    ds.private_block(0x0009, "MEDRECON TEST", create=True).add_new(0x10, "LO", PHI_STRINGS[12])
    if pixels is not None:
        arr = np.ascontiguousarray(pixels)
        colour = arr.ndim == 3 and arr.shape[-1] == 3 and arr.dtype == np.uint8
        ds.Rows, ds.Columns = (arr.shape[0], arr.shape[1]) if colour else arr.shape[-2:]
        ds.SamplesPerPixel = 3 if colour else 1
        if colour:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = "RGB" if colour else photometric
        ds.BitsAllocated = ds.BitsStored = arr.dtype.itemsize * 8
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(arr.dtype.kind == "i")
        ds.PixelData = arr.tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _series_key(name: str) -> tuple[str, str, str]:
    study, series = uid(f"{name}-study"), uid(f"{name}-series")
    return study, series, f"{study}/{series}"


def _axial(k: int, z: float, **attrs: object) -> dict[str, object]:
    return dict(ImageOrientationPatient=[1, 0, 0, 0, 1, 0], ImagePositionPatient=[-5.0, 7.0, z], **attrs)


def write_good_dicom(root: str | Path) -> dict[str, Expected]:
    """Good DICOM series under ``root``, by item key ``"<study>/<series>"``."""
    root = Path(root)
    out: dict[str, Expected] = {}
    rng = np.random.default_rng(0)

    # CT: 6 axial slices of 10 x 8, HU = 2 * stored - 1024, files named and numbered out of order.
    study, series, key = _series_key("ct")
    stored = rng.integers(0, 2000, size=(6, 10, 8)).astype(np.int16)  # (D, H, W) in +z order
    names = rng.permutation(6)
    for k in range(6):
        write_dicom(
            root / "ct" / f"IM{names[k]:04d}",
            stored[k],
            study=study,
            series=series,
            InstanceNumber=int(6 - k),
            PixelSpacing=[0.7, 0.6],
            SliceThickness=2.5,
            RescaleSlope=2,
            RescaleIntercept=-1024,
            KVP=120,
            **_axial(k, -30.0 + 2.5 * k),
        )
    out[key] = Expected((stored.astype(np.float32) * 2 - 1024), (2.5, 0.7, 0.6), "ct")

    # MR: 5 sagittal slices, normal = (0,1,0) x (0,0,-1) = (-1,0,0): D runs towards decreasing x.
    study, series, key = _series_key("mr")
    stored_mr = rng.integers(0, 4000, size=(5, 6, 9)).astype(np.uint16)  # (D, H, W)
    for k in range(5):
        write_dicom(
            root / "mr" / f"slice_{k}.dcm",
            stored_mr[k],
            study=study,
            series=series,
            modality="MR",
            sop_class=MRImageStorage,
            PixelSpacing=[1.5, 1.25],
            SliceThickness=3,
            ImageOrientationPatient=[0, 1, 0, 0, 0, -1],
            ImagePositionPatient=[10.0 + 3.0 * (4 - k), -40.0, 60.0],
            MagneticFieldStrength=3,
            RepetitionTime=2000,
            EchoTime=90,
        )
    out[key] = Expected(stored_mr.astype(np.float32), (3.0, 1.5, 1.25), "mri")

    # Enhanced MR: 4 frames stored out of order, per-frame positions and rescale intercepts.
    study, series, key = _series_key("enhanced")
    frames = rng.integers(0, 1000, size=(4, 5, 6)).astype(np.uint16)  # (frames, H, W) in file order
    z_of_frame = [4.0, -2.0, 7.0, 1.0]  # sorted: -2, 1, 4, 7 (3 mm apart)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [1.2, 1.3], 3.0
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    per_frame = []
    for f, z in enumerate(z_of_frame):
        group, position, transform = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, z]
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, 10 * f, "US"
        group.PlanePositionSequence, group.PixelValueTransformationSequence = [position], [transform]
        per_frame.append(group)
    write_dicom(
        root / "enhanced" / "multiframe.dcm",
        frames,
        study=study,
        series=series,
        modality="MR",
        sop_class=EnhancedMRImageStorage,
        NumberOfFrames=4,
        SharedFunctionalGroupsSequence=[shared],
        PerFrameFunctionalGroupsSequence=per_frame,
    )
    order = np.argsort(z_of_frame)
    expected = np.stack([frames[f].astype(np.float32) + 10 * f for f in order])
    out[key] = Expected(expected, (3.0, 1.2, 1.3), "mri")

    # Legacy multi-frame CT: no functional groups, frames placed by SpacingBetweenSlices.
    study, series, key = _series_key("legacy")
    frames_ct = rng.integers(-500, 500, size=(3, 4, 5)).astype(np.int16)
    write_dicom(
        root / "legacy" / "ct_multiframe.dcm",
        frames_ct,
        study=study,
        series=series,
        NumberOfFrames=3,
        PixelSpacing=[0.9, 0.8],
        SpacingBetweenSlices=1.5,
        RescaleSlope=1,
        RescaleIntercept=-1000,
        ImageOrientationPatient=[1, 0, 0, 0, -1, 0],
        ImagePositionPatient=[0.0, 0.0, 0.0],
    )
    out[key] = Expected(frames_ct.astype(np.float32) - 1000, (1.5, 0.9, 0.8), "ct")
    return out


def _bad_nifti(root: Path, outside: Path) -> dict[str, str]:
    """Bad NIfTI inputs, by item key, with their expected reason."""
    root.mkdir(parents=True, exist_ok=True)
    bad: dict[str, str] = {}
    volume = np.random.default_rng(1).normal(size=(6, 7, 8)).astype(np.float32)

    nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "truncated.nii")
    os.truncate(root / "truncated.nii", 352 + 100)
    bad["truncated.nii"] = "truncated"

    header = nib.Nifti1Header()
    header.set_data_shape((10000, 10000, 10000))  # 10**12 voxels
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    with open(root / "huge.nii", "wb") as f:
        header.write_to(f)
        f.write(b"\0" * 64)
    bad["huge.nii"] = "too_large"

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.float32), np.eye(4)), root / "fourd.nii")
    bad["fourd.nii"] = "not_3d"

    with_nan = volume.copy()
    with_nan[2, 3, 5] = np.nan
    nib.save(nib.Nifti1Image(with_nan, np.eye(4)), root / "nan.nii")
    bad["nan.nii"] = "not_finite"

    with_inf = volume.copy()
    with_inf[0, 0, 7] = np.inf
    nib.save(nib.Nifti1Image(with_inf, np.eye(4)), root / "inf.nii.gz")
    bad["inf.nii.gz"] = "not_finite"

    (root / "text.nii").write_text("this is a text file, not an image\n" * 20)
    bad["text.nii"] = "unreadable"
    (root / "empty.nii").write_bytes(b"")
    bad["empty.nii"] = "unreadable"
    (root / "random.nii.gz").write_bytes(np.random.default_rng(2).bytes(2000))
    bad["random.nii.gz"] = "unreadable"

    nib.save(nib.Nifti1Image(volume[:, :, :1], np.eye(4)), root / "header_source.nii")
    (root / "short_header.nii").write_bytes((root / "header_source.nii").read_bytes()[:200])
    (root / "header_source.nii").unlink()
    bad["short_header.nii"] = "unreadable"

    noise = np.random.default_rng(3).normal(size=(32, 32, 40)).astype(np.float32)
    nib.save(nib.Nifti1Image(noise, np.eye(4)), root / "truncated.nii.gz")
    data = (root / "truncated.nii.gz").read_bytes()
    (root / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    bad["truncated.nii.gz"] = "truncated"

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.complex64), np.eye(4)), root / "complex.nii")
    bad["complex.nii"] = "unreadable"

    nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "singular.nii")
    header = nib.load(root / "singular.nii").header.copy()
    header["srow_y"], header["sform_code"], header["qform_code"] = 0.0, 2, 0  # y axis of length 0
    with open(root / "singular.nii", "r+b") as f:
        header.write_to(f)
    bad["singular.nii"] = "unreadable"

    nib.save(nib.Nifti1Image(volume, np.eye(4)), outside / "brain.nii")
    os.symlink(outside / "brain.nii", root / "escape.nii")
    bad["escape.nii"] = "outside_source"
    os.symlink(outside, root / "linked_folder")
    bad["linked_folder"] = "outside_source"
    os.symlink(root / "does_not_exist.nii", root / "dangling.nii")
    bad["dangling.nii"] = "unreadable"
    return bad


def _bad_dicom(root: Path, outside: Path) -> dict[str, str]:
    """Bad DICOM inputs, by item key (series key, or relative path of a lone file), with reasons."""
    root.mkdir(parents=True, exist_ok=True)
    bad: dict[str, str] = {}
    tile = np.arange(16, dtype=np.int16).reshape(4, 4)

    def series(name: str, reason: str, slices: list[dict[str, object]], pixels=None, **common) -> None:
        study, uid_, key = _series_key(name)
        for k, attrs in enumerate(slices):
            arr = tile if pixels is None else pixels[k]
            write_dicom(root / name / f"{k}.dcm", arr, study=study, series=uid_, **{**common, **attrs})
        bad[key] = reason

    geometry = dict(PixelSpacing=[1.0, 1.0], SliceThickness=2.0)
    series("nopix", "no_pixel_data", [dict(Rows=4, Columns=4, **_axial(0, 0.0))], pixels=[None], **geometry)
    series("gap", "missing_slice", [_axial(k, z) for k, z in enumerate([0, 2, 4, 8, 10])], **geometry)
    series("uneven", "uneven_spacing", [_axial(k, z) for k, z in enumerate([0, 2, 4.3, 6.3])], **geometry)
    series("duplicate", "not_3d", [_axial(k, z) for k, z in enumerate([0, 2, 2, 4])], **geometry)
    series(
        "mixed_rows",
        "mixed_sizes",
        [_axial(k, 2.0 * k) for k in range(3)],
        pixels=[tile, tile, np.zeros((4, 6), np.int16)],
        **geometry,
    )
    series(
        "mixed_spacing",
        "mixed_sizes",
        [_axial(k, 2.0 * k, PixelSpacing=[1.0, 1.0 if k < 2 else 0.5]) for k in range(3)],
        SliceThickness=2.0,
    )
    series(
        "mixed_orientation",
        "mixed_sizes",
        [
            _axial(0, 0.0),
            _axial(1, 2.0),
            dict(ImageOrientationPatient=[0, 1, 0, 0, 0, -1], ImagePositionPatient=[0, 0, 4.0]),
        ],
        **geometry,
    )
    series(
        "pet", "unreadable", [_axial(0, 0.0)], modality="PT", sop_class=PositronEmissionTomographyImageStorage
    )
    series(
        "colour",
        "not_3d",
        [_axial(0, 0.0)],
        pixels=[np.zeros((4, 4, 3), np.uint8)],
        sop_class=SecondaryCaptureImageStorage,
        **geometry,
    )
    series("truncated_small", "truncated", [_axial(0, 0.0)], pixels=[np.ones((32, 32), np.int16)], **geometry)
    series("truncated_large", "truncated", [_axial(0, 0.0)], pixels=[np.ones((64, 64), np.int16)], **geometry)
    for name in ("truncated_small", "truncated_large"):
        path = root / name / "0.dcm"
        os.truncate(path, path.stat().st_size - 100)
    series("no_positions", "unreadable", [dict(InstanceNumber=k + 1) for k in range(2)], **geometry)

    report_study, report_series, _ = _series_key("report")
    write_dicom(
        root / "report.dcm",
        None,
        study=report_study,
        series=report_series,
        modality="SR",
        sop_class=BasicTextSRStorage,
    )
    bad["report.dcm"] = "no_pixel_data"  # no Rows: a lone item
    (root / "notes.txt").write_text("scanner export notes\n")
    bad["notes.txt"] = "unreadable"
    (root / "zero.dcm").write_bytes(b"")
    bad["zero.dcm"] = "unreadable"
    (root / "random.dcm").write_bytes(np.random.default_rng(4).bytes(1000))
    bad["random.dcm"] = "unreadable"

    study, uid_, _ = _series_key("outside")
    write_dicom(
        outside / "dicom" / "elsewhere.dcm", tile, study=study, series=uid_, **geometry, **_axial(0, 0)
    )
    os.symlink(outside / "dicom" / "elsewhere.dcm", root / "escape.dcm")
    bad["escape.dcm"] = "outside_source"
    os.symlink(outside / "dicom", root / "linked_folder")
    bad["linked_folder"] = "outside_source"
    return bad


def write_bad_corpus(directory: str | Path) -> dict[str, str]:
    """Write ``directory/{nifti,dicom,outside}`` and return ``{"<format>/<item key>": reason}``.

    ``nifti/`` and ``dicom/`` are the two source roots (one reader each); ``outside/`` holds the
    targets of links that escape them.
    """
    directory = Path(directory)
    outside = directory / "outside"
    outside.mkdir(parents=True, exist_ok=True)
    bad = {f"nifti/{k}": v for k, v in _bad_nifti(directory / "nifti", outside).items()}
    bad.update({f"dicom/{k}": v for k, v in _bad_dicom(directory / "dicom", outside).items()})
    return bad


def bad_corpus_of(directory: str | Path, fmt: str) -> tuple[Path, dict[str, str]]:
    """:func:`write_bad_corpus` into ``directory``; the root of format ``fmt`` and its ``{key: reason}``."""
    expected = write_bad_corpus(directory)
    prefix = f"{fmt}/"
    return Path(directory) / fmt, {
        k.removeprefix(prefix): v for k, v in expected.items() if k.startswith(prefix)
    }
