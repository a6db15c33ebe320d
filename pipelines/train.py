"""Training stage: Ray Train (``TorchTrainer``) on 2D slices streamed from the archive.

* Any acquisition trains: single-coil MRI, multi-coil SENSE, parallel- and fan-beam CT, low
  resolution (super-resolution, e.g. ``srcnn``). Each
  worker reads its own slices through :class:`pipelines.physics.Acquisition` (a small per-scan
  cache), and a batch's operator stacks the acquisitions of its slices, so no volume passes
  through the Ray object store or the driver and the model is always ``model(y, op)``.
* The MLflow run is created on the driver and passed in by ID; rank 0 logs metrics each epoch
  (``<stage name>/train_loss``, ``<stage name>/val_psnr``) and, at the end, the model
  (architecture JSON + safetensors weights) under ``models/<stage name>``, which the driver
  registers as ``<register_as>/<version>``.
* Every epoch rank 0 reports a checkpoint to Ray Train's storage path; Ray keeps the best
  ``keep_checkpoints`` by validation PSNR (by training loss without validation scans) plus the
  latest, and a re-created trainer with the same run name resumes from the latest.
* Progress reaches the driver's bar through a Ray queue that rank 0 writes to.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue as queue_lib
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from models.inference import reconstruct_slices
from models.losses import make_loss
from models.optim import make_optimizer, make_schedule
from models.registry import RECON_MODALITIES, WEIGHTS_FILE, build_model, recon_models_for, save_model
from models.registry import SPEC_FILE as MODEL_SPEC_FILE
from operators.linear import LinearOperator
from operators.metrics import psnr
from operators.transforms import on_grid
from pipelines.champion import CHALLENGER, set_challenger
from pipelines.context import StageContext, StageResult
from pipelines.errors import StageError
from pipelines.fanout import progress_bar
from pipelines.physics import Acquisition
from pipelines.spec import Augment, Spec, TrainMasks, TrainStage
from pipelines.store import MEASUREMENTS, Archive
from pipelines.tracking import MlflowTracker, register_model
from pipelines.tracking import client as tracking_client

__all__ = ["TrainJob", "SliceDataset", "train_loop_per_worker", "fit_and_register", "run"]


class TrainJob(Spec):
    """Everything a training worker needs; Ray hands it over as a dict (``train_loop_config``)."""

    stage: TrainStage
    archive_uri: str
    storage_options: dict[str, Any] = {}
    tracking_uri: str
    run_id: str
    seed: int
    train_ids: list[str]
    val_ids: list[str]
    init_uri: str | None = None  # init_from resolved to one version (None: from scratch)


class SliceDataset:
    """2D slices of many scans, read lazily from the archive with a small per-scan cache.

    Item ``i`` is slice ``i`` in scan order. :meth:`batch` returns ``(y, op, target)``: the
    measurements ``(B, *op.out_shape)`` in operator layout, one operator for the batch
    (:meth:`Acquisition.stack`), and the float32 ``(B, H, W)`` reference images.
    """

    def __init__(self, archive: Archive, scan_ids: list[str], cache_scans: int = 8) -> None:
        self.archive = archive
        self.scan_ids = list(scan_ids)
        self.index: list[tuple[str, int]] = []
        shapes = set()
        for sid in self.scan_ids:
            depth, *plane = archive.open_array(sid, archive.reference_name(sid)).shape
            shapes.add(tuple(plane))
            self.index.extend((sid, d) for d in range(depth))
        if len(shapes) > 1:
            raise StageError(
                f"training slices must share one (H, W); found {sorted(shapes)} across {self.scan_ids}"
            )
        self._cache: OrderedDict[str, tuple[Acquisition, torch.Tensor, np.ndarray]] = OrderedDict()
        self._cache_scans = cache_scans

    def __len__(self) -> int:
        return len(self.index)

    def scan(self, scan_id: str) -> tuple[Acquisition, torch.Tensor, np.ndarray]:
        """``(acquisition, measurements (D, *op.out_shape), image (D, H, W))`` of one scan."""
        if scan_id in self._cache:
            self._cache.move_to_end(scan_id)
            return self._cache[scan_id]
        acq = Acquisition.from_archive(self.archive, scan_id)
        reference = self.archive.read_array(scan_id, self.archive.reference_name(scan_id))
        if tuple(reference.shape[-2:]) != tuple(acq.image_shape):
            raise StageError(
                f"scan {scan_id!r}: its reference is {reference.shape[-2]}x{reference.shape[-1]} but its "
                f"measurements are {acq.describe()}; training needs references on the acquisition grid "
                "(fastMRI references are centre crops: reconstruct and evaluate these scans instead)"
            )
        item = (acq, acq.read(self.archive, scan_id), reference)
        self._cache[scan_id] = item
        if len(self._cache) > self._cache_scans:
            self._cache.popitem(last=False)
        return item

    def batch(self, indices: list[int] | np.ndarray) -> tuple[torch.Tensor, LinearOperator, torch.Tensor]:
        acqs, ys, xs = [], [], []
        for i in indices:
            sid, d = self.index[int(i)]
            acq, y, img = self.scan(sid)
            acqs.append(acq)
            ys.append(y[d])
            xs.append(img[d])
        return torch.stack(ys), Acquisition.stack(acqs), torch.from_numpy(np.stack(xs))


class Augmenter:
    """Flips, a small rotation and MONAI's elastic deformation of 2D training images, seeded per sample."""

    def __init__(self, spec: Augment) -> None:
        from monai.transforms import Rand2DElastic, RandFlip, RandRotate

        self.spec = spec
        self.transforms: list[Any] = []
        if spec.flip:
            self.transforms += [
                RandFlip(prob=spec.prob, spatial_axis=0),
                RandFlip(prob=spec.prob, spatial_axis=1),
            ]
        if spec.rotate_degrees > 0:
            angle = float(np.deg2rad(spec.rotate_degrees))
            self.transforms.append(
                RandRotate(range_x=angle, prob=spec.prob, keep_size=True, padding_mode="zeros")
            )
        if spec.elastic > 0:
            self.transforms.append(
                Rand2DElastic(
                    spacing=(16, 16), magnitude_range=(1.0, 2.0), prob=spec.elastic, padding_mode="zeros"
                )
            )

    def __call__(self, image: np.ndarray, seed: int) -> np.ndarray:
        """``image`` (H, W) transformed; the same seed gives the same transform."""
        x: Any = image[None]  # MONAI is channel-first
        for i, t in enumerate(self.transforms):
            t.set_random_state(seed=(seed + 7919 * i) % (2**32))
            x = t(x)
        return np.ascontiguousarray(np.asarray(x)[0], dtype=np.float32)


