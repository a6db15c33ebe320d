"""fastMRI HDF5 reader: files written in the fastMRI layout read back as acquired, bad files quarantined.

The writer below builds files the way the fastMRI data set stores them (``kspace`` complex64
``(slices, coils, H, W)``, a ``mask`` over columns, ``reconstruction_rss`` centre-cropped to
320 x 320, an ISMRMRD XML header, file attributes including a hashed ``patient_id``), from a
brain phantom pushed through the SENSE model with birdcage coils and an equispaced 4x column
mask (fastMRI's ``EquispacedMaskFunc``).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from operators.brain import brain_phantom
from operators.coils import estimate_sensitivities
from operators.fft import fftc, ifftc
from operators.metrics import psnr
from operators.mri import birdcage_maps, sense
from operators.phantoms import random_ellipsoids
from operators.recon import reconstruct
from operators.transforms import on_grid
from pipelines.sources.base import QuarantineError, SourceItem
from pipelines.sources.fastmri import discover, header_geometry, open_item

GRID = (384, 336)  # (H, W) of k-space: read-out over-sampled like fastMRI's 640, phase 336 (fastMRI: 368)
RECON = (320, 320)  # fastMRI's reference grid
COILS = 8
FOV_MM = (264.0, 231.0, 5.0)  # encoded field of view x (read-out, H), y (phase, W), z (slice thickness)
PATIENT_ID = "a3f5c0ffee0123456789abcdef0123456789abcdef0123456789abcdef012345"

HEADER = """<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD" xmlns:xs="http://www.w3.org/2001/XMLSchema"
    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <studyInformation><studyTime>10:25:47</studyTime></studyInformation>
  <subjectInformation><patientName>Doe^Jane</patientName><patientID>PAT-778899</patientID></subjectInformation>
  <measurementInformation>
    <measurementID>45153_190184843_190184852_1058</measurementID>
    <patientPosition>HFS</patientPosition><protocolName>AX T1 POST</protocolName>
  </measurementInformation>
  <acquisitionSystemInformation>
    <systemVendor>SIEMENS</systemVendor><systemModel>Skyra</systemModel>
    <institutionName>Example Hospital</institutionName><receiverChannels>{coils}</receiverChannels>
  </acquisitionSystemInformation>
  <encoding>
    <encodedSpace>
      <matrixSize><x>{h}</x><y>{w}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{fx}</x><y>{fy}</y><z>{fz}</z></fieldOfView_mm>
    </encodedSpace>
    <reconSpace>
      <matrixSize><x>{rh}</x><y>{rw}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>220</x><y>220</y><z>{fz}</z></fieldOfView_mm>
    </reconSpace>
    <encodingLimits>
      <kspace_encoding_step_1><minimum>0</minimum><maximum>{wmax}</maximum><center>{wc}</center></kspace_encoding_step_1>
    </encodingLimits>
    <trajectory>cartesian</trajectory>
  </encoding>
</ismrmrdHeader>
"""


def equispaced_mask(w: int, acceleration: int, center_fraction: float, seed: int) -> np.ndarray:
    """fastMRI's ``EquispacedMaskFunc`` for ``w`` columns: every ``R``-th column from a seeded offset,
    and the ``round(w · center_fraction)`` central columns. Float32 ``(W,)`` as fastMRI's mask."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(w, dtype=np.float32)
    mask[int(rng.integers(0, acceleration)) :: acceleration] = 1
    n_low = round(w * center_fraction)
    pad = (w - n_low + 1) // 2
    mask[pad : pad + n_low] = 1
    return mask


@dataclass(frozen=True)
class Written:
    """What :func:`write_fastmri_file` put in a file (the ground truth of the tests)."""

    path: Path
    kspace: np.ndarray  # as stored: complex64 (D, C, H, W) or (D, H, W), masked
    mask: np.ndarray  # bool (W,)
    reference: np.ndarray  # float32 (D, *recon)


