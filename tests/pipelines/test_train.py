"""Training for any acquisition: tiny runs through the spec lower the loss for SENSE and for CT; batches of
MRI, CT and low-resolution acquisitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from rich.console import Console

from pipelines.physics import Acquisition
from pipelines.runner import run_pipeline
from pipelines.spec import CTSpec, PipelineSpec, SimulateStage

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def _spec(root, simulate: dict, epochs: int = 4) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "name": "t",
            "archive": {"path": str(root / "archive")},
            "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "t"},
            "stages": [
                {"kind": "phantoms", "n_scans": 4, "shape": [8, 32, 32],
                 "split": {"train": 2, "val": 1, "test": 1}},
                {"kind": "simulate", **simulate},
                {"kind": "train", "model": {"name": "unrolled_gd", "kwargs": {"n_iter": 3, "features": 8}},
                 "workers": 2, "epochs": epochs, "batch_size": 4, "lr": 0.003},
            ],
        }
    )  # fmt: skip


def _losses(result) -> list[float]:
    client = MlflowClient(result.tracking_uri)
    history = client.get_metric_history(result.run_id, "train/train_loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


@pytest.mark.parametrize(
    "simulate",
    [
        {"modality": "mri", "coils": 8, "mask": {"acceleration": 4}},
        {"modality": "ct", "ct": {"geometry": "parallel", "views": 30, "i0": 1e5}},
    ],
    ids=["sense-8-coils", "ct-parallel"],
)
def test_training_lowers_the_loss(ray_session, tmp_path, simulate):
    result = run_pipeline(_spec(tmp_path, simulate), Console(quiet=True))
    losses = _losses(result)
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0], losses
    assert result.outputs["train"]["model_uri"] == "models:/t-train/1"
    assert np.isfinite(result.outputs["train"]["metrics"]["val_psnr"])


def test_a_batch_stacks_mri_acquisitions_and_shares_a_ct_geometry():
    mri = SimulateStage(kind="simulate", coils=4)
    a, b = (Acquisition.simulated(mri, seed, (16, 16)) for seed in (1, 2))
    op = Acquisition.stack([a, b, a])
    x = torch.randn(3, 16, 16, dtype=torch.complex64)
    y = op.forward(x)
    assert y.shape == (3, 4, 16, 16)
    torch.testing.assert_close(y[1], b.op.forward(x[1]))
    ct = SimulateStage(kind="simulate", modality="ct", ct=CTSpec(views=10))
    c = Acquisition.simulated(ct, 0, (16, 16))
    assert Acquisition.stack([c, Acquisition.simulated(ct, 1, (16, 16))]) is c.op
    fan = Acquisition.simulated(
        SimulateStage(kind="simulate", modality="ct", ct=CTSpec(geometry="fan")), 0, (16, 16)
    )
    with pytest.raises(
        Exception, match="training batches need one kind of acquisition; found CT 16x16 parallel"
    ):
        Acquisition.stack([c, fan])


def test_fresh_masks_differ_per_sample_and_keep_each_scans_noise(tmp_path):
    from pipelines.spec import TrainMasks
    from pipelines.train import SliceDataset, fresh_batch
    from tests.pipelines.helpers import phantom_archive, simulate

    archive = phantom_archive(tmp_path / "a", n=2, shape=(8, 32, 32))
    for s in ("s0", "s1"):
        assert simulate(archive, s, SimulateStage(kind="simulate", coils=2, snr_db=20)).status == "done"
    data = SliceDataset(archive, ["s0", "s1"])
    rng = np.random.default_rng(0)
    y, op, target = fresh_batch(data, list(range(16)), TrainMasks(accelerations=[4, 8]), rng)
    masks = op.mask  # (16, H, W): one mask per sample
    assert y.shape == (16, 2, 32, 32) and target.shape == (16, 32, 32)
    assert len({m.numpy().tobytes() for m in masks}) >= 12, "masks are drawn per sample"
    fractions = [float(m.mean()) for m in masks]
    assert max(fractions) > 0.2 > min(fractions), "both accelerations (4x and 8x) are drawn"
    assert bool((y.abs() * (1 - masks.unsqueeze(1)) == 0).all()), "nothing is measured outside the mask"
    noise = (y - op.forward(target.to(torch.complex64)))[masks.unsqueeze(1).expand_as(y) > 0]
    sigma = Acquisition.from_archive(archive, "s0").noise_sigma
    assert float(noise.abs().pow(2).mean().sqrt()) == pytest.approx(sigma, rel=0.1)
    again = fresh_batch(data, list(range(16)), TrainMasks(accelerations=[4, 8]), np.random.default_rng(0))
    torch.testing.assert_close(again[0], y)  # seeded

    ct = phantom_archive(tmp_path / "ct", n=1, shape=(8, 32, 32))
    simulate(ct, "s0", SimulateStage(kind="simulate", modality="ct", ct=CTSpec(views=10)))
    with pytest.raises(Exception, match=r"masks drawn per sample apply to MRI; scan 's0' is CT 32x32"):
        fresh_batch(SliceDataset(ct, ["s0"]), [0], TrainMasks(), rng)


def test_early_stopping_registers_the_best_epoch(ray_session, tmp_path):
    spec = _spec(tmp_path, {"modality": "mri"}, epochs=8).model_dump(mode="json")
    spec["stages"][2] |= {"lr": 0.3, "early_stopping": 1}  # a step this large soon makes things worse
    result = run_pipeline(PipelineSpec.model_validate(spec), Console(quiet=True))
    client = MlflowClient(result.tracking_uri)
    val = [
        m.value
        for m in sorted(client.get_metric_history(result.run_id, "train/val_psnr"), key=lambda m: m.step)
    ]
    assert len(val) < 8, f"early stopping never stopped: {val}"
    registered = result.outputs["train"]["registered"]
    assert registered["best_epoch"] == int(np.argmax(val)) and registered["best_val_psnr"] == pytest.approx(
        max(val)
    )
    assert val[-1] < max(val), "it stopped after an epoch without improvement"


def test_fine_tuning_starts_from_a_registered_model_of_the_same_architecture(ray_session, tmp_path):
    from pipelines.errors import PreflightError

    first = run_pipeline(_spec(tmp_path / "a", {"modality": "mri"}, epochs=3), Console(quiet=True))
    losses = _losses(first)
    raw = _spec(tmp_path / "b", {"modality": "mri"}, epochs=1).model_dump(mode="json")
    raw["tracking"] = {"uri": first.tracking_uri, "experiment": "t"}
    raw["stages"][2]["init_from"] = "models:/t-train/1"
    tuned = run_pipeline(PipelineSpec.model_validate(raw), Console(quiet=True))
    assert _losses(tuned)[0] < 0.9 * losses[0], "fine-tuning started from scratch"
    raw["stages"][2]["model"]["kwargs"]["features"] = 4
    mismatch = (
        r"init_from models:/t-train/1 is a unrolled_gd with .*'features': 8.*trains a unrolled_gd with .*: 4"
    )
    with pytest.raises(PreflightError, match=mismatch):
        run_pipeline(PipelineSpec.model_validate(raw), Console(quiet=True))


def test_a_low_resolution_batch_is_measured_anew_with_each_scans_noise(tmp_path):
    from pipelines.spec import Augment
    from pipelines.train import Augmenter, SliceDataset, fresh_batch
    from tests.pipelines.helpers import phantom_archive, simulate

    archive = phantom_archive(tmp_path / "a", n=2, shape=(8, 32, 32))
    stage = SimulateStage(kind="simulate", modality="lowres", lowres={"factor": 2, "snr_db": 20})
    for s in ("s0", "s1"):
        assert simulate(archive, s, stage).status == "done"
    data = SliceDataset(archive, ["s0", "s1"])
    y, op, target = data.batch(list(range(16)))  # the stored measurements
    assert y.shape == (16, 16, 16) and y.dtype == torch.float32 and type(op).__name__ == "Downsample"
    y, op, target = fresh_batch(data, list(range(16)), None, np.random.default_rng(0), Augmenter(Augment()))
    assert y.shape == (16, 16, 16) and y.dtype == torch.float32 and target.shape == (16, 32, 32)
    sigma = Acquisition.from_archive(archive, "s0").noise_sigma
    assert float((y - op.forward(target)).std()) == pytest.approx(sigma, rel=0.1)
    again = fresh_batch(data, list(range(16)), None, np.random.default_rng(0), Augmenter(Augment()))
    torch.testing.assert_close(again[0], y)  # seeded


def test_a_network_for_one_modality_refuses_an_archive_of_another_before_training(tmp_path):
    """The spec cannot check ingested measurements against the network: the train stage does, per scan."""
    from models.registry import recon_models_for
    from pipelines.errors import StageError
    from pipelines.spec import TrainStage
    from pipelines.train import _check_modality
    from tests.pipelines.helpers import phantom_archive, simulate

    archive = phantom_archive(tmp_path / "a", n=2, shape=(4, 32, 32))
    lowres = SimulateStage(kind="simulate", modality="lowres", lowres={"factor": 2})
    assert simulate(archive, "s0", lowres).status == "done"
    assert simulate(archive, "s1", SimulateStage(kind="simulate", modality="mri")).status == "done"

    def stage(name: str) -> TrainStage:
        return TrainStage.model_validate({"kind": "train", "model": {"name": name}})

    _check_modality(archive, stage("unrolled_gd"), ["s0", "s1"])  # takes any operator
    _check_modality(archive, stage("srcnn"), ["s0"])
    with pytest.raises(StageError, match=r"'srcnn' reconstructs modality 'lowres'; scan 's1' holds 'mri'"):
        _check_modality(archive, stage("srcnn"), ["s0", "s1"])
    with pytest.raises(StageError, match="scan 's0' holds 'lowres' measurements. Train one of") as err:
        _check_modality(archive, stage("varnet"), ["s0", "s1"])
    assert "'srcnn'" in str(err.value) and "'varnet'" not in str(err.value).split("Train one of")[1]
    assert "srcnn" not in recon_models_for("mri") and "varnet" in recon_models_for("mri")
