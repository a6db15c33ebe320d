"""The ``train_task`` stage: segmentation and classification networks, trained with Ray Train.

Like the recon models (:mod:`pipelines.train`, whose :func:`~pipelines.train.fit_and_register`
runs the worker group, keeps the best checkpoints and registers the model):

* each worker reads the training volumes itself from the archive (:mod:`pipelines.volumes`);
  nothing passes through the Ray object store;
* every epoch is ``steps_per_epoch`` optimiser steps; rank 0 validates, logs
  ``<stage>/train_loss`` and ``<stage>/val_score`` to MLflow and reports a checkpoint;
* the model is saved as architecture JSON plus safetensors and registered as ``<pipeline>-<stage>``.

Segmentation (``task: segment``) samples random ``patch`` crops of (image, classes), optionally
augmented with MONAI's flips and :class:`~monai.transforms.Rand3DElasticd` (the image bilinear,
the classes nearest), and minimises MONAI's Dice, Dice + cross-entropy or cross-entropy loss.
Validation segments each validation volume with a sliding window and scores the mean Dice over
the classes: ``val_score``.

Classification (``task: classify``) takes whole volumes and a per-scan target (the label volume
contains ``target``), minimises the binary cross-entropy weighted by the class balance, and
validates by AUC (accuracy at 0.5 when the validation scans hold one class). With
``init_encoder`` the encoder of a trained segmentation ``unet3d`` is copied into a
``unet_classifier``; with ``freeze`` only its head trains.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from models.optim import make_optimizer, make_schedule
from models.registry import build_model, save_model
from pipelines.context import StageContext, StageResult
from pipelines.errors import StageError
from pipelines.methods import stage_model_uri
from pipelines.scores import auc, dice_per_class, nanmean
from pipelines.spec import Spec, TaskTrainStage, VolumeAugment
from pipelines.store import SOURCE, Archive
from pipelines.train import _load_checkpoint, _stop_together, fit_and_register, initial_state, track_best
from pipelines.volumes import class_map, input_channels, label_names, read_classes, read_input, scan_target

__all__ = ["TaskJob", "VolumeAugmenter", "random_patch", "segment_volume", "train_loop", "run"]


class TaskJob(Spec):
    """Everything a worker needs; Ray hands it over as a dict."""

    stage: TaskTrainStage
    archive_uri: str
    storage_options: dict[str, Any] = {}
    tracking_uri: str
    run_id: str
    seed: int
    train_ids: list[str]
    val_ids: list[str]
    model_kwargs: dict[str, Any]
    class_names: list[str] = []
    lut: list[int] = []
    encoder_uri: str | None = None


class VolumeAugmenter:
    """Flips, MONAI's 3D elastic deformation and an intensity change of ``(C, D, H, W)`` volumes,
    applied alike to the classes ``(D, H, W)`` when given, seeded per sample."""

    def __init__(self, spec: VolumeAugment) -> None:
        from monai.transforms import Rand3DElasticd, RandFlipd, RandScaleIntensityd

        self.transforms: list[Any] = []
        if spec.flip:
            self.transforms.append(
                RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2, allow_missing_keys=True)
            )
        if spec.elastic > 0:
            self.transforms.append(
                Rand3DElasticd(
                    keys=["image", "label"],
                    sigma_range=spec.elastic_sigma,
                    magnitude_range=spec.elastic_magnitude,
                    prob=spec.elastic,
                    mode=("bilinear", "nearest"),
                    padding_mode="zeros",
                    allow_missing_keys=True,
                )
            )
        if spec.intensity > 0:
            self.transforms.append(RandScaleIntensityd(keys=["image"], factors=0.15, prob=spec.intensity))

    def __call__(
        self, image: np.ndarray, label: np.ndarray | None, seed: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        data: dict[str, Any] = {"image": image}
        if label is not None:
            data["label"] = label[None].astype(np.float32)
        for i, t in enumerate(self.transforms):
            t.set_random_state(seed=(seed + 7919 * i) % (2**32))
            data = t(data)
        out = np.ascontiguousarray(np.asarray(data["image"]), dtype=np.float32)
        if label is None:
            return out, None
        return out, np.rint(np.asarray(data["label"])[0]).astype(np.int64)


def random_patch(
    image: np.ndarray,
    label: np.ndarray,
    patch: tuple[int, int, int] | None,
    rng: np.random.Generator,
    centre: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A random ``patch`` crop of ``image (C, D, H, W)`` and ``label (D, H, W)``, zero-padded where
    the volume is smaller (the whole volume when ``patch`` is None). With a ``centre`` voxel the
    crop holds it, at a random offset of up to a quarter patch from the middle."""
    if patch is None:
        return image, label
    pad = [(0, max(0, p - s)) for p, s in zip(patch, label.shape, strict=True)]
    if any(after for _, after in pad):
        image = np.pad(image, [(0, 0), *pad])
        label = np.pad(label, pad)
    if centre is None:
        starts = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, label.shape, strict=True)]
    else:
        starts = [
            int(np.clip(c - p // 2 + rng.integers(-(p // 4), p // 4 + 1), 0, s - p))
            for c, p, s in zip(centre, patch, label.shape, strict=True)
        ]
    box = tuple(slice(a, a + p) for a, p in zip(starts, patch, strict=True))
    return image[(slice(None), *box)], label[box]


def segment_volume(
    model: torch.nn.Module, volume: np.ndarray, patch: tuple[int, int, int] | None, overlap: float = 0.25
) -> np.ndarray:
    """Class indices ``(D, H, W)`` of ``volume (C, D, H, W)``: MONAI's sliding-window inference with a
    Gaussian-weighted blend of ``patch`` windows (the volume padded to a multiple of 16 without)."""
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(volume))[None]
    shape = x.shape[2:]
    roi = patch or tuple(int(np.ceil(s / 16) * 16) for s in shape)
    roi = tuple(max(r, 32) for r in roi)  # instance normalisation needs more than one voxel at the bottom
    with torch.no_grad():
        logits = sliding_window_inference(
            x, roi, 2, model, overlap=overlap, mode="gaussian", padding_mode="constant"
        )
    return logits.argmax(1)[0].numpy().astype(np.uint8)  # type: ignore[union-attr]


def _loss(stage: TaskTrainStage, pos_weight: float | None) -> Any:
    from monai.losses import DiceCELoss, DiceLoss

    name = stage.loss_name
    if name == "dicece":
        return DiceCELoss(to_onehot_y=True, softmax=True, batch=stage.batch_dice)
    if name == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True, batch=stage.batch_dice)
    if name == "ce":
        return lambda logits, target: torch.nn.functional.cross_entropy(logits, target[:, 0])
    weight = torch.tensor(pos_weight if pos_weight is not None else 1.0)
    return torch.nn.BCEWithLogitsLoss(pos_weight=weight)


