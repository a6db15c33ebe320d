"""NIfTI reader: nibabel's own files, every orientation to one canonical volume, slabs, quarantine."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.sources import nifti
from pipelines.sources.base import QuarantineError, SourceItem
from tests.sources.corpus import bad_corpus_of, quarantine_of, read_all, write_good_nifti

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"


def _item(key: str) -> SourceItem:
    return SourceItem(format="nifti", paths=(key,), key=key)


def _canonical_dhw(img: nib.Nifti1Image) -> np.ndarray:
    """nibabel's own answer: closest RAS+ canonical image, ``(x, y, z) -> (z, y, x)``."""
    return nib.as_closest_canonical(img).get_fdata().transpose(2, 1, 0)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("nifti_good")
    return root, write_good_nifti(root)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return bad_corpus_of(tmp_path_factory.mktemp("corpus"), "nifti")


def test_anatomical_nii_reads_as_nibabel_canonical_volume():
    img = nib.load(NIB_DATA / "anatomical.nii")
    volume = nifti.open_item(str(NIB_DATA), _item("anatomical.nii"))
    reference = _canonical_dhw(img)
    data = read_all(volume, slab=4)
    assert volume.shape == reference.shape == (25, 41, 33)  # file is (33, 41, 25) LAS
    assert data.dtype == np.float32 and volume.dtype == np.float32
    np.testing.assert_array_equal(data, reference.astype(np.float32))
    assert (data.min(), data.max()) == (img.get_fdata().min(), img.get_fdata().max())
    assert volume.spacing == pytest.approx(tuple(reversed(img.header.get_zooms())))
    assert volume.modality == "mri"
    assert volume.attrs["orientation"] == "LAS" and volume.attrs["axes"] == "SAR"
    np.testing.assert_allclose(volume.attrs["affine"], img.affine)
    json.dumps(volume.attrs)


def test_example4d_is_refused_without_a_frame_and_each_frame_matches_nibabel():
    img = nib.load(NIB_DATA / "example4d.nii.gz")
    item = _item("example4d.nii.gz")
    with pytest.raises(QuarantineError, match=r"example4d\.nii\.gz: .*4D.*frame=k") as info:
        nifti.open_item(str(NIB_DATA), item)
    assert info.value.reason == "not_3d"
    frames = nifti.open_frames(str(NIB_DATA), item)
    assert len(frames) == img.shape[3] == 2
    canonical = nib.as_closest_canonical(img).get_fdata()  # (x, y, z, t)
    for k, volume in enumerate(frames):
        reference = canonical[..., k].transpose(2, 1, 0)
        data = read_all(volume, slab=5)
        assert volume.shape == reference.shape == (24, 96, 128)
        np.testing.assert_array_equal(data, reference.astype(np.float32))
        assert (data.min(), data.max()) == (reference.min(), reference.max())
        assert volume.spacing == pytest.approx((2.2, 2.0, 2.0), rel=1e-5)
        assert volume.attrs["frame"] == k and volume.attrs["n_frames"] == 2
    with pytest.raises(ValueError, match="frame=2 out of range"):
        nifti.open_item(str(NIB_DATA), item, frame=2)
    with pytest.raises(ValueError, match="expected frame=None"):
        nifti.open_item(str(NIB_DATA), _item("anatomical.nii"), frame=0)


def test_every_stored_orientation_reads_back_as_the_same_canonical_volume(good):
    root, expected = good
    orientations = set()
    for key, want in expected.items():
        volume = nifti.open_item(str(root), _item(key))
        data = read_all(volume, slab=2)
        assert volume.shape == want.volume.shape, key
        np.testing.assert_array_equal(data, want.volume, err_msg=key)
        assert volume.spacing == pytest.approx(want.spacing, rel=1e-6), key
        orientations.add(volume.attrs["orientation"])
    assert {"RAS", "LAS", "LPS", "PIR", "SLA"} <= orientations


def test_flipped_affine_reads_equal_to_the_canonical_file(good):
    root, _ = good
    canonical = read_all(nifti.open_item(str(root), _item("ras.nii")))
    for key in ("flipped_las.nii", "flipped_lps.nii.gz", "sub/permuted_pir.nii"):
        volume = nifti.open_item(str(root), _item(key))
        np.testing.assert_array_equal(read_all(volume), canonical, err_msg=key)
        # the same voxel of the canonical array lies at the same world point whatever the file order
        np.testing.assert_allclose(
            volume.attrs["affine_dhw"], nifti.open_item(str(root), _item("ras.nii")).attrs["affine_dhw"]
        )


def test_single_slice_images_are_one_by_h_by_w(good):
    root, expected = good
    for key in ("plane_2d.nii", "sagittal_slice.nii"):
        volume = nifti.open_item(str(root), _item(key))
        assert volume.shape[0] == 1, key
        np.testing.assert_array_equal(volume.read(0, 1), expected[key].volume)


