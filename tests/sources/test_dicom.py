"""DICOM reader and de-identification: pydicom's own files, series geometry, slabs, quarantine, no PHI."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import keyword_dict

from pipelines.sources import dicom
from pipelines.sources.base import SourceItem
from pipelines.sources.deid import (
    BASIC_PROFILE_KEYWORDS,
    DeidKeyError,
    PhiLeakError,
    assert_no_phi,
    keyed_scan_id,
    load_secret,
)
from pipelines.store import validate_scan_id
from tests.sources.corpus import PHI_STRINGS, bad_corpus_of, quarantine_of, read_all, write_good_dicom

#: Keys the reader computes; every other key of attrs must be a whitelisted DICOM keyword.
COMPUTED = {
    "source_format",
    "spacing",
    "axes",
    "affine_dhw",
    "n_files",
    "multiframe",
    "positions_from",
    "rescale_per_slice",
}
SECRET = b"0123456789abcdef-test-secret"


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """pydicom's CT_small.dcm and MR_small.dcm copied into one source folder."""
    root = tmp_path_factory.mktemp("pydicom_samples")
    datasets = {}
    for name in ("CT_small.dcm", "MR_small.dcm"):
        path = get_testdata_file(name, download=False)
        shutil.copy(path, root / name)
        datasets[name] = pydicom.dcmread(path)
    return root, datasets


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom_good")
    return root, write_good_dicom(root)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return bad_corpus_of(tmp_path_factory.mktemp("corpus"), "dicom")


def _by_path(root) -> dict[str, SourceItem]:
    return {item.paths[0]: item for item in dicom.discover(str(root))}


def test_ct_small_reads_in_hounsfield_units_like_pydicom(samples):
    root, datasets = samples
    ds = datasets["CT_small.dcm"]
    item = _by_path(root)["CT_small.dcm"]
    assert item.key == f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}"
    volume = dicom.open_item(str(root), item)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # (128, 128)
    data = volume.read(0, 1)
    assert volume.shape == (1, 128, 128) and data.dtype == np.float32
    np.testing.assert_array_equal(data[0], hu.astype(np.float32))
    assert (data.min(), data.max()) == (hu.min(), hu.max()) == (-896.0, 1167.0)
    assert volume.spacing == pytest.approx((float(ds.SliceThickness), *map(float, ds.PixelSpacing)))
    assert volume.modality == "ct"
    assert volume.attrs["RescaleIntercept"] == -1024.0 and volume.attrs["Modality"] == "CT"


def test_mr_small_reads_like_pydicom(samples):
    root, datasets = samples
    ds = datasets["MR_small.dcm"]
    volume = dicom.open_item(str(root), _by_path(root)["MR_small.dcm"])
    data = volume.read(0, 1)
    assert volume.shape == (1, 64, 64)
    np.testing.assert_array_equal(data[0], ds.pixel_array.astype(np.float32))
    assert (data.min(), data.max()) == (ds.pixel_array.min(), ds.pixel_array.max())
    assert volume.spacing == pytest.approx((0.8, 0.3125, 0.3125))
    assert volume.modality == "mri" and volume.attrs["EchoTime"] == 240.0


def test_good_series_read_back_sorted_along_the_slice_normal(good):
    root, expected = good
    items = {i.key: i for i in dicom.discover(str(root))}
    assert set(items) == set(expected)
    for key, want in expected.items():
        volume = dicom.open_item(str(root), items[key])
        assert volume.shape == want.volume.shape, key
        np.testing.assert_array_equal(read_all(volume, slab=2), want.volume, err_msg=key)
        assert volume.spacing == pytest.approx(want.spacing), key
        assert volume.modality == want.modality, key


def test_discover_sorts_paths_along_the_normal_not_by_name(good):
    root, _ = good
    ct = next(i for i in dicom.discover(str(root)) if i.paths[0].startswith("ct/"))
    z = [float(pydicom.dcmread(root / p, stop_before_pixels=True).ImagePositionPatient[2]) for p in ct.paths]
    assert z == sorted(z) and len(z) == 6
    assert list(ct.paths) != sorted(ct.paths)  # the names are shuffled on purpose


def test_multiframe_frames_become_slices(good):
    root, expected = good
    by_path = _by_path(root)
    enhanced = dicom.open_item(str(root), by_path["enhanced/multiframe.dcm"])
    assert enhanced.attrs["multiframe"] and enhanced.attrs["positions_from"] == "per_frame_functional_groups"
    assert enhanced.attrs["rescale_per_slice"] and "RescaleIntercept" not in enhanced.attrs
    legacy = dicom.open_item(str(root), by_path["legacy/ct_multiframe.dcm"])
    assert legacy.attrs["positions_from"] == "spacing_between_slices" and legacy.spacing[0] == 1.5
    assert legacy.attrs["axes"] == "IAL"  # IOP (1,0,0),(0,-1,0): normal -z, rows go anterior, columns left


@pytest.mark.parametrize("slab", [1, 2, 4, 6])
def test_slabs_concatenate_to_the_whole_volume(good, slab):
    root, expected = good
    for item in dicom.discover(str(root)):
        volume = dicom.open_item(str(root), item)
        np.testing.assert_array_equal(read_all(volume, slab=slab), volume.read(0, volume.shape[0]))


def test_a_slab_reads_only_the_files_of_its_slices(good, tmp_path):
    source, expected = good
    root = tmp_path / "copy"
    shutil.copytree(source / "ct", root / "ct")
    item = next(i for i in dicom.discover(str(root)))
    volume = dicom.open_item(str(root), item)
    for k, rel in enumerate(item.paths):
        if k not in (2, 3):
            (root / rel).unlink()
    np.testing.assert_array_equal(volume.read(2, 4), expected[item.key].volume[2:4])
    error = quarantine_of(dicom, root, item)
    assert error is not None and error.reason == "unreadable" and item.paths[0] in str(error)


