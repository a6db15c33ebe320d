"""Nightly retraining end to end: three nights on a tiny archive, a rollback, a re-run, concurrent starts.

Every night runs ``pipelines/specs/nightly_retrain.yaml`` as a user would (``medrecon run`` in a
subprocess, attached to the test session's Ray), with the archive, MLflow and the incoming folder
in a temporary directory and a small model.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from operators.phantoms import random_ellipsoids
from pipelines import champion
from pipelines.store import MEASUREMENTS, Archive
from pipelines.tracking import client
from tests.pipelines.helpers import ROOT, medrecon, stage_row

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

SPEC = str(ROOT / "pipelines" / "specs" / "nightly_retrain.yaml")
MODEL = "nightly-model"


def add_scans(folder: Path, first: int, n: int) -> None:
    """``n`` NIfTI volumes of (D, H, W) = (4, 32, 32), RAS, named sub-<i>.nii.gz."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + n):
        image = random_ellipsoids((4, 32, 32), seed=100 + i).image  # (D, H, W) = (S, A, R)
        nib.save(
            nib.Nifti1Image(np.ascontiguousarray(image.transpose(2, 1, 0)), np.eye(4)),
            folder / f"sub-{i:03d}.nii.gz",
        )


class Nights:
    def __init__(self, root: Path, ray) -> None:
        self.root, self.ray = root, ray
        self.archive = root / "archive"
        self.incoming = root / "incoming"
        self.uri = f"sqlite:///{root}/mlflow.db"

    def args(self, key: str, *overrides: str) -> list[str]:
        small = [
            f"archive.path={self.archive}",
            f"tracking.uri={self.uri}",
            f"ingest.sources=[{self.incoming}]",
            "train.workers=1",
            "train.epochs=2",
            "train.model.kwargs={n_iter: 3, features: 8}",
            "train.lr=0.003",
            "gate.margin=0.05",
            "gate.guard_tolerance=0.02",
            "reprocess.actors=1",
        ]
        sets = [a for o in (*small, *overrides) for a in ("--set", o)]
        return ["run", SPEC, "--set", f"run_key={key}", *sets, "--wait-for-lock"]

    def run(self, key: str, *overrides: str):
        out = medrecon(*self.args(key, *overrides), tmp=self.root, ray=self.ray)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out

    def start(self, key: str, *overrides: str):
        return medrecon(*self.args(key, *overrides), tmp=self.root, ray=self.ray, wait=False)

    def versions(self) -> list[str]:
        return sorted(str(v.version) for v in client(self.uri).search_model_versions(f"name='{MODEL}'"))


