"""Several models in one pipeline: the shipped compare spec, shrunk, and per-method resumption."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from rich.console import Console

from pipelines.runner import run_pipeline
from pipelines.spec import PipelineSpec
from pipelines.store import Archive

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

COMPARE = Path(__file__).resolve().parents[2] / "pipelines" / "specs" / "compare.yaml"


def tiny_compare(root: Path, methods: list[str] | None = None) -> PipelineSpec:
    raw = yaml.safe_load(COMPARE.read_text())
    raw["archive"] = {"path": str(root / "archive")}
    raw["tracking"] = {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "compare"}
    stages = {s.get("name", s["kind"]): s for s in raw["stages"]}
    stages["phantoms"].update(n_scans=5, shape=[8, 32, 32], split={"train": 2, "val": 1, "test": 2})
    for name in ("gd3", "gd6"):
        stages[name].update(epochs=1, batch_size=4)
    stages["recon"]["methods"] = methods or ["zero_filled", "learned:gd3", "learned:gd6"]
    return PipelineSpec.model_validate(raw)


@pytest.fixture(scope="module")
def compared(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    return root, run_pipeline(tiny_compare(root), Console(quiet=True))


def test_two_models_and_a_baseline_in_one_table(compared):
    root, result = compared
    assert [(r.name, r.status) for r in result.stages] == [
        ("phantoms", "ran"), ("simulate", "ran"), ("gd3", "ran"), ("gd6", "ran"), ("recon", "ran"),
        ("evaluate", "ran"),
    ]  # fmt: skip
    assert result.outputs["gd3"]["model_uri"] == "models:/compare-gd3/1"
    assert result.outputs["gd6"]["model_uri"] == "models:/compare-gd6/1"
    assert list(result.metrics) == ["zero_filled", "compare-gd3.v1", "compare-gd6.v1"]
    assert all(set(v) >= {"psnr", "ssim", "nmse"} for v in result.metrics.values())
    archive = Archive(str(root / "archive"))
    scan = archive.scans("test")[0]
    assert archive.open_array(scan, "recon/compare-gd6.v1").attrs["method"] == "learned:gd6"


def test_running_again_skips_every_stage(compared):
    root, result = compared
    again = run_pipeline(tiny_compare(root), Console(quiet=True))
    assert [r.status for r in again.stages] == ["skipped"] * 6
    assert again.run_id == result.run_id and again.metrics == result.metrics


def test_adding_a_method_reconstructs_only_that_method(compared):
    root, result = compared
    archive = Archive(str(root / "archive"))
    scans = archive.scans("test")
    keys = ["zero_filled", "compare-gd3.v1", "compare-gd6.v1"]
    before = {(k, s): archive.commit_record(f"recon/{k}", s) for k in keys for s in scans}
    more = tiny_compare(root, ["zero_filled", "learned:gd3", "learned:gd6", "cg_sense"])
    out = run_pipeline(more, Console(quiet=True))
    assert [(r.name, r.status) for r in out.stages][2:] == [
        ("gd3", "skipped"), ("gd6", "skipped"), ("recon", "ran"), ("evaluate", "ran"),
    ]  # fmt: skip
    after = {(k, s): archive.commit_record(f"recon/{k}", s) for k in keys for s in scans}
    assert after == before, "a committed method was reconstructed again"
    new = [archive.commit_record("recon/cg_sense", s) for s in scans]
    assert all(r is not None and r["time"] > max(b["time"] for b in before.values()) for r in new)
    assert list(out.metrics) == [*keys, "cg_sense"]
    assert out.metrics["compare-gd3.v1"] == result.metrics["compare-gd3.v1"]


def test_changing_one_model_retrains_only_it(compared):
    root, _ = compared
    raw = tiny_compare(root).model_dump(mode="json")
    next(s for s in raw["stages"] if s["name"] == "gd6")["lr"] = 0.001
    out = run_pipeline(PipelineSpec.model_validate(raw), Console(quiet=True))
    status = {r.name: r.status for r in out.stages}
    assert status["gd3"] == "skipped" and status["gd6"] == "ran"
    assert out.outputs["gd6"]["model_uri"] == "models:/compare-gd6/2"
    assert "compare-gd6.v2" in out.metrics and "compare-gd3.v1" in out.metrics
    archive = Archive(str(root / "archive"))
    scan = archive.scans("test")[0]
    assert archive.has_array(scan, "recon/compare-gd6.v1") and archive.has_array(scan, "recon/compare-gd6.v2")