def fresh_batch(
    dataset: SliceDataset,
    indices: list[int] | np.ndarray,
    masks: TrainMasks | None,
    rng: np.random.Generator,
    augment: Augmenter | None = None,
) -> tuple[torch.Tensor, LinearOperator, torch.Tensor]:
    """A batch measured anew from its (augmented) images: each MRI slice with its own seeded mask when
    ``masks`` is set, each scan's coil maps and noise level (MRI k-space noise, CT photon counts,
    low-resolution Gaussian noise).

    Returns ``(y, op, target)`` like :meth:`SliceDataset.batch`. Raises :class:`StageError` when
    ``masks`` is set for a CT scan.
    """
    from operators.masks import make_mask
    from operators.noise import low_dose_sinogram

    acqs, images = [], []
    for i in indices:
        sid, d = dataset.index[int(i)]
        acq, _, image = dataset.scan(sid)
        if masks is not None:
            if acq.modality != "mri":
                raise StageError(
                    f"train: masks drawn per sample apply to MRI; scan {sid!r} is {acq.describe()}"
                )
            accel = float(rng.choice(masks.accelerations))
            seed = int(rng.integers(2**62))
            acq = acq.with_mask(make_mask(masks.kind, acq.image_shape, accel, masks.center_fraction, seed))
        acqs.append(acq)
        images.append(image[d] if augment is None else augment(image[d], int(rng.integers(2**31))))
    x = torch.from_numpy(np.stack(images))  # (B, H, W)
    op = Acquisition.stack(acqs)
    y = op.forward(x)  # (B, H, W) or (B, C, H, W) complex, sinograms, or low-res images (B, H/f, W/f)
    if acqs[0].modality == "lowres":
        sigma = torch.tensor([a.noise_sigma for a in acqs], dtype=torch.float32)  # (B,)
        if bool((sigma > 0).any()):
            g = torch.Generator().manual_seed(int(rng.integers(2**62)))
            y = y + torch.randn(y.shape, generator=g) * sigma.reshape(-1, 1, 1)
        return y.to(torch.float32), op, x
    if acqs[0].modality == "ct":
        for b, a in enumerate(acqs):
            if a.ct is not None and a.ct.i0 is not None:
                mu = a.ct.attenuation
                y[b] = low_dose_sinogram(mu * y[b], a.ct.i0, seed=int(rng.integers(2**62))) / mu
        return y.to(torch.float32), op, x
    sigma = torch.tensor([a.noise_sigma for a in acqs], dtype=torch.float32)  # (B,)
    if bool((sigma > 0).any()):
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        noise = torch.complex(torch.randn(y.shape, generator=g), torch.randn(y.shape, generator=g))
        sampled = torch.stack([a.mask.to(torch.float32) for a in acqs])  # (B, H, W)
        sampled = sampled if y.ndim == 3 else sampled.unsqueeze(1)  # (B, 1, H, W) for coils
        scale = (sigma / np.sqrt(2.0)).reshape(-1, *([1] * (y.ndim - 1)))
        y = y + noise * scale * sampled
    return y.to(torch.complex64), op, x


