"""The embedded data source: seeded phantoms (random ellipsoids or brain-like heads) into the archive.

Each scan becomes ``scans/<scan_id>/image`` and ``labels`` plus one catalog row. Scan IDs are
generated here (``<prefix>-0000``). Real scans come in through :mod:`pipelines.ingest`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from operators.phantoms import TISSUE_CLASSES, random_ellipsoids
from pipelines.context import StageContext, StageResult
from pipelines.fanout import fan_out, summarise
from pipelines.fingerprint import scan_seed
from pipelines.spec import PhantomStage
from pipelines.store import SOURCE, Archive, CatalogRow, record_digest, validate_scan_id

__all__ = ["phantom_ids", "assign_splits", "lesion_options", "write_phantom", "run"]


def phantom_ids(stage: PhantomStage) -> list[str]:
    return [validate_scan_id(f"{stage.prefix}-{i:04d}") for i in range(stage.n_scans)]


def assign_splits(scan_ids: list[str], stage: PhantomStage, seed: int) -> dict[str, str]:
    """Seeded assignment of scans to train/val/test with the spec's counts."""
    order = np.random.default_rng(seed).permutation(len(scan_ids))
    names = ["train"] * stage.split.train + ["val"] * stage.split.val + ["test"] * stage.split.test
    return {scan_ids[i]: names[k] for k, i in enumerate(order)}


def lesion_options(stage: PhantomStage, seed: int, scan_id: str) -> dict[str, Any]:
    """``brain_phantom`` keyword arguments for the scan's lesions: a seeded coin with the stage's
    prevalence, then a seeded count (none without a ``lesions`` setting: each subject's own 0-3)."""
    if stage.lesions is None:
        return {}
    rng = np.random.default_rng(scan_seed(seed, scan_id, "lesions"))
    has = bool(rng.uniform() < stage.lesions.prevalence)
    lo, hi = stage.lesions.count
    return {"lesion_count": int(rng.integers(lo, hi + 1)) if has else 0, "lesion_scale": stage.lesions.scale}


def write_phantom(archive: Archive, scan_id: str, *, stage: PhantomStage, seed: int) -> dict[str, Any]:
    """Generate one seeded phantom of the stage's kind and write its image and labels."""
    scan = scan_seed(seed, scan_id, "phantom")
    if stage.phantom == "brain":
        from operators.brain import BRAIN_CLASSES, brain_phantom

        phantom = brain_phantom(stage.shape, seed=scan, **lesion_options(stage, seed, scan_id))
        classes = list(BRAIN_CLASSES)
    else:
        phantom = random_ellipsoids(stage.shape, seed=scan)
        classes = list(TISSUE_CLASSES)
    attrs = {"spacing": list(stage.spacing), "modality": "mri", "source": f"phantom:{stage.phantom}"}
    arrays = {
        "image": archive.write_array(scan_id, "image", phantom.image, attrs),
        # the names of the label values: a segmentation names its classes from them
        "labels": archive.write_array(scan_id, "labels", phantom.labels, {**attrs, "classes": classes}),
    }
    return {"arrays": arrays, "checksum": record_digest(arrays)}


def run(ctx: StageContext, stage: PhantomStage, fingerprint: str) -> StageResult:
    """Write the phantoms (one Ray task each) and the catalog."""
    ids = phantom_ids(stage)
    outcomes = fan_out(
        ctx.archive,
        SOURCE,
        ids,
        ctx.identity or fingerprint,  # not the run key's: a new night keeps the phantoms
        write_phantom,
        ["image", "labels"],
        {"stage": stage, "seed": ctx.spec.seed},
        num_cpus=1.0,
        console=ctx.console,
        description="phantoms",
        stage=stage.name,
    )
    splits = assign_splits(ids, stage, ctx.spec.seed)
    rows = [
        CatalogRow(
            scan_id=o.scan_id,
            modality="mri",
            shape=stage.shape,
            spacing=stage.spacing,
            source="phantom",
            checksum=(o.info or {}).get("checksum", ""),
            split=splits[o.scan_id],
            status="ok" if o.status != "failed" else "failed",
        )
        for o in outcomes
    ]
    ctx.archive.write_catalog(rows)
    return summarise(outcomes, {"n_scans": len(ids)}, {SOURCE: ctx.identity or fingerprint})
