"""Simulation stage: measurements from each scan's image, one Ray task per scan, slab by slab.

* MRI: ``y = M ⊙ F (S x) + n`` per 2D slice: single-coil (``CartesianMRI``) or SENSE with
  simulated birdcage coil maps, a seeded mask per scan, and complex Gaussian noise at a
  given SNR.
* CT: ``p = A x`` with a parallel- or fan-beam projector over ``views`` angles,
  optionally low-dose: Poisson counts ``N ~ Poisson(i0 · exp(-μ A x))`` then ``-log(N / i0) / μ``,
  with ``μ`` the attenuation of unit image intensity per pixel.

A volume is processed slab by slab (``slab`` slices at a time) into an output array
whose chunks or shards are those slabs, so a task's memory is bounded by one slab, not the
volume. With a 1D Cartesian mask only the acquired k-space columns are stored (attribute
``layout: columns``; :func:`pipelines.physics.read_kspace` zero-fills the rest).
Noise is seeded per slice from the pipeline seed and the scan ID, so the same spec and
seed give the same archive whatever the slab size. Before anything is written, the
image is checked for NaN/Inf, so a bad scan leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from operators.errors import NonFiniteError, ShapeError
from operators.linear import LinearOperator
from operators.masks import make_mask
from operators.noise import sigma_for_snr
from pipelines.context import StageContext, StageResult
from pipelines.fanout import fan_out, summarise
from pipelines.fingerprint import scan_seed
from pipelines.physics import ct_operator, mri_operator, sampled_columns
from pipelines.spec import MaskSpec, SimulateStage
from pipelines.store import Archive

__all__ = [
    "MRIAcquisition",
    "mri_acquisition",
    "simulate_mri_volume",
    "simulate_scan",
    "run_simulate",
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


def _noise(shape: tuple[int, ...], sigma: float, seed: int) -> torch.Tensor:
    """Complex Gaussian noise with standard deviation ``sigma`` per complex sample (``σ/√2`` per part)."""
    g = torch.Generator().manual_seed(seed)
    re = torch.randn(shape, generator=g)
    im = torch.randn(shape, generator=g)
    return torch.complex(re, im) * (sigma / np.sqrt(2.0))


@dataclass(frozen=True)
class MRIAcquisition:
    """A scan's MRI acquisition: its mask, coil maps (None for one coil), operator and stored columns."""

    mask: torch.Tensor  # (H, W) bool
    maps: torch.Tensor | None  # (C, H, W) complex
    op: LinearOperator
    columns: np.ndarray | None  # sampled columns stored (1D Cartesian masks), None: full k-space

    def stored_width(self, w: int) -> int:
        return w if self.columns is None else int(self.columns.size)


def mri_acquisition(stage: SimulateStage, scan_id: str, seed: int, shape: tuple[int, int]) -> MRIAcquisition:
    """The seeded mask (per scan), coil maps and operator of ``stage`` for slices of ``shape``."""
    from operators.mri import birdcage_maps

    mask = make_mask(
        stage.mask.kind,
        shape,
        stage.mask.acceleration,
        stage.mask.center_fraction,
        scan_seed(seed, scan_id, "mask"),
    )
    maps = birdcage_maps(shape, stage.coils) if stage.coils > 1 else None
    return MRIAcquisition(mask, maps, mri_operator(mask.to(torch.float32), maps), sampled_columns(mask))


def _simulate_mri(
    image: Any,
    stage: SimulateStage,
    acq: MRIAcquisition,
    scan_id: str,
    seed: int,
    out: Any | None = None,
    energy: float | None = None,
) -> float:
    """MRI simulation of ``image`` (D, H, W) into ``out``, slab by slab; returns the noise σ.

    ``out`` is ``(C, D, H, W)``, or ``(C, D, H, n)`` holding only the ``n`` columns ``acq.columns``.
    """
    depth, h, w = image.shape
    slab = stage.slab or depth
    mask_f = acq.mask.to(torch.float32)
    compact = out is not None and acq.columns is not None and out.shape[-1] == acq.columns.size
    cols = torch.from_numpy(acq.columns) if compact else None
    # One σ for the whole scan, whatever the slab size. Its reference is the RMS of the fully sampled
    # noiseless k-space, which by Parseval (orthonormal FFT, Σ|S_c|² = 1) is ‖x‖ / sqrt(C · N) and so
    # comes from the image in one cheap pass; operators.noise.kspace_noise instead takes the RMS of
    # the sampled entries of one array, which would differ from slab to slab.
    if energy is None:  # in-memory callers; simulate_scan passes the energy from its finite check
        energy = check_finite(image, slab)
    rms = float(np.sqrt(energy / (stage.coils * image.size)))
    sigma = 0.0 if stage.snr_db is None else sigma_for_snr(rms, stage.snr_db)
    for z0 in range(0, depth, slab):
        x = torch.from_numpy(np.ascontiguousarray(image[z0 : z0 + slab]))  # (s, H, W)
        y = acq.op.forward(x)  # (s, H, W) single coil or (s, C, H, W)
        y = y.reshape(x.shape[0], stage.coils, h, w).transpose(0, 1)  # (C, s, H, W)
        if sigma > 0:
            noise = torch.stack(
                [
                    _noise((stage.coils, h, w), sigma, scan_seed(seed, scan_id, f"noise/{z0 + i}"))
                    for i in range(x.shape[0])
                ],
                dim=1,
            )  # (C, s, H, W)
            y = y + noise * mask_f
        if cols is not None:
            y = y[..., cols]  # (C, s, H, n): the acquired lines only (4x faster than index_select(-1))
        if out is not None:
            out[:, z0 : z0 + x.shape[0]] = y.to(torch.complex64).numpy()
    return sigma


