"""Reconstruction stage: Ray Data batch reconstruction of an archive, resumable.

:class:`Reconstructor` is a callable class for ``Dataset.map_batches``: it loads the
model once in ``__init__`` (per actor), and for each scan ID in a batch reads the
k-space and mask from Zarr, reconstructs with every requested method, writes
``recon/<method>`` (float32 magnitude) and commits the scan. Each method's cost (wall seconds,
solver iterations, worst final residual) goes into the commit marker and the array's
``solver`` attribute, and the evaluate stage reports it beside the metrics. A scan that fails is
quarantined and the batch goes on; a re-run reconstructs only what is missing.

The class works without Ray on one in-memory batch, which is how it is unit-tested.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import numpy as np
import torch

from operators.linear import LinearOperator
from pipelines.context import StageContext, StageResult
from pipelines.errors import StageError
from pipelines.fanout import ScanOutcome, process_scan, progress_bar, summarise
from pipelines.physics import operator_for_scan, read_kspace
from pipelines.spec import LEARNED, ReconStage
from pipelines.store import Archive
from pipelines.train import reconstruct_slices

__all__ = ["Reconstructor", "SlabResult", "SolverLog", "measurement_slab", "classical_slab", "run_recon"]


def measurement_slab(archive: Archive, scan_id: str, name: str, z0: int, z1: int) -> torch.Tensor:
    """Slices ``z0:z1`` of a scan's measurements in operator layout.

    k-space ``(C, D, H, W)`` becomes ``(s, H, W)`` for one coil or ``(s, C, H, W)`` for SENSE;
    a sinogram ``(D, views, detectors)`` becomes ``(s, views, detectors)``.
    """
    arr = archive.open_array(scan_id, name)
    if name == "kspace":
        y = torch.from_numpy(read_kspace(arr, z0, z1))  # (C, s, H, W)
        return y[0] if y.shape[0] == 1 else y.transpose(0, 1).contiguous()  # (s, H, W) or (s, C, H, W)
    return torch.from_numpy(np.ascontiguousarray(arr[z0:z1]))


class SlabResult(NamedTuple):
    """One method on one slab: the magnitude ``(s, H, W)`` and how the solver went."""

    image: np.ndarray
    iterations: int = 0
    residual: float | None = None  # final relative residual; None for direct methods
    converged: bool = True  # met the tolerance before the iteration cap


def classical_slab(
    method: str, y: torch.Tensor, op: LinearOperator, options: dict[str, Any] | None = None
) -> SlabResult:
    """A classical reconstruction of a slab of measurements.

    ``options`` are :func:`operators.recon.reconstruct` keyword arguments (the spec's
    ``SolverOptions``). Direct methods (zero_filled, fbp) report 0 iterations and no residual;
    iterative ones their solver's step count, final relative residual and whether it met ``tol``.
    """
    options = options or {}
    if method == "zero_filled":
        return SlabResult(op.adjoint(y).abs().numpy().astype(np.float32))
    if method == "fbp":
        from operators.ct import fbp

        image = fbp(y, op, filter=options.get("fbp_filter", "ramp"))  # type: ignore[arg-type]
        return SlabResult(image.abs().numpy().astype(np.float32))
    from operators.recon import reconstruct

    result = reconstruct(method, y, op, **options)
    return SlabResult(
        result.image.abs().numpy().astype(np.float32),
        int(result.iterations),
        float(result.residual),
        bool(result.converged),
    )


class SolverLog:
    """Per method of one scan: wall seconds, iterations per slab, the worst final residual, convergence."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.iterations: list[int] = []
        self.residual: float | None = None
        self.unconverged = 0

    def add(self, seconds: float, slab: SlabResult) -> None:
        self.seconds += seconds
        self.iterations.append(slab.iterations)
        self.unconverged += not slab.converged
        if slab.residual is not None and np.isfinite(slab.residual):
            r = slab.residual
            self.residual = r if self.residual is None else max(self.residual, r)

    def summary(self) -> dict[str, Any]:
        """JSON-safe: ``recon_s``, ``iterations`` (mean over slabs), ``iterations_max``, ``residual_max``,
        ``converged`` (every slab met its tolerance) and ``slabs_at_cap``."""
        return {
            "recon_s": self.seconds,
            "iterations": float(np.mean(self.iterations)) if self.iterations else 0.0,
            "iterations_max": max(self.iterations, default=0),
            "residual_max": self.residual,
            "converged": self.unconverged == 0,
            "slabs_at_cap": self.unconverged,
        }


