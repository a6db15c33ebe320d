"""Simulation stage: measurements from each scan's image, one Ray task per scan, slab by slab.

* MRI: ``y = M ⊙ F (S x) + n`` per 2D slice: single-coil (``CartesianMRI``) or SENSE with
  simulated birdcage coil maps, a seeded mask per scan, and complex Gaussian noise at a
  given SNR.
* CT: ``p = A x`` with a parallel- or fan-beam projector over ``views`` angles,
  optionally low-dose: Poisson counts ``N ~ Poisson(i0 · exp(-μ A x))`` then ``-log(N / i0) / μ``,
  with ``μ`` the attenuation of unit image intensity per pixel.
* Low resolution: ``y = D_f x + n`` per 2D slice, ``D_f`` the mean of each ``f x f`` block
  (:class:`operators.resolution.Downsample`), optionally with real Gaussian noise ``n`` of
  standard deviation ``σ = RMS(x) · 10^(-SNR_dB/20)`` (one ``σ`` per scan, from the image's RMS).

A volume is processed slab by slab (``slab`` slices at a time) into an output array
whose chunks or shards are those slabs, so a task's memory is bounded by one slab, not the
volume. :class:`pipelines.physics.Acquisition` decides the stored layout (k-space slice-first
``(D, C, H, W)``; with a 1D Cartesian mask only the acquired columns; sinograms and low-res images
float32 ``(D, ...)``).
Noise is seeded per slice from the pipeline seed and the scan ID, so the same spec and
seed give the same archive whatever the slab size. Before anything is written, the
image is checked for NaN/Inf, so a bad scan leaves nothing behind.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from operators.errors import NonFiniteError, ShapeError
from operators.noise import low_dose_sinogram, sigma_for_snr
from pipelines.context import StageContext, StageResult
from pipelines.fanout import fan_out, summarise
from pipelines.fingerprint import scan_fingerprint, scan_seed
from pipelines.physics import Acquisition
from pipelines.spec import MaskSpec, SimulateStage
from pipelines.store import MEASUREMENTS, Archive, unit_of

__all__ = [
    "acquisition_for",
    "simulate_volume",
    "simulate_mri_volume",
    "simulate_scan",
    "run",
    "check_finite",
    "read_checked",
]


#: An image at most this big is kept in memory between the finite check and the simulation, so it
#: is read from the archive once (a 256³ float32 volume is 64 MiB); a bigger one is read twice, slab
#: by slab, so a task's memory stays bounded by the slab.
IMAGE_CACHE_BYTES = 256 << 20


def read_checked(image: Any, slab: int, cache_bytes: int | None = None) -> tuple[float, Any]:
    """Read the volume ``(D, ...)`` slab by slab once: NaN/Inf check and energy ``Σ x²``.

    Returns:
        ``(energy, source)``: ``source`` is the volume in memory when it is at most ``cache_bytes``
        (default :data:`IMAGE_CACHE_BYTES`), else ``image`` itself, to be read again slab by slab.

    Raises:
        NonFiniteError: naming the slices and the number of NaN/Inf values.
    """
    depth = image.shape[0]
    cache_bytes = IMAGE_CACHE_BYTES if cache_bytes is None else cache_bytes
    nbytes = int(np.prod(image.shape)) * np.dtype(image.dtype).itemsize
    kept = np.empty(image.shape, image.dtype) if nbytes <= cache_bytes else None
    bad_total, bad_slices, energy = 0, [], 0.0
    for z0 in range(0, depth, slab):
        block = np.asarray(image[z0 : z0 + slab])
        if kept is not None:
            kept[z0 : z0 + block.shape[0]] = block
        energy += float(np.sum(np.square(block, dtype=np.float64)))
        finite = np.isfinite(block)
        if not finite.all():
            per_slice = (~finite).reshape(block.shape[0], -1).sum(axis=1)
            bad_total += int(per_slice.sum())
            bad_slices += [z0 + int(i) for i in np.flatnonzero(per_slice)]
    if bad_total:
        raise NonFiniteError(
            f"image contains {bad_total} NaN/Inf values in slices {bad_slices[:10]}"
            f"{' …' if len(bad_slices) > 10 else ''}; expected only finite values"
        )
    return energy, (kept if kept is not None else image)


def check_finite(image: Any, slab: int) -> float:
    """Read the volume slab by slab once: raise :class:`NonFiniteError` naming the slices and count if it
    has NaN/Inf, else return its energy ``Σ x²`` (the noise level needs it; one read serves both)."""
    return read_checked(image, slab, cache_bytes=0)[0]


def _noise(shape: tuple[int, ...], sigma: float, seed: int, real: bool = False) -> torch.Tensor:
    """Gaussian noise with standard deviation ``sigma`` per sample: complex (``σ/√2`` per part), or
    real with ``real``."""
    g = torch.Generator().manual_seed(seed)
    re = torch.randn(shape, generator=g)
    if real:
        return re * sigma
    im = torch.randn(shape, generator=g)
    return torch.complex(re, im) * (sigma / np.sqrt(2.0))


def acquisition_for(stage: SimulateStage, scan_id: str, seed: int, shape: tuple[int, int]) -> Acquisition:
    """The acquisition ``stage`` simulates for one scan: its mask is seeded per scan."""
    return Acquisition.simulated(stage, scan_seed(seed, scan_id, "mask"), shape)


def simulate_volume(
    image: Any,
    stage: SimulateStage,
    acq: Acquisition,
    scan_id: str,
    seed: int,
    write: Any,
    energy: float | None = None,
) -> float:
    """Simulate ``image`` ``(D, H, W)`` slab by slab, handing each slab to ``write(z0, stored)``.

    ``stored`` is in the archive's layout (:meth:`Acquisition.to_stored`). Returns the noise σ of
    MRI (complex) or low resolution (real), 0 for CT. Noise is seeded per slice, so the slab size
    never changes the result.
    """
    depth, h, w = image.shape
    slab = stage.slab or depth
    sigma = 0.0
    snr_db = {"mri": stage.snr_db, "lowres": stage.lowres_spec.snr_db}.get(acq.modality)
    if snr_db is not None:
        # One σ for the whole scan, whatever the slab size. For MRI its reference is the RMS of the
        # fully sampled noiseless k-space, which by Parseval (orthonormal FFT, Σ|S_c|² = 1) is
        # ‖x‖ / sqrt(C · N); for low resolution the image's own RMS. Either comes from the image in
        # one cheap pass.
        if energy is None:  # in-memory callers; simulate_scan passes the energy from its finite check
            energy = check_finite(image, slab)
        coils = stage.coils if acq.modality == "mri" else 1
        rms = float(np.sqrt(energy / (coils * int(np.prod(image.shape)))))
        sigma = sigma_for_snr(rms, snr_db)
    for z0 in range(0, depth, slab):
        x = torch.from_numpy(np.ascontiguousarray(image[z0 : z0 + slab]))  # (s, H, W)
        y = acq.op.forward(x)  # (s, *op.out_shape)
        if acq.modality == "mri" and sigma > 0:
            assert acq.mask is not None
            noise = torch.stack(
                [
                    _noise((stage.coils, h, w), sigma, scan_seed(seed, scan_id, f"noise/{z0 + i}"))
                    for i in range(x.shape[0])
                ]
            )  # (s, C, H, W)
            y = y + (noise[:, 0] if stage.coils == 1 else noise) * acq.mask.to(torch.float32)
        elif acq.modality == "lowres" and sigma > 0:
            noise = torch.stack(
                [
                    _noise(acq.op.out_shape, sigma, scan_seed(seed, scan_id, f"noise/{z0 + i}"), real=True)
                    for i in range(x.shape[0])
                ]
            )  # (s, H/f, W/f)
            y = y + noise
        elif acq.modality == "ct" and acq.ct is not None and acq.ct.i0 is not None:
            # Photons see the physical line integral μ·(A x); the stored sinogram stays in image
            # units (divided back by μ), so y = A x + noise and FBP returns the image scale.
            mu = acq.ct.attenuation
            y = torch.stack(
                [
                    low_dose_sinogram(mu * y[i], acq.ct.i0, seed=scan_seed(seed, scan_id, f"dose/{z0 + i}"))
                    / mu
                    for i in range(y.shape[0])
                ]
            )
        write(z0, acq.to_stored(y))
    return sigma


def simulate_mri_volume(
    image: np.ndarray,
    mask_spec: MaskSpec,
    snr_db: float | None,
    seed: int,
    scan_id: str = "scan",
    coils: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """In-memory MRI simulation of a volume ``(D, H, W)``: ``(kspace (D, C, H, W), mask (H, W))``.

    The k-space is full (zero where unsampled), not the archive's compact column layout.
    """
    if image.ndim != 3:
        raise ShapeError(f"image must be a volume (D, H, W); found shape {image.shape}")
    check_finite(image, image.shape[0])
    stage = SimulateStage(kind="simulate", mask=mask_spec, snr_db=snr_db, coils=coils)
    acq = acquisition_for(stage, scan_id, seed, image.shape[1:])
    out = np.zeros((image.shape[0], coils, *image.shape[1:]), np.complex64)

    def write(z0: int, stored: np.ndarray) -> None:
        y = acq.from_stored(stored)  # zero-filled, operator layout
        out[z0 : z0 + stored.shape[0]] = (y.unsqueeze(1) if coils == 1 else y).numpy()

    simulate_volume(image, stage, acq, scan_id, seed, write)
    assert acq.mask is not None
    return out, acq.mask.numpy().astype(bool)


def simulate_scan(archive: Archive, scan_id: str, *, stage: SimulateStage, seed: int) -> dict[str, Any]:
    """Read one scan's image slab by slab, simulate, and write its measurements (see module docs)."""
    image = archive.reader(scan_id, stage.image)  # lazy and verified: read slab by slab
    if len(image.shape) != 3:
        raise ShapeError(f"image must be a volume (D, H, W); found shape {image.shape}")
    depth, h, w = image.shape
    slab = stage.slab or depth
    energy, source = read_checked(image, slab)  # before anything is written; in memory if small
    acq = acquisition_for(stage, scan_id, seed, (h, w))
    attrs = {**acq.attrs(), "seed": seed, "producer": "simulate", "slab": slab}
    if acq.modality == "mri":
        attrs |= {"mask": stage.mask.model_dump(), "snr_db": stage.snr_db}
    elif acq.modality == "lowres":
        attrs |= {"snr_db": stage.lowres_spec.snr_db}
    out = archive.create_array(
        scan_id,
        acq.measurement,
        acq.stored_shape(depth),
        np.float32 if acq.real else np.complex64,
        slab=slab,
        attrs=attrs,
        compress=acq.real,  # noisy k-space compresses ~1.08x: raw is faster
        slab_chunks=not acq.real,
    )
    sigma = simulate_volume(source, stage, acq, scan_id, seed, out.write, energy)
    arrays = {acq.measurement: out.record()}
    arrays |= {name: archive.write_array(scan_id, name, data, attrs) for name, data in acq.arrays().items()}
    info: dict[str, Any] = {"arrays": arrays, "reference": stage.image}
    if acq.modality == "mri":
        assert acq.mask is not None
        return info | {"sampled_fraction": float(acq.mask.float().mean()), "noise_sigma": sigma}
    if acq.modality == "lowres":
        return info | {"factor": acq.factor, "noise_sigma": sigma}
    assert acq.ct is not None
    return info | {"views": acq.ct.views, "i0": acq.ct.i0}


#: What each modality's simulation writes, for the progress bar.
_WHAT = {"mri": "k-space", "ct": "sinograms", "lowres": "low-res images"}


def run(ctx: StageContext, stage: SimulateStage, fingerprint: str) -> StageResult:
    """Simulate every scan of the archive, one Ray task each.

    A scan's commit fingerprint chains this stage's identity and its image's commit, so new scans
    (or a new night) simulate only what is new (:func:`pipelines.fingerprint.scan_fingerprint`).
    """
    ids = ctx.archive.scans("all")
    images = ctx.archive.committed(unit_of(stage.image))
    fps = {s: scan_fingerprint(ctx.identity or fingerprint, images.get(s)) for s in ids}
    outcomes = fan_out(
        ctx.archive,
        MEASUREMENTS,
        ids,
        fps,
        simulate_scan,
        ["mask", "kspace", "coil_maps", "sinogram", "lowres"],
        {"stage": stage, "seed": ctx.spec.seed},
        num_cpus=stage.num_cpus,
        console=ctx.console,
        description=f"simulate {_WHAT[stage.modality]}",
        stage=stage.name,
    )
    return summarise(outcomes, {"modality": stage.modality}, {MEASUREMENTS: fps})
