"""Shared test helpers: small archives built in-process (no Ray), and running ``medrecon`` as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from models.registry import build_model, save_model
from operators.phantoms import random_ellipsoids
from pipelines.fanout import process_scan
from pipelines.simulate import simulate_scan
from pipelines.spec import MaskSpec, SimulateStage
from pipelines.store import MEASUREMENTS, SOURCE, Archive, CatalogRow
from pipelines.tracking import MlflowTracker, register_model, start_pipeline_run

ROOT = Path(__file__).resolve().parents[2]


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
                        "sinogram", "lowres"], {"stage": stage, "seed": seed})  # fmt: skip


def archive_with_model(root: Path, n: int = 24) -> tuple[Archive, str]:
    """``n`` simulated scans (no Ray) and a registered model ``quickstart-model`` version 1, in MLflow at
    ``<root>/mlflow.db``; returns the archive and the tracking URI."""
    archive = phantom_archive(root / "archive", n=n, shape=(4, 32, 32))
    stage = SimulateStage(kind="simulate", mask=MaskSpec(acceleration=4), snr_db=30)
    for i in range(n):
        assert simulate(archive, f"s{i}", stage).status == "done"
    archive.commit_stage(
        "simulate", "fp-sim", kind="simulate", units={"measurements": "fp-sim", "source": "fp-source"}
    )
    uri = f"sqlite:///{root}/mlflow.db"
    run_id = start_pipeline_run(uri, "train", "train", "fp", {})
    kwargs = {"n_iter": 2, "features": 4}
    save_model(build_model("unrolled_gd", kwargs), "unrolled_gd", kwargs, root / "m")
    MlflowTracker(uri, run_id).log_model_dir(root / "m", "models/model")
    assert register_model(uri, "quickstart-model", run_id, "models/model") == "models:/quickstart-model/1"
    return archive, uri


def medrecon(
    *args: str, tmp: Path | None = None, ray: Any = None, wait: bool = True, env: dict | None = None
) -> Any:
    """Run ``python -m pipelines.cli ARGS`` as a user would: attached to ``ray`` (a Ray module with a live
    session) or embedded, with ``tmp`` as its TMPDIR; ``wait=False`` returns the running process."""
    environ = {**os.environ, "COLUMNS": "200", **({"TMPDIR": str(tmp)} if tmp else {}), **(env or {})}
    if ray is not None:
        environ["MEDRECON_RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    else:
        environ.pop("MEDRECON_RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipelines.cli", *args]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=400)


def stage_row(stdout: str, prefix: str = "reprocess-") -> list[str]:
    """A stage's row in the printed Stages table: name, status, seconds, done, skipped, failed."""
    row = next(line for line in stdout.splitlines() if line.startswith(f"│ {prefix}"))
    return [c.strip() for c in row.strip("│").split("│")]


def wait_for(predicate, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