def test_every_bad_item_is_quarantined_with_its_reason_and_a_file_name(bad):
    root, expected = bad
    assert len(expected) >= 17
    items = {i.key: i for i in dicom.discover(str(root))}
    assert set(items) == set(expected)
    wrong = []
    for key, reason in expected.items():
        error = quarantine_of(dicom, root, items[key])
        names_a_file = error is not None and any(path in str(error) for path in items[key].paths)
        if error is None or error.reason != reason or not names_a_file:
            wrong.append((key, reason, error and error.reason, str(error)))
    assert not wrong, wrong


def test_quarantine_messages_carry_no_phi(bad):
    root, _ = bad
    for item in dicom.discover(str(root)):
        message = str(quarantine_of(dicom, root, item))
        assert not [s for s in PHI_STRINGS if s in message], message
        assert not re.search(r"\d+(\.\d+){4,}", message), message  # no UID


def test_no_phi_string_uid_or_unlisted_attribute_leaves_the_reader(good, samples):
    root, _ = good
    volumes = [dicom.open_item(str(root), i) for i in dicom.discover(str(root))]
    sample_root, datasets = samples
    volumes += [dicom.open_item(str(sample_root), i) for i in dicom.discover(str(sample_root))]
    planted = list(PHI_STRINGS)
    for ds in datasets.values():  # what the library files carry
        planted += [str(ds.get(k)) for k in ("PatientName", "PatientID", "InstitutionName") if ds.get(k)]
        planted += [str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)]
    for volume in volumes:
        text = json.dumps(volume.attrs)
        assert not [s for s in planted if s in text], text
        assert set(volume.attrs) <= set(dicom.ATTRIBUTE_WHITELIST) | COMPUTED
        for item in dicom.discover(str(root)):
            for uid in item.key.split("/"):
                assert uid not in text
        assert_no_phi(volume.attrs)


def test_whitelist_and_basic_profile_are_real_disjoint_keywords():
    assert len(BASIC_PROFILE_KEYWORDS) >= 40
    assert not set(dicom.ATTRIBUTE_WHITELIST) & BASIC_PROFILE_KEYWORDS
    unknown = [k for k in (*dicom.ATTRIBUTE_WHITELIST, *BASIC_PROFILE_KEYWORDS) if k not in keyword_dict]
    assert not unknown
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName"):
        assert keyword in BASIC_PROFILE_KEYWORDS
    assert {
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "StudyDescription",
        "SeriesDescription",
    } <= BASIC_PROFILE_KEYWORDS


def test_assert_no_phi_refuses_profile_keywords_uids_at_any_depth():
    assert_no_phi({"Modality": "CT", "spacing": [1.0, 0.5, 0.5], "nested": {"EchoTime": 3.0}})
    for attrs, match in [
        ({"PatientName": "x"}, r"attrs\['PatientName'\] is an identifying"),
        ({"a": [{"InstitutionName": "x"}]}, r"attrs\['a'\]\[0\]\['InstitutionName'\]"),
        ({"SomethingUID": "x"}, "SomethingUID"),
        ({"note": "1.2.840.10008.5.1.4"}, r"attrs\['note'\] holds a DICOM UID-shaped value"),
    ]:
        with pytest.raises(PhiLeakError, match=match):
            assert_no_phi(attrs)


def test_keyed_scan_id_is_deterministic_keyed_and_a_valid_scan_id():
    key = "1.2.3.4/1.2.3.5"
    first = keyed_scan_id(key, SECRET)
    assert first == keyed_scan_id(key, SECRET)
    assert re.fullmatch(r"dcm-[0-9a-f]{20}", first)
    assert validate_scan_id(first) == first
    assert keyed_scan_id(key, SECRET + b"!") != first
    assert keyed_scan_id("1.2.3.4/1.2.3.6", SECRET) != first
    assert keyed_scan_id(key, SECRET, prefix="ct.v2").startswith("ct.v2-")
    assert "1.2.3" not in first
    with pytest.raises(DeidKeyError, match="expected bytes of length >= 16, found 5 bytes"):
        keyed_scan_id(key, b"short")
    with pytest.raises(ValueError, match="prefix '../x'"):
        keyed_scan_id(key, SECRET, prefix="../x")


def test_load_secret_from_environment_or_key_file(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDRECON_DEID_KEY", "environment-secret-0123")
    assert load_secret() == b"environment-secret-0123"
    key_file = tmp_path / "deid.key"
    key_file.write_text("file-secret-0123456789\n")
    assert load_secret(key_file=str(key_file)) == b"file-secret-0123456789"  # explicit file wins
    monkeypatch.delenv("MEDRECON_DEID_KEY")
    assert load_secret(key_file=str(key_file)) == b"file-secret-0123456789"


def test_load_secret_errors_say_how_to_provide_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDRECON_DEID_KEY", raising=False)
    with pytest.raises(
        DeidKeyError, match=r"\$MEDRECON_DEID_KEY is unset.*set the environment variable.*key_file="
    ):
        load_secret()
    monkeypatch.setenv("MY_KEY", "tooshort")
    with pytest.raises(DeidKeyError, match=r"from \$MY_KEY is 8 bytes; expected at least 16") as info:
        load_secret("MY_KEY")
    assert "tooshort" not in str(info.value)
    with pytest.raises(DeidKeyError, match=r"key file '.*absent\.key' cannot be read"):
        load_secret(key_file=str(tmp_path / "absent.key"))
    assert issubclass(DeidKeyError, ValueError)