def simulate_mri_volume(
    image: np.ndarray,
    mask_spec: MaskSpec,
    snr_db: float | None,
    seed: int,
    scan_id: str = "scan",
    coils: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """In-memory MRI simulation of a volume ``(D, H, W)``: ``(kspace (C, D, H, W), mask (H, W))``."""
    if image.ndim != 3:
        raise ShapeError(f"image must be a volume (D, H, W); found shape {image.shape}")
    check_finite(image, image.shape[0])
    stage = SimulateStage(kind="simulate", mask=mask_spec, snr_db=snr_db, coils=coils)
    acq = mri_acquisition(stage, scan_id, seed, image.shape[1:])
    out = np.zeros((coils, *image.shape), np.complex64)
    _simulate_mri(image, stage, acq, scan_id, seed, out)
    return out, acq.mask.numpy().astype(bool)


def simulate_scan(archive: Archive, scan_id: str, *, stage: SimulateStage, seed: int) -> dict[str, Any]:
    """Read one scan's image slab by slab, simulate, and write its measurements (see module docs)."""
    from operators.noise import low_dose_sinogram

    image = archive.open_array(scan_id, "image")  # lazy: read slab by slab
    if len(image.shape) != 3:
        raise ShapeError(f"image must be a volume (D, H, W); found shape {image.shape}")
    depth, h, w = image.shape
    slab = stage.slab or depth
    energy, image = read_checked(image, slab)  # before anything is written; in memory if small
    attrs: dict[str, Any] = {"modality": stage.modality, "seed": seed, "producer": "simulate", "slab": slab,
                             "image_shape": [h, w]}  # fmt: skip
    if stage.modality == "mri":
        attrs |= {"mask": stage.mask.model_dump(), "coils": stage.coils, "snr_db": stage.snr_db}
        acq = mri_acquisition(stage, scan_id, seed, (h, w))
        if acq.columns is not None:  # 1D Cartesian: store the acquired lines only (physics.read_kspace)
            attrs |= {"layout": "columns", "columns": acq.columns.tolist()}
        out = archive.create_array(
            scan_id,
            "kspace",
            (stage.coils, depth, h, acq.stored_width(w)),
            np.complex64,
            slab=slab,
            slab_axis=1,
            attrs=attrs,
            compress=False,
            slab_chunks=True,
        )
        sigma = _simulate_mri(image, stage, acq, scan_id, seed, out, energy)
        archive.write_array(scan_id, "mask", acq.mask.numpy().astype(bool), attrs)
        if acq.maps is not None:
            archive.write_array(scan_id, "coil_maps", acq.maps.to(torch.complex64).numpy(), attrs)
        return {"sampled_fraction": float(acq.mask.float().mean()), "noise_sigma": sigma}
    ct = stage.ct_spec
    op = ct_operator(ct, (h, w))
    attrs |= {"ct": ct.model_dump(), "angles": op.angles.tolist()}
    out = archive.create_array(
        scan_id, "sinogram", (depth, *op.out_shape), np.float32, slab=slab, attrs=attrs
    )
    for z0 in range(0, depth, slab):
        x = torch.from_numpy(np.ascontiguousarray(image[z0 : z0 + slab]))  # (s, H, W)
        p = op.forward(x)  # (s, views, detectors)
        if ct.i0 is not None:
            # Photons see the physical line integral μ·(A x); the stored sinogram stays in image units
            # (divided back by μ), so y = A x + noise and FBP returns the image scale.
            mu = ct.attenuation
            p = torch.stack(
                [
                    low_dose_sinogram(mu * p[i], ct.i0, seed=scan_seed(seed, scan_id, f"dose/{z0 + i}")) / mu
                    for i in range(p.shape[0])
                ]
            )
        out[z0 : z0 + x.shape[0]] = p.numpy().astype(np.float32)
    return {"views": ct.views, "i0": ct.i0}


def run_simulate(ctx: StageContext, stage: SimulateStage, fingerprint: str) -> StageResult:
    ids = ctx.archive.scans("all")
    outputs = ["mask", "kspace", "coil_maps"] if stage.modality == "mri" else ["sinogram"]
    outcomes = fan_out(
        ctx.archive,
        "simulate",
        ids,
        fingerprint,
        simulate_scan,
        outputs,
        {"stage": stage, "seed": ctx.spec.seed},
        num_cpus=stage.num_cpus,
        console=ctx.console,
        description=f"simulate {'k-space' if stage.modality == 'mri' else 'sinograms'}",
    )
    return summarise(outcomes, {"modality": stage.modality})
