"""The simulation stage: CT (parallel, fan, low dose), multi-coil MRI, low resolution, slabs, layouts;
recon from them."""

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
        ({"modality": "ct", "lowres": {"factor": 2}}, r"'lowres' settings given for modality 'ct'.*lowres"),
        ({"modality": "lowres", "lowres": {"factor": 3}}, r"(?s)lowres\.factor.*Input should be 2 or 4"),
        ({"modality": "lowres", "snr_db": 30}, r"snr_db: 30.0 apply to modality 'mri'.*lowres: \{snr_db"),
        (
            {"modality": "lowres", "coils": 4, "mask": {"acceleration": 8}},
            r"mask: \{'kind': 'random_1d', 'acceleration': 8.0, .*\}, coils: 4 apply to modality 'mri'",
        ),
        ({"modality": "sar"}, r"(?s)modality.*'mri', 'ct' or 'lowres'"),
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


# -- low resolution ----------------------------------------------------------------------------------
def _lowres_pipeline(**changes) -> dict:
    stages = {
        "phantoms": {
            "kind": "phantoms",
            "n_scans": 2,
            "shape": [8, 16, 16],
            "split": {"train": 1, "test": 1},
        },
        "simulate": {"kind": "simulate", "modality": "lowres", "lowres": {"factor": 2}},
        "train": {"kind": "train", "model": {"name": "srcnn", "kwargs": {"factor": 2, "features": [4, 4]}}},
        "recon": {"kind": "recon", "methods": ["bicubic", "learned:train"]},
    }
    for kind, fields in changes.items():
        stages[kind] = {**stages[kind], **fields}
    return {"name": "sr", "archive": {"path": "x"}, "stages": list(stages.values())}


def test_lowres_is_the_mean_of_each_block_and_rebuilds_the_same_acquisition(archive):
    stage, info = _sim(archive, modality="lowres", lowres={"factor": 4}, slab=2)
    stored = archive.open_array("s0", "lowres")
    assert stored.shape == (SHAPE[0], 12, 12) and stored.dtype == np.float32
    assert stored.attrs["factor"] == 4 and stored.attrs["image_shape"] == [48, 48]
    assert info["factor"] == 4 and info["noise_sigma"] == 0
    image = archive.read_array("s0", "image")
    blocks = image.reshape(SHAPE[0], 12, 4, 12, 4).mean(axis=(2, 4))  # (D, 12, 12)
    np.testing.assert_allclose(archive.read_array("s0", "lowres"), blocks, rtol=1e-5, atol=1e-6)
    acq = Acquisition.from_archive(archive, "s0")
    assert (acq.modality, acq.measurement, acq.factor, acq.image_shape) == ("lowres", "lowres", 4, (48, 48))
    assert type(acq.op).__name__ == "Downsample" and acq.describe() == "LOWRES 48x48 down-sampled 4x to 12x12"
    y = acq.read(archive, "s0", 1, 3)
    assert tuple(y.shape) == (2, 12, 12) and y.dtype == torch.float32
    np.testing.assert_allclose(y.numpy(), blocks[1:3], rtol=1e-5, atol=1e-6)
    assert Acquisition.stack([acq, Acquisition.from_archive(archive, "s0")]) is acq.op


def test_lowres_noise_is_seeded_at_the_requested_snr(archive):
    _, info = _sim(archive, modality="lowres", lowres={"factor": 2, "snr_db": 20})
    noisy = archive.read_array("s0", "lowres")
    _sim(archive, modality="lowres", lowres={"factor": 2, "snr_db": 20}, slab=2)
    np.testing.assert_array_equal(noisy, archive.read_array("s0", "lowres"))  # seeded per slice, not per slab
    _sim(archive, modality="lowres", lowres={"factor": 2})
    noise = noisy - archive.read_array("s0", "lowres")
    image = archive.read_array("s0", "image").astype(np.float64)
    assert info["noise_sigma"] == pytest.approx(np.sqrt(np.mean(image**2)) / 10)  # 20 dB under the image RMS
    assert np.std(noise) == pytest.approx(info["noise_sigma"], rel=0.05)
    _sim(archive, modality="lowres", lowres={"factor": 2, "snr_db": 20})
    assert Acquisition.from_archive(archive, "s0").noise_sigma == pytest.approx(info["noise_sigma"])