def _save_checkpoint(directory: str, model: torch.nn.Module, job: TrainJob, parts: dict[str, Any]) -> None:
    """Model (architecture + safetensors), optimiser, schedule, gradient scaler and epoch state."""
    save_model(model, job.stage.model.name, job.stage.model.kwargs, directory)
    for name in ("optimizer", "schedule", "scaler"):
        torch.save(parts[name].state_dict(), os.path.join(directory, f"{name}.pt"))
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump(parts["state"], f)


def _load_checkpoint(directory: str, model: torch.nn.Module, parts: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_FILE)))
    for name in ("optimizer", "schedule", "scaler"):
        path = os.path.join(directory, f"{name}.pt")
        if os.path.exists(path):  # checkpoints written before the scaler was saved have none
            parts[name].load_state_dict(torch.load(path, weights_only=True))
    with open(os.path.join(directory, "state.json")) as f:
        return dict(json.load(f))


def _validate(
    model: torch.nn.Module, dataset: SliceDataset, scan_ids: list[str], device: Any
) -> float | None:
    scores = []
    for sid in scan_ids:
        acq, y, ref = dataset.scan(sid)
        scores.append(psnr(on_grid(reconstruct_slices(model, y, acq.slab_op, device=device), ref.shape), ref))
    return float(np.mean(scores)) if scores else None


def _initial_weights(model: torch.nn.Module, job: TrainJob) -> None:
    """Load ``init_uri``'s weights, after checking it is the same architecture."""
    from pipelines.methods import load_model_uri

    assert job.init_uri is not None
    source, spec = load_model_uri(job.init_uri, job.tracking_uri)
    same = spec.get("name") == job.stage.model.name and spec.get("kwargs", {}) == job.stage.model.kwargs
    if not same:
        raise StageError(
            f"train stage {job.stage.name!r}: init_from {job.init_uri} is {spec.get('name')} "
            f"{spec.get('kwargs')}; this stage trains {job.stage.model.name} {job.stage.model.kwargs}"
        )
    model.load_state_dict(source.state_dict())


def initial_state() -> dict[str, Any]:
    """A training run's bookkeeping before its first epoch (saved in every checkpoint as ``state.json``)."""
    return {"epoch": -1, "best": None, "best_epoch": None, "bad_epochs": 0}


def track_best(state: dict[str, Any], epoch: int, score: float, patience: int | None) -> bool:
    """Record ``epoch``'s validation ``score`` (higher is better) in ``state``; True when ``patience``
    epochs in a row have not beaten the best (early stopping; never with ``patience`` None)."""
    if state["best"] is None or score > state["best"]:
        state |= {"best": score, "best_epoch": epoch, "bad_epochs": 0}
    else:
        state["bad_epochs"] += 1
    return patience is not None and state["bad_epochs"] >= patience


