"""Analysis stages: specs, what they read (pipelines.volumes), scores, tiny pipelines end to end on Ray."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from pydantic import ValidationError
from rich.console import Console

from pipelines.errors import StageError
from pipelines.phantoms import lesion_options
from pipelines.scores import auc, dice_per_class, hd95_per_class, roc
from pipelines.spec import PhantomStage, PipelineSpec
from pipelines.store import Archive
from pipelines.volumes import class_map, read_input

NAMES = ["background", "scalp", "csf", "lesions"]


def _pipeline(root, stages: list[dict]) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "name": "a",
            "archive": {"path": str(root / "archive")},
            "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "a"},
            "stages": stages,
        }
    )


PHANTOMS = {"kind": "phantoms", "phantom": "brain", "n_scans": 8, "shape": [32, 32, 32],
            "split": {"train": 4, "val": 1, "test": 3},
            "lesions": {"prevalence": 0.5, "scale": 3}}  # fmt: skip
SEG = {"kind": "train_task", "name": "seg", "task": "segment",
       "model": {"name": "unet3d", "kwargs": {"channels": [4, 8, 16]}},
       "classes": {"tissue": ["grey_matter", "white_matter"], "lesions": ["lesions"]},
       "patch": [32, 32, 32], "oversample": {"lesions": 0.5}, "batch_dice": True,
       "epochs": 2, "steps_per_epoch": 4, "batch_size": 1}  # fmt: skip
CLF = {"kind": "train_task", "name": "clf", "task": "classify",
       "model": {"name": "unet_classifier", "kwargs": {"channels": [4, 8, 16]}},
       "init_encoder": "seg", "freeze": True, "epochs": 1, "steps_per_epoch": 3, "batch_size": 2}  # fmt: skip


# -- specs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"loss": "bce"}, "loss bce is for task classify"),
        ({"freeze": True}, "init_encoder and freeze apply to task classify"),
    ],
)
def test_a_segmentation_stage_refuses_classification_settings(tmp_path, change, message):
    with pytest.raises(ValidationError, match=message):
        _pipeline(tmp_path, [PHANTOMS, {**SEG, **change}])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"patch": None}, "oversample centres patches on a class: give patch"),
        ({"oversample": {"lesions": 0.7, "tissue": 0.5}}, "their sum at most 1"),
        ({"oversample": {"lesions": 0}}, r"each fraction in \(0, 1\]"),
    ],
)
def test_oversampling_needs_patches_and_fractions_that_add_up(tmp_path, change, message):
    with pytest.raises(ValidationError, match=message):
        _pipeline(tmp_path, [PHANTOMS, {**SEG, **change}])
    with pytest.raises(ValidationError, match="patch, classes, oversample and batch_dice apply to task seg"):
        _pipeline(tmp_path, [PHANTOMS, SEG, {**CLF, "batch_dice": True}])
    with pytest.raises(ValidationError, match="seg_classifier reads a trained segmentation: set init_enc"):
        _pipeline(tmp_path, [PHANTOMS, {**CLF, "model": {"name": "seg_classifier"}, "init_encoder": None,
                                        "freeze": False}])  # fmt: skip


def test_oversampled_patches_are_centred_on_the_rare_class():
    from types import SimpleNamespace

    from pipelines.spec import TaskTrainStage
    from pipelines.train_task import _class_voxels, _sample

    label = np.zeros((32, 32, 32), np.int64)
    label[28:30, 2:4, 29:31] = 2  # a lesion in a corner
    example = (np.zeros((1, 32, 32, 32), np.float32), label)
    rng = np.random.default_rng(0)
    held = {}
    for fraction in (1.0, 0.0):
        oversample = {"lesions": fraction} if fraction else {}
        stage = TaskTrainStage.model_validate({**SEG, "patch": [8, 8, 8], "oversample": oversample})
        job = SimpleNamespace(stage=stage, class_names=["background", "tissue", "lesions"])
        voxels = _class_voxels(job, [example]) if oversample else []
        patches = [_sample([example], voxels, job, rng) for _ in range(50)]
        assert all(x.shape == (1, 8, 8, 8) and y.shape == (8, 8, 8) for x, y in patches)
        held[fraction] = np.mean([(y == 2).any() for _, y in patches])
    assert held[1.0] == 1.0 and held[0.0] < 0.2, held


def test_freeze_needs_an_encoder_and_an_encoder_needs_a_segmentation_stage(tmp_path):
    with pytest.raises(ValidationError, match="freeze trains only the head"):
        _pipeline(tmp_path, [PHANTOMS, {**CLF, "init_encoder": None}])
    with pytest.raises(ValidationError, match="init_encoder 'seg' names no segmentation train_task stage"):
        _pipeline(tmp_path, [PHANTOMS, CLF])


def test_a_detector_reads_the_input_its_segmentation_was_trained_on(tmp_path):
    simulate = {"kind": "simulate", "modality": "mri", "mask": {"kind": "random_1d", "acceleration": 4}}
    recon = {"kind": "recon", "methods": ["zero_filled"], "split": "all"}
    seg = {**SEG, "input": "recon/zero_filled"}
    detector = {**CLF, "model": {"name": "seg_classifier"}}
    with pytest.raises(ValidationError, match="trained on input 'recon/zero_filled'; found input 'image'"):
        _pipeline(tmp_path, [PHANTOMS, simulate, recon, seg, detector])
    spec = _pipeline(tmp_path, [PHANTOMS, simulate, recon, seg, {**detector, "input": "recon/zero_filled"}])
    assert spec.stages[-1].input == "recon/zero_filled"
    # an encoder alone may move to another input (transfer learning): only the whole detector may not
    _pipeline(tmp_path, [PHANTOMS, simulate, recon, seg, CLF])


def test_segment_and_classify_stages_name_a_model_of_their_task(tmp_path):
    with pytest.raises(ValidationError, match="'clf' names no train_task stage with task segment"):
        _pipeline(tmp_path, [PHANTOMS, SEG, CLF, {"kind": "segment", "model": "clf"}])
    with pytest.raises(ValidationError, match="'seg' names no train_task stage with task classify"):
        _pipeline(tmp_path, [PHANTOMS, SEG, {"kind": "classify", "models": ["seg"]}])
    with pytest.raises(ValidationError, match="recon inputs need a recon stage"):
        _pipeline(tmp_path, [PHANTOMS, SEG, {"kind": "segment", "model": "seg", "inputs": ["recon/*"]}])


def test_lesions_are_for_brain_phantoms_and_drawn_per_scan_with_the_prevalence():
    with pytest.raises(ValidationError, match="lesions apply to brain phantoms"):
        PhantomStage.model_validate({**PHANTOMS, "phantom": "ellipsoids"})
    stage = PhantomStage.model_validate({**PHANTOMS, "n_scans": 8})
    draws = [lesion_options(stage, 0, f"phantom-{i:04d}")["lesion_count"] for i in range(200)]
    assert 0.35 < np.mean([d > 0 for d in draws]) < 0.65
    assert set(draws) <= {0, 1, 2, 3} and draws == [
        lesion_options(stage, 0, f"phantom-{i:04d}")["lesion_count"] for i in range(200)
    ]
    none = PhantomStage.model_validate({**PHANTOMS, "lesions": {"prevalence": 0.0}})
    assert all(lesion_options(none, 0, f"p{i}")["lesion_count"] == 0 for i in range(20))


# -- what the models read ------------------------------------------------------------------------------


def test_classes_group_named_or_numbered_labels_and_the_rest_is_background():
    names, lut = class_map({"brain": ["csf", 1], "lesion": ["lesions"]}, NAMES)
    assert names == ["background", "brain", "lesion"]
    assert lut[:4].tolist() == [0, 1, 1, 2] and lut[4:].max() == 0
    names, lut = class_map(None, NAMES)  # every named label its own class
    assert names == NAMES and lut[:4].tolist() == [0, 1, 2, 3]
    with pytest.raises(StageError, match="the labels have no 'tumour'; they name"):
        class_map({"t": ["tumour"]}, NAMES)
    with pytest.raises(StageError, match="is in classes 'a' and 'b'"):
        class_map({"a": ["csf"], "b": [2]}, NAMES)
    with pytest.raises(StageError, match="do not name their values"):
        class_map(None, [])


def test_inputs_are_scaled_images_or_kspace_magnitude_and_phase(tmp_path):
    from pipelines.spec import MaskSpec, SimulateStage
    from tests.pipelines.helpers import phantom_archive, simulate

    archive = phantom_archive(tmp_path, n=1, shape=(4, 32, 32))
    image = read_input(archive, "s0", "image")
    assert image.shape == (1, 4, 32, 32) and abs(np.percentile(image, 99.5) - 1) < 1e-5
    assert (
        simulate(archive, "s0", SimulateStage(kind="simulate", mask=MaskSpec(acceleration=4))).status
        == "done"
    )
    k = read_input(archive, "s0", "measurements")
    assert k.shape == (2, 4, 32, 32) and k.dtype == np.float32
    assert k[0].min() >= 0 and np.abs(k[1]).max() <= 1  # log-magnitude, phase / π
    with pytest.raises(StageError, match="has no array 'recon/cs_tv'"):
        read_input(archive, "s0", "recon/cs_tv")


def test_low_resolution_measurements_are_one_scaled_channel(tmp_path):
    from pipelines.spec import SimulateStage
    from pipelines.volumes import input_channels
    from tests.pipelines.helpers import phantom_archive, simulate

    archive = phantom_archive(tmp_path, n=1, shape=(4, 32, 32))
    stage = SimulateStage(kind="simulate", modality="lowres", lowres={"factor": 4})
    assert simulate(archive, "s0", stage).status == "done"
    lowres = read_input(archive, "s0", "measurements")
    assert lowres.shape == (1, 4, 8, 8) and lowres.dtype == np.float32
    assert abs(np.percentile(lowres, 99.5) - 1) < 1e-5 and input_channels(archive, "s0", "measurements") == 1


# -- scores ---------------------------------------------------------------------------------------------


def test_dice_and_hd95_of_a_shifted_cube():
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[5:15, 5:15, 5:15] = 1
    pred = np.roll(ref, 2, axis=2)
    assert dice_per_class(pred, ref, 3)[0] == pytest.approx(0.8)
    assert np.isnan(dice_per_class(pred, ref, 3)[1])  # class 2 is in neither: no score
    assert hd95_per_class(pred, ref, 2)[0] == pytest.approx(2.0)
    assert hd95_per_class(pred, ref, 2, spacing=(1.0, 1.0, 1.5))[0] == pytest.approx(3.0)
    assert np.isnan(hd95_per_class(np.zeros_like(ref), ref, 2)[0])


def test_auc_and_roc():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    fpr, tpr = roc([0.1, 0.9], [0, 1])
    assert fpr[0] == 0 and tpr[-1] == 1
    with pytest.raises(ValueError, match="needs scans of both classes"):
        auc([0.2, 0.3], [1, 1])


# -- end to end ------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_segment_and_classify_after_reconstruction_end_to_end(ray_session, tmp_path):
    from pipelines.runner import run_pipeline

    spec = _pipeline(
        tmp_path,
        [
            PHANTOMS,
            {"kind": "simulate", "mask": {"acceleration": 4}},
            {"kind": "recon", "methods": ["zero_filled"], "actors": 1},
            SEG,
            CLF,
            {**CLF, "name": "kspace", "input": "measurements", "init_encoder": None, "freeze": False,
             "model": {"name": "densenet3d",
                       "kwargs": {"init_features": 4, "growth_rate": 4, "block_config": [1]}}},
            {**CLF, "name": "det", "model": {"name": "seg_classifier"}, "epochs": 1, "steps_per_epoch": 2},
            {"kind": "segment", "model": "seg", "inputs": ["image", "recon/*"], "figures": 1},
            {"kind": "classify", "models": ["clf", "kspace", "det"]},
        ],
    )  # fmt: skip
    result = run_pipeline(spec, Console(quiet=True))
    archive = Archive(str(tmp_path / "archive"))
    seg = result.outputs["segment"]
    assert seg["inputs"] == ["image", "zero_filled"]
    assert seg["classes"] == ["background", "tissue", "lesions"]
    assert set(seg["summary"]) == {"image", "zero_filled"} and "psnr" in seg["summary"]["zero_filled"]
    for scan in archive.scans("test"):
        pred = archive.read_array(scan, "seg/segment.zero_filled")
        assert pred.shape == (32, 32, 32) and pred.max() <= 2
    assert result.outputs["clf"]["encoder"] == result.outputs["seg"]["model_uri"]
    assert result.outputs["kspace"]["input"] == "measurements"
    summary = result.outputs["classify"]["summary"]
    assert set(summary) == {"clf", "kspace", "det"}
    assert all(0 <= s["accuracy"] <= 1 for s in summary.values())
    # the detector is the whole segmentation: its classes and patch came from the seg stage
    from pipelines.methods import load_model_uri

    det, det_spec = load_model_uri(result.outputs["det"]["model_uri"], result.tracking_uri)
    assert det_spec["kwargs"]["out_channels"] == 3 and det.target == 2 and det.roi == (32, 32, 32)
    client = MlflowClient(result.tracking_uri)
    figures = [f.path for f in client.list_artifacts(result.run_id, "segment/segment")]
    assert any(p.endswith("_overlay.png") for p in figures), figures
    metrics = client.get_run(result.run_id).data.metrics
    assert "segment/zero_filled/dice_mean" in metrics and "segment/image/dice/lesions" in metrics
    # the same spec again: every stage is skipped
    again = run_pipeline(spec, Console(quiet=True))
    assert {r.status for r in again.stages} == {"skipped"}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_model_trained_with_dropout_writes_a_std_map_that_evaluate_calibrates(ray_session, tmp_path):
    from pipelines.runner import run_pipeline

    spec = _pipeline(
        tmp_path,
        [
            {"kind": "phantoms", "phantom": "brain", "n_scans": 4, "shape": [8, 32, 32],
             "split": {"train": 2, "val": 1, "test": 1}},
            {"kind": "simulate", "mask": {"acceleration": 4}},
            {"kind": "train", "model": {"name": "unrolled_gd", "kwargs": {"n_iter": 2, "features": 8}},
             "workers": 1, "epochs": 2, "batch_size": 4, "dropout": 0.1},
            {"kind": "recon", "methods": ["zero_filled", "learned:train"], "actors": 1,
             "uncertainty": {"samples": 3, "dropout": 0.1}},
            {"kind": "evaluate"},
        ],
    )  # fmt: skip
    result = run_pipeline(spec, Console(quiet=True))
    archive = Archive(str(tmp_path / "archive"))
    scan = archive.scans("test")[0]
    std = archive.read_array(scan, "recon/a-train.v1.std")  # checked against its commit like any array
    assert std.shape == (8, 32, 32) and std.min() >= 0 and std.max() > 0
    assert not archive.has_array(scan, "recon/zero_filled.std")  # classical methods have none
    means = result.metrics
    assert -1 <= means["a-train.v1"]["std_error_r"] <= 1 and "std_error_r" not in means["zero_filled"]
    client = MlflowClient(result.tracking_uri)
    paths = [f.path for f in client.list_artifacts(result.run_id, "evaluation/evaluate")]
    assert any(p.endswith("_a-train.v1_uncertainty.png") for p in paths), paths


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_gan_prior_reconstructs_with_the_generator_a_generate_stage_trained(ray_session, tmp_path):
    from pipelines.runner import run_pipeline

    spec = _pipeline(
        tmp_path,
        [
            {"kind": "phantoms", "phantom": "brain", "n_scans": 4, "shape": [8, 32, 32],
             "split": {"train": 2, "val": 1, "test": 1}},
            {"kind": "simulate", "mask": {"acceleration": 4}},
            {"kind": "train_task", "name": "gan", "task": "generate",
             "model": {"name": "dcgan", "kwargs": {"latent": 8, "features": 4}},
             "epochs": 2, "steps_per_epoch": 5, "batch_size": 4},
            {"kind": "recon", "methods": ["zero_filled", "gan_prior:gan", "gan_prior+dc:gan",
                                          "gan_prior+adapt+dc:gan"], "actors": 1},
            {"kind": "evaluate"},
        ],
    )  # fmt: skip
    result = run_pipeline(spec, Console(quiet=True))
    assert result.outputs["gan"]["model_uri"] == "models:/a-gan/1"
    keys = result.outputs["recon"]["methods"]
    assert keys == [
        "zero_filled",
        "gan_prior.a-gan.v1",
        "gan_prior_dc.a-gan.v1",
        "gan_prior_adapt_dc.a-gan.v1",
    ]
    archive = Archive(str(tmp_path / "archive"))
    scan = archive.scans("test")[0]
    for key in keys[1:]:
        assert archive.read_array(scan, f"recon/{key}").shape == (8, 32, 32)
        assert np.isfinite(result.metrics[key]["psnr"])
    # data consistency puts the measured samples back: its data residual is far below the prior's
    assert (
        result.metrics["gan_prior_dc.a-gan.v1"]["dc_residual"]
        < 0.5 * result.metrics["gan_prior.a-gan.v1"]["dc_residual"]
    )
    client = MlflowClient(result.tracking_uri)
    assert [f.path for f in client.list_artifacts(result.run_id, "train_task/gan")] == [
        "train_task/gan/samples.png"
    ]


def test_a_gan_prior_must_name_a_generate_stage(tmp_path):
    with pytest.raises(ValidationError, match="'gan_prior:seg' names no train_task stage with task generate"):
        _pipeline(
            tmp_path, [PHANTOMS, {"kind": "simulate"}, SEG, {"kind": "recon", "methods": ["gan_prior:seg"]}]
        )
