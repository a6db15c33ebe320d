"""Small archives built in-process (no Ray): phantoms and simulated measurements, committed."""

from __future__ import annotations

from pathlib import Path

from operators.phantoms import random_ellipsoids
from pipelines.fanout import process_scan
from pipelines.simulate import simulate_scan
from pipelines.spec import SimulateStage
from pipelines.store import MEASUREMENTS, SOURCE, Archive, CatalogRow


def add_image(archive: Archive, scan_id: str, image, fingerprint: str = "fp-source") -> None:
    """Write and commit ``image`` as a scan's source, the way the phantoms stage does."""
    record = archive.write_array(scan_id, "image", image)
    archive.commit(SOURCE, scan_id, fingerprint, arrays={"image": record})


def phantom_archive(root: Path, n: int = 3, shape=(4, 32, 32), splits=None) -> Archive:
    """An archive of ``n`` committed random-ellipsoid images ``s0..``, with a catalog."""
    archive = Archive(str(root), create=True)
    rows = []
    for i in range(n):
        add_image(archive, f"s{i}", random_ellipsoids(shape, seed=i).image)
        split = (splits or ["test"] * n)[i]
        rows.append(CatalogRow(f"s{i}", "mri", shape, (1.0, 1.0, 1.0), "phantom", "", split))
    archive.write_catalog(rows)
    return archive


def simulate(archive: Archive, scan_id: str, stage: SimulateStage, seed: int = 0, fp: str = "fp-sim"):
    """Simulate and commit one scan (what a simulate task does); returns the outcome."""
    return process_scan(archive, MEASUREMENTS, scan_id, fp, simulate_scan, ["kspace", "mask", "coil_maps",
                        "sinogram"], {"stage": stage, "seed": seed})  # fmt: skip
