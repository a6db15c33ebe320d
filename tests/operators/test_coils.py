"""ESPIRiT coil sensitivities: they recover known maps, model the data, and make CG-SENSE work."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from operators.coils import acs_lines, estimate_sensitivities, sampled_columns
from operators.errors import DTypeError, ParameterError, ShapeError
from operators.fft import fftc, ifftc
from operators.masks import center_slice, equispaced_1d
from operators.metrics import psnr
from operators.mri import birdcage_maps, sense
from operators.phantoms import random_ellipsoids
from operators.recon import reconstruct

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/operators/conftest.py

SHAPE = (256, 224)  # (H, W): W the under-sampled (column) axis, as in fastMRI
COILS = 8
NOISE = 0.002  # complex Gaussian k-space noise per sample (the image peaks near 1)


@dataclass(frozen=True)
class Acquisition:
    """One simulated multi-coil slice: ``y = M ⊙ Fc(S ⊙ x) + noise``."""

    image: torch.Tensor  # complex (H, W), with a smooth phase
    maps: torch.Tensor  # true sensitivities, complex (C, H, W), Σ_c |S_c|² = 1
    mask: torch.Tensor  # bool (H, W), constant along H
    clean: torch.Tensor  # fully sampled noise-free k-space, complex (C, H, W)
    kspace: torch.Tensor  # measured k-space, complex (C, H, W), zero in unsampled columns
    inside: torch.Tensor  # bool (H, W): the object


def _acquire(shape: tuple[int, int], seed: int, center_fraction: float = 0.08) -> Acquisition:
    h, w = shape
    magnitude = torch.from_numpy(random_ellipsoids((8, h, w), seed).image[4])  # (H, W)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    image = torch.polar(magnitude, 0.8 * xx + 0.5 * yy**2)  # a smooth image phase, like real scans
    maps = birdcage_maps(shape, COILS)
    clean = fftc(maps * image, 2)  # (C, H, W)
    g = torch.Generator().manual_seed(seed)
    noisy = clean + NOISE * torch.randn(clean.shape, generator=g, dtype=torch.complex64)
    mask = equispaced_1d(shape, acceleration=4, center_fraction=center_fraction, seed=seed)  # (H, W)
    return Acquisition(image, maps, mask, clean, noisy * mask, magnitude > 0.05)


@pytest.fixture(scope="module")
def acq() -> Acquisition:
    return _acquire(SHAPE, seed=0)


@pytest.fixture(scope="module")
def estimated(acq: Acquisition) -> torch.Tensor:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return estimate_sensitivities(acq.kspace)
    finally:
        torch.set_num_threads(threads)


def _coil_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|aᴴ b| / (|a| |b|)`` per pixel over coils ``(C, H, W) -> (H, W)``: 1 iff equal up to a phase."""
    norms = a.abs().pow(2).sum(0).sqrt() * b.abs().pow(2).sum(0).sqrt()  # (H, W)
    return (a.conj() * b).sum(0).abs() / norms.clamp(min=1e-12)


# -- the calibration band ------------------------------------------------------------------------
def test_acs_lines_is_the_sampled_run_through_the_centre_column() -> None:
    mask = np.zeros(32, dtype=bool)
    mask[[2, 6, 10, 24, 28]] = True
    mask[13:19] = True
    assert acs_lines(mask) == (13, 19)
    mask[12] = True  # an equispaced line touching the band is as fully sampled: the run grows
    assert acs_lines(torch.from_numpy(mask)) == (12, 19)
    assert acs_lines(torch.from_numpy(mask).float().expand(5, 32)) == (12, 19)  # (H, W), constant in H


def test_acs_lines_of_a_fastmri_mask_is_its_centre_fraction() -> None:
    w = 368
    mask = equispaced_1d((8, w), 4, 0.08, seed=3)[0]  # (W,)
    start, stop = acs_lines(mask)
    centre = center_slice(w, 0.08)
    assert start <= centre.start and stop >= centre.stop and mask[start:stop].all()
    assert stop - start <= centre.stop - centre.start + 2  # at most one equispaced line on each side


def test_acs_lines_without_a_sampled_centre_names_the_centre_column() -> None:
    mask = np.zeros(16, dtype=bool)
    mask[::4] = True  # columns 0, 4, 8, 12: centre 8 sampled, but make it unsampled
    mask[8] = False
    with pytest.raises(ParameterError, match=r"centre column 8 of the mask \(W = 16\) is not sampled"):
        acs_lines(mask)


def test_sampled_columns_are_the_non_zero_columns(acq: Acquisition) -> None:
    assert torch.equal(sampled_columns(acq.kspace), acq.mask[0])