def test_a_scan_simulated_again_with_another_modality_reads_the_committed_measurements(archive):
    _sim(archive, snr_db=None)
    _sim(archive, modality="lowres")
    assert archive.has_array("s0", "kspace"), "the old k-space is still there"
    assert Acquisition.from_archive(archive, "s0").modality == "lowres"


def test_a_factor_that_does_not_divide_the_image_fails_the_scan_and_names_the_setting(tmp_path):
    odd = Archive(str(tmp_path / "odd"), create=True)
    add_image(odd, "s0", random_ellipsoids((2, 18, 20), seed=0).image)
    stage = SimulateStage(kind="simulate", modality="lowres", lowres={"factor": 4})
    outcome = simulate(odd, "s0", stage)
    assert outcome.status == "failed"
    assert (
        "simulate stage 'simulate': lowres.factor must divide the slices' H and W; found factor 4 for "
        "(H, W) = (18, 20) (remainders 2 and 0)" in outcome.error
    )
    assert not odd.has_array("s0", "lowres")


def test_a_corrupt_lowres_factor_is_named(archive):
    from pipelines.errors import ArchiveError

    _sim(archive, modality="lowres")
    stored = zarr.open_array(zarr.storage.LocalStore(archive.uri), path="scans/s0/lowres", mode="r+")
    stored.attrs["factor"] = 5
    with pytest.raises(
        ArchiveError, match=r"scans/s0/lowres: attribute 'factor' is 5 for image_shape \(48, 48\)"
    ):
        Acquisition.from_archive(archive, "s0")


def test_bicubic_and_nearest_reconstruct_lowres_and_mri_methods_are_refused_per_scan(archive):
    _sim(archive, modality="lowres")
    rec = reconstructor(archive, ["nearest", "bicubic", "cs_tv", "zero_filled"], {"cs_tv": {"max_iter": 20}})
    out = rec({"scan_id": np.array(["s0"])})
    assert "method 'zero_filled' does not apply to LOWRES scan 's0'; it serves ['mri']" in out["error"][0]
    image = archive.read_array("s0", "image")
    scores = {m: psnr(archive.read_array("s0", f"recon/{m}"), image) for m in ("nearest", "bicubic", "cs_tv")}
    assert archive.read_array("s0", "recon/bicubic").shape == SHAPE
    assert scores["bicubic"] > scores["nearest"] > 20, scores

    from pipelines.evaluate import comparison_figure

    titles = [ax.get_title() for ax in comparison_figure(archive, "s0", ["bicubic"]).axes]
    assert "low-res input (24x24)" in titles and any(t.startswith("bicubic\nPSNR") for t in titles)


def test_a_lowres_pipeline_checks_methods_models_and_the_factor():
    spec = PipelineSpec.model_validate(_lowres_pipeline())
    assert PipelineSpec.model_validate(spec.model_dump(mode="json")) == spec  # `validate` prints this
    cases = [
        ({"recon": {"methods": ["zero_filled"]}},
         r"method 'zero_filled' does not apply to modality 'lowres'; expected any of \['nearest', 'bicubic'"),
        ({"simulate": {"lowres": {"factor": 4}}, "phantoms": {"shape": [8, 24, 18]}},
         r"lowres.factor must divide the slices' H and W; found factor 4 for \(H, W\) = \(24, 18\) from the "
         r"phantoms stage 'phantoms' shape \(remainders 0 and 2\)"),
        ({"simulate": {"lowres": {"factor": 4}}},
         r"model 'srcnn' up-samples by model.kwargs.factor = 2, but the simulate stage measures "
         r"lowres.factor = 4; set the model's factor to 4"),
        ({"train": {"model": {"name": "varnet", "kwargs": {}}}},
         r"model 'varnet' reconstructs modality 'mri'; this pipeline simulates 'lowres'. Train one of "
         r"\[.*'srcnn'.*\], or simulate modality: mri"),
        ({"simulate": {"modality": "mri", "lowres": None}, "recon": {"methods": ["learned:train"]}},
         r"model 'srcnn' reconstructs modality 'lowres'; this pipeline simulates 'mri'.*modality: lowres"),
    ]  # fmt: skip
    for changes, message in cases:
        with pytest.raises(Exception, match=message):
            PipelineSpec.model_validate(_lowres_pipeline(**changes))
    # a network that takes any operator trains on low resolution too
    PipelineSpec.model_validate(_lowres_pipeline(train={"model": {"name": "unet_post", "kwargs": {}}}))