def _examples(archive: Archive, ids: list[str], job: TaskJob) -> list[tuple[np.ndarray, Any]]:
    """``(input (C, D, H, W), classes (D, H, W) or the scan's 0/1 target)`` of every scan."""
    stage = job.stage
    lut = np.asarray(job.lut, np.int64)
    out = []
    for sid in ids:
        x = read_input(archive, sid, stage.input)
        y = (
            read_classes(archive, sid, lut)
            if stage.task == "segment"
            else scan_target(archive, sid, stage.target)
        )
        out.append((x, y))
    return out


def _validate(model: torch.nn.Module, job: TaskJob, examples: list[tuple[np.ndarray, Any]]) -> float:
    stage = job.stage
    model.eval()
    if stage.task == "segment":
        scores = [
            nanmean(dice_per_class(segment_volume(model, x, stage.patch), y, len(job.class_names)))
            for x, y in examples
        ]
        return nanmean(scores)
    with torch.no_grad():
        probs = [float(torch.sigmoid(model(torch.from_numpy(x)[None]))[0]) for x, _ in examples]
    labels = [int(y) for _, y in examples]
    if len(set(labels)) == 2:
        return auc(probs, labels)
    return float(np.mean([(p > 0.5) == bool(t) for p, t in zip(probs, labels, strict=True)]))


