"""Training for any acquisition: tiny runs through the spec lower the loss for SENSE and for CT."""

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