def write_fastmri_file(
    path: Path,
    image: np.ndarray,
    *,
    coils: int = COILS,
    acceleration: int = 4,
    center_fraction: float = 0.08,
    seed: int = 0,
    noise: float = 0.002,
    recon: tuple[int, int] = RECON,
    mask_dtype: type = np.float32,
) -> Written:
    """Write ``image`` ``(D, H, W)`` as a fastMRI file: multi-coil (``coils > 1``) or single-coil.

    Multi-coil: ``kspace = M ⊙ (Fc(S_c ⊙ image) + noise)`` with birdcage maps, reference
    ``reconstruction_rss`` = the centre crop of the RSS of the fully sampled coil images.
    Single-coil: ``kspace = M ⊙ (Fc(image) + noise)``, reference ``reconstruction_esc`` = the
    crop of ``|Fcᴴ(full k-space)|``. The noise is complex Gaussian of standard deviation ``noise``.
    """
    d, h, w = image.shape
    x = torch.from_numpy(image).to(torch.complex64)  # (D, H, W)
    g = torch.Generator().manual_seed(seed)
    if coils > 1:
        full = fftc(x.unsqueeze(1) * birdcage_maps((h, w), coils), 2)  # (D, C, H, W)
    else:
        full = fftc(x, 2)  # (D, H, W)
    full = full + noise * torch.randn(full.shape, generator=g, dtype=torch.complex64)
    images = ifftc(full, 2)
    rss = images.abs().pow(2).sum(1).sqrt() if coils > 1 else images.abs()  # (D, H, W)
    reference = np.ascontiguousarray(on_grid(rss.numpy(), recon)).astype(np.float32)  # (D, *recon)
    mask = equispaced_mask(w, acceleration, center_fraction, seed)  # (W,)
    kspace = (full * torch.from_numpy(mask)).numpy().astype(np.complex64)  # zero in unsampled columns
    header = HEADER.format(
        coils=coils, h=h, w=w, fx=FOV_MM[0], fy=FOV_MM[1], fz=FOV_MM[2], rh=recon[0], rw=recon[1],
        wmax=w - 1, wc=w // 2,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=kspace)
        f.create_dataset("mask", data=mask.astype(mask_dtype))
        f.create_dataset("reconstruction_rss" if coils > 1 else "reconstruction_esc", data=reference)
        f.create_dataset("ismrmrd_header", data=header.encode())  # a scalar bytes string, as fastMRI
        f.attrs["acquisition"] = "AXT1POST" if coils > 1 else "CORPD_FBK"
        f.attrs["max"] = float(reference.max())
        f.attrs["norm"] = float(np.linalg.norm(reference))
        f.attrs["patient_id"] = PATIENT_ID
    return Written(path, kspace, mask != 0, reference)


def _open(path: Path, root: Path | None = None) -> object:
    root = path.parent if root is None else root
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    return open_item(str(root), SourceItem("fastmri", (rel,), rel))


@pytest.fixture(scope="module")
def brain_file(tmp_path_factory: pytest.TempPathFactory) -> Written:
    """A 2-slice, 8-coil brain file on a (384, 336) k-space grid, the head inside the 320 x 320 centre."""
    head = brain_phantom((8, *RECON), seed=0).image[3:5]  # (2, 320, 320), two central slices
    image = np.zeros((2, *GRID), dtype=np.float32)
    top, left = (GRID[0] - RECON[0]) // 2, (GRID[1] - RECON[1]) // 2
    image[:, top : top + RECON[0], left : left + RECON[1]] = head  # read-out over-sampling: empty margins
    return write_fastmri_file(
        tmp_path_factory.mktemp("fastmri") / "multicoil" / "file_brain_AXT1POST_001.h5", image
    )


def _small_image(d: int = 2, shape: tuple[int, int] = (48, 40), seed: int = 1) -> np.ndarray:
    return random_ellipsoids((max(d, 8), *shape), seed).image[:d]  # (D, H, W)


# -- discovery -------------------------------------------------------------------------------------
def test_discover_lists_every_h5_file_by_its_relative_posix_path(tmp_path: Path) -> None:
    for rel in ("b/scan2.h5", "a.h5", "b/c/scan3.h5", "notes.txt", "b/scan.nii"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    items = discover(str(tmp_path))
    assert [i.key for i in items] == ["a.h5", "b/c/scan3.h5", "b/scan2.h5"]
    assert all(i.format == "fastmri" and i.paths == (i.key,) for i in items)


# -- reading ---------------------------------------------------------------------------------------
def test_multicoil_file_reads_as_the_acquired_kspace(brain_file: Written) -> None:
    vol = _open(brain_file.path)
    assert vol.shape == (2, COILS, *GRID) and vol.dtype == np.complex64 and vol.modality == "mri"
    whole = vol.read(0, 2)
    assert whole.shape == (2, COILS, *GRID) and whole.dtype == np.complex64
    np.testing.assert_array_equal(whole, brain_file.kspace)
    mask = vol.extra["mask"]
    assert mask.dtype == bool and mask.shape == (GRID[1],)
    np.testing.assert_array_equal(mask, brain_file.mask)
    assert 0.25 <= mask.mean() <= 0.35  # 4x plus the centre
    reference = vol.extra["reference"]
    assert reference.dtype == np.float32 and reference.shape == (2, *RECON)
    np.testing.assert_array_equal(reference, brain_file.reference)


def test_header_geometry_and_file_attributes_reach_attrs(brain_file: Written) -> None:
    vol = _open(brain_file.path)
    a = vol.attrs
    assert a["source_format"] == "fastmri" and a["coils"] == COILS and a["layout"] == "slices, coils, H, W"
    assert a["encoded_matrix"] == [GRID[0], GRID[1], 1] and a["recon_matrix"] == [*RECON, 1]
    assert a["encoded_fov_mm"] == list(FOV_MM) and a["recon_fov_mm"] == [220.0, 220.0, FOV_MM[2]]
    assert a["kspace_encoding_step_1"] == {"minimum": 0, "maximum": GRID[1] - 1, "center": GRID[1] // 2}
    assert a["acquisition"] == "AXT1POST" and a["mask_source"] == "dataset"
    assert a["reference"] == "reconstruction_rss"
    assert a["max"] == pytest.approx(float(brain_file.reference.max()))
    assert a["norm"] == pytest.approx(float(np.linalg.norm(brain_file.reference)))
    assert vol.spacing == pytest.approx((FOV_MM[2], FOV_MM[0] / GRID[0], FOV_MM[1] / GRID[1]))


def test_no_identifying_attribute_or_header_text_leaves_the_reader(brain_file: Written) -> None:
    attrs = _open(brain_file.path).attrs
    text = json.dumps(attrs)  # JSON-able, and nothing identifying in it
    assert "patient_id" not in attrs
    for secret in (
        PATIENT_ID,
        "Doe",
        "PAT-778899",
        "Example Hospital",
        "Skyra",
        "45153",
        "AX T1 POST",
        "10:25",
    ):
        assert secret not in text, secret


def test_slab_reads_equal_the_whole(brain_file: Written) -> None:
    vol = _open(brain_file.path)
    np.testing.assert_array_equal(np.concatenate([vol.read(0, 1), vol.read(1, 2)]), vol.read(0, 2))
    assert vol.read(1, 1).shape == (0, COILS, *GRID)
    with pytest.raises(ValueError, match=r"0 <= z0 <= z1 <= 2; found 1:3"):
        vol.read(1, 3)


def test_the_slab_reader_pickles_for_workers(brain_file: Written) -> None:
    reader = pickle.loads(pickle.dumps(_open(brain_file.path).reader))  # Ray ships it to workers
    np.testing.assert_array_equal(reader(1, 2), brain_file.kspace[1:2])


def test_mask_comes_from_the_nonzero_columns_without_a_mask_dataset(
    brain_file: Written, tmp_path: Path
) -> None:
    path = tmp_path / "no_mask.h5"
    shutil.copy(brain_file.path, path)
    with h5py.File(path, "a") as f:
        del f["mask"]
    vol = _open(path)
    np.testing.assert_array_equal(vol.extra["mask"], brain_file.mask)
    assert vol.attrs["mask_source"] == "kspace"


@pytest.mark.parametrize("dtype", [np.float32, bool])
def test_a_stored_mask_of_either_dtype_becomes_bool(tmp_path: Path, dtype: type) -> None:
    written = write_fastmri_file(tmp_path / "m.h5", _small_image(), coils=4, recon=(32, 32), mask_dtype=dtype)
    mask = _open(written.path).extra["mask"]
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, written.mask)


def test_single_coil_file(tmp_path: Path) -> None:
    written = write_fastmri_file(tmp_path / "singlecoil.h5", _small_image(3), coils=1, recon=(32, 32))
    vol = _open(written.path)
    assert vol.shape == (3, 48, 40) and vol.attrs["coils"] == 1 and vol.attrs["layout"] == "slices, H, W"
    np.testing.assert_array_equal(vol.read(0, 3), written.kspace)
    np.testing.assert_array_equal(vol.read(1, 3), written.kspace[1:3])
    assert vol.attrs["reference"] == "reconstruction_esc" and vol.attrs["acquisition"] == "CORPD_FBK"
    np.testing.assert_array_equal(vol.extra["reference"], written.reference)


def test_reference_grid_crop_follows_fastmri() -> None:
    x = np.arange(7 * 6).reshape(7, 6)
    np.testing.assert_array_equal(on_grid(x, (3, 2)), x[2:5, 2:4])  # offsets (7-3)//2, (6-2)//2
    assert on_grid(np.zeros((2, 384, 336)), RECON).shape == (2, *RECON)
    padded = on_grid(x, (8, 2))  # a grid larger than the image: zero rows at the end
    np.testing.assert_array_equal(padded[:7], x[:, 2:4])
    assert not padded[7:].any()


def test_header_geometry_with_and_without_namespace() -> None:
    plain = "<ismrmrdHeader><encoding><encodedSpace><matrixSize><x>640</x><y>368</y><z>1</z></matrixSize>"
    plain += "<fieldOfView_mm><x>280</x><y>161</y><z>4.5</z></fieldOfView_mm></encodedSpace></encoding>"
    plain += "</ismrmrdHeader>"
    spaced = plain.replace("<ismrmrdHeader>", '<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">')
    expected = {"encoded_matrix": [640, 368, 1], "encoded_fov_mm": [280.0, 161.0, 4.5]}
    assert header_geometry(plain) == expected and header_geometry(spaced.encode()) == expected
    assert header_geometry("<ismrmrdHeader/>") == {}
    with pytest.raises(ValueError, match="not well-formed XML"):
        header_geometry("<ismrmrdHeader><encoding>")
    with pytest.raises(ValueError, match="declares a DTD or entities"):
        header_geometry('<!DOCTYPE x [<!ENTITY a "aaaa">]><ismrmrdHeader>&a;</ismrmrdHeader>')


# -- quarantine ------------------------------------------------------------------------------------
def _write_datasets(path: Path, **datasets: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f.create_dataset(name, data=data)
    return path


@pytest.mark.parametrize(
    ("make", "reason", "match"),
    [
        (
            lambda p: _write_datasets(p, reconstruction_rss=np.zeros((2, 4, 4), np.float32)),
            "no_kspace",
            r"bad.h5: no 'kspace' dataset; .* found datasets \['reconstruction_rss'\]",
        ),
        (lambda p: p.write_text("not an HDF5 file"), "unreadable", r"bad.h5: not an HDF5 file"),
        (
            lambda p: _write_datasets(p, kspace=np.zeros((8, 8), np.complex64)),
            "unreadable",
            r"bad.h5: dataset 'kspace' must be complex \(slices, H, W\) single-coil or "
            r"\(slices, coils, H, W\) multi-coil .*found shape \(8, 8\), dtype complex64",
        ),
        (
            lambda p: _write_datasets(p, kspace=np.zeros((2, 8, 8), np.float32)),
            "unreadable",
            r"found shape \(2, 8, 8\), dtype float32",
        ),
        (
            lambda p: _write_datasets(
                p, kspace=np.ones((2, 8, 8), np.complex64), mask=np.ones(5, np.float32)
            ),
            "unreadable",
            r"dataset 'mask' must be a real column mask of 8 entries .*found shape \(5,\)",
        ),
        (
            lambda p: _write_datasets(
                p, kspace=np.ones((2, 8, 8), np.complex64), ismrmrd_header=b"<ismrmrdHeader"
            ),
            "unreadable",
            r"dataset 'ismrmrd_header': the ISMRMRD header is not well-formed XML",
        ),
    ],
    ids=["no_kspace", "not_hdf5", "wrong_rank", "not_complex", "bad_mask", "bad_header"],
)
def test_bad_files_are_quarantined_with_a_reason(tmp_path: Path, make, reason: str, match: str) -> None:
    path = tmp_path / "bad.h5"
    make(path)
    with pytest.raises(QuarantineError, match=match) as caught:
        _open(path)
    assert caught.value.reason == reason


def test_a_truncated_file_is_quarantined(tmp_path: Path) -> None:
    written = write_fastmri_file(tmp_path / "cut.h5", _small_image(), coils=2, recon=(32, 32))
    data = written.path.read_bytes()
    written.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(QuarantineError, match=r"cut.h5: the HDF5 file does not open") as caught:
        _open(written.path)
    assert caught.value.reason == "truncated"


def test_a_symlink_leaving_the_source_is_quarantined(tmp_path: Path, brain_file: Written) -> None:
    root = tmp_path / "source"
    root.mkdir()
    (root / "escape.h5").symlink_to(brain_file.path)
    items = discover(str(root))
    assert [i.key for i in items] == ["escape.h5"]  # found, so that it is reported, not silently skipped
    with pytest.raises(QuarantineError, match=r"escape.h5: resolves to .*outside the source") as caught:
        open_item(str(root), items[0])
    assert caught.value.reason == "outside_source"


# -- the bar: calibrated SENSE on the ingested k-space ----------------------------------------------
def test_cg_sense_with_estimated_maps_beats_zero_filled_on_the_reference_grid(brain_file: Written) -> None:
    """ESPIRiT maps from the file's own k-space, then CG-SENSE, against zero-filled RSS (fastMRI's baseline).

    Both are compared with the file's ``reconstruction_rss`` on its 320 x 320 grid, as fastMRI evaluates.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vol = _open(brain_file.path)
        kspace = torch.from_numpy(vol.read(0, vol.shape[0]))  # (D, C, H, W)
        mask = torch.from_numpy(vol.extra["mask"]).expand(vol.shape[-2], -1)  # (H, W), constant along H
        maps = estimate_sensitivities(kspace, mask=vol.extra["mask"])  # (D, C, H, W)
        recon = reconstruct("cg_sense", kspace, sense(mask, maps)).image.abs()  # (D, H, W)
    finally:
        torch.set_num_threads(threads)
    zero_filled = ifftc(kspace, 2).abs().pow(2).sum(1).sqrt()  # RSS of the zero-filled coil images, (D, H, W)
    reference = vol.extra["reference"]  # (D, 320, 320)
    p_zf = psnr(on_grid(zero_filled.numpy(), RECON), reference)
    p_cg = psnr(on_grid(np.asarray(recon), RECON), reference)
    print(f"PSNR on the 320 x 320 crop: cg_sense {p_cg:.2f} dB, zero-filled RSS {p_zf:.2f} dB")
    assert p_cg > p_zf + 3, (p_cg, p_zf)
    assert p_cg > 25, p_cg
