"""The simulation stage: CT (parallel, fan, low dose), multi-coil MRI, slabs, layouts; recon from them."""

import uuid

import numpy as np
import pytest
import torch
import zarr

from operators.metrics import psnr
from operators.phantoms import random_ellipsoids
from pipelines.physics import Acquisition, ct_operator, sampled_columns
from pipelines.spec import CTSpec, MaskSpec, PipelineSpec, SimulateStage
from pipelines.store import Archive
from tests.pipelines.helpers import add_image, simulate
from tests.pipelines.test_stages import reconstructor

SHAPE = (5, 48, 48)


@pytest.fixture
def archive(tmp_path):
    a = Archive(str(tmp_path / "a"), create=True)
    add_image(a, "s0", random_ellipsoids(SHAPE, seed=0).image)
    return a


def _measured(archive):
    """Scan s0's measurements in operator layout, zero-filled: (D, H, W) one coil, (D, C, H, W) SENSE."""
    return Acquisition.from_archive(archive, "s0").read(archive, "s0").numpy()


def _sim(archive, **fields):
    stage = SimulateStage(kind="simulate", **fields)
    outcome = simulate(archive, "s0", stage, seed=3, fp=uuid.uuid4().hex)  # always simulate anew
    assert outcome.status == "done", outcome.error
    return stage, outcome.info


def test_ct_parallel_noiseless_equals_the_projector(archive):
    stage, _ = _sim(archive, modality="ct", ct=CTSpec(views=30))
    sino = archive.read_array("s0", "sinogram")
    op = ct_operator(stage.ct_spec, SHAPE[1:])
    assert sino.shape == (SHAPE[0], 30, 48) and sino.dtype == np.float32
    np.testing.assert_allclose(
        sino, op.forward(torch.from_numpy(archive.read_array("s0", "image"))).numpy(), rtol=1e-5, atol=1e-5
    )
    assert archive.open_array("s0", "sinogram").attrs["ct"]["views"] == 30


def test_ct_low_dose_is_seeded_noisy_and_fbp_reconstructs(archive):
    _sim(archive, modality="ct", ct=CTSpec(views=90, i0=1e4))
    noisy = archive.read_array("s0", "sinogram")
    _sim(archive, modality="ct", ct=CTSpec(views=90, i0=1e4))
    assert np.array_equal(noisy, archive.read_array("s0", "sinogram")), "same seed, same noise"
    _sim(archive, modality="ct", ct=CTSpec(views=90))
    clean = archive.read_array("s0", "sinogram")
    assert 0 < np.abs(noisy - clean).mean() < 0.2 * np.abs(clean).mean()
    rec = reconstructor(archive, ["fbp"])
    assert list(rec({"scan_id": np.array(["s0"])})["status"]) == ["done"]
    assert psnr(archive.read_array("s0", "recon/fbp"), archive.read_array("s0", "image")) > 22

    from pipelines.evaluate import comparison_figure

    fig = comparison_figure(archive, "s0", ["fbp"])
    titles = [ax.get_title() for ax in fig.axes]
    assert "sinogram (90 views)" in titles and any(t.startswith("fbp\nPSNR") for t in titles)


def test_ct_fan_beam_branch(archive):
    _sim(archive, modality="ct", ct=CTSpec(geometry="fan", views=60))
    acq = Acquisition.from_archive(archive, "s0")
    assert acq.measurement == "sinogram" and type(acq.op).__name__ == "FanBeam"
    assert archive.read_array("s0", "sinogram").shape == (SHAPE[0], 60, 72)


def test_multicoil_kspace_is_slice_first_and_rebuilds_the_same_operator(archive):
    _sim(archive, coils=4, mask=MaskSpec(acceleration=4), snr_db=None)
    stored = archive.open_array("s0", "kspace")
    assert stored.shape[:2] == (SHAPE[0], 4) and stored.attrs["axes"] == "D,C,H,W"
    maps = archive.read_array("s0", "coil_maps")
    assert maps.shape == (4, 48, 48)
    acq = Acquisition.from_archive(archive, "s0")
    assert acq.measurement == "kspace" and acq.coils == 4
    img = torch.from_numpy(archive.read_array("s0", "image"))
    np.testing.assert_allclose(_measured(archive), acq.op.forward(img).numpy(), rtol=1e-4, atol=1e-5)


def test_single_coil_reads_in_operator_layout(archive):
    _sim(archive, snr_db=None)
    acq = Acquisition.from_archive(archive, "s0")
    assert archive.open_array("s0", "kspace").shape[:2] == (SHAPE[0], 1)
    y = acq.read(archive, "s0", 1, 3)
    assert tuple(y.shape) == (2, 48, 48) and y.dtype == torch.complex64
    img = torch.from_numpy(archive.read_array("s0", "image"))
    np.testing.assert_allclose(y.numpy(), acq.op.forward(img[1:3]).numpy(), rtol=1e-4, atol=1e-5)


def test_slab_size_does_not_change_the_archive(archive):
    _sim(archive, coils=2, slab=2, snr_db=20)
    by_slab = archive.read_array("s0", "kspace")
    stored = archive.open_array("s0", "kspace")
    assert stored.shards is None and stored.chunks == (2, 2, 48, stored.shape[-1])  # one plain chunk per slab
    _sim(archive, coils=2, snr_db=20)
    np.testing.assert_array_equal(by_slab, archive.read_array("s0", "kspace"))


