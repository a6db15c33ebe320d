"""Simulation stage: measurements from each scan's image, one Ray task per scan.

MRI: ``y = M ⊙ F x + n`` per 2D slice (``operators.mri.CartesianMRI``), with a
seeded mask per scan (``operators.masks``) and complex Gaussian noise at a given SNR
(``operators.noise``). Seeds come from the pipeline seed and the scan ID, so the same
spec and seed always give the same k-space and masks.

Each task reads ``image`` from Zarr and writes ``kspace`` (C, D, H, W) complex64 and
``mask``; nothing passes through the Ray object store.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from operators.errors import NonFiniteError, ShapeError
from operators.masks import make_mask
from operators.mri import CartesianMRI
from operators.noise import kspace_noise
from pipelines.context import StageContext, StageResult
from pipelines.fanout import fan_out, summarise
from pipelines.fingerprint import scan_seed
from pipelines.spec import MaskSpec, SimulateStage
from pipelines.store import Archive

__all__ = ["simulate_mri_volume", "simulate_scan", "run_simulate"]


def simulate_mri_volume(
    image: np.ndarray, mask_spec: MaskSpec, snr_db: float | None, mask_seed: int, noise_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Single-coil Cartesian k-space of a volume, slice by slice.

    Args:
        image: float32 ``(D, H, W)``.
        mask_spec: the mask kind, acceleration and centre fraction.
        snr_db: k-space SNR in dB, or None for noiseless data.
        mask_seed, noise_seed: seeds of the mask and the noise.

    Returns:
        ``(kspace, mask)``: complex64 ``(1, D, H, W)`` and bool ``(H, W)``.
    """
    if image.ndim != 3:
        raise ShapeError(f"image must be a volume (D, H, W); found shape {image.shape}")
    if not np.all(np.isfinite(image)):
        bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
        raise NonFiniteError(f"image contains {bad} NaN/Inf values; expected only finite values")
    _, h, w = image.shape
    mask = make_mask(mask_spec.kind, (h, w), mask_spec.acceleration, mask_spec.center_fraction, mask_seed)
    op = CartesianMRI(mask.to(torch.float32))
    y = op.forward(torch.from_numpy(np.ascontiguousarray(image)))  # (D, H, W) complex64
    if snr_db is not None:
        y = kspace_noise(y, snr_db, seed=noise_seed, mask=mask)
    return y.numpy()[None].astype(np.complex64), mask.numpy().astype(bool)


def simulate_scan(archive: Archive, scan_id: str, *, stage: SimulateStage, seed: int) -> dict[str, Any]:
    """Read one scan's image, simulate, write ``mask`` and ``kspace``."""
    image = archive.read_array(scan_id, "image")
    kspace, mask = simulate_mri_volume(
        image, stage.mask, stage.snr_db, scan_seed(seed, scan_id, "mask"), scan_seed(seed, scan_id, "noise")
    )
    attrs = {
        "modality": stage.modality,
        "mask": stage.mask.model_dump(),
        "snr_db": stage.snr_db,
        "seed": seed,
        "producer": "simulate",
    }
    archive.write_array(scan_id, "mask", mask, attrs)
    archive.write_array(scan_id, "kspace", kspace, attrs)
    return {"sampled_fraction": float(mask.mean())}


def run_simulate(ctx: StageContext, stage: SimulateStage, fingerprint: str) -> StageResult:
    ids = ctx.archive.scans("all")
    outcomes = fan_out(
        ctx.archive, "simulate", ids, fingerprint, simulate_scan, ["mask", "kspace"],
        {"stage": stage, "seed": ctx.spec.seed}, num_cpus=stage.num_cpus, console=ctx.console,
        description="simulate k-space",
    )
    return summarise(outcomes)