# -- accuracy --------------------------------------------------------------------------------------
def test_estimated_maps_equal_the_true_maps_up_to_a_common_phase(
    acq: Acquisition, estimated: torch.Tensor
) -> None:
    assert estimated.shape == (COILS, *SHAPE) and estimated.dtype == torch.complex64
    corr = _coil_correlation(estimated, acq.maps)[acq.inside]
    assert float(corr.mean()) > 0.99, float(corr.mean())
    assert float(corr.quantile(0.01)) > 0.95, float(corr.quantile(0.01))
    # The bar can fail: coil-independent maps (no calibration at all) fall well below it.
    flat = torch.full_like(acq.maps, COILS**-0.5)
    assert float(_coil_correlation(flat, acq.maps)[acq.inside].mean()) < 0.8


def test_maps_are_unit_norm_inside_the_object_and_zero_far_outside(
    acq: Acquisition, estimated: torch.Tensor
) -> None:
    sos = estimated.abs().pow(2).sum(0)  # Σ_c |S_c|², (H, W)
    assert float(((sos[acq.inside] - 1).abs() < 1e-3).float().mean()) > 0.999
    assert torch.all((sos < 1e-12) | ((sos - 1).abs() < 1e-3))  # cropped or normalised, nothing between
    assert float((sos > 0.5).float().mean()) < 0.9  # the background is cropped (ESPIRiT eigenvalues < crop)
    assert torch.all(sos[:4, :4] == 0)  # corners are outside the head


def test_sense_with_estimated_maps_models_the_fully_sampled_data(
    acq: Acquisition, estimated: torch.Tensor
) -> None:
    """Projecting noise-free data onto the SENSE model ``Fc S Sᴴ Fcᴴ`` leaves it (nearly) unchanged."""
    coil_images = ifftc(acq.clean, 2)  # (C, H, W)
    combined = (estimated.conj() * coil_images).sum(0)  # Sᴴ x, (H, W)
    model = fftc(estimated * combined, 2)  # (C, H, W)
    residual = float((model - acq.clean).norm() / acq.clean.norm())
    assert residual < 0.02, residual


def test_cg_sense_with_estimated_maps_beats_zero_filled(acq: Acquisition, estimated: torch.Tensor) -> None:
    reference = acq.image.abs()
    zero_filled = ifftc(acq.kspace, 2).abs().pow(2).sum(0).sqrt()  # RSS of the zero-filled coil images
    with_estimate = reconstruct("cg_sense", acq.kspace, sense(acq.mask, estimated)).image.abs()
    with_truth = reconstruct("cg_sense", acq.kspace, sense(acq.mask, acq.maps)).image.abs()
    p_zf, p_est, p_true = (psnr(x, reference) for x in (zero_filled, with_estimate, with_truth))
    assert p_est > p_zf + 3, (p_est, p_zf)
    assert p_est > p_true - 1, (p_est, p_true)  # as good as knowing the maps


# -- layouts and options ---------------------------------------------------------------------------
def test_each_slice_of_a_volume_is_calibrated_on_its_own() -> None:
    a, b = _acquire((64, 64), seed=1, center_fraction=0.16), _acquire((64, 64), seed=2, center_fraction=0.16)
    volume = torch.stack([a.kspace, b.kspace])  # (D, C, H, W)
    maps = estimate_sensitivities(volume, calib=(16, 8), kernel=4)
    assert maps.shape == (2, COILS, 64, 64)
    for d, one in enumerate((a, b)):
        torch.testing.assert_close(
            maps[d], estimate_sensitivities(one.kspace, calib=(16, 8), kernel=4), rtol=0, atol=1e-5
        )


def test_an_explicit_column_mask_gives_the_same_maps(acq: Acquisition, estimated: torch.Tensor) -> None:
    torch.testing.assert_close(estimate_sensitivities(acq.kspace, mask=acq.mask[0].numpy()), estimated)


def test_calib_wider_than_the_sampled_centre_names_the_band(acq: Acquisition) -> None:
    band = acs_lines(acq.mask[0])
    with pytest.raises(
        ParameterError, match=rf"has {band[1] - band[0]} \(columns {band[0]}:{band[1]} of 224\)"
    ):
        estimate_sensitivities(acq.kspace, calib=(24, 40))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"calib": 4}, ParameterError, r"smaller than the kernel 6 x 6"),
        ({"calib": (8, 8, 8)}, ParameterError, r"calib must be None, an int or a pair"),
        ({"crop": 1.0}, ParameterError, r"crop must be in \(0, 1\); found 1.0"),
        ({"kernel": 0}, ParameterError, r"kernel must be an int >= 1; found 0"),
    ],
)
def test_bad_options_say_what_was_expected(acq: Acquisition, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        estimate_sensitivities(acq.kspace, **kwargs)


def test_kspace_must_be_complex_and_multi_coil() -> None:
    with pytest.raises(DTypeError, match=r"kspace must be a complex torch.Tensor; found torch.float32"):
        estimate_sensitivities(torch.ones(2, 8, 8))
    with pytest.raises(ShapeError, match=r"multi-coil \(\.\.\., C, H, W\); found shape \(8, 8\)"):
        estimate_sensitivities(torch.ones(8, 8, dtype=torch.complex64))