def _initial_encoder(model: torch.nn.Module, job: TaskJob) -> None:
    from models.analysis import SegmentationClassifier, UNetClassifier, load_encoder
    from pipelines.methods import load_model_uri

    assert job.encoder_uri is not None
    if not isinstance(model, (UNetClassifier, SegmentationClassifier)):
        raise StageError(
            f"train_task stage {job.stage.name!r}: init_encoder needs model unet_classifier or seg_classifier"
        )
    source, spec = load_model_uri(job.encoder_uri, job.tracking_uri)
    if spec.get("name") != "unet3d":
        raise StageError(
            f"train_task stage {job.stage.name!r}: init_encoder {job.encoder_uri} is a {spec.get('name')}; "
            "expected a segmentation unet3d"
        )
    try:
        load_encoder(model, source.state_dict())
    except ValueError as exc:
        raise StageError(
            f"train_task stage {job.stage.name!r}: init_encoder {job.encoder_uri}: {exc}"
        ) from None


def _class_voxels(job: TaskJob, examples: list[tuple[np.ndarray, Any]]) -> list[dict[int, np.ndarray]]:
    """Per training volume, the voxels ``(n, 3)`` of every ``oversample`` class it holds."""
    wanted = {job.class_names.index(name) for name in job.stage.oversample}
    return [{c: np.argwhere(y == c) for c in wanted if (y == c).any()} for _, y in examples]


