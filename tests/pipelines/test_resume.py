"""Training survives faults: SIGKILL to a Ray Train worker, and separately to the driver, after the
second checkpoint; the job resumes at the third epoch in the same MLflow run, and ends with the
weights of an uninterrupted run.

One worker on the CPU, so every step is deterministic (no DDP all-reduce order, one torch thread):
the test asserts the final weights are *equal*, not close.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from pipelines.methods import load_model_uri
from pipelines.spec import MaskSpec, SimulateStage
from pipelines.tracking import client
from tests.pipelines.helpers import medrecon, phantom_archive, simulate, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

EPOCHS = 4


@pytest.fixture(scope="module")
def base_archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    archive = phantom_archive(root / "archive", n=8, shape=(8, 64, 64), splits=["train"] * 8)
    stage = SimulateStage(kind="simulate", mask=MaskSpec(acceleration=4), snr_db=30)
    for i in range(8):
        assert simulate(archive, f"s{i}", stage).status == "done"
    archive.commit_stage("simulate", "fp-sim", kind="simulate", units={"measurements": "fp-sim"})
    return root / "archive"


def scenario(base: Path, root: Path) -> tuple[Path, str]:
    """A copy of the simulated archive, its own MLflow, and a train-only pipeline file."""
    shutil.copytree(base, root / "archive")
    uri = f"sqlite:///{root}/mlflow.db"
    spec = {
        "name": "resume",
        "seed": 3,
        "archive": {"path": str(root / "archive")},
        "tracking": {"uri": uri, "experiment": "resume"},
        "stages": [
            {
                "kind": "train",
                "name": "model",
                "model": {"name": "unrolled_gd", "kwargs": {"n_iter": 4, "features": 16}},
                "workers": 1,
                "epochs": EPOCHS,
                "batch_size": 4,
                "lr": 0.002,
                "schedule": "cosine",
                "masks": {"accelerations": [4]},
                "augment": {"flip": True, "rotate_degrees": 10, "elastic": 0.3},
                "max_failures": 2,
                "keep_checkpoints": 2,
            }
        ],
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, uri


def checkpoints(root: Path) -> int:
    """Epochs whose checkpoint Ray Train has recorded (its snapshot is what a restart reads)."""
    for snapshot in (root / "archive" / "_meta" / "train").glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except ValueError:  # being rewritten
            return 0
        return int(latest.get("metrics", {}).get("epoch", -1)) + 1
    return 0


def final(uri: str) -> tuple[dict[str, torch.Tensor], str, list[int], str]:
    """(weights of the registered model, the run, the epochs with a logged loss, resumed_from_epoch)."""
    c = client(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("resume").experiment_id])
    model, _ = load_model_uri("models:/resume-model/1", uri)
    steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "model/train_loss"))
    return model.state_dict(), run.info.run_id, steps, run.data.tags.get("model.resumed_from_epoch", "")


def train_workers(since: float) -> list[psutil.Process]:
    """Ray Train worker processes started after ``since`` (Ray may keep an earlier one idle)."""
    found = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        try:
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.info["create_time"] >= since:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {float((a[k] - b[k]).abs().max())}"


@pytest.fixture(scope="module")
def reference(base_archive, tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("uninterrupted")
    spec, uri = scenario(base_archive, root)
    out = medrecon("run", str(spec), tmp=root, ray=ray_session)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    weights, _, steps, resumed = final(uri)
    assert steps == list(range(EPOCHS)) and resumed == "0"
    return weights


def test_a_killed_driver_restarts_at_epoch_3_in_the_same_run_with_the_same_weights(
    base_archive, reference, tmp_path, ray_session
):
    spec, uri = scenario(base_archive, tmp_path)
    proc = medrecon("run", str(spec), tmp=tmp_path, ray=ray_session, wait=False)
    wait_for(lambda: checkpoints(tmp_path) >= 2 or proc.poll() is not None, 300, "two checkpoints")
    assert proc.poll() is None, "training ended before the kill: " + proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    c = client(uri)
    (killed,) = c.search_runs([c.get_experiment_by_name("resume").experiment_id])

    out = medrecon("run", str(spec), tmp=tmp_path, ray=ray_session)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "took over the archive lease" in out.stdout  # the killed driver's lease
    weights, run_id, steps, resumed = final(uri)
    assert resumed == "2"  # 0-based: the third epoch
    assert run_id == killed.info.run_id
    assert steps == list(range(EPOCHS))  # epochs 0-1 from the first process, 2-3 from the second
    assert_same_weights(weights, reference)


def test_a_killed_worker_is_restarted_by_ray_train_from_the_latest_checkpoint_with_the_same_weights(
    base_archive, reference, tmp_path, ray_session
):
    spec, uri = scenario(base_archive, tmp_path)
    started = time.time()
    proc = medrecon("run", str(spec), tmp=tmp_path, ray=ray_session, wait=False)
    wait_for(lambda: checkpoints(tmp_path) >= 2 or proc.poll() is not None, 300, "two checkpoints")
    workers = train_workers(started)
    assert len(workers) == 1 and proc.poll() is None
    os.kill(workers[0].pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    weights, _, steps, resumed = final(uri)
    assert resumed == "2"
    assert sorted(set(steps)) == list(range(EPOCHS))
    assert_same_weights(weights, reference)
