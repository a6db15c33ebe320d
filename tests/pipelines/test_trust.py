"""Runs you can trust: nothing silently wrong, leaked or run twice (real ``medrecon`` processes).

Most jobs attach to the test session's Ray (``MEDRECON_RAY_ADDRESS``); the ones about the embedded
Ray's life start their own. Each runs with its own ``TMPDIR`` so leftovers can be counted.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
import zarr
from mlflow.tracking import MlflowClient

from pipelines.store import Archive
from tests.pipelines.helpers import archive_with_model, medrecon, stage_row, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

SECRET = "SUPERSECRET123"


def tiny(root: Path, **changes) -> Path:
    """A small full pipeline (phantoms, simulate, a 4-epoch model, recon, evaluate) written to a file."""
    raw = {
        "name": "trust",
        "archive": {"path": str(root / "archive"), "storage_options": {"key": "AKIAFAKE", "secret": SECRET}},
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "trust"},
        "stages": [
            {"kind": "phantoms", "n_scans": 6, "shape": [8, 32, 32],
             "split": {"train": 3, "val": 1, "test": 2}},
            {"kind": "simulate", "mask": {"acceleration": 4}},
            {"kind": "train", "name": "model",
             "model": {"name": "unrolled_gd", "kwargs": {"n_iter": 2, "features": 4}},
             "workers": 2, "epochs": 4, "batch_size": 4, "keep_checkpoints": 1},
            {"kind": "recon", "methods": ["zero_filled", "learned:model"]},
            {"kind": "evaluate"},
        ],
    }  # fmt: skip
    for key, value in changes.items():
        raw[key] = value
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def contested(ray_session, tmp_path_factory):
    """Three runs of one pipeline on one archive: the first, a second 2 s later without waiting, and a
    third with --wait-for-lock. Returns the root, the private TMPDIR and the three results."""
    root = tmp_path_factory.mktemp("trust")
    tmp = root / "tmp"
    tmp.mkdir()
    spec = tiny(root)
    first = medrecon("run", str(spec), tmp=tmp, ray=ray_session, wait=False)
    time.sleep(2.0)
    second = medrecon("run", str(spec), tmp=tmp, ray=ray_session)
    third = medrecon("run", str(spec), "--wait-for-lock", tmp=tmp, ray=ray_session, wait=False)
    out1, err1 = first.communicate(timeout=400)
    out3, err3 = third.communicate(timeout=400)
    results = {
        "first": (first.returncode, out1, err1),
        "second": (second.returncode, second.stdout, second.stderr),
        "third": (third.returncode, out3, err3),
    }
    return root, tmp, results


def test_a_second_run_on_an_archive_exits_2_naming_the_first(contested):
    root, _, results = contested
    codes = sorted(results[k][0] for k in ("first", "second"))
    assert codes == [0, 2], {k: r[2][-2000:] for k, r in results.items()}
    _, out, err = next(r for k, r in results.items() if k != "third" and r[0] == 2)
    assert "is in use by 'medrecon pipeline trust' (pid" in err and "--wait-for-lock" in err
    assert "Traceback" not in err


def test_waiting_for_the_lock_then_finds_everything_done(contested):
    root, _, results = contested
    code, out, err = results["third"]
    assert code == 0, err[-3000:]
    assert "waiting for the archive, in use by 'medrecon pipeline trust'" in out
    assert all(stage_row(out, name)[1] == "skipped" for name in ("phantoms", "simulate", "model", "recon"))


def test_exactly_one_training_one_version_one_lineage(contested):
    root, _, _ = contested
    client = MlflowClient(f"sqlite:///{root}/mlflow.db", registry_uri=f"sqlite:///{root}/mlflow.db")
    versions = client.search_model_versions("name='trust-model'")
    assert [str(v.version) for v in versions] == ["1"]
    (run,) = client.search_runs([client.get_experiment_by_name("trust").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "model/train_loss")] == [0, 1, 2, 3]
    archive = Archive(str(root / "archive"), {"key": "AKIAFAKE", "secret": SECRET})
    assert {
        archive.open_array(s, "recon/trust-model.v1").attrs["model_version"] for s in archive.scans("test")
    } == {"1"}
    trainings = list((root / "archive" / "_meta" / "train").iterdir())
    assert len(trainings) == 1
    checkpoints = list(trainings[0].glob("checkpoint_*"))
    assert 1 <= len(checkpoints) <= 2, "keep_checkpoints: 1, plus the latest"


def test_a_planted_secret_is_found_nowhere(contested):
    root, _, results = contested
    for _, out, err in results.values():
        assert SECRET not in out + err and "AKIAFAKE" not in out + err
    validate = medrecon("validate", str(root / "spec.yaml"), tmp=root / "tmp")
    assert validate.returncode == 0 and SECRET not in validate.stdout + validate.stderr
    assert "key: '***'" in validate.stdout
    leaks = []
    for folder in (root / "archive" / "_meta", root / "mlartifacts"):
        for path in folder.rglob("*"):
            if path.is_file() and SECRET.encode() in path.read_bytes():
                leaks.append(str(path))
    assert (root / "mlflow.db").is_file() and SECRET.encode() not in (root / "mlflow.db").read_bytes()
    assert not leaks, leaks


def test_a_changed_environment_resumes_cleanly_and_leaves_the_run_finished(contested, ray_session):
    root, tmp, _ = contested
    out = medrecon("run", str(root / "spec.yaml"), "--set", "ray.num_cpus=2", tmp=tmp, ray=ray_session)
    assert out.returncode == 0, out.stderr[-3000:]
    assert all(
        stage_row(out.stdout, n)[1] == "skipped"
        for n in ("phantoms", "simulate", "model", "recon", "evaluate")
    )
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("trust").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["medrecon.ray_num_cpus"] == "2"


def test_a_nan_in_an_image_is_quarantined_and_never_reaches_the_table(contested, ray_session):
    root, tmp, _ = contested
    archive = Archive(str(root / "archive"))
    scan = archive.scans("test")[0]
    image = archive.read_array(scan, "image")
    image[1, 5, 5] = np.nan  # behind the archive's back, after its commit
    zarr.open_array(zarr.storage.LocalStore(archive.uri), path=f"scans/{scan}/image", mode="r+")[...] = image
    spec = yaml.safe_load((root / "spec.yaml").read_text())
    spec["stages"][3]["methods"] = ["zero_filled", "cg_sense", "learned:model"]  # recon and evaluate rerun
    path = root / "nan.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = medrecon("run", str(path), tmp=tmp, ray=ray_session)
    assert out.returncode == 3, (out.stdout + out.stderr)[-3000:]
    assert f"evaluate: {scan}: IntegrityError: scans/{scan}/image" in out.stderr
    assert "nan" not in out.stdout.lower().replace("nanmean", "")
    assert "Results (1 scans)" in out.stdout
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    metrics = {k: v for r in client.search_runs([client.get_experiment_by_name("trust").experiment_id])
               for k, v in r.data.metrics.items()}  # fmt: skip
    assert metrics and all(np.isfinite(v) for v in metrics.values())
    show = medrecon("show", str(root / "archive"), tmp=tmp)
    row = next(line for line in show.stdout.splitlines() if line.startswith(f"│ {scan}"))
    assert row.rstrip("│ ").endswith("✗"), row  # evaluate/evaluate, the last column


def test_no_temporary_leftovers_after_five_runs(contested):
    _, tmp, _ = contested  # five runs used tmp (three contested, the changed environment, the NaN image)
    # The drivers' temp folder, and the session cluster's (its actors load the models).
    for folder in (tmp, Path(os.environ["TMPDIR"])):
        assert not [p.name for p in folder.iterdir() if p.name.startswith("medrecon-")], folder


def test_a_deleted_chunk_is_named_exits_3_and_the_other_scans_are_untouched(ray_session, tmp_path):
    archive, _ = archive_with_model(tmp_path)
    clean = medrecon("reprocess", archive.uri, "--method", "zero_filled", tmp=tmp_path, ray=ray_session)
    assert clean.returncode == 0, clean.stderr[-3000:]
    reference = {s: archive.read_array(s, "recon/zero_filled").tobytes() for s in archive.scans("all")}
    for s in archive.scans("all"):
        archive.uncommit("recon/zero_filled", s)
    for name, rec in archive.stage_records().items():
        if rec["kind"] == "recon":
            archive.uncommit_stage(name)
    victim = "s7"
    os.remove(Path(archive.uri) / "scans" / victim / "kspace" / "c" / "0" / "0" / "0" / "0")
    out = medrecon("reprocess", archive.uri, "--method", "zero_filled", tmp=tmp_path, ray=ray_session)
    assert out.returncode == 3, (out.stdout + out.stderr)[-3000:]
    assert f"{victim}: IntegrityError: scans/{victim}/kspace: chunk c/0/0/0/0 (slices 0-3)" in out.stderr
    assert "is missing from the store" in out.stderr and "1 scan(s) quarantined" in out.stderr
    assert victim not in archive.committed("recon/zero_filled") and not archive.has_array(
        victim, "recon/zero_filled"
    )
    for s in archive.scans("all"):
        if s != victim:
            assert archive.read_array(s, "recon/zero_filled").tobytes() == reference[s], s
    show = medrecon("show", archive.uri, tmp=tmp_path)
    row = next(line for line in show.stdout.splitlines() if line.startswith(f"│ {victim} "))
    assert "✗" in row and f"recon/zero_filled: {victim}: IntegrityError" in show.stdout


@pytest.mark.parametrize(
    ("case", "changes", "message"),
    [
        ("huge phantom", {"shape": [10000, 10000, 10000]},
         r"stage 'phantoms': one task needs about [\d.]+ TiB \(a 10000x10000x10000 phantom"),
        ("model kwarg", {"kwargs": {"bogus": 3}}, r"model: .*bad keyword arguments.*bogus"),
        ("tracking down", {"tracking": "http://127.0.0.1:9"},
         r"MLflow server at http://127\.0\.0\.1:9 is not reachable \(connection refused\)"),
    ],
)  # fmt: skip
def test_refused_in_seconds_with_exit_2_and_no_ray(tmp_path, case, changes, message):
    import re

    spec = yaml.safe_load(tiny(tmp_path).read_text())
    if "shape" in changes:
        spec["stages"][0]["shape"] = changes["shape"]
    if "kwargs" in changes:
        spec["stages"][2]["model"]["kwargs"] |= changes["kwargs"]
    if "tracking" in changes:
        spec["tracking"]["uri"] = changes["tracking"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    ray_tmp = tmp_path / "raytmp"
    ray_tmp.mkdir()
    t0 = time.monotonic()
    out = medrecon("run", str(path), tmp=tmp_path, env={"RAY_TMPDIR": str(ray_tmp)})
    seconds = time.monotonic() - t0
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    assert re.search(message, out.stderr), out.stderr
    assert "Traceback" not in out.stderr and seconds < 10, seconds
    assert not any(ray_tmp.iterdir()), "Ray was started"
    assert not (tmp_path / "archive").exists() or case != "huge phantom"


def test_sigterm_marks_the_run_killed_releases_the_lease_and_stops_the_embedded_ray(tmp_path):
    spec = tiny(tmp_path)
    proc = medrecon("run", str(spec), tmp=tmp_path, wait=False)
    archive_dir = tmp_path / "archive"
    wait_for(lambda: (archive_dir / "_meta" / "train").exists(), what="training to start")
    children = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err
    assert not (archive_dir / "_meta" / "lease.json").exists()
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert [r[0] for r in db.execute("select status from runs")] == ["KILLED"]
    alive = lambda: [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]  # noqa: E731
    wait_for(lambda: not alive(), timeout=30, what="the embedded Ray's processes to exit")


def test_leftovers_of_a_sigkilled_run_are_reaped_by_the_next_embedded_start(tmp_path):
    from pipelines.embedded import reap_orphans

    code = (
        "import ray, time; ray.init(address='local', num_cpus=1, include_dashboard=False); "
        "print('up', flush=True); time.sleep(600)"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # Ray's own folder stays short: sockets have a path limit
    driver = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert driver.stdout.readline().strip() == "up"
    names = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
    children = psutil.Process(driver.pid).children(recursive=True)
    agents = {p.pid for p in children if (p.cmdline() or [""])[0] in names}
    driver.kill()
    driver.wait()
    time.sleep(3)
    left = {p for p in agents if psutil.pid_exists(p)}
    assert left, "expected Ray's agents to outlive a SIGKILLed driver (if Ray fixed this, drop the reaper)"
    reaped = {pid for pid, _ in reap_orphans()}
    assert left <= reaped
    wait_for(lambda: not any(psutil.pid_exists(p) for p in left), timeout=10, what="the orphans to exit")
