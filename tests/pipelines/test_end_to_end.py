"""A tiny quickstart through the real Ray, Zarr and MLflow path, and its re-run semantics."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from rich.console import Console

from pipelines.runner import run_pipeline
from pipelines.spec import PipelineSpec
from pipelines.store import MEASUREMENTS, Archive

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

QUICKSTART = Path(__file__).resolve().parents[2] / "pipelines" / "specs" / "quickstart.yaml"


def _shipped(name: str, root: Path, experiment: str, phantoms: dict) -> tuple[dict, dict[str, dict]]:
    """A spec of ``pipelines/specs`` as raw YAML, its archive and tracking moved under ``root``
    and its phantoms stage updated with ``phantoms``; also its stages by kind, to shrink them."""
    raw = yaml.safe_load((QUICKSTART.parent / name).read_text())
    raw["archive"] = {"path": str(root / "archive")}
    raw["tracking"] = {"uri": f"sqlite:///{root}/mlflow.db", "experiment": experiment}
    stages = {s["kind"]: s for s in raw["stages"]}
    stages["phantoms"].update(phantoms)
    return raw, stages


def tiny_spec(root: Path, **changes) -> PipelineSpec:
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["name"] = "tiny"
    raw["archive"] = {"path": str(root / "archive")}
    raw["tracking"] = {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "tiny"}
    stages = {s["kind"]: s for s in raw["stages"]}
    stages["phantoms"].update(n_scans=6, shape=[8, 48, 48], split={"train": 3, "val": 1, "test": 2})
    stages["train"].update(
        epochs=2, batch_size=4, model={"name": "unrolled_gd", "kwargs": {"n_iter": 2, "features": 8}}
    )
    stages["recon"]["options"] = {"cs_tv": {"max_iter": 30}}
    for kind, fields in changes.items():
        stages[kind].update(fields)
    return PipelineSpec.model_validate(raw)


@pytest.fixture(scope="module")
def first_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    spec = tiny_spec(root)
    result = run_pipeline(spec, Console(quiet=True))
    return root, spec, result


def test_every_stage_ran_and_metrics_reached_mlflow(first_run):
    root, spec, result = first_run
    assert [(r.name, r.status) for r in result.stages] == [
        ("phantoms", "ran"),
        ("simulate", "ran"),
        ("model", "ran"),
        ("recon", "ran"),
        ("evaluate", "ran"),
    ]
    assert all(not r.failed for r in result.stages) and not result.quarantined
    assert list(result.metrics) == ["zero_filled", "cs_tv", "tiny-model.v1"]
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    for method in ("zero_filled", "tiny-model.v1"):
        for metric in ("psnr", "ssim", "nmse"):
            logged = run.data.metrics[f"{method}/{metric}"]
            assert logged == pytest.approx(result.metrics[method][metric])
    assert 15 < run.data.metrics["zero_filled/psnr"] < 40
    assert 0 < run.data.metrics["zero_filled/ssim"] < 1
    assert "model/train_loss" in run.data.metrics and "model/val_psnr" in run.data.metrics
    assert run.data.params["model.epochs"] == "2" and "archive" not in " ".join(run.data.params)
    assert run.data.tags["medrecon.archive"] == result.archive_uri
    artifacts = {
        a.path for a in MlflowClient(result.tracking_uri).list_artifacts(result.run_id, "evaluation/evaluate")
    }
    assert "evaluation/evaluate/per_scan_metrics.parquet" in artifacts
    assert any(p.endswith("_comparison.png") for p in artifacts)


def test_metrics_match_an_independent_recomputation(first_run):
    """The logged means equal PSNRs recomputed here from the arrays in the archive."""
    from operators.metrics import psnr

    root, spec, result = first_run
    archive = Archive(str(root / "archive"))
    test_ids = archive.scans("test")
    assert len(test_ids) == 2
    for method in ("zero_filled", "tiny-model.v1"):
        scores = []
        for sid in test_ids:
            ref = archive.read_array(sid, "image")
            scores.append(psnr(archive.read_array(sid, f"recon/{method}"), ref))
        assert np.mean(scores) == pytest.approx(result.metrics[method]["psnr"], rel=1e-6)
    lineage = archive.open_array(test_ids[0], "recon/tiny-model.v1").attrs
    assert lineage["model_uri"] == result.outputs["model"]["model_uri"] == "models:/tiny-model/1"
    assert lineage["method"] == "learned:model" and lineage["producer"] == "recon"


def test_same_seed_gives_same_archive(first_run, tmp_path):
    """Determinism: phantoms, masks and k-space are identical for the same spec and seed."""
    root, spec, _ = first_run
    from pipelines.fanout import process_scan
    from pipelines.phantoms import write_phantom
    from pipelines.simulate import simulate_scan
    from pipelines.store import SOURCE

    a = Archive(str(root / "archive"))
    b = Archive(str(tmp_path / "b"), create=True)
    sid = a.scans("train")[0]
    process_scan(
        b, SOURCE, sid, "fp", write_phantom, [], {"stage": spec.stage("phantoms"), "seed": spec.seed}
    )
    process_scan(
        b, MEASUREMENTS, sid, "fp", simulate_scan, [], {"stage": spec.stage("simulate"), "seed": spec.seed}
    )
    for name in ("image", "mask", "kspace"):
        assert np.array_equal(a.read_array(sid, name), b.read_array(sid, name)), name


def test_rerun_skips_everything_and_resumes_the_same_mlflow_run(first_run):
    root, spec, result = first_run
    again = run_pipeline(spec, Console(quiet=True))
    assert [r.status for r in again.stages] == ["skipped"] * 5
    assert again.run_id == result.run_id
    assert again.metrics == result.metrics


def test_changing_one_stage_redoes_it_and_the_stages_after(first_run):
    root, spec, result = first_run
    changed = tiny_spec(root, recon={"methods": ["zero_filled"], "options": {}})
    out = run_pipeline(changed, Console(quiet=True))
    assert [(r.name, r.status) for r in out.stages] == [
        ("phantoms", "skipped"),
        ("simulate", "skipped"),
        ("model", "skipped"),
        ("recon", "ran"),
        ("evaluate", "ran"),
    ]
    assert out.stages[3].skipped == 2 and out.stages[3].done == 0, "zero_filled was already committed"
    assert set(out.metrics) == {"zero_filled"}
    assert out.metrics["zero_filled"]["psnr"] == pytest.approx(result.metrics["zero_filled"]["psnr"])


def test_half_written_archive_redoes_only_the_uncommitted_scan(first_run):
    root, spec, _ = first_run
    archive = Archive(str(root / "archive"))
    ids = archive.scans("all")
    victim, others = ids[0], ids[1:]
    original = archive.read_array(victim, "kspace")
    # A crash mid-stage: the victim's k-space is half-written and uncommitted, the stage never finished.
    archive.write_array(victim, "kspace", np.zeros_like(original))
    archive.uncommit(MEASUREMENTS, victim)
    archive.uncommit_stage("simulate")
    kspace_dir = lambda s: root / "archive" / "scans" / s / "kspace"  # noqa: E731
    before = {s: os.stat(next(kspace_dir(s).rglob("c/*"))).st_mtime_ns for s in others}
    partial = PipelineSpec.model_validate(
        {
            **spec.model_dump(mode="json"),
            "stages": [
                spec.stage("phantoms").model_dump(mode="json"),
                spec.stage("simulate").model_dump(mode="json"),
            ],
        }
    )
    out = run_pipeline(partial, Console(quiet=True))
    sim = out.stages[1]
    assert (sim.status, sim.done, sim.skipped) == ("ran", 1, len(others))
    assert np.array_equal(archive.read_array(victim, "kspace"), original)
    after = {s: os.stat(next(kspace_dir(s).rglob("c/*"))).st_mtime_ns for s in others}
    assert after == before, "committed scans were rewritten"


def test_ct_pipeline_without_training_through_the_cli(ray_session, tmp_path):
    """The shipped CT spec, shrunk, run by ``medrecon run`` as a second driver on the session's cluster."""
    import subprocess
    import sys

    tiny = {"n_scans": 3, "shape": [8, 48, 48], "split": {"train": 1, "val": 1, "test": 1}}
    raw, stages = _shipped("ct_sparse_view.yaml", tmp_path, "ct", tiny)
    stages["recon"]["options"]["cs_tv"].update(max_iter=40, tol=0.0)  # tol 0: stops at the cap
    path = tmp_path / "ct.yaml"
    path.write_text(yaml.safe_dump(raw))
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "MEDRECON_RAY_ADDRESS": address, "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", str(path)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Results (1 scans)" in out.stdout
    assert "note: cs_tv stopped at its iteration cap before its tolerance on 100% of the scans" in out.stdout
    archive = Archive(str(tmp_path / "archive"))
    sid = archive.scans("test")[0]
    assert archive.open_array(sid, "sinogram").shape == (8, 60, 48)
    client = MlflowClient(raw["tracking"]["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("ct").experiment_id])
    metrics = run.data.metrics
    assert metrics["cs_tv/iterations"] == 40 and metrics["fbp/iterations"] == 0
    assert metrics["cs_tv/converged"] == 0 and metrics["fbp/converged"] == 1
    assert metrics["cs_tv/psnr"] > metrics["fbp/psnr"]  # 60 noisy views: TV beats filtered back-projection


def test_reprocess_reuses_what_the_pipeline_wrote_and_adds_only_the_new(first_run):
    """A recon method's fingerprint is the same from a pipeline and from ``medrecon reprocess``."""
    from pipelines.reprocess import reprocess_spec

    root, spec, result = first_run
    archive = Archive(str(root / "archive"))
    scans = archive.scans("test")
    reused = ("recon/zero_filled", "recon/tiny-model.v1")
    before = {(u, s): archive.commit_record(u, s) for u in reused for s in scans}
    methods = ["zero_filled", "models:/tiny-model/1", "cg_sense"]
    spec_r = reprocess_spec(str(root / "archive"), methods, split="test", tracking_uri=result.tracking_uri)
    (stage,) = run_pipeline(spec_r, Console(quiet=True)).stages
    assert (stage.status, stage.done, stage.skipped) == ("ran", 2, 0), "cg_sense is new on both test scans"
    assert {(u, s): archive.commit_record(u, s) for u, s in before} == before, "a pipeline output was redone"
    assert set(archive.committed("recon/cg_sense")) == set(scans)


def test_superres_pipeline_trains_srcnn_on_low_resolution_measurements(ray_session, tmp_path):
    """The shipped super-resolution spec, shrunk: SRCNN is a recon method beside the up-samplers."""
    tiny = {"n_scans": 3, "shape": [8, 32, 32], "split": {"train": 1, "val": 1, "test": 1}}
    raw, stages = _shipped("superres.yaml", tmp_path, "superres", tiny)
    stages["train"].update(
        epochs=2,
        batch_size=4,
        cpus_per_worker=1,
        model={"name": "srcnn", "kwargs": {"factor": 2, "features": [8, 4]}},
    )
    result = run_pipeline(PipelineSpec.model_validate(raw), Console(quiet=True))
    assert [(r.name, r.status) for r in result.stages] == [
        ("phantoms", "ran"), ("simulate", "ran"), ("srcnn", "ran"), ("recon", "ran"), ("evaluate", "ran"),
    ]  # fmt: skip
    assert not result.quarantined and list(result.metrics) == ["nearest", "bicubic", "superres-srcnn.v1"]
    assert np.isfinite(result.outputs["srcnn"]["metrics"]["val_psnr"])
    archive = Archive(str(tmp_path / "archive"))
    scan = archive.scans("test")[0]
    assert archive.open_array(scan, "lowres").shape == (8, 16, 16)
    assert archive.read_array(scan, "recon/superres-srcnn.v1").shape == (8, 32, 32)
    psnr = {key: values["psnr"] for key, values in result.metrics.items()}
    assert 15 < psnr["nearest"] < psnr["bicubic"] < 40, psnr
    # the residual network starts as the bicubic image; four tiny steps move it little (superres.yaml
    # trains it to +4.8 dB)
    assert psnr["superres-srcnn.v1"] > psnr["bicubic"] - 0.5, psnr
