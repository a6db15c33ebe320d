"""What the learned-reconstruction benchmarks share: brain subjects, seeded acquisitions, a fit loop.

The pipeline trains through Ray Train on an archive (``pipelines/train.py``); the studies that
train many small models (the sample-complexity table, the 3D comparison) train in process with
the same recipe, so that their cost is the networks', not the orchestration's:

* images: :func:`operators.brain.brain_phantom` subjects, reference magnitude in ``[0, ~1.15]``;
* acquisition: single-coil :class:`~operators.mri.CartesianMRI` (``ndim`` 2 or 3), complex
  Gaussian noise at 40 dB SNR on the sampled entries (:func:`operators.noise.kspace_noise`);
* training: a fresh seeded mask per sample and step (:func:`draw_batch`), AdamW with a one-cycle
  schedule, gradient clipping at 1, loss ``l1+ssim`` (:mod:`models.optim`, :mod:`models.losses`);
* test: one fixed mask per subject, PSNR of ``|x|`` with the subject's ``max - min`` as range.

Nothing here is timed inside a test; the scripts print tables and write ``benchmarks/results/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.losses import make_loss
from models.optim import make_optimizer, make_schedule
from operators.brain import brain_phantom
from operators.masks import make_mask
from operators.metrics import psnr
from operators.mri import CartesianMRI
from operators.noise import kspace_noise
from operators.recon import reconstruct

__all__ = [
    "Acquired",
    "TunedTV",
    "subjects",
    "acquire",
    "draw_batch",
    "fit",
    "mean_psnr",
    "tuned_cs_tv",
    "SNR_DB",
]

SNR_DB = 40.0


@dataclass(frozen=True)
class Acquired:
    """Noisy k-space ``y`` of a batch of references ``x`` through ``op`` (one mask per item)."""

    y: torch.Tensor
    op: CartesianMRI
    x: torch.Tensor


def subjects(seeds: list[int], shape: tuple[int, int, int]) -> list[torch.Tensor]:
    """One float32 brain volume ``shape`` per seed."""
    return [torch.from_numpy(np.ascontiguousarray(brain_phantom(shape, s).image)) for s in seeds]


def acquire(
    x: torch.Tensor, mask_kind: str, acceleration: float, seeds: list[int], ndim: int, center: float = 0.08
) -> Acquired:
    """Measure the batch ``x`` ``(B, *spatial)``, item ``i`` with the mask drawn from ``seeds[i]``."""
    spatial = tuple(x.shape[1:])
    masks = torch.stack([make_mask(mask_kind, spatial, acceleration, center, int(s)) for s in seeds])
    op = CartesianMRI(masks, ndim=ndim)
    clean = op.forward(x.to(torch.complex64))
    y = torch.stack(
        [kspace_noise(clean[i], SNR_DB, seed=int(s) + 7919, mask=masks[i]) for i, s in enumerate(seeds)]
    )
    return Acquired(y, op, x)


def draw_batch(
    images: torch.Tensor,
    batch: int,
    mask_kind: str,
    accelerations: list[float],
    ndim: int,
    rng: np.random.Generator,
) -> Acquired:
    """``batch`` items of ``images`` ``(N, *spatial)`` at random, each measured with a fresh mask."""
    idx = rng.integers(0, images.shape[0], size=batch)
    accel = float(rng.choice(accelerations))
    seeds = [int(s) for s in rng.integers(0, 2**62, size=batch)]
    return acquire(images[idx], mask_kind, accel, seeds, ndim)


def fit(
    model: nn.Module,
    next_batch: Callable[[], Acquired],
    steps: int,
    lr: float = 1e-3,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` for ``steps`` optimiser steps; returns the first and last loss and the wall time."""
    optimizer = make_optimizer(model.parameters(), "adamw", lr, 1e-4)
    schedule = make_schedule(optimizer, "onecycle", lr, steps)
    loss_fn = make_loss("l1+ssim")
    losses = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        b = next_batch()
        loss = loss_fn(model(b.y, b.op), b.x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    k = max(1, steps // 10)
    return {
        "first_loss": float(np.mean(losses[:k])),
        "last_loss": float(np.mean(losses[-k:])),
        "seconds": time.perf_counter() - t0,
    }


def mean_psnr(recons: list[torch.Tensor], refs: list[torch.Tensor]) -> tuple[float, float]:
    """Mean and standard deviation over subjects of the PSNR of ``|x|`` (range: the subject's max - min)."""
    scores = [
        psnr(r.abs().float(), ref, data_range=float(ref.max() - ref.min()))
        for r, ref in zip(recons, refs, strict=True)
    ]
    return float(np.mean(scores)), float(np.std(scores))


@dataclass(frozen=True)
class TunedTV:
    """``cs_tv`` on the test acquisitions with the weight that scored best on the validation ones."""

    images: list[torch.Tensor]
    lam: float
    validation: dict[float, float]  # weight -> mean validation PSNR
    iterations: list[int]  # per test acquisition
    seconds: float  # per test acquisition

    def describe(self) -> str:
        return f"lam {self.lam}, iterations {int(np.median(self.iterations))} (max {max(self.iterations)})"


def tuned_cs_tv(
    vals: list[Acquired], tests: list[Acquired], lams: list[float], max_iter: int = 2000, tol: float = 1e-4
) -> TunedTV:
    """Choose ``lam`` from ``lams`` by mean validation PSNR, then reconstruct ``tests`` to ``tol``."""
    scores = {}
    for lam in lams:
        recons = [reconstruct("cs_tv", a.y, a.op, lam=lam, max_iter=max_iter, tol=tol).image for a in vals]
        scores[lam] = mean_psnr(recons, [a.x for a in vals])[0]
    lam = max(scores, key=scores.__getitem__)
    t0 = time.perf_counter()
    results = [reconstruct("cs_tv", a.y, a.op, lam=lam, max_iter=max_iter, tol=tol) for a in tests]
    seconds = (time.perf_counter() - t0) / len(tests)
    return TunedTV([r.image for r in results], lam, scores, [r.iterations for r in results], seconds)
