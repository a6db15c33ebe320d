"""Stage functions without Ray: simulation, the Reconstructor on one in-memory batch, fan-out rules."""

from dataclasses import asdict

import numpy as np
import pytest

from models.registry import build_model, save_model
from operators.errors import NonFiniteError
from operators.phantoms import random_ellipsoids
from pipelines.fanout import process_scan
from pipelines.methods import parse_method
from pipelines.recon import Reconstructor, recon_code_version, resolve_methods
from pipelines.simulate import simulate_mri_volume, simulate_scan
from pipelines.spec import MaskSpec, SimulateStage, SolverOptions
from pipelines.store import MEASUREMENTS
from pipelines.tracking import MlflowTracker, register_model, start_pipeline_run
from tests.pipelines.helpers import phantom_archive, simulate

STAGE = SimulateStage(kind="simulate", mask=MaskSpec(acceleration=4, center_fraction=0.08), snr_db=30)


def reconstructor(archive, methods, options=None, tracking_uri="sqlite:///unused.db", upstream="fp-data"):
    """A Reconstructor for ``methods`` as a recon stage would build it (fingerprints on ``upstream``)."""
    opts = {k: SolverOptions.model_validate(v) for k, v in (options or {}).items()}
    resolved = resolve_methods([parse_method(m) for m in methods], opts, tracking_uri)
    fps = {
        m.key: {s: m.fingerprint(upstream, recon_code_version()) for s in archive.committed("source")}
        for m in resolved
    }
    return Reconstructor(archive.uri, {}, [asdict(m) for m in resolved], fps, tracking_uri)


@pytest.fixture
def archive(tmp_path):
    return phantom_archive(tmp_path / "a")


def test_simulation_is_seeded_and_undersamples():
    img = random_ellipsoids((4, 32, 32), seed=0).image
    k1, m1 = simulate_mri_volume(img, STAGE.mask, 30, seed=1)
    k2, m2 = simulate_mri_volume(img, STAGE.mask, 30, seed=1)
    k3, _ = simulate_mri_volume(img, STAGE.mask, 30, seed=2)
    assert k1.shape == (4, 1, 32, 32) and k1.dtype == np.complex64 and m1.shape == (32, 32)
    assert np.array_equal(k1, k2) and np.array_equal(m1, m2) and not np.array_equal(k1, k3)
    assert 0.15 < m1.mean() < 0.45
    assert np.all(k1[:, 0][:, ~m1] == 0), "unsampled k-space must stay zero"


def test_non_finite_image_is_refused_with_a_count():
    img = random_ellipsoids((4, 32, 32), seed=0).image
    img[0, 0, :3] = np.nan
    with pytest.raises(NonFiniteError, match=r"3 NaN/Inf values in slices \[0\]"):
        simulate_mri_volume(img, STAGE.mask, 30, seed=1)


def test_a_scan_changed_after_its_commit_is_quarantined_leaves_nothing_and_others_go_on(archive):
    import zarr

    bad = archive.read_array("s1", "image")
    bad[1, 2, 3] = np.inf  # planted behind the archive's back: the writer would refuse it
    zarr.open_array(zarr.storage.LocalStore(archive.uri), path="scans/s1/image", mode="r+")[...] = bad
    outcomes = [
        process_scan(
            archive, MEASUREMENTS, s, "fp", simulate_scan, ["mask", "kspace"], {"stage": STAGE, "seed": 0}
        )
        for s in ("s0", "s1", "s2")
    ]
    assert [o.status for o in outcomes] == ["done", "failed", "done"]
    assert "IntegrityError" in outcomes[1].error and "scans/s1/image" in outcomes[1].error
    assert not archive.has_array("s1", "kspace") and not archive.has_array("s1", "mask")
    assert archive.quarantined(MEASUREMENTS) == {"s1": outcomes[1].error}
    again = [
        process_scan(
            archive, MEASUREMENTS, s, "fp", simulate_scan, ["mask", "kspace"], {"stage": STAGE, "seed": 0}
        )
        for s in ("s0", "s2")
    ]
    assert [o.status for o in again] == ["skipped", "skipped"]


