"""The archive: scan-ID validation, arrays, commit markers, quarantine, catalog."""

import numpy as np
import pytest

from pipelines.errors import ArchiveError, ScanIdError
from pipelines.store import Archive, CatalogRow, chunk_layout, validate_scan_id


@pytest.mark.parametrize("bad", ["../etc", "a/b", "..", ".", "", "x" * 129, "_meta", "scan id", "näme"])
def test_scan_ids_that_could_escape_or_hide_are_refused(bad):
    with pytest.raises(ScanIdError, match="invalid scan ID"):
        validate_scan_id(bad)


def test_archive_refuses_bad_scan_id_before_touching_a_path(tmp_path):
    a = Archive(str(tmp_path / "a"), create=True)
    with pytest.raises(ScanIdError, match=r"invalid scan ID '\.\./escape'"):
        a.write_array("../escape", "image", np.zeros((2, 8, 8), np.float32))
    assert not (tmp_path / "escape").exists() and not (tmp_path / "a" / "escape").exists()


def test_missing_archive_is_a_clear_error(tmp_path):
    with pytest.raises(ArchiveError, match=r"archive .*nope not found"):
        Archive(str(tmp_path / "nope"))


def test_arrays_round_trip_with_attrs_and_sharding(tmp_path):
    a = Archive(str(tmp_path / "a"), create=True)
    rng = np.random.default_rng(0)
    img = rng.random((10, 40, 48), dtype=np.float32)
    ksp = (rng.random((2, 10, 40, 48)) + 1j * rng.random((2, 10, 40, 48))).astype(np.complex64)
    a.write_array("s-1", "image", img, {"spacing": [1.0, 0.5, 0.5]})
    a.write_array("s-1", "kspace", ksp)
    a.write_array("s-1", "recon/zero_filled", img)
    assert np.array_equal(a.read_array("s-1", "image"), img)
    assert np.array_equal(a.read_array("s-1", "kspace"), ksp)
    arr = a.open_array("s-1", "kspace")
    assert arr.shards == (2, 10, 40, 48), "one scan's array must be one shard (one writer)"
    assert arr.attrs.asdict() == {} and a.open_array("s-1", "image").attrs["spacing"] == [1.0, 0.5, 0.5]
    with pytest.raises(ArchiveError, match="array 'labels' not found"):
        a.open_array("s-1", "labels")
    a.delete_array("s-1", "recon/zero_filled")
    assert not a.has_array("s-1", "recon/zero_filled") and a.has_array("s-1", "image")


def test_chunks_hold_whole_slices_and_shard_is_the_array():
    chunks, shards = chunk_layout((64, 256, 256), 4)
    assert chunks == (4, 256, 256) and shards == (64, 256, 256)
    chunks, shards = chunk_layout((5, 1024, 1024), 8)
    assert chunks == (1, 1024, 1024) and shards == (5, 1024, 1024)


def test_commit_markers_and_quarantine(tmp_path):
    a = Archive(str(tmp_path / "a"), create=True)
    assert not a.is_committed("simulate", "s1", "fp")
    a.quarantine("simulate", "s1", "ValueError: boom")
    assert a.quarantined("simulate") == {"s1": "ValueError: boom"}
    a.commit("simulate", "s1", "fp", {"n": 1})
    assert a.is_committed("simulate", "s1", "fp") and not a.is_committed("simulate", "s1", "other")
    assert a.quarantined("simulate") == {}, "a commit clears the scan's quarantine record"
    a.uncommit("simulate", "s1")
    assert a.commit_record("simulate", "s1") is None
    a.commit_stage("train", "fp2", {"model_uri": "models:/m/1"}, complete=False)
    assert a.stage_record("train")["outputs"] == {"model_uri": "models:/m/1"}
    assert a.stage_record("train")["complete"] is False


def test_catalog_round_trip_and_splits(tmp_path):
    a = Archive(str(tmp_path / "a"), create=True)
    rows = [
        CatalogRow("s1", "mri", (4, 8, 8), (1.0, 1.0, 1.0), "phantom", "abc", "train"),
        CatalogRow("s2", "mri", (4, 8, 8), (1.0, 1.0, 1.0), "phantom", "def", "test"),
        CatalogRow("s3", "mri", (4, 8, 8), (1.0, 1.0, 1.0), "phantom", "ghi", "test", status="failed"),
    ]
    a.write_catalog(rows)
    assert a.catalog() == rows
    assert a.scans("test") == ["s2"] and a.scans("all") == ["s1", "s2"]
    with pytest.raises(ScanIdError):
        a.write_catalog([CatalogRow("../x", "mri", (1,), (1.0,), "p", "c", "train")])
