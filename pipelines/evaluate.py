"""Evaluation stage: metrics per scan and method, means to MLflow, a table, and a figure.

It scores the reconstructions of every recon stage before it. Per scan (one Ray task each) it
scores every ``recon/<key>`` against ``image`` with PSNR, SSIM and NMSE (``operators.metrics``);
the scores live in the scan's commit record (unit ``evaluate/<stage name>``), so a re-run reads
them instead of recomputing. A metric that is NaN or infinite quarantines the scan with the reason,
and never reaches the table or MLflow. Scans without a reference image (real data reprocessed
without one) are left out and counted. The driver then logs ``<key>/<metric>`` means to the run's
MLflow run, a per-scan Parquet table, and a PNG figure (reference, each reconstruction, and error
maps for one slice).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from operators.metrics import psnr, score
from operators.transforms import on_grid
from pipelines.context import StageContext, StageResult
from pipelines.errors import IntegrityError
from pipelines.fanout import fan_out, summarise
from pipelines.spec import EvaluateStage
from pipelines.store import SOURCE, STD_SUFFIX, Archive

__all__ = ["score_scan", "aggregate", "comparison_figure", "uncertainty_slice_figure", "run"]

#: Columns copied from each method's recon commit record beside the metrics: wall seconds per scan
#: and per slice, iterations per slab, ``converged`` (1 when every slab met its tolerance, so its mean
#: is the fraction of scans that converged), the data-consistency residual ``‖A x̂ − y‖ / ‖y‖``, and
#: the regularisation weight a tuned method used.
COSTS = ("recon_s", "s_per_slice", "iterations", "converged", "dc_residual", "lam")
#: Metrics whose spread over scans is reported too (``<metric>_std``).
SPREAD = ("psnr", "ssim", "nmse", "std_error_r")


def score_scan(archive: Archive, scan_id: str, *, methods: list[str], metrics: list[str]) -> dict[str, Any]:
    """``{"scores": {method: {metric: value}}}`` for one scan, with each method's recon cost.

    The cost (``recon_s``: wall seconds for the scan, ``iterations``: mean solver steps per
    slab, ``converged``: 1 or 0) comes from each method's commit record.

    Raises:
        IntegrityError: a metric is NaN or infinite (named with the method).
    """
    ref = archive.read_array(scan_id, archive.reference_name(scan_id))
    rng = float(ref.max() - ref.min())
    scores: dict[str, dict[str, float]] = {}
    for method in methods:
        recon = on_grid(archive.read_array(scan_id, f"recon/{method}"), ref.shape)
        values = score(recon, ref, metrics)
        bad = {m: v for m, v in values.items() if not np.isfinite(v)}
        if bad:
            raise IntegrityError(
                f"scan {scan_id!r}: {method} scores {bad}; expected finite metrics "
                f"(reference range {rng:.3g}: a constant reference gives no PSNR)"
            )
        cost = (archive.commit_record(f"recon/{method}", scan_id) or {}).get("solver", {})
        scores[method] = values | {k: float(cost[k]) for k in COSTS if cost.get(k) is not None}
        if archive.has_array(scan_id, f"recon/{method}{STD_SUFFIX}"):  # how well its std predicts its error
            from models.uncertainty import calibration, foreground

            std = on_grid(archive.read_array(scan_id, f"recon/{method}{STD_SUFFIX}"), ref.shape)
            r = calibration(std, np.abs(recon - ref), foreground(ref))
            scores[method] |= {"std_mean": float(std.mean())} | ({"std_error_r": r} if np.isfinite(r) else {})
    return {"scores": scores}


def aggregate(per_scan: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per method over scans: the mean of each value, and ``<metric>_std`` for :data:`SPREAD`."""
    out: dict[str, dict[str, list[float]]] = {}
    for scores in per_scan.values():
        for method, values in scores.items():
            for metric, v in values.items():
                out.setdefault(method, {}).setdefault(metric, []).append(v)
    means: dict[str, dict[str, float]] = {}
    for method, d in out.items():
        means[method] = {k: float(np.mean(v)) for k, v in d.items()}
        means[method] |= {f"{k}_std": float(np.std(v)) for k, v in d.items() if k in SPREAD}
    return means