def _stop_together(stop: bool) -> bool:
    """Rank 0's early-stopping decision, shared with every rank (they must leave the loop together)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return stop
    flag = torch.tensor([1 if stop else 0])
    dist.broadcast(flag, src=0)
    return bool(flag.item())


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(batches: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """The items of ``batches``, built ``depth`` ahead in a background thread.

    Reading, augmenting and measuring the next batch (numpy, zarr and FFTs, which release the GIL)
    overlaps the current step; the order, and so every seeded draw, is unchanged.
    """
    q: queue_lib.Queue[Any] = queue_lib.Queue(maxsize=depth)
    done = object()

    def work() -> None:
        try:
            for item in batches:
                q.put(item)
        except BaseException as exc:  # handed to the consumer, raised there
            q.put(_Failed(exc))
        q.put(done)

    threading.Thread(target=work, daemon=True, name="medrecon-prefetch").start()
    while (item := q.get()) is not done:
        if isinstance(item, _Failed):
            raise item.exc
        yield item


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker: build, (resume or fine-tune,) train, validate, report.

    Each epoch reports ``train_loss``, ``val_psnr`` (with validation scans), ``step_seconds`` (the
    median wall time of one optimiser step, data wait included), ``samples_per_second`` (the whole
    world's), ``world_size`` and ``lr``, with a checkpoint from rank 0.
    """
    config = dict(config)
    progress = config.pop("progress", None)  # a ray.util.queue.Queue the driver's bar reads
    job = TrainJob.model_validate(config)
    stage = job.stage
    import ray.train
    import ray.train.torch

    torch.set_num_threads(stage.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    autocast = stage.amp is not None and device.type == "cuda"
    amp_dtype = torch.float16 if stage.amp == "fp16" else torch.bfloat16
    archive = Archive(job.archive_uri, job.storage_options)
    train_set = SliceDataset(archive, job.train_ids)
    val_set = SliceDataset(archive, job.val_ids) if job.val_ids and rank == 0 else None
    augmenter = Augmenter(stage.augment) if stage.augment is not None else None

    per_rank = len(train_set) // world
    if per_rank == 0:
        raise StageError(
            f"train stage {stage.name!r}: {len(train_set)} training slices for {world} workers; "
            "every worker needs at least one: lower workers or add training scans"
        )
    batches_per_epoch = max(1, math.ceil(per_rank / stage.batch_size))
    steps_per_epoch = math.ceil(batches_per_epoch / stage.accumulate)
    torch.manual_seed(job.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = build_model(stage.model.name, stage.model.kwargs)
    optimizer = make_optimizer(model.parameters(), stage.optimizer, stage.lr, stage.weight_decay)
    schedule = make_schedule(optimizer, stage.schedule, stage.lr, steps_per_epoch * stage.epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=autocast and stage.amp == "fp16")
    parts: dict[str, Any] = {"optimizer": optimizer, "schedule": schedule, "scaler": scaler}
    state = initial_state()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = _load_checkpoint(d, model, parts)
    elif job.init_uri:
        _initial_weights(model, job)
    ddp_model = ray.train.torch.prepare_model(model)
    tracker = MlflowTracker(job.tracking_uri, job.run_id) if rank == 0 else None
    if tracker is not None:
        tracker.set_tags(
            {
                f"{stage.name}.device": str(device),
                f"{stage.name}.world_size": str(world),
                f"{stage.name}.resumed_from_epoch": str(state["epoch"] + 1),
            }
        )
    loss_fn = make_loss(stage.loss)
    params = [p for p in model.parameters() if p.requires_grad]

    def epoch_batches(mine: np.ndarray, rng: np.random.Generator) -> Iterator[Any]:
        for start in range(0, len(mine), stage.batch_size):
            indices = mine[start : start + stage.batch_size]
            if stage.masks is not None or augmenter is not None:
                yield fresh_batch(train_set, indices, stage.masks, rng, augmenter)
            else:
                yield train_set.batch(indices)

    total_steps = steps_per_epoch * stage.epochs
    last_put = 0.0
    for epoch in range(state["epoch"] + 1, stage.epochs):
        t0 = time.perf_counter()
        order = np.random.default_rng([job.seed, epoch]).permutation(len(train_set))
        mine = order[: per_rank * world][rank::world]  # equal share on every rank
        rng = np.random.default_rng([job.seed, epoch, rank, 1])  # per-sample masks and augmentations
        ddp_model.train()
        losses, step_times = [], []
        step, t_step = 0, time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        dropout = contextlib.ExitStack()
        if stage.dropout is not None:  # MC dropout while training; validation runs without it
            from models.uncertainty import mc_dropout

            dropout.enter_context(mc_dropout(model, stage.dropout, seed=int(rng.integers(2**62))))
        # (an exception ends the worker, and the model with its hooks; so no try/finally)
        for k, (y, op, target) in enumerate(prefetch(epoch_batches(mine, rng))):
            last = (k + 1) % stage.accumulate == 0 or k + 1 == batches_per_epoch
            if device.type != "cpu":
                y, target, op = y.to(device), target.to(device), op.to(device)
            # DDP all-reduces gradients only on a step's last micro-batch.
            sync = contextlib.nullcontext() if last or world == 1 else ddp_model.no_sync()
            with sync:
                with torch.autocast("cuda", dtype=amp_dtype, enabled=autocast):
                    loss = loss_fn(ddp_model(y, op), target)
                if not torch.isfinite(loss):
                    raise StageError(
                        f"train stage {stage.name!r}: the loss is {float(loss)} at epoch {epoch}, batch {k} "
                        f"({stage.model.name}, lr {stage.lr}); lower the learning rate, set grad_clip, or "
                        "check the data"
                    )
                scaler.scale(loss / stage.accumulate).backward()
            losses.append(loss.item())
            if not last:
                continue
            scaler.unscale_(optimizer)
            # The total gradient norm (clipped to grad_clip when set) also tells whether one is NaN/Inf;
            # with fp16 the scaler skips such a step itself and lowers its scale.
            norm = torch.nn.utils.clip_grad_norm_(params, stage.grad_clip or float("inf"))
            if not torch.isfinite(norm) and not scaler.is_enabled():
                raise StageError(
                    f"train stage {stage.name!r}: the gradient norm is {float(norm)} at epoch {epoch}, "
                    f"step {step} ({stage.model.name}); lower the learning rate or set grad_clip"
                )
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            now = time.perf_counter()
            step_times.append(now - t_step)
            t_step = now
            # The bar's queue is a Ray actor: a put is a remote call (~3 ms here), so at most two a second.
            if rank == 0 and progress is not None and (now - last_put > 0.5 or step == steps_per_epoch):
                progress.put_nowait((epoch * steps_per_epoch + step) / total_steps)
                last_put = now
        dropout.close()
        seconds = time.perf_counter() - t0
        metrics: dict[str, float] = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "epoch_seconds": seconds,
            "step_seconds": float(np.median(step_times)),
            "samples_per_second": len(mine) * world / seconds,
            "world_size": world,
            "lr": float(schedule.get_last_lr()[0]),
        }
        stop = False
        if rank == 0:
            model.eval()
            score = _validate(model, val_set, job.val_ids, device) if val_set is not None else None
            if score is not None:
                metrics["val_psnr"] = score
                stop = track_best(state, epoch, score, stage.early_stopping)
        state["epoch"] = epoch
        stop = _stop_together(stop)
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                _save_checkpoint(d, model, job, parts | {"state": state})
                assert tracker is not None
                tracker.log_metrics({f"{stage.name}/{k}": v for k, v in metrics.items()}, step=epoch)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
        if stop:
            break


def _resolve_init(ctx: StageContext, stage: TrainStage) -> str | None:
    """``init_from`` as one exact version (an alias may move while workers start), or None for scratch."""
    if stage.init_from is None:
        return None
    from pipelines.errors import TrackingError
    from pipelines.methods import resolve_model_uri

    try:
        return resolve_model_uri(stage.init_from, ctx.tracking_uri)[1]
    except TrackingError as exc:
        if stage.init_from_missing != "scratch":
            raise StageError(f"train stage {stage.name!r}: {exc}") from None
        ctx.console.print(f"{stage.name}: {stage.init_from} does not exist yet: training from scratch")
        return None


def _storage_path(archive: Archive) -> str:
    """Where Ray Train keeps checkpoints: ``_meta/train`` of the archive, on :func:`_storage_filesystem`."""
    return f"{archive.root}/_meta/train"  # a local archive's root is its absolute path


def _storage_filesystem(archive: Archive) -> Any:
    """The archive's own fsspec filesystem as pyarrow's, for a remote archive (None for a local one).

    Given a bare ``s3://`` path, Ray Train would open its own pyarrow S3 filesystem, which knows
    nothing of the archive's ``storage_options`` (an ``endpoint_url`` or keys there): checkpoints
    would go elsewhere than the archive, or nowhere. Wrapping the archive's filesystem sends them
    exactly where the archive is (the path is then given without its scheme).
    """
    if archive.is_local:
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(archive.fs))


