"""Small simulated archives that benchmarks build as setup (not timed), without Ray."""

from __future__ import annotations

from pathlib import Path

from operators.phantoms import random_ellipsoids
from pipelines.fanout import process_scan
from pipelines.simulate import simulate_scan
from pipelines.spec import SimulateStage
from pipelines.store import MEASUREMENTS, SOURCE, Archive, CatalogRow

__all__ = ["simulated_archive"]


def simulated_archive(
    path: Path, ids: list[str], shape: tuple[int, int, int], split: str, seed: int = 0
) -> Archive:
    """Random-ellipsoid phantoms ``ids`` of ``shape`` in ``split``, each simulated with the default
    simulate stage (1 coil, 4x random_1d, 40 dB) and committed, as a pipeline would leave them."""
    archive = Archive(str(path), create=True)
    for i, scan_id in enumerate(ids):
        record = archive.write_array(scan_id, "image", random_ellipsoids(shape, seed=i).image)
        archive.commit(SOURCE, scan_id, "fp-source", arrays={"image": record})
    archive.write_catalog([CatalogRow(s, "mri", shape, (1.0, 1.0, 1.0), "phantom", "", split) for s in ids])
    stage = SimulateStage(kind="simulate")
    for scan_id in ids:
        outcome = process_scan(
            archive, MEASUREMENTS, scan_id, "fp-sim", simulate_scan, ["kspace", "mask", "coil_maps"],
            {"stage": stage, "seed": seed},
        )  # fmt: skip
        if outcome.status != "done":
            raise RuntimeError(f"simulate failed for {scan_id}: {outcome.error}")
    archive.commit_stage(
        "simulate", "fp-sim", kind="simulate", units={MEASUREMENTS: "fp-sim", SOURCE: "fp-source"}
    )
    return archive