def _sample(
    train_set: list[tuple[np.ndarray, Any]],
    voxels: list[dict[int, np.ndarray]],
    job: TaskJob,
    rng: np.random.Generator,
) -> tuple[np.ndarray, Any]:
    """One training example: a volume (segment: a patch of it, centred on an ``oversample`` class
    with that class's probability)."""
    stage = job.stage
    u, chosen = (rng.uniform() if stage.oversample else 1.0), None
    for name, fraction in stage.oversample.items():
        if u < fraction:
            chosen = job.class_names.index(name)
            break
        u -= fraction
    holders = [i for i, v in enumerate(voxels) if chosen in v] if chosen is not None else []
    if not holders:
        x, y = train_set[int(rng.integers(len(train_set)))]
        return random_patch(x, y, stage.patch, rng) if stage.task == "segment" else (x, y)
    i = holders[int(rng.integers(len(holders)))]
    points = voxels[i][chosen]
    x, y = train_set[i]
    return random_patch(x, y, stage.patch, rng, centre=points[int(rng.integers(len(points)))])


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker: build (and initialise), train ``steps_per_epoch`` per epoch, validate, report."""
    config = dict(config)
    progress = config.pop("progress", None)
    job = TaskJob.model_validate(config)
    stage = job.stage
    import ray.train
    import ray.train.torch

    torch.set_num_threads(stage.threads)
    if stage.task == "generate":
        _train_generator(job, progress)
        return
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    archive = Archive(job.archive_uri, job.storage_options)
    train_set = _examples(archive, job.train_ids, job)
    val_set = _examples(archive, job.val_ids, job) if rank == 0 and job.val_ids else []
    augment = VolumeAugmenter(stage.augment) if stage.augment is not None else None
    voxels = _class_voxels(job, train_set) if stage.oversample else []
    pos_weight = None
    if stage.task == "classify":
        positives = sum(int(y) for _, y in train_set)
        if positives in (0, len(train_set)):
            raise StageError(
                f"train_task stage {stage.name!r}: all {len(train_set)} training scans are "
                f"{'positive' if positives else 'negative'} for {stage.target!r}; a classifier needs both"
            )
        pos_weight = (len(train_set) - positives) / positives

    torch.manual_seed(job.seed)
    model = build_model(stage.model.name, job.model_kwargs)
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint and job.encoder_uri:
        _initial_encoder(model, job)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, stage.optimizer, stage.lr, stage.weight_decay)
    schedule = make_schedule(optimizer, stage.schedule, stage.lr, stage.steps_per_epoch * stage.epochs)
    parts: dict[str, Any] = {"optimizer": optimizer, "schedule": schedule}
    state = initial_state()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = _load_checkpoint(d, model, parts)
    ddp_model = ray.train.torch.prepare_model(model)
    loss_fn = _loss(stage, pos_weight)
    tracker = None
    if rank == 0:
        from pipelines.tracking import MlflowTracker

        tracker = MlflowTracker(job.tracking_uri, job.run_id)
    total = stage.steps_per_epoch * stage.epochs
    last_put = 0.0
    for epoch in range(state["epoch"] + 1, stage.epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng([job.seed, epoch, rank])
        ddp_model.train()
        losses = []
        for step in range(stage.steps_per_epoch):
            xs, ys = [], []
            for _ in range(stage.batch_size):
                x, y = _sample(train_set, voxels, job, rng)
                if augment is not None:
                    x, label = augment(x, y if stage.task == "segment" else None, int(rng.integers(2**31)))
                    y = label if label is not None else y
                xs.append(x)
                ys.append(y)
            x_batch = torch.from_numpy(np.stack(xs)).to(device)
            if stage.task == "segment":
                target = torch.from_numpy(np.stack(ys))[:, None].to(device)  # (B, 1, D, H, W) class indices
            else:
                target = torch.tensor(ys, dtype=torch.float32, device=device)
            loss = loss_fn(ddp_model(x_batch), target)
            if not torch.isfinite(loss):
                raise StageError(
                    f"train_task stage {stage.name!r}: the loss is {float(loss)} at epoch {epoch}, "
                    f"step {step}; lower the learning rate or check the inputs"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            now = time.perf_counter()
            if (
                rank == 0
                and progress is not None
                and (now - last_put > 0.5 or step + 1 == stage.steps_per_epoch)
            ):
                progress.put_nowait((epoch * stage.steps_per_epoch + step + 1) / total)
                last_put = now
        metrics: dict[str, float] = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "epoch_seconds": time.perf_counter() - t0,
            "lr": float(schedule.get_last_lr()[0]),
        }
        stop = False
        if rank == 0 and val_set:
            score = _validate(model, job, val_set)
            metrics["val_score"] = score
            stop = track_best(state, epoch, score, stage.early_stopping)
        state["epoch"] = epoch
        stop = _stop_together(stop)
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                save_model(model, stage.model.name, job.model_kwargs, d)
                with open(os.path.join(d, TASK_FILE), "w") as f:
                    json.dump(task_facts(job), f)
                for name, part in parts.items():
                    torch.save(part.state_dict(), os.path.join(d, f"{name}.pt"))
                with open(os.path.join(d, "state.json"), "w") as f:
                    json.dump(state, f)
                assert tracker is not None
                tracker.log_metrics({f"{stage.name}/{k}": v for k, v in metrics.items()}, step=epoch)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
        if stop:
            break


TASK_FILE = "task.json"


def task_facts(job: TaskJob) -> dict[str, Any]:
    """What a user of the model must know besides its weights (saved beside them as ``task.json``)."""
    stage = job.stage
    return {
        "task": stage.task,
        "input": stage.input,
        "classes": job.class_names,
        "lut": job.lut,
        "patch": list(stage.patch) if stage.patch else None,
        "target": stage.target if stage.task == "classify" else None,
    }


def _train_generator(job: TaskJob, progress: Any) -> None:
    """``task: generate``: a DCGAN on the training images' axial slices, in one worker, one go.

    Adversarial training has no validation score to keep the best of: the generator (its weight
    average, see :func:`models.gan.train_dcgan`) after the last step is the one registered, with a
    grid of its samples in MLflow. A restarted worker trains again from the start.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import ray.train

    from models.gan import DCGANConfig, normalise_slices, train_dcgan
    from pipelines.tracking import MlflowTracker

    stage = job.stage
    archive = Archive(job.archive_uri, job.storage_options)
    slices = np.concatenate([archive.read_array(s, archive.reference_name(s)) for s in job.train_ids])
    config = DCGANConfig(**job.model_kwargs)
    if slices.shape[1:] != (config.image_size, config.image_size):
        raise StageError(
            f"train_task stage {stage.name!r}: the training slices are {slices.shape[1]}x{slices.shape[2]} "
            f"and the dcgan's image_size is {config.image_size}; give square images of that size"
        )
    images, _ = normalise_slices(torch.from_numpy(slices))
    total = stage.epochs * stage.steps_per_epoch
    last = [0.0]

    def on_step(step: int, entry: dict[str, float]) -> None:
        now = time.perf_counter()
        if progress is not None and (now - last[0] > 0.5 or step + 1 == total):
            progress.put_nowait((step + 1) / total)
            last[0] = now

    generator, _, history = train_dcgan(
        images, config, steps=total, batch_size=stage.batch_size, lr=stage.lr, seed=job.seed, on_step=on_step
    )
    tracker = MlflowTracker(job.tracking_uri, job.run_id)
    for epoch in range(stage.epochs):
        part = slice(epoch * stage.steps_per_epoch, (epoch + 1) * stage.steps_per_epoch)
        means = {k: float(np.mean(history[k][part])) for k in ("loss_d", "loss_g", "d_real", "d_fake")}
        tracker.log_metrics({f"{stage.name}/{k}": v for k, v in means.items()}, step=epoch)
    with torch.no_grad():
        samples = generator(torch.randn(16, config.latent, generator=torch.Generator().manual_seed(job.seed)))
    fig, axes = plt.subplots(4, 4, figsize=(8, 8), layout="constrained")
    for ax, image in zip(axes.flat, samples.numpy(), strict=True):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1.2)
        ax.axis("off")
    fig.suptitle(f"{stage.name}: 16 samples of the generator after {total} steps")
    tracker.log_figure(fig, f"train_task/{stage.name}/samples.png")
    plt.close(fig)
    state = initial_state() | {"epoch": stage.epochs - 1}
    metrics = {
        "epoch": stage.epochs - 1,
        "train_loss": float(np.mean(history["loss_g"][-stage.steps_per_epoch :])),
    }
    with tempfile.TemporaryDirectory() as d:
        save_model(generator, stage.model.name, job.model_kwargs, d)
        with open(os.path.join(d, TASK_FILE), "w") as f:
            json.dump(task_facts(job), f)
        with open(os.path.join(d, "state.json"), "w") as f:
            json.dump(state, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _resolve_encoder(ctx: StageContext, stage: TaskTrainStage) -> str | None:
    if stage.init_encoder is None:
        return None
    return stage_model_uri(
        ctx.upstream, ctx.tracking_uri, stage.init_encoder, f"train_task stage {stage.name!r}"
    )


def _segmentation_facts(ctx: StageContext, stage: TaskTrainStage) -> dict[str, Any]:
    """A ``seg_classifier``'s network settings from the segmentation stage it starts from: its
    architecture, its classes (the target's channel) and its patch (the inference window)."""
    assert stage.init_encoder is not None
    source = ctx.upstream.get(stage.init_encoder)
    if source is None:  # a registered model: its settings must be given
        return {}
    classes = list(source.get("classes") or [])
    if stage.target not in classes:
        raise StageError(
            f"train_task stage {stage.name!r}: the segmentation {stage.init_encoder!r} has classes "
            f"{classes}, without the target {stage.target!r}; add a class {stage.target!r} to it"
        )
    seg = next(s for s in ctx.spec.stages if s.name == stage.init_encoder)
    facts = dict(seg.model.kwargs) | {  # type: ignore[union-attr]
        "out_channels": len(classes),
        "target_channel": classes.index(stage.target),
    }
    if source.get("patch"):
        facts["roi"] = list(source["patch"])
    return facts


def run(ctx: StageContext, stage: TaskTrainStage, fingerprint: str) -> StageResult:
    """Train with Ray Train, register the model, and return its URI and what it predicts."""
    has = set(ctx.archive.committed(SOURCE))
    train_ids = [s for s in ctx.archive.scans("train") if s in has]
    val_ids = [s for s in ctx.archive.scans("val") if s in has]
    if not train_ids:
        raise StageError(f"train_task stage {stage.name!r}: no training scans with committed images")
    first = train_ids[0]
    kwargs = dict(stage.model.kwargs)
    if stage.task == "generate":  # the generator's image size defaults to the slices'
        kwargs.setdefault(
            "image_size", int(ctx.archive.open_array(first, ctx.archive.reference_name(first)).shape[-1])
        )
    channels = input_channels(ctx.archive, first, stage.input)
    if stage.task != "generate" and kwargs.setdefault("in_channels", channels) != channels:
        raise StageError(
            f"train_task stage {stage.name!r}: model in_channels is {kwargs['in_channels']} but input "
            f"{stage.input!r} has {channels} channel(s); remove in_channels or set it to {channels}"
        )
    names: list[str] = []
    lut: list[int] = []
    if stage.task == "segment":
        names, table = class_map(stage.classes, label_names(ctx.archive, first))
        lut = table.tolist()
        if kwargs.setdefault("out_channels", len(names)) != len(names):
            raise StageError(
                f"train_task stage {stage.name!r}: model out_channels is {kwargs['out_channels']} for "
                f"{len(names)} classes {names}; remove out_channels or set it to {len(names)}"
            )
        missing = sorted(set(stage.oversample) - set(names))
        if missing:
            raise StageError(
                f"train_task stage {stage.name!r}: oversample names {missing}, which are not among the "
                f"classes {names[1:]}"
            )
    encoder_uri = _resolve_encoder(ctx, stage)
    if stage.model.name == "seg_classifier":
        kwargs = _segmentation_facts(ctx, stage) | kwargs
    if stage.freeze:
        kwargs["freeze"] = True
    job = TaskJob(
        stage=stage,
        archive_uri=ctx.archive.uri,
        storage_options=ctx.archive.storage_options,
        tracking_uri=ctx.tracking_uri,
        run_id=ctx.tracker.run_id,
        seed=ctx.spec.seed,
        train_ids=train_ids,
        val_ids=val_ids,
        model_kwargs=kwargs,
        class_names=names,
        lut=lut,
        encoder_uri=encoder_uri,
    )
    best = bool(val_ids) and stage.task != "generate"  # a GAN has no validation score
    score = ("val_score", "max") if best else ("train_loss", "min")
    what = f"{stage.task} {stage.model.name}"
    model_uri, state, last = fit_and_register(
        ctx, stage, fingerprint, train_loop, job.model_dump(mode="json"), score,
        f"train {stage.name} ({what}, {stage.epochs} epochs)", choose_best=best,
    )  # fmt: skip
    chosen = {"best_epoch": state.get("best_epoch"), "best_val_score": state.get("best")}
    ctx.tracker.log_metrics({f"{stage.name}/{k}": v for k, v in chosen.items() if v is not None})
    outputs = {
        "model_uri": model_uri,
        **task_facts(job),
        "registered": chosen,
        "metrics": {k: v for k, v in last.items() if isinstance(v, (int, float))},
        "encoder": job.encoder_uri,
    }
    return StageResult(outputs=outputs, done=len(train_ids))