def test_reconstructor_on_one_in_memory_batch(archive, tmp_path):
    for s in ("s0", "s2"):
        simulate(archive, s, STAGE)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = start_pipeline_run(uri, "t", "t", "fp", {})
    net = build_model("unrolled_gd", {"n_iter": 2, "features": 4})
    save_model(net, "unrolled_gd", {"n_iter": 2, "features": 4}, tmp_path / "m")
    MlflowTracker(uri, run_id).log_model_dir(tmp_path / "m", "models/unit")
    model_uri = register_model(uri, "unit-model", run_id, "models/unit")
    assert model_uri == "models:/unit-model/1"
    rec = reconstructor(archive, ["zero_filled", model_uri], tracking_uri=uri)
    out = rec({"scan_id": np.array(["s0", "s1", "s2"])})
    assert list(out["status"]) == ["done", "failed", "done"], out["error"]
    assert "no measurements" in out["error"][1] and "recon/zero_filled" in out["error"][1]
    zf = archive.read_array("s0", "recon/zero_filled")
    learned = archive.read_array("s0", "recon/unit-model.v1")
    assert zf.shape == (4, 32, 32) and zf.dtype == np.float32
    # An untrained unrolled net is gradient descent from the zero-filled image on a projector: same image.
    np.testing.assert_allclose(learned, zf, atol=1e-5)
    lineage = archive.open_array("s0", "recon/unit-model.v1").attrs
    assert lineage["model_uri"] == model_uri and lineage["model_version"] == "1"
    assert lineage["model_run_id"] == run_id and lineage["method"] == model_uri
    assert lineage["code_version"] == recon_code_version() and len(lineage["input_checksum"]) == 16
    assert list(rec({"scan_id": np.array(["s0"])})["status"]) == ["skipped"]


