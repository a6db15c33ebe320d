"""``medrecon ingest`` and the ingest stage: real files in, bad ones quarantined, nothing identifying kept.

Every test runs the command as a user would, against the session's Ray, into a real Zarr archive
with MLflow in SQLite; the files are written by ``tests/sources/corpus.py`` (NIfTI and DICOM,
with patient identifiers planted in every DICOM file) and by the libraries' own test data.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines.ingest import path_scan_id, split_of
from pipelines.sources import dicom, nifti
from pipelines.sources.deid import keyed_scan_id
from pipelines.spec import SplitFractions
from pipelines.store import SOURCE, Archive
from tests.pipelines.helpers import medrecon
from tests.sources.corpus import PHI_STRINGS, write_bad_corpus, write_good_dicom, write_good_nifti

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

KEY = "ingest-test-secret-0123456789"
ENV = {"MEDRECON_DEID_KEY": KEY}


def _ids(root: Path, fmt: str) -> dict[str, str]:
    """Item key -> the scan ID ingest gives it."""
    reader = nifti if fmt == "nifti" else dicom
    items = [i for i in reader.discover(str(root)) if fmt == "dicom" or i.format == "nifti"]
    if fmt == "nifti":
        return {i.key: path_scan_id("nii", i.key) for i in items}
    return {i.key: keyed_scan_id(i.key, KEY.encode()) for i in items}


def _grep_tree(root: Path, needles: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(file, needle)`` for every needle found in the bytes of any file under ``root``."""
    hits = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            data = Path(dirpath, name).read_bytes()
            hits += [(os.path.join(dirpath, name), n) for n in needles if n.encode() in data]
    return hits