def comparison_figure(
    archive: Archive, scan_id: str, methods: list[str], slice_index: int | None = None
) -> Any:
    """A matplotlib figure: reference and each method on top, |error| maps below, for one slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref_vol = archive.read_array(scan_id, archive.reference_name(scan_id))  # (D, H, W)
    d = ref_vol.shape[0] // 2 if slice_index is None else min(max(slice_index, 0), ref_vol.shape[0] - 1)
    ref = ref_vol[d]
    vmax = float(ref.max())
    n = len(methods) + 1
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 6.6), squeeze=False, layout="constrained")
    axes[0, 0].imshow(ref, cmap="gray", vmin=0, vmax=vmax)
    axes[0, 0].set_title(f"reference\n{scan_id} slice {d}")
    if archive.has_array(scan_id, "mask"):
        mask = archive.read_array(scan_id, "mask")
        axes[1, 0].imshow(np.broadcast_to(mask, ref.shape) if mask.ndim < 2 else mask, cmap="gray")
        axes[1, 0].set_title(f"sampling mask ({100 * float(np.mean(mask)):.0f}% sampled)")
    elif archive.has_array(scan_id, "sinogram"):
        sinogram = archive.read_array(scan_id, "sinogram", d, d + 1)[0]  # (views, detectors)
        axes[1, 0].imshow(sinogram, cmap="gray", aspect="auto")
        axes[1, 0].set_title(f"sinogram ({sinogram.shape[0]} views)")
        axes[1, 0].set_xlabel("detector")
        axes[1, 0].set_ylabel("view")
    elif archive.has_array(scan_id, "lowres"):
        lowres = archive.read_array(scan_id, "lowres", d, d + 1)[0]  # (H/f, W/f)
        axes[1, 0].imshow(lowres, cmap="gray", vmin=0, vmax=vmax)
        axes[1, 0].set_title(f"low-res input ({lowres.shape[0]}x{lowres.shape[1]})")
    else:
        axes[1, 0].axis("off")
    err_max = 0.25 * vmax
    for i, method in enumerate(methods, start=1):
        rec = on_grid(archive.read_array(scan_id, f"recon/{method}")[d], ref.shape)
        axes[0, i].imshow(rec, cmap="gray", vmin=0, vmax=vmax)
        axes[0, i].set_title(f"{method}\nPSNR {psnr(rec, ref, data_range=vmax - float(ref.min())):.2f} dB")
        im = axes[1, i].imshow(np.abs(rec - ref), cmap="inferno", vmin=0, vmax=err_max)
        axes[1, i].set_title(f"|{method} − reference|")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[1, -1], shrink=0.9, label="absolute error")
    return fig


def uncertainty_slice_figure(archive: Archive, scan_id: str, key: str, slice_index: int | None = None) -> Any:
    """Reference, reconstruction, |error| and the MC-dropout std of one slice (models.uncertainty)."""
    from models.uncertainty import uncertainty_figure

    ref = archive.read_array(scan_id, archive.reference_name(scan_id))
    d = ref.shape[0] // 2 if slice_index is None else min(max(slice_index, 0), ref.shape[0] - 1)
    recon = on_grid(archive.read_array(scan_id, f"recon/{key}", d, d + 1), ref[d : d + 1].shape)[0]
    std = on_grid(archive.read_array(scan_id, f"recon/{key}{STD_SUFFIX}", d, d + 1), ref[d : d + 1].shape)[0]
    return uncertainty_figure(
        ref[d], recon, std, f"{key}: predicted std against |error|, {scan_id} slice {d}"
    )


def run(ctx: StageContext, stage: EvaluateStage, fingerprint: str) -> StageResult:
    """Score the recon stages before this one; log means, a per-scan table and a figure."""

    position = next(i for i, s in enumerate(ctx.spec.stages) if s.name == stage.name)
    recons = [ctx.upstream.get(s.name, {}) for s in ctx.spec.stages[:position] if s.kind == "recon"]
    methods = list(dict.fromkeys(k for out in recons for k in out.get("methods", [])))
    labels = {k: v for out in recons for k, v in out.get("labels", {}).items()}
    scans = list(dict.fromkeys(s for out in recons for s in out.get("scans", [])))
    # Every method is scored on the same scans. A method that failed on every scan leaves the table
    # (its quarantine says why) instead of taking every other method's scores with it.
    failed = {k: set(ctx.archive.quarantined(f"recon/{k}")) & set(scans) for k in methods}
    dropped = [k for k in methods if scans and failed[k] >= set(scans)]
    methods = [k for k in methods if k not in dropped]
    bad = set().union(*(failed[k] for k in methods)) if methods else set()
    with_reference = set(ctx.archive.committed(SOURCE))
    ids = [s for s in scans if s not in bad and s in with_reference]
    for key in dropped:
        ctx.console.print(f"[yellow]evaluate: {key} failed on every scan and is left out of the table[/]")
    unit = f"evaluate/{stage.name}"
    outcomes = fan_out(
        ctx.archive,
        unit,
        ids,
        fingerprint,
        score_scan,
        [],
        {"methods": methods, "metrics": stage.metrics},
        num_cpus=1.0,
        console=ctx.console,
        description="evaluate",
        stage=stage.name,
    )
    per_scan = {o.scan_id: (o.info or {})["scores"] for o in outcomes if o.status != "failed"}
    means = aggregate(per_scan)
    if stage.stability is not None and per_scan:
        from pipelines.audit import audit_methods

        resolved = {k: v for out in recons for k, v in out.get("resolved", {}).items() if k in methods}
        first = sorted(per_scan)[0]
        ctx.console.print(
            f"stability audit of {len(resolved)} method(s) on {first} (ε = {stage.stability.eps})"
        )
        audit = audit_methods(ctx.archive, first, list(resolved.values()), stage.stability, ctx.tracking_uri)
        for key, values in audit.items():
            means.setdefault(key, {}).update(values)
    ctx.tracker.log_metrics({f"{m}/{k}": v for m, d in means.items() for k, v in d.items()})
    rows = [{"scan_id": sid, "method": m, **v} for sid, scores in per_scan.items() for m, v in scores.items()]
    ctx.tracker.log_table(rows, "per_scan_metrics.parquet", f"evaluation/{stage.name}")
    if per_scan:
        import matplotlib.pyplot as plt

        first = sorted(per_scan)[0]
        fig = comparison_figure(ctx.archive, first, methods, stage.figure_slice)
        ctx.tracker.log_figure(fig, f"evaluation/{stage.name}/{first}_comparison.png")
        plt.close(fig)
        for key in (m for m in methods if ctx.archive.has_array(first, f"recon/{m}{STD_SUFFIX}")):
            fig = uncertainty_slice_figure(ctx.archive, first, key, stage.figure_slice)
            ctx.tracker.log_figure(fig, f"evaluation/{stage.name}/{first}_{key}_uncertainty.png")
            plt.close(fig)
    outputs = {
        "methods": methods,
        "means": means,
        "labels": labels,
        "n_scans": len(per_scan),
        "without_reference": len([s for s in scans if s not in with_reference]),
        "per_scan": per_scan,
    }
    return summarise(outcomes, outputs, {unit: fingerprint})
