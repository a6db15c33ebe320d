"""Honest baselines and the stability audit, through a pipeline: a λ grid chosen on the validation
split, and every method's amplification under a worst-case perturbation."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from pipelines.runner import run_pipeline
from pipelines.spec import PipelineSpec
from pipelines.store import Archive

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

GRID = [0.0005, 0.01, 0.2]


def _spec(root, **evaluate) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "name": "base",
            "archive": {"path": str(root / "archive")},
            "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "base"},
            "stages": [
                {"kind": "phantoms", "n_scans": 6, "shape": [8, 32, 32],
                 "split": {"train": 2, "val": 2, "test": 2}},
                {"kind": "simulate", "mask": {"acceleration": 4}, "snr_db": 30},
                {"kind": "train", "model": {"name": "unet_post", "kwargs": {"features": [4, 8]}}, "epochs": 1,
                 "batch_size": 4},
                {"kind": "recon", "methods": ["zero_filled", "cs_tv", "learned:train"], "tune_slices": 2,
                 "options": {"cs_tv": {"lam": GRID, "max_iter": 60}}},
                {"kind": "evaluate", **evaluate},
            ],
        }
    )  # fmt: skip


@pytest.fixture(scope="module")
def benchmarked(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    spec = _spec(root, stability={"eps": 0.02, "steps": 3, "trials": 2})
    return root, run_pipeline(spec, Console(quiet=True))


def test_the_weight_is_chosen_on_validation_and_recorded(benchmarked):
    root, result = benchmarked
    (tuning,) = result.outputs["recon"]["tuning"]
    assert tuning["grid"] == GRID and tuning["chosen"] == GRID[int(np.argmax(tuning["psnr"]))]
    assert len(set(tuning["psnr"])) == 3, "each weight was scored"
    archive = Archive(str(root / "archive"))
    scan = archive.scans("test")[0]
    attrs = archive.open_array(scan, "recon/cs_tv").attrs
    assert attrs["options"]["lam"] == tuning["chosen"] and attrs["lam_grid"] == GRID
    assert result.metrics["cs_tv"]["lam"] == tuning["chosen"] and "lam" not in result.metrics["zero_filled"]
    client = MlflowClient(result.tracking_uri)
    history = client.get_metric_history(result.run_id, "tune/cs_tv/psnr")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(tuning["psnr"])


def test_every_method_has_an_amplification_and_the_linear_one_is_one(benchmarked):
    _, result = benchmarked
    for key in ("zero_filled", "cs_tv", "base-train.v1"):
        assert np.isfinite(result.metrics[key]["amplification"]), key
        assert result.metrics[key]["amplification"] >= result.metrics[key]["amplification_random"]
    assert result.metrics["zero_filled"]["amplification"] == pytest.approx(1.0, abs=1e-3)  # Aᴴ on A r


def test_the_grid_is_not_searched_again_when_only_evaluation_changes(benchmarked):
    root, result = benchmarked
    tuned = sorted((root / "archive" / "_meta" / "tuning").iterdir())
    stamps = [p.stat().st_mtime_ns for p in tuned]
    again = run_pipeline(_spec(root, metrics=["psnr"]), Console(quiet=True))
    assert [r.status for r in again.stages][-2:] == ["skipped", "ran"]
    assert [p.stat().st_mtime_ns for p in sorted((root / "archive" / "_meta" / "tuning").iterdir())] == stamps
    assert again.metrics["cs_tv"]["lam"] == result.metrics["cs_tv"]["lam"]
