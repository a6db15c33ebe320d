"""Training stage: Ray Train (``TorchTrainer``) on 2D slices streamed from the archive.

* Each worker reads its own slices from Zarr (a small per-scan cache), so no volume
  passes through the Ray object store or the driver.
* The MLflow run is created on the driver and passed in by ID; rank 0 logs metrics
  each epoch and, at the end, the model (architecture JSON + safetensors weights).
* Every epoch rank 0 reports a checkpoint to Ray Train's storage path; a re-created
  trainer with the same run name resumes from the last one.
* The driver shows a progress bar fed by the metrics rank 0 logs to MLflow.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from models.registry import build_model, save_model
from operators.linear import LinearOperator
from operators.metrics import psnr
from operators.mri import CartesianMRI
from pipelines.context import StageContext, StageResult
from pipelines.errors import StageError
from pipelines.fanout import progress_bar
from pipelines.physics import kspace_shape, read_kspace
from pipelines.spec import Spec, TrainStage
from pipelines.store import Archive
from pipelines.tracking import MlflowTracker, register_model

__all__ = ["TrainJob", "SliceDataset", "train_loop_per_worker", "run_train", "reconstruct_slices"]


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


class SliceDataset:
    """2D slices of many scans, read lazily from the archive with a small per-scan cache.

    Item ``i`` is slice ``i`` in scan order. :meth:`batch` returns
    ``(y, mask, target)``: complex64 ``(B, H, W)`` k-space, float32 ``(B, H, W)`` masks and
    float32 ``(B, H, W)`` reference images.
    """

    def __init__(self, archive: Archive, scan_ids: list[str], cache_scans: int = 8) -> None:
        self.archive = archive
        self.scan_ids = list(scan_ids)
        self.index: list[tuple[str, int]] = []
        shapes = set()
        for sid in self.scan_ids:
            shape = kspace_shape(self.archive.open_array(sid, "kspace"))  # (C, D, H, W)
            shapes.add(tuple(shape[2:]))
            self.index.extend((sid, d) for d in range(shape[1]))
        if len(shapes) > 1:
            raise StageError(
                f"training slices must share one (H, W); found {sorted(shapes)} across {self.scan_ids}"
            )
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_scans = cache_scans

    def __len__(self) -> int:
        return len(self.index)

    def _scan(self, scan_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if scan_id in self._cache:
            self._cache.move_to_end(scan_id)
            return self._cache[scan_id]
        item = (
            read_kspace(self.archive.open_array(scan_id, "kspace"))[0],  # (D, H, W) single coil
            self.archive.read_array(scan_id, "mask").astype(np.float32),  # (H, W)
            self.archive.read_array(scan_id, "image"),  # (D, H, W)
        )
        self._cache[scan_id] = item
        if len(self._cache) > self._cache_scans:
            self._cache.popitem(last=False)
        return item

    def batch(self, indices: list[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ys, ms, xs = [], [], []
        for i in indices:
            sid, d = self.index[int(i)]
            k, m, img = self._scan(sid)
            ys.append(k[d])
            ms.append(m)
            xs.append(img[d])
        return torch.from_numpy(np.stack(ys)), torch.from_numpy(np.stack(ms)), torch.from_numpy(np.stack(xs))


@torch.no_grad()
def reconstruct_slices(
    model: torch.nn.Module, y: torch.Tensor, op: LinearOperator, batch: int = 8
) -> np.ndarray:
    """Magnitude reconstruction ``(S, H, W)`` of measurements ``(S, *op.out_shape)`` with ``model(y, op)``."""
    out = [model(y[start : start + batch], op).abs().numpy() for start in range(0, y.shape[0], batch)]
    return np.concatenate(out).astype(np.float32)


def _loss(x: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    diff = x - target.to(x.dtype)
    return diff.abs().mean() if kind == "l1" else (diff.abs() ** 2).mean()


def _save_checkpoint(
    directory: str, model: torch.nn.Module, job: TrainJob, optimizer: torch.optim.Optimizer, epoch: int
) -> None:
    save_model(model, job.stage.model.name, job.stage.model.kwargs, directory)
    torch.save(optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump({"epoch": epoch}, f)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker: build, (resume,) train, validate, report, log."""
    job = TrainJob.model_validate(config)
    import ray.train
    import ray.train.torch
    from safetensors.torch import load_file

    torch.set_num_threads(job.stage.threads_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    archive = Archive(job.archive_uri, job.storage_options)
    train_set = SliceDataset(archive, job.train_ids)
    val_set = {sid: None for sid in job.val_ids}

    torch.manual_seed(job.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = build_model(job.stage.model.name, job.stage.model.kwargs)
    optimizer = torch.optim.Adam(model.parameters(), lr=job.stage.lr)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, "weights.safetensors")))
            optimizer.load_state_dict(torch.load(os.path.join(d, "optimizer.pt"), weights_only=True))
            start_epoch = json.load(open(os.path.join(d, "state.json")))["epoch"] + 1
    ddp_model = ray.train.torch.prepare_model(model)
    tracker = MlflowTracker(job.tracking_uri, job.run_id) if rank == 0 else None

    per_rank = len(train_set) // world
    steps_per_epoch = max(1, math.ceil(per_rank / job.stage.batch_size))
    total_steps = steps_per_epoch * job.stage.epochs
    for epoch in range(start_epoch, job.stage.epochs):
        t0 = time.perf_counter()
        order = np.random.default_rng([job.seed, epoch]).permutation(len(train_set))
        mine = order[: per_rank * world][rank::world]  # equal share on every rank
        ddp_model.train()
        losses = []
        for step, start in enumerate(range(0, len(mine), job.stage.batch_size)):
            y, mask, target = train_set.batch(mine[start : start + job.stage.batch_size])
            x = ddp_model(y, CartesianMRI(mask))
            loss = _loss(x, target, job.stage.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if tracker is not None and step % 10 == 0:
                tracker.log_metrics({"train/progress": (epoch * steps_per_epoch + step + 1) / total_steps})
        metrics: dict[str, float] = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "epoch_seconds": time.perf_counter() - t0,
        }
        if rank == 0:
            model.eval()
            scores = []
            for sid in val_set:
                kspace = read_kspace(archive.open_array(sid, "kspace"))[0]
                val_op = CartesianMRI(torch.from_numpy(archive.read_array(sid, "mask").astype(np.float32)))
                recon = reconstruct_slices(model, torch.from_numpy(kspace), val_op)
                ref = archive.read_array(sid, "image")
                scores.append(psnr(recon, ref))
            if scores:
                metrics["val_psnr"] = float(np.mean(scores))
            with tempfile.TemporaryDirectory() as d:
                _save_checkpoint(d, model, job, optimizer, epoch)
                assert tracker is not None
                tracker.log_metrics(
                    {f"train/{k}": v for k, v in metrics.items()}
                    | {"train/progress": (epoch + 1) / job.stage.epochs},
                    step=epoch,
                )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            save_model(model, job.stage.model.name, job.stage.model.kwargs, d)
            assert tracker is not None
            tracker.log_model_dir(d)