def fit_and_register(
    ctx: StageContext,
    stage: Any,
    fingerprint: str,
    loop: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    score: tuple[str, str],
    description: str,
    choose_best: bool = True,
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Run ``loop`` on a Ray Train worker group, log the chosen checkpoint's model and register it.

    Shared by every training stage (recon models here, analysis models in
    :mod:`pipelines.train_task`). ``stage`` has ``workers``, ``cpus_per_worker``,
    ``gpus_per_worker``, ``max_failures``, ``keep_checkpoints`` and optionally ``alias``; every
    report of ``loop`` carries ``score[0]`` and, from rank 0, a checkpoint with the model files and
    a ``state.json``. The best checkpoint by ``score`` is registered (the latest with
    ``choose_best=False``; Ray keeps the best ``keep_checkpoints`` by ``score`` either way). Returns
    ``(models:/NAME/VERSION, the chosen checkpoint's state, the last reported metrics)``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    use_gpu = stage.gpus_per_worker > 0
    resources = {"CPU": stage.cpus_per_worker, **({"GPU": stage.gpus_per_worker} if use_gpu else {})}
    progress: Queue = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        loop,
        train_loop_config={**config, "progress": progress},
        scaling_config=ScalingConfig(
            num_workers=stage.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=f"{ctx.spec.name}-{stage.name}-{fingerprint}",
            storage_path=_storage_path(ctx.archive),
            storage_filesystem=_storage_filesystem(ctx.archive),
            failure_config=FailureConfig(max_failures=stage.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=stage.keep_checkpoints,
                checkpoint_score_attribute=score[0],
                checkpoint_score_order=score[1],  # type: ignore[arg-type]
            ),
        ),
    )
    stop = threading.Event()

    def show_progress(bar_group: Any, bar: Any) -> None:  # reads the queue rank 0 writes to
        while not stop.is_set():
            try:
                bar_group.update(bar, completed=100 * progress.get(timeout=0.5))
            except queue_lib.Empty:
                continue
            except Exception:  # Ray is shutting down (Ctrl-C): the bar just stops
                return

    # fit() runs on the main thread, so Ctrl-C and SIGTERM interrupt it directly; a reader thread
    # feeds the bar and is stopped before Ray can shut down under it.
    with progress_bar(ctx.console) as bar_group:
        bar = bar_group.add_task(description, total=100)
        reader = threading.Thread(target=show_progress, args=(bar_group, bar), daemon=True)
        reader.start()
        try:
            fit_result = trainer.fit()
        except Exception as exc:
            raise StageError(f"train stage {stage.name!r}: Ray Train failed: {exc}") from exc
        finally:
            stop.set()
            reader.join()
            progress.shutdown()
        bar_group.update(bar, completed=100)
    if fit_result.error:
        raise StageError(f"train stage {stage.name!r}: Ray Train failed: {fit_result.error}")
    best = fit_result.get_best_checkpoint(*score) if choose_best else None
    chosen = best or fit_result.checkpoint
    if chosen is None:
        raise StageError(f"train stage {stage.name!r}: Ray Train reported no checkpoint")
    with chosen.as_directory() as d, tempfile.TemporaryDirectory() as model_dir:
        for part in (MODEL_SPEC_FILE, WEIGHTS_FILE, "task.json"):  # without optimiser and schedule state
            if part != "task.json" or os.path.exists(os.path.join(d, part)):  # an analysis model's facts
                shutil.copy(os.path.join(d, part), model_dir)
        with open(os.path.join(d, "state.json")) as f:
            state = json.load(f)
        ctx.tracker.log_model_dir(model_dir, f"models/{stage.name}")
    name = ctx.spec.model_name(stage.name)
    model_uri = register_model(ctx.tracking_uri, name, ctx.tracker.run_id, f"models/{stage.name}")
    version = model_uri.rsplit("/", 1)[1]
    alias = getattr(stage, "alias", None)
    if alias == CHALLENGER:  # also tags the version's role
        set_challenger(ctx.tracking_uri, name, version)
    elif alias:
        tracking_client(ctx.tracking_uri).set_registered_model_alias(name, alias, version)
    return model_uri, state, dict(fit_result.metrics or {})


def _check_modality(archive: Archive, stage: TrainStage, scan_ids: list[str]) -> None:
    """A network made for some modalities only (``RECON_MODALITIES``) must find them in every scan.

    The spec checks it against a simulate stage's modality; ingested measurements are known only
    here. Without this, a wrong network fails inside Ray Train with a shape error.
    """
    serves = RECON_MODALITIES.get(stage.model.name)
    if serves is None:
        return
    for sid in scan_ids:
        modality = Acquisition.modality_of(archive, sid)
        if modality not in serves:
            raise StageError(
                f"train stage {stage.name!r}: model {stage.model.name!r} reconstructs modality "
                f"{' or '.join(repr(m) for m in serves)}; scan {sid!r} holds {modality!r} measurements. "
                f"Train one of {recon_models_for(modality)}"
            )


def run(ctx: StageContext, stage: TrainStage, fingerprint: str) -> StageResult:
    """Fit with Ray Train, register the model in MLflow, and return its ``models:/`` URI."""
    committed = ctx.archive.committed(MEASUREMENTS)
    train_ids = [s for s in ctx.archive.scans("train") if s in committed]
    val_ids = [s for s in ctx.archive.scans("val") if s in committed]
    if not train_ids:
        split = ctx.archive.scans("train")
        counts = {s: len(ctx.archive.scans(s)) for s in ("train", "val", "test")}
        why = (
            f"the train split is empty (train {counts['train']}, val {counts['val']}, test {counts['test']} "
            "scans): give the ingest or phantoms stage a train fraction, or a manifest with split=train"
            if not split
            else f"none of its {len(split)} scans has committed measurements: a simulate (or ingest) "
            "stage must run first"
        )
        raise StageError(f"train stage {stage.name!r}: no training scans with committed measurements; {why}")
    _check_modality(ctx.archive, stage, train_ids + val_ids)
    # (The runner checked every train stage's CPUs and GPUs against the cluster before any stage.)
    init_uri = _resolve_init(ctx, stage)
    job = TrainJob(
        stage=stage,
        archive_uri=ctx.archive.uri,
        storage_options=ctx.archive.storage_options,
        tracking_uri=ctx.tracking_uri,
        run_id=ctx.tracker.run_id,
        seed=ctx.spec.seed,
        train_ids=train_ids,
        val_ids=val_ids,
        init_uri=init_uri,
    )
    score = ("val_psnr", "max") if val_ids else ("train_loss", "min")
    model_uri, state, fit_metrics = fit_and_register(
        ctx, stage, fingerprint, train_loop_per_worker, job.model_dump(mode="json"), score,
        f"train {stage.name} ({stage.workers} workers, {stage.epochs} epochs)", choose_best=bool(val_ids),
    )  # fmt: skip
    final = {k: v for k, v in fit_metrics.items() if isinstance(v, (int, float))}
    chosen_facts = {"best_epoch": state.get("best_epoch"), "best_val_psnr": state.get("best")}
    ctx.tracker.log_metrics({f"{stage.name}/{k}": v for k, v in chosen_facts.items() if v is not None})
    outputs = {"model_uri": model_uri, "metrics": final, "registered": chosen_facts, "init_from": init_uri}
    return StageResult(outputs=outputs, done=len(train_ids))
