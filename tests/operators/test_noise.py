"""Measurement noise: SNR achieved, sampled entries only, Poisson low dose, seeds and errors."""

from __future__ import annotations

import math

import pytest
import torch

from operators.errors import DTypeError, NonFiniteError, ParameterError, ShapeError
from operators.noise import kspace_noise, low_dose_sinogram, sigma_for_snr, signal_rms


def _kspace(shape: tuple[int, ...], dtype: torch.dtype = torch.complex64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype) * 3.0


def test_sigma_for_snr() -> None:
    assert sigma_for_snr(2.0, 20.0) == pytest.approx(0.2)
    assert sigma_for_snr(1.0, 0.0) == pytest.approx(1.0)
    with pytest.raises(ParameterError, match=r"snr_db must be a finite number of decibels; found inf"):
        sigma_for_snr(1.0, math.inf)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("snr_db", [0.0, 10.0, 30.0])
def test_snr_is_achieved_on_sampled_entries(dtype: torch.dtype, snr_db: float) -> None:
    y0 = _kspace((4, 128, 128), dtype)
    mask = torch.zeros(128, 128, dtype=torch.bool)
    mask[:, ::3] = True
    y0 = y0 * mask  # measurements are zero off the mask, as A x would give
    y = kspace_noise(y0, snr_db, seed=1, mask=mask)
    assert y.dtype == dtype and y.shape == y0.shape
    noise = (y - y0)[mask.expand_as(y)]
    measured = 20 * math.log10(signal_rms(y0, mask) / float(noise.abs().pow(2).mean().sqrt()))
    assert measured == pytest.approx(snr_db, abs=0.1)
    # Complex circular: equal power in the real and imaginary parts, zero mean.
    assert float(noise.real.var() / noise.imag.var()) == pytest.approx(1.0, abs=0.05)
    assert abs(complex(noise.mean())) < 0.05 * float(noise.abs().mean())
    # Nothing added off the mask.
    assert torch.equal(y[~mask.expand_as(y)], y0[~mask.expand_as(y)])


def test_without_mask_every_entry_is_noisy() -> None:
    y0 = _kspace((64, 64))
    y = kspace_noise(y0, 20.0, seed=0)
    assert bool(((y - y0) != 0).all())


def test_seed_and_generator_reproducible_and_global_rng_untouched() -> None:
    y0 = _kspace((8, 16))
    before = torch.get_rng_state()
    a = kspace_noise(y0, 10.0, seed=5)
    b = kspace_noise(y0, 10.0, generator=torch.Generator().manual_seed(5))
    c = kspace_noise(y0, 10.0, seed=6)
    p = torch.full((10, 12), 1.0)
    d = low_dose_sinogram(p, 1e3, seed=5)
    e = low_dose_sinogram(p, 1e3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(d, e)
    assert not torch.equal(d, low_dose_sinogram(p, 1e3, seed=6))


def test_randomness_must_be_given_exactly_once() -> None:
    y0 = _kspace((4, 4))
    with pytest.raises(ParameterError, match=r"exactly one of seed .* found seed=None, generator=None"):
        kspace_noise(y0, 10.0)
    with pytest.raises(ParameterError, match=r"exactly one of seed"):
        low_dose_sinogram(torch.ones(3, 3), 1e3, seed=1, generator=torch.Generator())


def test_kspace_noise_errors() -> None:
    with pytest.raises(DTypeError, match=r"y must be a complex tensor \(k-space\); found torch.float32"):
        kspace_noise(torch.ones(4, 4), 10.0, seed=0)
    bad = _kspace((4, 4))
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"y contains 1 NaN/Inf values"):
        kspace_noise(bad, 10.0, seed=0)
    with pytest.raises(ShapeError, match=r"mask of shape \(5,\) must broadcast to y's shape \(4, 4\)"):
        kspace_noise(_kspace((4, 4)), 10.0, seed=0, mask=torch.ones(5))
    with pytest.raises(ShapeError, match=r"mask of shape \(2, 4, 4\) must broadcast to y's shape \(4, 4\)"):
        kspace_noise(_kspace((4, 4)), 10.0, seed=0, mask=torch.ones(2, 4, 4))


def test_zero_signal_gets_no_noise() -> None:
    y0 = torch.zeros(4, 4, dtype=torch.complex64)
    assert torch.equal(kspace_noise(y0, 10.0, seed=0), y0)


# -- low-dose CT ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_low_dose_counts_are_poisson_around_the_expected_log(dtype: torch.dtype) -> None:
    i0, p = 1e4, 1.5
    sino = torch.full((200, 300), p, dtype=dtype)
    noisy = low_dose_sinogram(sino, i0, seed=0)
    assert noisy.dtype == dtype and noisy.shape == sino.shape
    counts = i0 * torch.exp(-noisy.double())
    expected = i0 * math.exp(-p)
    assert float(counts.mean()) == pytest.approx(expected, rel=0.01)
    assert float(counts.var()) == pytest.approx(expected, rel=0.05)  # Poisson: variance = mean
    assert torch.allclose(counts, counts.round(), atol=1e-2 * max(1.0, expected) ** 0.5)  # integer counts


def test_high_dose_is_nearly_noiseless_and_starved_rays_are_clamped() -> None:
    p = torch.linspace(0.0, 4.0, 50).reshape(5, 10)
    torch.testing.assert_close(low_dose_sinogram(p, 1e12, seed=0), p, atol=1e-4, rtol=0)
    starved = low_dose_sinogram(torch.full((50, 50), 30.0), 10.0, seed=0)  # I0·exp(-30) ≈ 0 photons
    torch.testing.assert_close(starved, torch.full((50, 50), math.log(10.0)))  # N clamped to 1


def test_low_dose_errors() -> None:
    for i0 in (0, -5.0, float("nan")):
        with pytest.raises(ParameterError, match=r"i0 \(photons per ray\) must be > 0.*found"):
            low_dose_sinogram(torch.ones(3, 3), i0, seed=0)
    bad = torch.ones(3, 3)
    bad[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"sinogram contains 1 NaN/Inf values"):
        low_dose_sinogram(bad, 1e3, seed=0)
    with pytest.raises(DTypeError, match=r"sinogram must be a real floating tensor; found torch.complex64"):
        low_dose_sinogram(torch.ones(3, 3, dtype=torch.complex64), 1e3, seed=0)


def test_works_on_batched_inputs() -> None:
    y0 = _kspace((2, 3, 8, 8))  # (B, C, H, W)
    mask = torch.ones(2, 1, 8, 8)
    assert kspace_noise(y0, 20.0, seed=0, mask=mask).shape == y0.shape
    assert low_dose_sinogram(torch.ones(4, 30, 20), 1e4, seed=0).shape == (4, 30, 20)
