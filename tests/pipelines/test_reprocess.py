"""``medrecon reprocess``: an archive, methods and model URIs, no spec; a killed actor; a killed driver.

The jobs run as real ``medrecon`` processes attached to the test session's Ray cluster
(``MEDRECON_RAY_ADDRESS``), the way a user's job attaches to a running cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import psutil
import pytest

from models.registry import build_model, save_model
from pipelines.methods import parse_method
from pipelines.recon import Reconstructor, recon_code_version, resolve_methods
from pipelines.runner import external_data_fingerprint
from pipelines.spec import MaskSpec, SimulateStage, SolverOptions
from pipelines.store import Archive
from pipelines.tracking import MlflowTracker, register_model, start_pipeline_run
from tests.pipelines.helpers import phantom_archive, simulate

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
N_SCANS = 24
SLOW = ["--method", "cs_tv", "--option", "cs_tv.max_iter=150", "--option", "cs_tv.tol=0"]  # ~0.3 s a scan


def build(root: Path) -> tuple[Archive, str]:
    """An archive of simulated scans (no Ray) and a registered model ``quickstart-model`` version 1."""
    archive = phantom_archive(root / "archive", n=N_SCANS, shape=(4, 32, 32))
    stage = SimulateStage(kind="simulate", mask=MaskSpec(acceleration=4), snr_db=30)
    for i in range(N_SCANS):
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


def medrecon(*args: str, ray_session, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    env = {
        **os.environ,
        "MEDRECON_RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
        "COLUMNS": "200",
    }
    cmd = [sys.executable, "-m", "pipelines.cli", *args]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def committed(archive: Archive, unit: str) -> dict[str, dict]:
    return {s: archive.commit_record(unit, s) for s in archive.committed(unit)}


def stage_row(stdout: str, prefix: str = "reprocess-") -> list[str]:
    """A stage's row in the printed Stages table: name, status, seconds, done, skipped, failed."""
    row = next(line for line in stdout.splitlines() if line.startswith(f"│ {prefix}"))
    return [c.strip() for c in row.strip("│").split("│")]


def wait_for(predicate, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def clean_records(archive: Archive, root: Path) -> dict[str, list[int]]:
    """The CRCs a clean in-process run (no Ray) writes for the slow method, per scan, on a copy."""
    import shutil

    copy = Archive(str(shutil.copytree(archive.uri, root / "clean")))
    for unit in copy.units():
        if unit.startswith("recon/"):
            for scan in copy.committed(unit):
                copy.uncommit(unit, scan)
    options = {"cs_tv": SolverOptions(max_iter=150, tol=0.0)}
    methods = resolve_methods([parse_method("cs_tv")], options, "sqlite:///unused.db")
    fps = {m.key: m.fingerprint(external_data_fingerprint(copy), recon_code_version()) for m in methods}
    rec = Reconstructor(copy.uri, {}, [asdict(m) for m in methods], fps)
    rec({"scan_id": np.array(copy.scans("all"))})
    return {s: r["arrays"]["recon/cs_tv"]["crc32"] for s, r in committed(copy, "recon/cs_tv").items()}


@pytest.fixture
def job(tmp_path):
    return build(tmp_path)


def test_reprocess_writes_each_method_with_lineage_and_exits_0(ray_session, job, tmp_path):
    archive, uri = job
    out = medrecon(
        "reprocess", archive.uri, "--method", "zero_filled", "--method", "models:/quickstart-model/1",
        "--split", "test", "--evaluate", ray_session=ray_session,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Results (24 scans)" in out.stdout and "quickstart-model.v1" in out.stdout
    for scan in archive.scans("all"):
        lineage = archive.open_array(scan, "recon/quickstart-model.v1").attrs
        assert lineage["model_uri"] == "models:/quickstart-model/1" and lineage["model_version"] == "1"
        assert set(lineage) >= {"method", "code_version", "input_checksum", "time", "fingerprint"}
        assert archive.read_array(scan, "recon/zero_filled").shape == (4, 32, 32)
    again = medrecon(
        "reprocess", archive.uri, "--method", "zero_filled", "--method", "models:/quickstart-model/1",
        "--split", "test", ray_session=ray_session,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    cells = stage_row(again.stdout)
    assert cells[1] == "skipped", "the same job again: its stage record says it is done"


def test_bad_arguments_exit_2_with_one_line(ray_session, job):
    archive, _ = job
    out = medrecon("reprocess", archive.uri, "--method", "magic", ray_session=ray_session)
    assert out.returncode == 2 and "unknown method 'magic'" in out.stderr and "Traceback" not in out.stderr
    out = medrecon("reprocess", archive.uri, "--method", "models:/nope/1", ray_session=ray_session)
    assert (
        out.returncode == 1 and "has no version 1 of 'nope'" in out.stderr and "Traceback" not in out.stderr
    )


def test_a_killed_actor_is_retried_and_every_scan_is_committed_once(ray_session, job, tmp_path):
    archive, _ = job
    proc = medrecon("reprocess", archive.uri, *SLOW, "--actors", "2", ray_session=ray_session, wait=False)
    wait_for(lambda: len(archive.committed("recon/cs_tv")) >= 4, what="the first commits")
    actors = [
        p for p in psutil.process_iter(["cmdline"]) if "Reconstructor" in " ".join(p.info["cmdline"] or [])
    ]
    assert actors, "no recon actor process found"
    actors[0].send_signal(signal.SIGKILL)
    before = committed(archive, "recon/cs_tv")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert len(before) < N_SCANS, "the actor was killed after the job had finished"
    after = committed(archive, "recon/cs_tv")
    assert set(after) == set(archive.scans("all"))
    assert all(after[s] == before[s] for s in before), "a scan committed before the kill was committed again"
    assert not archive.quarantined("recon/cs_tv")
    assert {s: r["arrays"]["recon/cs_tv"]["crc32"] for s, r in after.items()} == clean_records(
        archive, tmp_path
    )


def test_a_killed_driver_is_resumed_and_only_the_remainder_is_done(ray_session, job):
    archive, _ = job
    proc = medrecon("reprocess", archive.uri, *SLOW, ray_session=ray_session, wait=False)
    wait_for(lambda: len(archive.committed("recon/cs_tv")) >= 4, what="the first commits")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(3.0)  # the dead job's actors are stopped by Ray; let any in-flight commit land
    done_before = set(archive.committed("recon/cs_tv"))
    assert 4 <= len(done_before) < N_SCANS
    out = medrecon("reprocess", archive.uri, *SLOW, ray_session=ray_session)
    assert out.returncode == 0, out.stderr[-3000:]
    cells = stage_row(out.stdout)
    assert (
        cells[1] == "ran"
        and int(cells[3]) == N_SCANS - len(done_before)
        and int(cells[4]) == len(done_before)
    )
    assert set(archive.committed("recon/cs_tv")) == set(archive.scans("all"))