def _storage_path(archive: Archive) -> str:
    return f"{archive.uri}/_meta/train"


def run_train(ctx: StageContext, stage: TrainStage, fingerprint: str) -> StageResult:
    """Fit with Ray Train, register the model in MLflow, and return its ``models:/`` URI."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    committed = set(ctx.archive.scans("all")) - set(ctx.archive.quarantined("simulate"))
    train_ids = [s for s in ctx.archive.scans("train") if s in committed]
    val_ids = [s for s in ctx.archive.scans("val") if s in committed]
    if not train_ids:
        raise StageError(
            "train: no simulated training scans in the archive; the simulate stage must run first"
        )
    job = TrainJob(
        stage=stage,
        archive_uri=ctx.archive.uri,
        storage_options=ctx.archive.storage_options,
        tracking_uri=ctx.tracking_uri,
        run_id=ctx.tracker.run_id,
        seed=ctx.spec.seed,
        train_ids=train_ids,
        val_ids=val_ids,
    )
    use_gpu = stage.gpus_per_worker > 0
    resources = {"CPU": 1.0, **({"GPU": stage.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=stage.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=f"{ctx.spec.name}-train-{fingerprint}",
            storage_path=_storage_path(ctx.archive),
            failure_config=FailureConfig(max_failures=1),
        ),
    )
    ctx.tracker.log_params({f"train.{k}": v for k, v in stage.model_dump(mode="json").items()})
    result: dict[str, Any] = {}

    def fit() -> None:
        try:
            result["value"] = trainer.fit()
        except Exception as exc:  # surfaced on the driver thread below
            result["error"] = exc

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    with progress_bar(ctx.console) as progress:
        bar = progress.add_task(f"train ({stage.workers} workers, {stage.epochs} epochs)", total=100)
        while thread.is_alive():
            thread.join(timeout=2.0)
            try:
                done = ctx.tracker.client.get_run(ctx.tracker.run_id).data.metrics.get("train/progress", 0.0)
                progress.update(bar, completed=100 * done)
            except Exception:  # a busy SQLite file: try again next tick
                pass
        progress.update(bar, completed=100)
    if "error" in result:
        raise StageError(f"train: Ray Train failed: {result['error']}") from result["error"]
    fit_result = result["value"]
    if fit_result.error:
        raise StageError(f"train: Ray Train failed: {fit_result.error}")
    name = ctx.spec.tracking.registered_model or f"{ctx.spec.name}-model"
    model_uri = register_model(ctx.tracking_uri, name, ctx.tracker.run_id)
    final = {k: v for k, v in (fit_result.metrics or {}).items() if isinstance(v, (int, float))}
    return StageResult(outputs={"model_uri": model_uri, "metrics": final}, done=len(train_ids))
