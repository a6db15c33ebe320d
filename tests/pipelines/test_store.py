"""The archive: scan-ID validation, arrays, layout version, commit records, quarantine, catalog."""

import json

import numpy as np
import pytest

from pipelines.errors import ArchiveError, ScanIdError
from pipelines.store import LAYOUT_VERSION, Archive, CatalogRow, chunk_layout, unit_of, validate_scan_id


@pytest.mark.parametrize("bad", ["../etc", "a/b", "..", ".", "", "x" * 129, "_meta", "scan id", "näme"])
def test_scan_ids_that_could_escape_or_hide_are_refused(bad):
    with pytest.raises(ScanIdError, match="invalid scan ID"):
        validate_scan_id(bad)


def test_archive_refuses_bad_scan_id_before_touching_a_path(tmp_path):
    a = Archive(str(tmp_path / "a"), create=True)
    with pytest.raises(ScanIdError, match=r"invalid scan ID '\.\./escape'"):
        a.write_array("../escape", "image", np.zeros((2, 8, 8), np.float32))
    assert not (tmp_path / "escape").exists() and not (tmp_path / "a" / "escape").exists()


def test_missing_archive_and_a_file_in_its_place_are_clear_errors(tmp_path):
    with pytest.raises(ArchiveError, match=r"archive .*nope not found"):
        Archive(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("not an archive")
    for create in (False, True):
        with pytest.raises(ArchiveError, match=r"archive path .*file is a file; expected a directory"):
            Archive(str(tmp_path / "file"), create=create)


def test_an_archive_of_another_layout_version_is_refused_naming_both(tmp_path):
    Archive(str(tmp_path / "a"), create=True)
    meta = tmp_path / "a" / "zarr.json"
    assert json.loads(meta.read_text())["attributes"]["medrecon"]["layout_version"] == LAYOUT_VERSION
    meta.write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))  # as before v2
    with pytest.raises(
        ArchiveError, match=r"written in layout version 1 .*\(C, D, H, W\).*reads layout version 2"
    ):
        Archive(str(tmp_path / "a"))


def test_arrays_round_trip_with_attrs_records_and_sharding(tmp_path):
    a = Archive(str(tmp_path / "a"), create=True)
    rng = np.random.default_rng(0)
    img = rng.random((10, 40, 48), dtype=np.float32)
    rec = a.write_array("s-1", "image", img, {"spacing": [1.0, 0.5, 0.5]})
    assert (
        rec["shape"] == [10, 40, 48]
        and rec["dtype"] == "float32"
        and len(rec["crc32"]) == -(-10 // rec["slab"])
    )
    a.commit("source", "s-1", "fp", arrays={"image": rec})
    assert np.array_equal(a.read_array("s-1", "image"), img)
    assert np.array_equal(a.read_array("s-1", "image", 3, 5), img[3:5])
    arr = a.open_array("s-1", "image")
    assert arr.shards[0] >= 10, "one scan's array must be one shard (one writer)"
    assert a.open_array("s-1", "image").attrs["spacing"] == [1.0, 0.5, 0.5]
    with pytest.raises(ArchiveError, match="array 'labels' not found"):
        a.open_array("s-1", "labels")
    a.delete_array("s-1", "image")
    assert not a.has_array("s-1", "image")


def test_uncommitted_arrays_are_not_read(tmp_path):
    a = Archive(str(tmp_path / "a"), create=True)
    a.write_array("s1", "image", np.ones((2, 4, 4), np.float32))
    with pytest.raises(ArchiveError, match=r"scans/s1/image: no commit records it .*unit 'source'"):
        a.read_array("s1", "image")


def test_arrays_belong_to_units():
    assert unit_of("image") == unit_of("labels") == "source"
    assert (
        unit_of("kspace") == unit_of("mask") == unit_of("coil_maps") == unit_of("sinogram") == "measurements"
    )
    assert unit_of("recon/cs_tv") == "recon/cs_tv"
    with pytest.raises(ArchiveError, match="belongs to no commit unit"):
        unit_of("whatever")


def test_chunks_hold_whole_slices_and_shard_is_the_array():
    chunks, shards = chunk_layout((64, 256, 256), 4)
    assert chunks == (4, 256, 256) and shards == (64, 256, 256)
    chunks, shards = chunk_layout((5, 1024, 1024), 8)
    assert chunks == (1, 1024, 1024) and shards == (5, 1024, 1024)


def test_commit_records_and_quarantine(tmp_path):
    a = Archive(str(tmp_path / "a"), create=True)
    assert not a.is_committed("measurements", "s1", "fp")
    a.quarantine("measurements", "s1", "ValueError: boom", stage="simulate")
    assert a.quarantined("measurements") == {"s1": "ValueError: boom"}
    assert a.quarantine_record("measurements", "s1")["stage"] == "simulate"
    a.commit("measurements", "s1", "fp", {"n": 1})
    assert a.is_committed("measurements", "s1", "fp") and not a.is_committed("measurements", "s1", "other")
    assert a.quarantined("measurements") == {}, "a commit clears the scan's quarantine record"
    a.commit("recon/cs_tv", "s1", "fp-tv")
    assert a.committed("recon/cs_tv") == {"s1": "fp-tv"}
    assert a.units() == ["measurements", "recon/cs_tv"]
    a.uncommit("measurements", "s1")
    assert a.commit_record("measurements", "s1") is None


def test_stage_records_give_each_units_current_fingerprint(tmp_path):
    a = Archive(str(tmp_path / "a"), create=True)
    a.commit_stage("model", "fp2", {"model_uri": "models:/m/1"}, kind="train", complete=False)
    assert a.stage_record("model")["outputs"] == {"model_uri": "models:/m/1"}
    assert a.stage_record("model")["complete"] is False
    a.commit_stage("recon", "r1", kind="recon", units={"recon/cs_tv": "u1", "recon/zero_filled": "z1"})
    a.commit_stage("reprocess", "r2", kind="recon", units={"recon/cs_tv": "u2"})
    assert a.current_fingerprints() == {"recon/cs_tv": "u2", "recon/zero_filled": "z1"}
    assert set(a.stage_records()) == {"model", "recon", "reprocess"}


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
