"""Honest baselines: a classical method's regularisation weight chosen on the validation split.

A recon stage whose ``options`` give a method a list of weights (``cs_tv: {lam: [0.002, 0.005,
0.01, 0.02]}``) reconstructs the middle ``tune_slices`` slices of every validation scan once per
weight, one Ray task per weight, and keeps the weight with the best mean PSNR against the reference
images. The chosen weight becomes part of the method's identity (and so of its fingerprint and its
outputs' lineage, beside the grid); the scores go to MLflow (``tune/<method>/psnr``, one step per
weight) and to the stage's outputs. Results are remembered in ``_meta/tuning/`` by everything they
depend on, so re-running an interrupted stage does not tune again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipelines.errors import StageError
from pipelines.fingerprint import combine
from pipelines.methods import ResolvedMethod
from pipelines.store import Archive

__all__ = ["Tuning", "score_weight", "tune_methods"]


@dataclass(frozen=True)
class Tuning:
    """One method's grid search: the weights, their mean validation PSNR, and the weight chosen."""

    method: str
    grid: list[float]
    psnr: list[float]
    chosen: float


def score_weight(
    archive: Archive, method: str, options: dict[str, Any], scan_ids: list[str], slices: int
) -> float:
    """Mean PSNR of ``method`` with ``options`` over the middle ``slices`` slices of ``scan_ids``."""
    import torch

    from operators.metrics import psnr
    from operators.recon import reconstruct
    from operators.transforms import on_grid
    from pipelines.physics import Acquisition

    torch.set_num_threads(1)
    scores = []
    for scan_id in scan_ids:
        acq = Acquisition.from_archive(archive, scan_id)
        depth = archive.open_array(scan_id, acq.measurement).shape[0]
        z0 = max(0, depth // 2 - slices // 2)
        z1 = min(depth, z0 + slices)
        y = acq.read(archive, scan_id, z0, z1)
        ref = archive.read_array(scan_id, archive.reference_name(scan_id), z0, z1)
        image = on_grid(reconstruct(method, y, acq.slab_op(z0, z1), **options).image.abs().numpy(), ref.shape)
        scores.append(psnr(image, ref, data_range=float(ref.max() - ref.min())))
    return float(np.mean(scores))


def _tune_one(ctx: Any, method: ResolvedMethod, grid: list[float], val_ids: list[str], slices: int) -> Tuning:
    import ray

    name = method.identity["method"]
    key = combine(
        {"identity": method.identity, "data": ctx.data_fingerprint, "val": val_ids, "slices": slices}
    )
    path = ctx.archive._path("_meta", "tuning", f"{key}.json")
    cached = ctx.archive._read_json(path)
    if cached is not None:
        return Tuning(name, cached["grid"], cached["psnr"], cached["chosen"])
    task = ray.remote(num_cpus=1)(score_weight)
    base = {k: v for k, v in method.identity["options"].items() if k != "lam"}
    refs = [task.remote(ctx.archive, name, base | {"lam": lam}, val_ids, slices) for lam in grid]
    scores = [float(s) for s in ray.get(refs)]
    best = int(np.argmax(scores))
    result = Tuning(name, grid, scores, grid[best])
    ctx.archive._write_json(path, {"grid": grid, "psnr": scores, "chosen": grid[best]})
    return result


def tune_methods(
    ctx: Any, methods: list[ResolvedMethod], slices: int
) -> tuple[list[ResolvedMethod], list[Tuning]]:
    """Resolve every weight grid among ``methods`` to its best weight (see the module docstring).

    Raises:
        StageError: a grid is given but the archive has no validation scans with measurements.
    """
    grids = [m for m in methods if isinstance(m.identity.get("options", {}).get("lam"), list)]
    if not grids:
        return methods, []
    from pipelines.store import MEASUREMENTS

    measured = ctx.archive.committed(MEASUREMENTS)
    val_ids = [s for s in ctx.archive.scans("val") if s in measured]
    if not val_ids:
        names = [m.key for m in grids]
        raise StageError(
            f"recon: {names} give a grid of weights to choose from, which needs validation scans; the "
            "archive's catalog has none with measurements. Give one weight, or add a val split"
        )
    tunings = []
    out = []
    for method in methods:
        if method not in grids:
            out.append(method)
            continue
        grid = [float(x) for x in method.identity["options"]["lam"]]
        ctx.console.print(f"tuning {method.key}: lam from {grid} on {len(val_ids)} validation scan(s)")
        tuning = _tune_one(ctx, method, grid, val_ids, slices)
        tunings.append(tuning)
        for step, (lam, score) in enumerate(zip(tuning.grid, tuning.psnr, strict=True)):
            ctx.tracker.log_metrics(
                {f"tune/{method.key}/psnr": score, f"tune/{method.key}/lam": lam}, step=step
            )
        options = method.identity["options"] | {"lam": tuning.chosen}
        identity = method.identity | {"options": options, "lam_grid": grid}
        out.append(replace(method, identity=identity))
    return out, tunings