class Reconstructor:
    """Reconstruct scans named in a batch; see the module docstring.

    Args:
        archive_uri, storage_options: where the archive is.
        methods: method names (``zero_filled``, classical names, or ``learned``).
        fingerprint: the stage fingerprint written into commit markers.
        model_uri, tracking_uri: the model for ``learned`` (loaded once, here).
        options: per classical method, :func:`operators.recon.reconstruct` keyword arguments.
    """

    def __init__(
        self,
        archive_uri: str,
        storage_options: dict[str, Any],
        methods: list[str],
        fingerprint: str,
        model_uri: str | None = None,
        tracking_uri: str | None = None,
        options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        torch.set_num_threads(1)
        self.archive = Archive(archive_uri, storage_options)
        self.methods = list(methods)
        self.options = dict(options or {})
        self.fingerprint = fingerprint
        self.model_uri = model_uri
        self.model = None
        if LEARNED in self.methods:
            if model_uri is None or tracking_uri is None:
                raise StageError("recon: method 'learned' needs model_uri and tracking_uri")
            from pipelines.tracking import load_model_uri

            self.model, _ = load_model_uri(model_uri, tracking_uri)

    def reconstruct_scan(self, archive: Archive, scan_id: str) -> dict[str, Any]:
        op, name, acq = operator_for_scan(archive, scan_id)
        depth = archive.open_array(scan_id, name).shape[1 if name == "kspace" else 0]
        slab = int(acq.get("slab") or depth)
        h, w = op.in_shape
        outs = {}
        for method in self.methods:
            attrs = {"method": method, "producer": "recon", "fingerprint": self.fingerprint}
            if method == LEARNED:
                attrs["model_uri"] = self.model_uri
            outs[method] = archive.create_array(
                scan_id, f"recon/{method}", (depth, h, w), np.float32, slab=slab, attrs=attrs
            )
        logs = {method: SolverLog() for method in outs}
        for z0 in range(0, depth, slab):
            y = measurement_slab(archive, scan_id, name, z0, z0 + slab)  # read once for every method
            for method, out in outs.items():
                t0 = time.perf_counter()
                if method == LEARNED:
                    assert self.model is not None
                    result = SlabResult(reconstruct_slices(self.model, y, op))
                else:
                    result = classical_slab(method, y, op, self.options.get(method))
                logs[method].add(time.perf_counter() - t0, result)
                out[z0 : z0 + y.shape[0]] = result.image
        solver = {method: log.summary() for method, log in logs.items()}
        for method, out in outs.items():
            out.attrs.update({"solver": solver[method]})
        return {"methods": self.methods, "solver": solver}

    def process(self, scan_id: str) -> ScanOutcome:
        return process_scan(
            self.archive,
            "recon",
            scan_id,
            self.fingerprint,
            self.reconstruct_scan,
            [f"recon/{m}" for m in self.methods],
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outcomes = [self.process(str(s)) for s in batch["scan_id"]]
        return {
            "scan_id": np.array([o.scan_id for o in outcomes]),
            "status": np.array([o.status for o in outcomes]),
            "seconds": np.array([o.seconds for o in outcomes]),
            "error": np.array([o.error or "" for o in outcomes]),
        }


def run_recon(ctx: StageContext, stage: ReconStage, fingerprint: str) -> StageResult:
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # ray.data sets its own levels on import
    model_uri = stage.model_uri or ctx.upstream.get("train", {}).get("model_uri")
    if LEARNED in stage.methods and model_uri is None:
        raise StageError(
            "recon: method 'learned' needs a model: "
            "the train stage recorded none and recon.model_uri is unset"
        )
    failed_sim = set(ctx.archive.quarantined("simulate"))  # nothing to reconstruct for those
    ids = [s for s in ctx.archive.scans(stage.split) if s not in failed_sim]
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False  # one rich bar on the terminal instead
    ds = ray.data.from_items([{"scan_id": s} for s in ids]).map_batches(
        Reconstructor,
        fn_constructor_kwargs={
            "archive_uri": ctx.archive.uri,
            "storage_options": ctx.archive.storage_options,
            "methods": stage.methods,
            "fingerprint": fingerprint,
            "model_uri": model_uri,
            "tracking_uri": ctx.tracking_uri,
            "options": {m: o.model_dump() for m, o in stage.options.items()},
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=stage.actors),
        num_cpus=stage.cpus_per_actor,
    )
    outcomes = []
    with progress_bar(ctx.console) as progress:
        bar = progress.add_task(f"reconstruct ({', '.join(stage.methods)})", total=len(ids))
        for row in ds.iter_rows():
            outcomes.append(
                ScanOutcome(
                    str(row["scan_id"]), str(row["status"]), float(row["seconds"]), str(row["error"]) or None
                )
            )
            progress.advance(bar)
    return summarise(outcomes, {"methods": stage.methods, "model_uri": model_uri, "scans": ids})
