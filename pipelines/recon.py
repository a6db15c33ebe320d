"""Reconstruction stage: Ray Data batch reconstruction of an archive, resumable.

:class:`Reconstructor` is a callable class for ``Dataset.map_batches``: it loads the
model once in ``__init__`` (per actor), and for each scan ID in a batch reads the
k-space and mask from Zarr, reconstructs with every requested method, writes
``recon/<method>`` (float32 magnitude) and commits the scan. A scan that fails is
quarantined and the batch goes on; a re-run reconstructs only what is missing.

The class works without Ray on one in-memory batch, which is how it is unit-tested.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from operators.mri import CartesianMRI
from pipelines.context import StageContext, StageResult
from pipelines.errors import StageError
from pipelines.fanout import ScanOutcome, process_scan, progress_bar, summarise
from pipelines.spec import LEARNED, ReconStage
from pipelines.store import Archive
from pipelines.train import reconstruct_slices

__all__ = ["Reconstructor", "classical_volume", "run_recon"]


def classical_volume(method: str, kspace: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Magnitude ``(D, H, W)`` of a classical reconstruction of single-coil k-space ``(D, H, W)``."""
    op = CartesianMRI(torch.from_numpy(mask.astype(np.float32)))
    y = torch.from_numpy(kspace)
    if method == "zero_filled":
        return op.adjoint(y).abs().numpy().astype(np.float32)
    from operators.recon import reconstruct

    return np.stack([reconstruct(method, y[d], op).image.abs().numpy() for d in range(y.shape[0])]).astype(np.float32)


class Reconstructor:
    """Reconstruct scans named in a batch; see the module docstring.

    Args:
        archive_uri, storage_options: where the archive is.
        methods: method names (``zero_filled``, classical names, or ``learned``).
        fingerprint: the stage fingerprint written into commit markers.
        model_uri, tracking_uri: the model for ``learned`` (loaded once, here).
    """

    def __init__(
        self,
        archive_uri: str,
        storage_options: dict[str, Any],
        methods: list[str],
        fingerprint: str,
        model_uri: str | None = None,
        tracking_uri: str | None = None,
    ) -> None:
        torch.set_num_threads(1)
        self.archive = Archive(archive_uri, storage_options)
        self.methods = list(methods)
        self.fingerprint = fingerprint
        self.model_uri = model_uri
        self.model = None
        if LEARNED in self.methods:
            if model_uri is None or tracking_uri is None:
                raise StageError("recon: method 'learned' needs model_uri and tracking_uri")
            from pipelines.tracking import load_model_uri

            self.model, _ = load_model_uri(model_uri, tracking_uri)

    def reconstruct_scan(self, archive: Archive, scan_id: str) -> dict[str, Any]:
        kspace = archive.read_array(scan_id, "kspace")[0]  # (D, H, W), single coil
        mask = archive.read_array(scan_id, "mask")
        for method in self.methods:
            if method == LEARNED:
                assert self.model is not None
                volume = reconstruct_slices(self.model, kspace, mask)
            else:
                volume = classical_volume(method, kspace, mask)
            attrs = {"method": method, "producer": "recon", "fingerprint": self.fingerprint}
            if method == LEARNED:
                attrs["model_uri"] = self.model_uri
            archive.write_array(scan_id, f"recon/{method}", volume, attrs)
        return {"methods": self.methods}

    def process(self, scan_id: str) -> ScanOutcome:
        return process_scan(
            self.archive, "recon", scan_id, self.fingerprint, self.reconstruct_scan,
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
    import ray.data

    model_uri = stage.model_uri or ctx.upstream.get("train", {}).get("model_uri")
    if LEARNED in stage.methods and model_uri is None:
        raise StageError("recon: method 'learned' needs a model: the train stage recorded none and recon.model_uri is unset")
    failed_sim = set(ctx.archive.quarantined("simulate"))
    ids = [s for s in ctx.archive.scans(stage.split) if s not in failed_sim]
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False  # one rich bar on the terminal instead
    ds = ray.data.from_items([{"scan_id": s} for s in ids]).map_batches(
        Reconstructor,
        fn_constructor_kwargs={
            "archive_uri": ctx.archive.uri, "storage_options": ctx.archive.storage_options,
            "methods": stage.methods, "fingerprint": fingerprint, "model_uri": model_uri,
            "tracking_uri": ctx.tracking_uri,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=stage.actors),
        num_cpus=stage.cpus_per_actor,
    )
    outcomes = []
    with progress_bar(ctx.console) as progress:
        bar = progress.add_task(f"reconstruct ({', '.join(stage.methods)})", total=len(ids))
        for row in ds.iter_rows():
            outcomes.append(ScanOutcome(str(row["scan_id"]), str(row["status"]), float(row["seconds"]), str(row["error"]) or None))
            progress.advance(bar)
    return summarise(outcomes, {"methods": stage.methods, "model_uri": model_uri, "scans": ids})