def test_small_images_are_read_once_and_big_ones_twice_with_the_same_result(archive, monkeypatch):
    import pipelines.simulate as simulate_module

    image = archive.reader("s0", "image")
    energy, kept = simulate_module.read_checked(image, 2)
    assert isinstance(kept, np.ndarray) and np.array_equal(kept, image.read())
    assert energy == pytest.approx(float(np.sum(image.read().astype(np.float64) ** 2)))
    energy_lazy, lazy = simulate_module.read_checked(image, 2, cache_bytes=kept.nbytes - 1)
    assert lazy is image and energy_lazy == energy

    _sim(archive, coils=2, slab=2, snr_db=20)
    cached = archive.read_array("s0", "kspace")
    monkeypatch.setattr(simulate_module, "IMAGE_CACHE_BYTES", 0)  # read twice, slab by slab
    _, lazy_again = simulate_module.read_checked(image, 2)
    assert lazy_again is image
    _sim(archive, coils=2, slab=2, snr_db=20)
    np.testing.assert_array_equal(cached, archive.read_array("s0", "kspace"))


@pytest.mark.parametrize("kind", ["random_1d", "equispaced_1d"])
def test_1d_masks_store_only_the_acquired_columns(archive, kind):
    _sim(archive, mask=MaskSpec(kind=kind, acceleration=4), snr_db=20)
    stored = archive.open_array("s0", "kspace")
    mask = archive.read_array("s0", "mask")
    cols = np.flatnonzero(mask[0])
    assert stored.attrs["layout"] == "columns" and stored.attrs["columns"] == cols.tolist()
    assert stored.shape == (SHAPE[0], 1, SHAPE[1], cols.size) and cols.size < SHAPE[2] // 2
    full = _measured(archive)
    assert full.shape == SHAPE
    np.testing.assert_array_equal(full[..., cols], archive.read_array("s0", "kspace")[:, 0])
    assert not full[..., np.setdiff1d(np.arange(SHAPE[2]), cols)].any()  # never acquired: zero
    assert np.abs(archive.read_array("s0", "kspace")).min() > 0  # every stored sample was acquired
    acq = Acquisition.from_archive(archive, "s0")
    np.testing.assert_array_equal(acq.read(archive, "s0", 1, 3).numpy(), full[1:3])  # a slab, zero-filled


def test_2d_masks_store_full_kspace(archive):
    _sim(archive, mask=MaskSpec(kind="poisson_disc", acceleration=4), snr_db=None)
    stored = archive.open_array("s0", "kspace")
    assert stored.attrs["layout"] == "full" and stored.shape == (SHAPE[0], 1, *SHAPE[1:])
    assert sampled_columns(archive.read_array("s0", "mask")) is None
    assert sampled_columns(np.ones((4, 4), bool)) is None  # fully sampled: nothing to save


def test_a_corrupt_column_layout_is_named(archive):
    from pipelines.errors import ArchiveError

    _sim(archive, snr_db=None)
    stored = zarr.open_array(zarr.storage.LocalStore(archive.uri), path="scans/s0/kspace", mode="r+")
    stored.attrs["columns"] = stored.attrs["columns"][:-1]
    message = r"scans/s0/kspace: stored with \d+ columns but its 'columns' attribute lists"
    with pytest.raises(ArchiveError, match=message):
        Acquisition.from_archive(archive, "s0")


def test_noise_level_matches_the_requested_snr(archive):
    _, info = _sim(archive, snr_db=20)
    ksp = _measured(archive)
    _sim(archive, snr_db=None)
    noise = ksp - _measured(archive)
    mask = archive.read_array("s0", "mask")
    sampled = noise[:, mask]
    assert np.std(sampled) == pytest.approx(info["noise_sigma"], rel=0.05)  # complex std: E|n|² = σ²
    assert np.std(sampled.real) == pytest.approx(info["noise_sigma"] / np.sqrt(2), rel=0.05)
    assert np.all(noise[:, ~mask] == 0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mask": {"acceleration": 0.5}}, r"(?s)mask\.acceleration.*greater than or equal to 1"),
        ({"mask": {"kind": "spiral"}}, r"(?s)mask\.kind.*random_1d"),
        ({"modality": "ct", "ct": {"i0": 0}}, r"(?s)ct\.i0.*greater than 0"),
        ({"modality": "mri", "ct": {"views": 10}}, r"'ct' settings given for modality 'mri'"),
    ],
)
def test_bad_simulation_settings_are_spec_errors(fields, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        SimulateStage.model_validate({"kind": "simulate", **fields})


def test_ct_pipeline_refuses_mri_methods():
    raw = {
        "name": "ct",
        "archive": {"path": "x"},
        "stages": [
            {"kind": "phantoms", "n_scans": 2, "shape": [8, 16, 16], "split": {"train": 1, "test": 1}},
            {"kind": "simulate", "modality": "ct"},
            {"kind": "recon", "methods": ["zero_filled", "fbp"]},
        ],
    }
    with pytest.raises(Exception, match=r"method 'zero_filled' does not apply to modality 'ct'.*'fbp'"):
        PipelineSpec.model_validate(raw)