@pytest.mark.parametrize("slab", [1, 2, 3, 4, 7])
def test_slabs_concatenate_to_the_whole_volume(good, slab):
    root, expected = good
    for key in ("ras.nii", "flipped_lps.nii.gz", "sub/permuted_sla.nii"):
        volume = nifti.open_item(str(root), _item(key))
        whole = volume.read(0, volume.shape[0])
        np.testing.assert_array_equal(read_all(volume, slab=slab), whole)
        np.testing.assert_array_equal(whole, expected[key].volume)
    assert volume.read(2, 2).shape == (0, *volume.shape[1:])
    with pytest.raises(ValueError, match="expected 0 <= z0 <= z1 <= 5"):
        volume.read(3, 6)


def test_reading_a_slab_of_an_uncompressed_file_does_not_load_the_volume(tmp_path):
    data = np.random.default_rng(0).normal(size=(64, 64, 128)).astype(np.float32)  # 2 MiB
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "big.nii")
    volume = nifti.open_item(str(tmp_path), _item("big.nii"))
    tracemalloc.start()
    try:
        slab = volume.read(10, 12)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(slab, data[:, :, 10:12].transpose(2, 1, 0))
    assert peak < data.nbytes / 16, f"reading 2 of 128 slices peaked at {peak} bytes"


def test_discover_lists_nifti_files_by_relative_posix_path(good, tmp_path):
    root, expected = good
    (root / "README.txt").write_text("not an image")
    (root / ".hidden.nii").write_bytes(b"")
    os.symlink(root, root / "loop")  # a link back into the source: walked once, no cycle
    try:
        items = nifti.discover(str(root))
    finally:
        (root / "loop").unlink()
    assert [i.key for i in items] == sorted(expected)
    assert all(i.format == "nifti" and i.paths == (i.key,) for i in items)
    with pytest.raises(FileNotFoundError, match="expected a directory"):
        nifti.discover(str(tmp_path / "absent"))


def test_a_link_inside_the_source_is_read(good):
    root, expected = good
    os.symlink(root / "ras.nii", root / "link_to_ras.nii")
    try:
        volume = nifti.open_item(str(root), _item("link_to_ras.nii"))
        np.testing.assert_array_equal(read_all(volume), expected["ras.nii"].volume)
    finally:
        (root / "link_to_ras.nii").unlink()


def test_every_bad_file_is_quarantined_with_its_reason_and_name(bad):
    root, expected = bad
    assert len(expected) >= 14
    items = {i.key: i for i in nifti.discover(str(root))}
    assert set(items) == set(expected)
    wrong = []
    for key, reason in expected.items():
        error = quarantine_of(nifti, root, items[key])
        if error is None or error.reason != reason or key not in str(error):
            wrong.append((key, reason, error and error.reason, str(error)))
    assert not wrong, wrong


def test_header_problems_are_found_at_open_before_any_read(bad):
    root, _ = bad
    for key, reason, match in [
        ("huge.nii", "too_large", r"huge\.nii: header declares shape \(10000, 10000, 10000\)"),
        ("truncated.nii", "truncated", r"truncated\.nii: file is 452 bytes; the header declares 1696"),
        ("fourd.nii", "not_3d", r"fourd\.nii: shape \(4, 4, 3, 2\) is 4D"),
        ("escape.nii", "outside_source", r"escape\.nii: resolves to .*outside the source"),
    ]:
        with pytest.raises(QuarantineError, match=match) as info:
            nifti.open_item(str(root), _item(key))
        assert info.value.reason == reason


def test_nan_is_found_on_the_slab_that_holds_it(bad):
    root, _ = bad
    volume = nifti.open_item(str(root), _item("nan.nii"))  # NaN at x=2, y=3, z=5
    assert np.isfinite(volume.read(0, 5)).all()
    with pytest.raises(QuarantineError, match=r"nan\.nii: slab 5:6 holds 1 NaN/Inf") as info:
        volume.read(5, 6)
    assert info.value.reason == "not_finite"


def test_truncated_gzip_is_found_when_its_missing_part_is_read(bad):
    root, _ = bad
    volume = nifti.open_item(str(root), _item("truncated.nii.gz"))
    volume.read(0, 2)  # the first slices are in the half that is there
    with pytest.raises(QuarantineError, match=r"truncated\.nii\.gz: compressed data ends") as info:
        volume.read(0, volume.shape[0])
    assert info.value.reason == "truncated"


def test_a_non_nifti_item_is_a_caller_error():
    with pytest.raises(ValueError, match="expected a NIfTI item with one path"):
        nifti.open_item(str(NIB_DATA), SourceItem(format="dicom", paths=("a", "b"), key="x"))
