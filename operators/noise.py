"""Measurement noise: complex Gaussian k-space noise at a given SNR, and low-dose CT counts.

Randomness is an argument: every sampler takes ``seed`` (an int) or ``generator`` (a
``torch.Generator`` on the data's device), exactly one of them, and never touches the global
RNG.

SNR convention (MRI). For measurements ``y`` and the set ``Ω`` of sampled entries::

    RMS   = sqrt( mean_{k ∈ Ω} |y_k|² )          (RMS of the noiseless sampled signal)
    SNR_dB = 20 log10( RMS / σ )

where ``σ`` is the standard deviation of the complex noise per entry, ``E|n_k|² = σ²``, i.e.
``σ/√2`` on each of the real and imaginary parts (the convention of ``pipelines/simulate.py``).

Low-dose CT. With line integrals ``p`` (a sinogram) and ``I0`` incident photons per ray::

    N ~ Poisson(I0 · exp(-p)),   N ← max(N, 1),   p̃ = -log(N / I0)

The clamp keeps rays that recorded no photon finite (as if one photon had arrived); it biases
only rays with ``I0·exp(-p)`` near or below 1.

Example:
    >>> import torch
    >>> from operators.noise import kspace_noise, low_dose_sinogram
    >>> y = torch.ones(64, 64, dtype=torch.complex64)
    >>> noisy = kspace_noise(y, 20.0, seed=0)
    >>> p = low_dose_sinogram(torch.full((90, 64), 2.0), 1e4, seed=0)
    >>> p.shape
    torch.Size([90, 64])
"""

from __future__ import annotations

import math

import torch

from operators.errors import DTypeError, NonFiniteError, ParameterError, ShapeError
from operators.fft import broadcast_shape

__all__ = ["sigma_for_snr", "signal_rms", "kspace_noise", "low_dose_sinogram"]


def _generator(
    seed: int | None, generator: torch.Generator | None, device: torch.device, owner: str
) -> torch.Generator:
    if (seed is None) == (generator is None):
        raise ParameterError(
            f"{owner}: pass exactly one of seed (an int) or generator (a torch.Generator); "
            f"found seed={seed!r}, generator={generator!r}"
        )
    if generator is not None:
        return generator
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ParameterError(f"{owner}: seed must be an int; found {seed!r}")
    return torch.Generator(device=device).manual_seed(seed)


def _check_finite(x: torch.Tensor, name: str, owner: str) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise NonFiniteError(
            f"{owner}: {name} contains {int(bad.sum())} NaN/Inf values (of {x.numel()}); "
            "expected only finite values"
        )


def sigma_for_snr(signal_rms: float, snr_db: float) -> float:
    """The complex noise standard deviation ``σ = RMS · 10^(-SNR_dB/20)`` (see the module docstring)."""
    if not math.isfinite(snr_db):
        raise ParameterError(f"snr_db must be a finite number of decibels; found {snr_db!r}")
    if not (math.isfinite(signal_rms) and signal_rms >= 0):
        raise ParameterError(f"signal_rms must be finite and >= 0; found {signal_rms!r}")
    return float(signal_rms) * 10.0 ** (-snr_db / 20.0)


def signal_rms(y: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """``sqrt(mean |y_k|²)`` over the sampled entries (``mask != 0``; all entries if ``mask`` is None)."""
    power = y.real**2 + y.imag**2 if y.is_complex() else y**2
    if mask is None:
        return math.sqrt(float(power.to(torch.float64).mean()))
    sampled = (mask != 0).expand_as(power)
    n = int(sampled.sum())
    return math.sqrt(float(power.to(torch.float64)[sampled].sum()) / n) if n else 0.0


def kspace_noise(
    y: torch.Tensor,
    snr_db: float,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y + n`` with complex Gaussian ``n`` on the sampled entries only, at ``snr_db``.

    ``σ`` comes from the RMS of ``y`` over the sampled entries (module docstring), one ``σ``
    for the whole array (all coils, all slices). Entries where ``mask == 0`` are returned
    unchanged. A zero signal gets no noise.

    Args:
        y: complex measurements, e.g. ``(C, H, W)`` k-space.
        snr_db: signal-to-noise ratio in dB.
        seed: int seed of a fresh generator (or give ``generator``).
        generator: a ``torch.Generator`` on ``y.device`` (or give ``seed``).
        mask: sampled entries, broadcastable to ``y`` (e.g. ``(H, W)``); None: every entry.

    Returns:
        Noisy measurements, same shape and dtype as ``y``.
    """
    if not isinstance(y, torch.Tensor) or not y.is_complex():
        found = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
        raise DTypeError(f"kspace_noise: y must be a complex tensor (k-space); found {found}")
    _check_finite(y, "y", "kspace_noise")
    g = _generator(seed, generator, y.device, "kspace_noise")
    if mask is not None:
        try:
            fits = broadcast_shape(mask.shape, y.shape) == tuple(y.shape)
        except ValueError:
            fits = False
        if not fits:
            raise ShapeError(
                f"kspace_noise: mask of shape {tuple(mask.shape)} must broadcast to y's shape "
                f"{tuple(y.shape)} (e.g. an (H, W) mask for (C, H, W) k-space)"
            )
    sigma = sigma_for_snr(signal_rms(y, mask), snr_db)
    real = torch.randn(y.shape, generator=g, dtype=y.real.dtype, device=y.device)
    imag = torch.randn(y.shape, generator=g, dtype=y.real.dtype, device=y.device)
    noise = torch.complex(real, imag) * (sigma / math.sqrt(2.0))
    if mask is not None:
        noise = noise * (mask != 0)
    return y + noise


def low_dose_sinogram(
    sinogram: torch.Tensor,
    i0: float,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Low-dose line integrals ``-log(max(N, 1) / I0)`` with ``N ~ Poisson(I0 · exp(-p))``.

    Args:
        sinogram: real line integrals ``p`` of any shape, e.g. ``(views, detectors)``.
        i0: incident photons per ray, > 0 (e.g. ``1e4`` low dose, ``1e6`` near noiseless).
        seed: int seed of a fresh generator (or give ``generator``).
        generator: a ``torch.Generator`` on the sinogram's device (or give ``seed``).

    Returns:
        Noisy line integrals, same shape and dtype as ``sinogram``.
    """
    if not isinstance(sinogram, torch.Tensor) or not sinogram.is_floating_point():
        found = sinogram.dtype if isinstance(sinogram, torch.Tensor) else type(sinogram).__name__
        raise DTypeError(f"low_dose_sinogram: sinogram must be a real floating tensor; found {found}")
    if not (isinstance(i0, (int, float)) and math.isfinite(i0) and i0 > 0):
        raise ParameterError(f"low_dose_sinogram: i0 (photons per ray) must be > 0, e.g. 1e4; found {i0!r}")
    _check_finite(sinogram, "sinogram", "low_dose_sinogram")
    g = _generator(seed, generator, sinogram.device, "low_dose_sinogram")
    rates = float(i0) * torch.exp(-sinogram.to(torch.float64))  # expected counts per ray
    counts = torch.poisson(rates, generator=g).clamp_(min=1.0)
    return (-torch.log(counts / float(i0))).to(sinogram.dtype)
