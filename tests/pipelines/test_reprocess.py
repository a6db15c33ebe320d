"""``medrecon reprocess``: an archive, methods and model URIs, no spec; a killed actor; a killed driver.

The jobs run as real ``medrecon`` processes attached to the test session's Ray cluster
(``MEDRECON_RAY_ADDRESS``), the way a user's job attaches to a running cluster.
"""

from __future__ import annotations

import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipelines.methods import parse_method
from pipelines.recon import Reconstructor, recon_code_version, resolve_methods
from pipelines.spec import SolverOptions
from pipelines.store import Archive
from tests.pipelines.helpers import archive_with_model, medrecon, stage_row, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

N_SCANS = 24
SLOW = ["--method", "cs_tv", "--option", "cs_tv.max_iter=150", "--option", "cs_tv.tol=0"]  # ~0.3 s a scan


def committed(archive: Archive, unit: str) -> dict[str, dict]:
    return {s: archive.commit_record(unit, s) for s in archive.committed(unit)}


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
    measured = copy.committed("measurements")
    fps = {m.key: {s: m.fingerprint(measured[s], recon_code_version()) for s in measured} for m in methods}
    rec = Reconstructor(copy.uri, {}, [asdict(m) for m in methods], fps)
    rec({"scan_id": np.array(copy.scans("all"))})
    return {s: r["arrays"]["recon/cs_tv"]["crc32"] for s, r in committed(copy, "recon/cs_tv").items()}


@pytest.fixture
def job(tmp_path):
    return archive_with_model(tmp_path, N_SCANS)


def test_reprocess_writes_each_method_with_lineage_and_exits_0(ray_session, job, tmp_path):
    archive, uri = job
    out = medrecon(
        "reprocess", archive.uri, "--method", "zero_filled", "--method", "models:/quickstart-model/1",
        "--split", "test", "--evaluate", ray=ray_session,
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
        "--split", "test", ray=ray_session,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    cells = stage_row(again.stdout)
    assert cells[1] == "skipped", "the same job again: its stage record says it is done"


def test_bad_arguments_exit_2_with_one_line(ray_session, job):
    archive, _ = job
    out = medrecon("reprocess", archive.uri, "--method", "magic", ray=ray_session)
    assert out.returncode == 2 and "unknown method 'magic'" in out.stderr and "Traceback" not in out.stderr
    out = medrecon("reprocess", archive.uri, "--method", "models:/nope/1", ray=ray_session)  # before Ray
    assert (
        out.returncode == 2 and "has no version 1 of 'nope'" in out.stderr and "Traceback" not in out.stderr
    )


def test_a_model_that_does_not_fit_the_archives_operator_is_refused_before_ray(ray_session, job, tmp_path):
    from models.registry import build_model, save_model
    from pipelines.tracking import MlflowTracker, register_model, start_pipeline_run

    archive, uri = job  # single-coil MRI; VarNet needs SENSE
    run_id = start_pipeline_run(uri, "train", "varnet", "fp-v", {})
    kwargs = {"n_cascades": 1, "features": 4, "sens_features": 4}
    save_model(build_model("varnet", kwargs), "varnet", kwargs, tmp_path / "v")
    MlflowTracker(uri, run_id).log_model_dir(tmp_path / "v", "models/v")
    model_uri = register_model(uri, "coils", run_id, "models/v")
    out = medrecon("reprocess", archive.uri, "--method", model_uri, ray=None, env={"RAY_ADDRESS": ""})
    assert out.returncode == 2, (out.stdout + out.stderr)[-2000:]
    assert f"model {model_uri} (varnet) does not fit this pipeline's operator CartesianMRI" in out.stderr
    assert "images (32, 32), measurements (32, 32)" in out.stderr and "Traceback" not in out.stderr
    assert "Token authentication" not in out.stderr, "Ray was started"


def test_a_killed_actor_is_retried_and_every_scan_is_committed_once(ray_session, job, tmp_path):
    archive, _ = job
    proc = medrecon("reprocess", archive.uri, *SLOW, "--actors", "2", ray=ray_session, wait=False)
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
    proc = medrecon("reprocess", archive.uri, *SLOW, ray=ray_session, wait=False)
    wait_for(lambda: len(archive.committed("recon/cs_tv")) >= 4, what="the first commits")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(3.0)  # the dead job's actors are stopped by Ray; let any in-flight commit land
    done_before = set(archive.committed("recon/cs_tv"))
    assert 4 <= len(done_before) < N_SCANS
    out = medrecon("reprocess", archive.uri, *SLOW, ray=ray_session)
    assert out.returncode == 0, out.stderr[-3000:]
    cells = stage_row(out.stdout)
    assert (
        cells[1] == "ran"
        and int(cells[3]) == N_SCANS - len(done_before)
        and int(cells[4]) == len(done_before)
    )
    assert set(archive.committed("recon/cs_tv")) == set(archive.scans("all"))