def test_an_alias_resolves_to_its_version_and_a_missing_model_is_named(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.errors import TrackingError
    from pipelines.methods import resolve_model_uri

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = start_pipeline_run(uri, "t", "t", "fp", {})
    kwargs = {"n_iter": 1, "features": 2}
    save_model(build_model("unrolled_gd", kwargs), "unrolled_gd", kwargs, tmp_path / "m")
    MlflowTracker(uri, run_id).log_model_dir(tmp_path / "m", "models/a")
    for _ in range(2):
        register_model(uri, "net", run_id, "models/a")
    MlflowClient(uri, registry_uri=uri).set_registered_model_alias("net", "champion", "2")
    assert resolve_model_uri("models:/net@champion", uri)[:2] == ("net.v2", "models:/net/2")
    assert resolve_model_uri("models:/net/1", uri)[0] == "net.v1"
    with pytest.raises(TrackingError, match=r"has no version 7 of 'net'"):
        resolve_model_uri("models:/net/7", uri)
    with pytest.raises(TrackingError, match=r"has no alias @gone of 'net'"):
        resolve_model_uri("models:/net@gone", uri)


def test_recon_records_each_methods_cost_and_evaluate_reports_it(archive):
    from pipelines.evaluate import score_scan

    simulate(archive, "s0", STAGE)
    rec = reconstructor(archive, ["zero_filled", "cs_tv"], {"cs_tv": {"max_iter": 7, "tol": 0.0}})
    assert list(rec({"scan_id": np.array(["s0"])})["status"]) == ["done"]
    solver = {m: archive.commit_record(f"recon/{m}", "s0")["solver"] for m in ("zero_filled", "cs_tv")}
    assert solver["cs_tv"]["iterations"] == 7  # the cap, from the spec
    assert solver["cs_tv"]["iterations_max"] == 7
    assert 0 < solver["cs_tv"]["residual_max"] < 1
    assert solver["cs_tv"]["converged"] is False and solver["cs_tv"]["slabs_at_cap"] == 1  # tol 0: never met
    assert solver["zero_filled"]["converged"] is True
    assert solver["zero_filled"]["iterations"] == 0 and solver["zero_filled"]["residual_max"] is None
    assert solver["cs_tv"]["recon_s"] > solver["zero_filled"]["recon_s"] > 0
    attrs = archive.open_array("s0", "recon/cs_tv").attrs
    assert attrs["solver"] == solver["cs_tv"] and attrs["options"]["max_iter"] == 7

    scores = score_scan(archive, "s0", methods=["zero_filled", "cs_tv"], metrics=["psnr"])["scores"]
    assert scores["cs_tv"]["iterations"] == 7 and scores["cs_tv"]["recon_s"] == solver["cs_tv"]["recon_s"]
    assert set(scores["zero_filled"]) == {
        "psnr",
        "recon_s",
        "s_per_slice",
        "iterations",
        "converged",
        "dc_residual",
    }
    assert scores["cs_tv"]["lam"] == 0.01  # cs_tv's default weight, recorded
    assert scores["zero_filled"]["dc_residual"] < 1e-5 < scores["cs_tv"]["dc_residual"] < 0.5
    assert scores["cs_tv"]["s_per_slice"] == pytest.approx(solver["cs_tv"]["recon_s"] / 4)
    assert scores["cs_tv"]["converged"] == 0.0 and scores["zero_filled"]["converged"] == 1.0


def test_each_method_commits_on_its_own_and_a_new_one_adds_only_itself(archive):
    simulate(archive, "s0", STAGE)
    first = reconstructor(archive, ["zero_filled"])
    assert list(first({"scan_id": np.array(["s0"])})["status"]) == ["done"]
    before = archive.commit_record("recon/zero_filled", "s0")
    both = reconstructor(archive, ["zero_filled", "cg_sense"])
    assert list(both({"scan_id": np.array(["s0"])})["status"]) == ["done"]
    assert archive.commit_record("recon/zero_filled", "s0") == before, "zero_filled was redone"
    assert archive.commit_record("recon/cg_sense", "s0")["method"] == "cg_sense"
    changed = reconstructor(archive, ["zero_filled"], upstream="fp-new-measurements")
    changed({"scan_id": np.array(["s0"])})
    assert archive.commit_record("recon/zero_filled", "s0")["time"] > before["time"], "new data: redone"


def test_a_method_that_fails_on_a_scan_is_quarantined_alone(archive):
    simulate(archive, "s0", STAGE)
    rec = reconstructor(archive, ["zero_filled", "fbp"])  # fbp is for CT: it fails on an MRI scan
    out = rec({"scan_id": np.array(["s0"])})
    assert list(out["status"]) == ["failed"]
    assert "recon/fbp" in out["error"][0] and "does not apply to MRI scan 's0'" in out["error"][0]
    assert archive.is_committed("recon/zero_filled", "s0", rec.fingerprints["zero_filled"]["s0"])
    assert "s0" in archive.quarantined("recon/fbp") and not archive.has_array("s0", "recon/fbp")


def test_solver_options_must_name_classical_methods_of_the_stage():
    from pydantic import ValidationError

    from pipelines.spec import ReconStage

    with pytest.raises(ValidationError, match=r"options given for \['cs_wavelet'\]"):
        ReconStage(kind="recon", methods=["zero_filled", "cs_tv"], options={"cs_wavelet": {"lam": 0.1}})
    with pytest.raises(ValidationError, match="max_iter"):
        ReconStage(kind="recon", methods=["cs_tv"], options={"cs_tv": {"max_iter": 0}})
    with pytest.raises(ValidationError, match="unknown method 'magic'"):
        ReconStage(kind="recon", methods=["magic"])


def test_each_gan_prior_form_has_its_own_key_and_identity():
    uri = "runs:/0123456789abcdef/model"  # resolves without a registry
    forms = ["gan_prior:gan", "gan_prior+dc:gan", "gan_prior+adapt:gan", "gan_prior+adapt+dc:gan"]
    resolved = resolve_methods(
        [parse_method(m) for m in forms], {}, "sqlite:///unused.db", trained={"gan": uri}
    )
    assert [m.key for m in resolved] == [
        "gan_prior.run.0123456789ab",
        "gan_prior_dc.run.0123456789ab",
        "gan_prior_adapt.run.0123456789ab",
        "gan_prior_adapt_dc.run.0123456789ab",
    ]
    settings = [m.identity["gan_prior"] for m in resolved]
    assert [s["data_consistency"] for s in settings] == [False, True, False, True]
    assert [s.get("adapt_steps", 0) > 0 for s in settings] == [False, False, True, True]
    assert len({m.fingerprint("fp-data", "code") for m in resolved}) == 4