def test_ingest_commits_good_files_quarantines_each_bad_one_with_its_reason_and_keeps_no_phi(
    ray_session, tmp_path
):
    good_nifti, good_dicom = (
        write_good_nifti(tmp_path / "good" / "nifti"),
        write_good_dicom(tmp_path / "good" / "dicom"),
    )
    bad = write_bad_corpus(tmp_path / "bad")
    assert len(bad) >= 20
    sources = [tmp_path / "good", tmp_path / "bad" / "nifti", tmp_path / "bad" / "dicom"]
    archive_dir = tmp_path / "archive"
    out = medrecon(
        "ingest", *map(str, sources), "--archive", str(archive_dir), ray=ray_session, env=ENV, tmp=tmp_path
    )
    assert out.returncode == 3, out.stderr[-3000:]  # some quarantined, the others committed

    archive = Archive(str(archive_dir))
    rows = {r.scan_id: r for r in archive.catalog()}
    # Good files: committed, read back as the readers give them (canonical orientation, HU, spacing).
    nifti_ids = {k: path_scan_id("nii", f"nifti/{k}") for k in good_nifti}
    dicom_ids = {k: keyed_scan_id(k, KEY.encode()) for k in good_dicom}
    for key, expected in [
        *((nifti_ids[k], v) for k, v in good_nifti.items()),
        *((dicom_ids[k], v) for k, v in good_dicom.items()),
    ]:
        row = rows[key]
        assert row.status == "ok" and row.ingested_at, row
        np.testing.assert_allclose(archive.read_array(key, "image"), expected.volume, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(row.spacing, expected.spacing, rtol=1e-5)
        assert row.modality == expected.modality
        assert row.split in ("train", "val", "test")
    # Bad files: each quarantined with its reason and its file's name; no array of it is left.
    quarantined = archive.quarantined(SOURCE)
    for name, reason in bad.items():
        fmt, key = name.split("/", 1)
        scan_id = path_scan_id("nii", key) if fmt == "nifti" else keyed_scan_id(key, KEY.encode())
        assert scan_id in quarantined, f"{name} ({reason}) was not quarantined"
        assert f"[{reason}]" in quarantined[scan_id], (name, quarantined[scan_id])
        assert not archive.has_array(scan_id, "image")
        assert rows[scan_id].status == "quarantined"
    # Nothing identifying anywhere: arrays, attributes, catalog, commit records, MLflow, output.
    hits = _grep_tree(archive_dir, PHI_STRINGS) + _grep_tree(tmp_path / "mlflow.db", PHI_STRINGS)
    hits += [("stdout/stderr", n) for n in PHI_STRINGS if n in out.stdout + out.stderr]
    assert not hits, hits


def test_reingest_is_a_noop_and_a_new_file_is_appended_with_its_own_time(ray_session, tmp_path):
    src = tmp_path / "src"
    good = write_good_nifti(src)
    args = ("ingest", str(src), "--archive", str(tmp_path / "archive"))
    first = medrecon(*args, ray=ray_session, tmp=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    archive = Archive(str(tmp_path / "archive"))
    before = {r.scan_id: r for r in archive.catalog()}
    assert len(before) == len(good)
    commits = {s: archive.commit_record(SOURCE, s)["time"] for s in before}

    again = medrecon(*args, ray=ray_session, tmp=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "unchanged" in again.stdout  # the source listing is the same: the stage is skipped whole
    assert {r.scan_id: r for r in archive.catalog()} == before

    shutil.copy(src / "ras.nii", src / "copy_of_ras.nii")
    third = medrecon(*args, ray=ray_session, tmp=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    after = {r.scan_id: r for r in archive.catalog()}
    new = path_scan_id("nii", "copy_of_ras.nii")
    assert set(after) == set(before) | {new}
    assert all(after[s] == before[s] for s in before), "existing rows are never rewritten"
    assert after[new].ingested_at >= max(r.ingested_at for r in before.values())
    assert {s: archive.commit_record(SOURCE, s)["time"] for s in before} == commits, "nothing re-written"
    np.testing.assert_array_equal(
        archive.read_array(new, "image"), archive.read_array(path_scan_id("nii", "ras.nii"), "image")
    )


def test_manifest_gives_ids_splits_and_labels_and_a_dicom_source_needs_a_key(ray_session, tmp_path):
    from pipelines.sources.demo import write_demo_folder

    manifest = write_demo_folder(tmp_path / "demo", n=6, shape=(8, 24, 24), seed=3)
    listed = list(csv.DictReader(open(manifest)))
    out = medrecon(
        "ingest", str(tmp_path / "demo"), "--manifest", str(manifest), "--archive", str(tmp_path / "a"),
        ray=ray_session, tmp=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    archive = Archive(str(tmp_path / "a"))
    rows = {r.scan_id: r for r in archive.catalog()}
    assert {r["scan_id"]: r["split"] for r in listed} == {s: r.split for s, r in rows.items()}
    from operators.brain import brain_phantom

    first = listed[0]["scan_id"]
    phantom = brain_phantom((8, 24, 24), seed=3)  # written LPS: ingest turns it back to (S, A, R)
    image, labels = archive.read_array(first, "image"), archive.read_array(first, "labels")
    np.testing.assert_allclose(image, phantom.image, atol=1e-6)
    np.testing.assert_array_equal(labels, phantom.labels)
    assert labels.dtype == np.int16
    np.testing.assert_allclose(rows[first].spacing, (1.2, 0.9, 0.9))

    write_good_dicom(tmp_path / "dicom")
    no_key = medrecon(
        "ingest", str(tmp_path / "dicom"), "--archive", str(tmp_path / "a"), ray=ray_session, tmp=tmp_path
    )
    assert no_key.returncode == 2
    assert "MEDRECON_DEID_KEY" in no_key.stderr and KEY not in no_key.stderr


def test_splits_follow_a_seeded_hash_of_the_scan_id_in_the_spec_fractions():
    fractions = SplitFractions(train=0.6, val=0.2, test=0.2)
    ids = [f"nii-{i:04d}" for i in range(2000)]
    splits = [split_of(s, 0, fractions) for s in ids]
    counts = {k: splits.count(k) / len(ids) for k in ("train", "val", "test")}
    assert abs(counts["train"] - 0.6) < 0.04 and abs(counts["val"] - 0.2) < 0.03, counts
    assert splits == [split_of(s, 0, fractions) for s in ids], "deterministic"
    assert splits != [split_of(s, 1, fractions) for s in ids], "the seed matters"
    with pytest.raises(ValueError, match="add up to 1"):
        SplitFractions(train=0.5, val=0.2, test=0.2)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nifti_folder_spec_ingests_preprocesses_simulates_trains_reconstructs_and_evaluates(
    ray_session, tmp_path
):
    """A tiny run of ``pipelines/specs/nifti_folder.yaml`` on the demo folder, only sizes overridden."""
    from pipelines.sources.demo import write_demo_folder

    manifest = write_demo_folder(tmp_path / "nifti", n=6, shape=(8, 30, 28), seed=1)
    sets = [
        f"archive.path={tmp_path / 'archive'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"ingest.sources=[{tmp_path / 'nifti'}]",
        f"ingest.manifest={manifest}",
        "preprocess.shape=[8, 32, 32]",
        "neumann.epochs=2",
        "neumann.model.kwargs={n_blocks: 2, features: 4, regularizer: unet, levels: 1}",
        "recon.options.cs_tv={lam: [0.01], max_iter: 30}",
    ]
    out = medrecon("run", "pipelines/specs/nifti_folder.yaml", *[a for s in sets for a in ("--set", s)],
                   ray=ray_session, tmp=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    archive = Archive(str(tmp_path / "archive"))
    test_ids = archive.scans("test")
    assert test_ids
    for scan_id in archive.scans("all"):
        pre = archive.read_array(scan_id, "derived/preprocessed")
        assert pre.shape == (8, 32, 32) and -1e-6 <= pre.min() and pre.max() <= 1 + 1e-6  # min-max
        assert archive.reference_name(scan_id) == "derived/preprocessed"
    for scan_id in test_ids:
        for key in ("zero_filled", "cs_tv"):
            assert archive.read_array(scan_id, f"recon/{key}").shape == (8, 32, 32)
    assert "nifti-folder-neumann.v1" in out.stdout  # the trained model reconstructed and was scored


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fastmri_kspace_ingests_as_measurements_and_cg_sense_beats_zero_filled_on_the_320_crop(
    ray_session, tmp_path
):
    """A multi-coil fastMRI file (8 coils, equispaced 4x) in; its k-space stored as acquired, maps
    estimated per slice; reprocess reconstructs it; scored on the reference's 320x320 grid."""
    from models.registry import build_model, save_model
    from operators.brain import brain_phantom
    from operators.metrics import psnr
    from operators.transforms import on_grid
    from pipelines.physics import Acquisition
    from pipelines.tracking import MlflowTracker, register_model, start_pipeline_run
    from tests.sources.test_fastmri import write_fastmri_file

    src = tmp_path / "fastmri"
    src.mkdir()
    written = write_fastmri_file(
        src / "file_brain_0001.h5", brain_phantom((10, 352, 336), seed=5).image, seed=5
    )
    archive_dir = str(tmp_path / "archive")
    out = medrecon("ingest", str(src), "--archive", archive_dir, ray=ray_session, tmp=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    archive = Archive(archive_dir)
    (scan_id,) = archive.scans("all")
    assert scan_id == path_scan_id("fmri", "file_brain_0001.h5")
    acq = Acquisition.from_archive(archive, scan_id)
    assert acq.per_slice and acq.coils == 8 and acq.image_shape == (352, 336)
    kspace = archive.open_array(scan_id, "kspace")
    assert kspace.shape[:3] == (10, 8, 352) and kspace.attrs["layout"] == "columns"  # acquired lines only
    np.testing.assert_array_equal(acq.mask[0].numpy(), written.mask.astype(bool))
    assert archive.open_array(scan_id, "coil_maps").shape == (10, 8, 352, 336)
    reference = archive.read_array(scan_id, "image")
    assert reference.shape == (10, 320, 320)
    assert "patient" not in str(dict(kspace.attrs)).lower()

    # A registered network reconstructs it too: 10 slices, 8 a batch, each batch with its own maps.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_pipeline_run(uri, "models", "models", "fp", {})
    kwargs = {"n_iter": 2, "features": 4}
    save_model(build_model("unrolled_gd", kwargs), "unrolled_gd", kwargs, tmp_path / "m")
    MlflowTracker(uri, run_id).log_model_dir(tmp_path / "m", "models/model")
    model = register_model(uri, "tiny-gd", run_id, "models/model")
    out = medrecon(
        "reprocess", archive_dir, "--method", "zero_filled", "--method", "cg_sense", "--method", model,
        ray=ray_session, tmp=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    learned = archive.read_array(scan_id, "recon/tiny-gd.v1")
    assert learned.shape == (10, 352, 336) and np.isfinite(learned).all()
    rng = float(reference.max() - reference.min())
    score = {
        m: psnr(
            on_grid(archive.read_array(scan_id, f"recon/{m}"), reference.shape), reference, data_range=rng
        )
        for m in ("zero_filled", "cg_sense")
    }
    print("fastMRI 320x320 crop PSNR:", score)
    assert score["cg_sense"] > score["zero_filled"] + 3, score


def test_the_libraries_own_real_files_ingest_as_nibabel_and_pydicom_read_them(ray_session, tmp_path):
    """nibabel's anatomical.nii and example4d.nii.gz, pydicom's CT_small and MR_small, through the command."""
    import nibabel as nib
    import pydicom
    from pydicom.data import get_testdata_file

    src = tmp_path / "real"
    src.mkdir()
    nib_data = Path(nib.__file__).parent / "tests" / "data"
    for name in ("anatomical.nii", "example4d.nii.gz"):
        shutil.copy(nib_data / name, src / name)
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (src / name.split("_")[0]).mkdir()
        shutil.copy(get_testdata_file(name, download=False), src / name.split("_")[0] / name)
    out = medrecon(
        "ingest", str(src), "--archive", str(tmp_path / "a"), ray=ray_session, tmp=tmp_path, env=ENV
    )
    assert out.returncode == 3, out.stderr[-3000:]  # the 4D file is refused, the others committed
    archive = Archive(str(tmp_path / "a"))
    rows = {r.scan_id: r for r in archive.catalog()}

    anat = nib.as_closest_canonical(nib.load(src / "anatomical.nii"))
    data = anat.get_fdata(dtype=np.float32)  # (x, y, z) in RAS
    scan = path_scan_id("nii", "anatomical.nii")
    image = archive.read_array(scan, "image")
    assert image.shape == data.shape[::-1]
    assert (image.min(), image.max()) == (data.min(), data.max())
    np.testing.assert_allclose(rows[scan].spacing, anat.header.get_zooms()[::-1], rtol=1e-6)
    assert "[not_3d]" in archive.quarantined(SOURCE)[path_scan_id("nii", "example4d.nii.gz")]

    for name, modality in (("CT_small.dcm", "ct"), ("MR_small.dcm", "mri")):
        ds = pydicom.dcmread(get_testdata_file(name, download=False))
        pixels = ds.pixel_array * float(getattr(ds, "RescaleSlope", 1)) + float(
            getattr(ds, "RescaleIntercept", 0)
        )
        scan = keyed_scan_id(f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}", KEY.encode())
        image = archive.read_array(scan, "image")
        assert image.shape == (1, ds.Rows, ds.Columns) and rows[scan].modality == modality
        assert (image.min(), image.max()) == (pixels.min(), pixels.max())
        np.testing.assert_allclose(rows[scan].spacing[1:], [float(v) for v in ds.PixelSpacing])
        assert str(ds.PatientName) not in json.dumps(dict(archive.open_array(scan, "image").attrs))
