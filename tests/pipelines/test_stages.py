"""Stage functions without Ray: simulation, the Reconstructor on one in-memory batch, fan-out rules."""

import numpy as np
import pytest

from models.registry import build_model, save_model
from operators.errors import NonFiniteError
from operators.phantoms import random_ellipsoids
from pipelines.fanout import process_scan
from pipelines.recon import Reconstructor
from pipelines.simulate import simulate_mri_volume, simulate_scan
from pipelines.spec import MaskSpec, SimulateStage
from pipelines.store import Archive
from pipelines.tracking import MlflowTracker, register_model, start_pipeline_run


@pytest.fixture
def archive(tmp_path):
    a = Archive(str(tmp_path / "a"), create=True)
    for i in range(3):
        a.write_array(f"s{i}", "image", random_ellipsoids((4, 32, 32), seed=i).image)
    return a


STAGE = SimulateStage(kind="simulate", mask=MaskSpec(acceleration=4, center_fraction=0.08), snr_db=30)


def test_simulation_is_seeded_and_undersamples():
    img = random_ellipsoids((4, 32, 32), seed=0).image
    k1, m1 = simulate_mri_volume(img, STAGE.mask, 30, seed=1)
    k2, m2 = simulate_mri_volume(img, STAGE.mask, 30, seed=1)
    k3, _ = simulate_mri_volume(img, STAGE.mask, 30, seed=2)
    assert k1.shape == (1, 4, 32, 32) and k1.dtype == np.complex64 and m1.shape == (32, 32)
    assert np.array_equal(k1, k2) and np.array_equal(m1, m2) and not np.array_equal(k1, k3)
    assert 0.15 < m1.mean() < 0.45
    assert np.all(k1[0][:, ~m1] == 0), "unsampled k-space must stay zero"


def test_non_finite_image_is_refused_with_a_count():
    img = random_ellipsoids((4, 32, 32), seed=0).image
    img[0, 0, :3] = np.nan
    with pytest.raises(NonFiniteError, match=r"3 NaN/Inf values in slices \[0\]"):
        simulate_mri_volume(img, STAGE.mask, 30, seed=1)


def test_failed_scan_is_quarantined_leaves_nothing_and_others_go_on(archive):
    bad = archive.read_array("s1", "image")
    bad[1, 2, 3] = np.inf
    archive.write_array("s1", "image", bad)
    outcomes = [
        process_scan(
            archive, "simulate", s, "fp", simulate_scan, ["mask", "kspace"], {"stage": STAGE, "seed": 0}
        )
        for s in ("s0", "s1", "s2")
    ]
    assert [o.status for o in outcomes] == ["done", "failed", "done"]
    assert "NonFiniteError" in outcomes[1].error and "1 NaN/Inf values in slices [1]" in outcomes[1].error
    assert not archive.has_array("s1", "kspace") and not archive.has_array("s1", "mask")
    assert archive.quarantined("simulate") == {"s1": outcomes[1].error}
    again = [
        process_scan(
            archive, "simulate", s, "fp", simulate_scan, ["mask", "kspace"], {"stage": STAGE, "seed": 0}
        )
        for s in ("s0", "s2")
    ]
    assert [o.status for o in again] == ["skipped", "skipped"]


def test_reconstructor_on_one_in_memory_batch(archive, tmp_path):
    for s in ("s0", "s2"):
        simulate_scan(archive, s, stage=STAGE, seed=0)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = start_pipeline_run(uri, "t", "t", "fp", {})
    net = build_model("unrolled_gd", {"n_iter": 2, "features": 4})
    save_model(net, "unrolled_gd", {"n_iter": 2, "features": 4}, tmp_path / "m")
    MlflowTracker(uri, run_id).log_model_dir(tmp_path / "m")
    model_uri = register_model(uri, "unit-model", run_id)
    rec = Reconstructor(archive.uri, {}, ["zero_filled", "learned"], "fp-r", model_uri, uri)
    out = rec({"scan_id": np.array(["s0", "s1", "s2"])})
    assert list(out["status"]) == ["done", "failed", "done"], out["error"]
    assert "kspace" in out["error"][1]
    zf = archive.read_array("s0", "recon/zero_filled")
    learned = archive.read_array("s0", "recon/learned")
    assert zf.shape == (4, 32, 32) and zf.dtype == np.float32
    # An untrained unrolled net is gradient descent from the zero-filled image on a projector: same image.
    np.testing.assert_allclose(learned, zf, atol=1e-5)
    assert archive.open_array("s0", "recon/learned").attrs["model_uri"] == model_uri
    assert list(rec({"scan_id": np.array(["s0"])})["status"]) == ["skipped"]


def test_recon_records_each_methods_cost_and_evaluate_reports_it(archive):
    from pipelines.evaluate import score_scan
    from pipelines.spec import ReconStage

    simulate_scan(archive, "s0", stage=STAGE, seed=0)
    stage = ReconStage(
        kind="recon", methods=["zero_filled", "cs_tv"], options={"cs_tv": {"max_iter": 7, "tol": 0.0}}
    )
    options = {m: o.model_dump() for m, o in stage.options.items()}
    rec = Reconstructor(archive.uri, {}, stage.methods, "fp-c", options=options)
    assert list(rec({"scan_id": np.array(["s0"])})["status"]) == ["done"]
    solver = archive.commit_record("recon", "s0")["solver"]
    assert solver["cs_tv"]["iterations"] == 7  # the cap, from the spec
    assert solver["cs_tv"]["iterations_max"] == 7
    assert 0 < solver["cs_tv"]["residual_max"] < 1
    assert solver["cs_tv"]["converged"] is False and solver["cs_tv"]["slabs_at_cap"] == 1  # tol 0: never met
    assert solver["zero_filled"]["converged"] is True
    assert solver["zero_filled"]["iterations"] == 0 and solver["zero_filled"]["residual_max"] is None
    assert solver["cs_tv"]["recon_s"] > solver["zero_filled"]["recon_s"] > 0
    assert archive.open_array("s0", "recon/cs_tv").attrs["solver"] == solver["cs_tv"]

    scores = score_scan(archive, "s0", methods=stage.methods, metrics=["psnr"])["scores"]
    assert scores["cs_tv"]["iterations"] == 7 and scores["cs_tv"]["recon_s"] == solver["cs_tv"]["recon_s"]
    assert set(scores["zero_filled"]) == {"psnr", "recon_s", "iterations", "converged"}
    assert scores["cs_tv"]["converged"] == 0.0 and scores["zero_filled"]["converged"] == 1.0


def test_solver_options_must_name_classical_methods_of_the_stage():
    from pydantic import ValidationError

    from pipelines.spec import ReconStage

    with pytest.raises(ValidationError, match=r"options given for \['cs_wavelet'\]"):
        ReconStage(kind="recon", methods=["zero_filled", "cs_tv"], options={"cs_wavelet": {"lam": 0.1}})
    with pytest.raises(ValidationError, match="max_iter"):
        ReconStage(kind="recon", methods=["cs_tv"], options={"cs_tv": {"max_iter": 0}})