def test_three_nights_promote_promote_reject_then_rollback_and_a_rerun_is_a_noop(ray_session, tmp_path):
    n = Nights(tmp_path, ray_session)
    add_scans(n.incoming, 0, 10)

    # Night 1: nothing to compare with; trains from scratch and promotes.
    night1 = n.run("2026-11-28")
    assert "does not exist yet: training from scratch" in night1.stdout
    assert champion.alias_version(n.uri, MODEL, "champion") == "1"
    archive = Archive(str(n.archive))
    old = archive.scans("all")
    assert len(old) == 10
    first_commit = archive.commit_record(MEASUREMENTS, old[0])
    assert all(archive.has_array(s, f"recon/{MODEL}.v1") for s in old)  # the night's new scans: all

    # Night 2: new scans arrive; only they are simulated; a longer fine-tune of the champion wins.
    add_scans(n.incoming, 10, 4)
    night2 = n.run("2026-11-29", "train.epochs=6")
    assert stage_row(night2.stdout, "simulate")[3:5] == ["4", "10"]  # done, skipped
    assert archive.commit_record(MEASUREMENTS, old[0]) == first_commit
    assert champion.alias_version(n.uri, MODEL, "champion") == "2", night2.stdout[-3000:]
    runs = client(n.uri).get_run
    gate2 = champion.decided(n.uri, MODEL, "2")
    assert gate2 is not None and gate2.action == "promote" and gate2.previous == "1"
    assert gate2.metrics["challenger/psnr"] > gate2.metrics["champion/psnr"] + 0.05
    assert runs(gate2.run_id).data.tags["medrecon.run_key"] == "2026-11-29"
    new = [s for s in Archive(str(n.archive)).scans("all") if s not in old]
    assert len(new) == 4
    assert all(archive.has_array(s, f"recon/{MODEL}.v2") for s in new)
    assert not any(archive.has_array(s, f"recon/{MODEL}.v2") for s in old)  # only the new scans

    # Night 3: a deliberately worse challenger (one step from scratch) is rejected with its reason.
    add_scans(n.incoming, 14, 2)
    n.run("2026-11-30", "train.init_from=null", "train.epochs=1", "train.batch_size=64")
    assert champion.alias_version(n.uri, MODEL, "champion") == "2"
    rejected = champion.decided(n.uri, MODEL, "3")
    assert rejected is not None and rejected.action == "reject" and "psnr" in rejected.reason
    tags = client(n.uri).get_model_version(MODEL, "3").tags
    assert tags.get("medrecon.gate") == "rejected"

    history = champion.history(n.uri, MODEL)
    assert [(e.action, e.version) for e in history] == [("promote", "1"), ("promote", "2"), ("reject", "3")]
    listed = medrecon("models", "history", MODEL, "--tracking-uri", n.uri, tmp=tmp_path)
    assert listed.returncode == 0 and "reject" in listed.stdout

    # Rollback: champion back to v1, recorded.
    back = medrecon("models", "rollback", MODEL, "--tracking-uri", n.uri, tmp=tmp_path)
    assert back.returncode == 0, back.stdout + back.stderr
    assert champion.alias_version(n.uri, MODEL, "champion") == "1"
    assert champion.history(n.uri, MODEL)[-1].action == "rollback"

    # Re-running night 2 does nothing: every stage skipped, no new version, no new decision.
    before = (n.versions(), len(champion.history(n.uri, MODEL)))
    again = n.run("2026-11-29", "train.epochs=6")
    assert all(stage_row(again.stdout, s)[1] == "skipped" for s in ("ingest", "simulate", "model", "gate"))
    assert (n.versions(), len(champion.history(n.uri, MODEL))) == before

    # Two starts of one night at once: one trains and decides, the other waits and skips.
    add_scans(n.incoming, 16, 2)
    procs = [n.start("2026-12-01", "train.epochs=3") for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert n.versions() == ["1", "2", "3", "4"]
    decisions = [e for e in champion.history(n.uri, MODEL) if e.version == "4"]
    assert len(decisions) == 1
    assert sum(e.action == "promote" for e in decisions) <= 1


def test_new_scans_are_counted_from_the_last_successful_night(tmp_path):
    archive = Archive(str(tmp_path / "a"), create=True)
    from pipelines.store import CatalogRow

    rows = [CatalogRow(f"s{i}", "mri", (1, 2, 2), (1.0,) * 3, "x", "", "train", ingested_at=t)
            for i, t in enumerate(["2026-11-28T01:00:00+00:00", "2026-11-29T01:00:00.5+00:00"])]  # fmt: skip
    archive.write_catalog(rows)
    assert archive.last_success("nightly", "k3") is None
    assert archive.scans_since(None) == ["s0", "s1"]
    night1 = {"started_at": "2026-11-28T00:00:00+00:00", "finished_at": "2026-11-28T02:00:00+00:00"}
    archive.record_run("nightly", "k1", night1 | {"status": "FINISHED"})
    archive.record_run("nightly", "k2", {"started_at": "2026-11-29T00:00:00+00:00", "status": "FAILED"})
    since = archive.last_success("nightly", "k3")
    assert since == "2026-11-28T02:00:00+00:00"  # a failed night does not count
    assert archive.scans_since(since) == ["s1"]
    assert archive.last_success("nightly", "k1") is None  # a night never counts from itself


def test_a_gate_metric_evaluate_does_not_produce_is_refused_when_the_file_is_read(tmp_path):
    from pipelines.errors import SpecError
    from pipelines.specfile import load_spec

    with pytest.raises(SpecError, match=r"gate.*evaluate does not produce metric 'dice'"):
        load_spec(SPEC, ["gate.metric=dice"])
    with pytest.raises(SpecError, match=r"evaluate does not produce metric\(s\) \['hd95'\]"):
        load_spec(SPEC, ["gate.guard=[ssim, hd95]"])
    with pytest.raises(SpecError, match=r"challenger 'nope' names no train stage before it"):
        load_spec(SPEC, ["gate.challenger=nope"])


def test_asking_for_more_cpus_or_gpus_than_the_cluster_has_fails_before_training(ray_session, tmp_path):
    from pipelines.errors import PreflightError
    from pipelines.preflight import check_resources
    from pipelines.specfile import load_spec

    train = load_spec(SPEC, []).stage("model")
    check_resources([train], {"CPU": 2.0})  # 2 workers x 1 CPU fit
    with pytest.raises(PreflightError, match=r"asks for 6 CPUs \(3 workers x 2\), but the Ray cluster has 2"):
        check_resources([train.model_copy(update={"workers": 3, "cpus_per_worker": 2.0})], {"CPU": 2.0})
    with pytest.raises(PreflightError, match=r"asks for 2 GPUs \(2 workers x 1\), but the Ray cluster has 0"):
        check_resources([train.model_copy(update={"gpus_per_worker": 1.0})], {"CPU": 2.0})

    # Through the command line: exit 2 before any stage runs (nothing ingested).
    n = Nights(tmp_path, ray_session)
    add_scans(n.incoming, 0, 2)
    out = medrecon(*n.args("k", "train.workers=8"), tmp=tmp_path, ray=ray_session)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "asks for 8 CPUs (8 workers x 1), but the Ray cluster has 2" in out.stderr
    assert not Archive(str(n.archive)).committed("source")


def test_an_empty_training_split_fails_with_a_clear_message(ray_session, tmp_path):
    n = Nights(tmp_path, ray_session)
    add_scans(n.incoming, 0, 3)
    out = medrecon(
        *n.args("k", "ingest.split={train: 0.0, val: 0.0, test: 1.0}"), tmp=tmp_path, ray=ray_session
    )
    assert out.returncode == 1
    assert "train stage 'model': no training scans with committed measurements; the train split is empty" in (
        out.stderr
    )
    assert "(train 0, val 0, test 3 scans)" in out.stderr
