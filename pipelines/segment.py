"""The ``segment`` stage: segment every input of a split with one fixed model, and score it.

One Ray task per scan loads the model (a ``train_task`` stage's, or a ``models:/`` URI, with the
classes, input scaling and patch it was trained with from its ``task.json``), segments each input
(the ``image``, or reconstructions ``recon/<key>``) by sliding-window inference
(:func:`pipelines.train_task.segment_volume`), writes ``seg/<stage>.<input>`` and scores it
against the scan's label volume: Dice and the 95th-percentile Hausdorff distance (mm) per class,
and for a reconstruction its PSNR against the reference image. The scores live in the scan's
commit record (unit ``segment/<stage>``), so a re-run reads them.

The driver prints and logs (``<stage>/<input>/dice_mean``, ``.../dice/<class>``, ``.../hd95_mean``,
``.../psnr``) one row per input, mean ± std over scans: with reconstructions as inputs, the table
answers whether a better reconstruction makes a better segmentation. It logs the per-scan table
(Parquet) and overlay figures (input, prediction and reference contours, for a few scans).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from operators.metrics import psnr
from operators.transforms import on_grid
from pipelines.context import StageContext, StageResult
from pipelines.errors import StageError
from pipelines.fanout import fan_out, summarise
from pipelines.methods import stage_model_uri
from pipelines.scores import dice_per_class, hd95_per_class, nanmean
from pipelines.spec import SegmentStage
from pipelines.store import SOURCE, Archive
from pipelines.volumes import read_classes, read_input

__all__ = ["input_key", "expand_inputs", "segment_scan", "overlay_figure", "run"]


def input_key(source: str) -> str:
    """The name an input goes by in arrays, metrics and tables: ``image`` or the recon key."""
    return source.removeprefix("recon/")


def expand_inputs(stage: SegmentStage, recon_keys: list[str]) -> list[str]:
    """The stage's inputs with ``recon/*`` replaced by every reconstruction of the recon stages before."""
    out: list[str] = []
    for source in stage.inputs:
        out += [f"recon/{k}" for k in recon_keys] if source == "recon/*" else [source]
    return list(dict.fromkeys(out))


def _model(model_uri: str, tracking_uri: str) -> tuple[Any, dict[str, Any]]:
    from pipelines.methods import load_model_uri

    model, spec = load_model_uri(model_uri, tracking_uri)
    task = spec.get("task") or {}
    if task.get("task") != "segment":
        raise StageError(f"{model_uri} is not a segmentation model (its task.json says {task.get('task')!r})")
    return model, task


def segment_scan(
    archive: Archive,
    scan_id: str,
    *,
    stage_name: str,
    model_uri: str,
    tracking_uri: str,
    sources: list[str],
    overlap: float,
) -> dict[str, Any]:
    """Segment and score every source of one scan (module docstring); ``{"arrays", "scores"}``."""
    import torch

    from pipelines.train_task import segment_volume

    torch.set_num_threads(1)
    model, task = _model(model_uri, tracking_uri)
    names, lut = task["classes"], np.asarray(task["lut"], np.int64)
    patch = tuple(task["patch"]) if task.get("patch") else None
    truth = read_classes(archive, scan_id, lut)
    spacing = archive.open_array(scan_id, "labels").attrs.get("spacing")
    reference = archive.read_array(scan_id, archive.reference_name(scan_id))
    arrays, scores = {}, {}
    for source in sources:
        key = input_key(source)
        x = read_input(archive, scan_id, source)
        if x.shape[1:] != truth.shape:
            raise StageError(
                f"scan {scan_id!r}: {source} is {x.shape[1:]} but its labels are {truth.shape}; "
                "segmentation scores need the two on one grid"
            )
        pred = segment_volume(model, x, patch, overlap)
        arrays[f"seg/{stage_name}.{key}"] = archive.write_array(
            scan_id, f"seg/{stage_name}.{key}", pred, {"classes": names, "source": source}
        )
        dice = dice_per_class(pred, truth, len(names))
        hd95 = hd95_per_class(pred, truth, len(names), spacing)
        row: dict[str, Any] = {
            "dice": dice,
            "hd95": hd95,
            "dice_mean": nanmean(dice),
            "hd95_mean": nanmean(hd95),
        }
        if source != "image":
            recon = on_grid(archive.read_array(scan_id, source), reference.shape)
            row["psnr"] = psnr(np.abs(recon), reference)
        scores[key] = row
    return {"arrays": arrays, "scores": scores, "classes": names}


def overlay_figure(
    archive: Archive, scan_id: str, stage_name: str, keys: list[str], sources: list[str], lut: np.ndarray
) -> Any:
    """Middle slice: each input with its predicted classes (top) and the reference classes (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = read_classes(archive, scan_id, lut)
    d = truth.shape[0] // 2
    n = len(keys)
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 6.6), squeeze=False, layout="constrained")
    k = int(lut.max()) + 1
    for i, (key, source) in enumerate(zip(keys, sources, strict=True)):
        image = read_input(archive, scan_id, source)[0, d]
        pred = archive.read_array(scan_id, f"seg/{stage_name}.{key}", d, d + 1)[0]
        dice = nanmean(dice_per_class(pred[None], truth[d][None], k))
        for row, (labels, title) in enumerate(
            [(pred, f"{key}\nprediction (slice Dice {dice:.3f})"), (truth[d], "reference classes")]
        ):
            ax = axes[row, i]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            ax.imshow(
                np.ma.masked_equal(labels, 0),
                cmap="tab10",
                vmin=0,
                vmax=9,
                alpha=0.45,
                interpolation="nearest",
            )
            ax.contour(labels, levels=np.arange(0.5, k), colors="white", linewidths=0.3)
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{scan_id}, slice {d}")
    return fig


def _summary(
    per_scan: dict[str, dict[str, Any]], keys: list[str], names: list[str]
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        rows = [s[key] for s in per_scan.values() if key in s]
        if not rows:
            continue
        means = [r["dice_mean"] for r in rows]
        d: dict[str, float] = {
            "dice_mean": nanmean(means),
            "dice_std": float(np.nanstd(means)),
            "hd95_mean": nanmean([r["hd95_mean"] for r in rows]),
        }
        for c, name in enumerate(names[1:]):
            d[f"dice/{name}"] = nanmean([r["dice"][c] for r in rows])
            d[f"hd95/{name}"] = nanmean([r["hd95"][c] for r in rows])
        if all("psnr" in r for r in rows):
            d["psnr"] = float(np.mean([r["psnr"] for r in rows]))
        out[key] = d
    return out


def print_table(console: Any, title: str, summary: dict[str, dict[str, float]], names: list[str]) -> None:
    """One row per input: mean Dice ± std, per-class Dice, HD95 and PSNR."""
    from rich.table import Table

    table = Table(title=title)
    for col in ["input", "PSNR (dB)", "mean Dice", *names[1:], "HD95 (mm)"]:
        table.add_column(col, justify="left" if col == "input" else "right")
    for key, d in summary.items():
        table.add_row(
            key,
            f"{d['psnr']:.2f}" if "psnr" in d else "-",
            f"{d['dice_mean']:.3f} ± {d['dice_std']:.3f}",
            *[f"{d[f'dice/{n}']:.3f}" for n in names[1:]],
            f"{d['hd95_mean']:.2f}",
        )
    console.print(table)


def run(ctx: StageContext, stage: SegmentStage, fingerprint: str) -> StageResult:
    """Segment the split's scans, score them, and log the table and figures."""
    model_uri = stage_model_uri(ctx.upstream, ctx.tracking_uri, stage.model, f"segment stage {stage.name!r}")
    position = next(i for i, s in enumerate(ctx.spec.stages) if s.name == stage.name)
    recon_keys = [
        k
        for s in ctx.spec.stages[:position]
        if s.kind == "recon"
        for k in ctx.upstream.get(s.name, {}).get("methods", [])
    ]
    sources = expand_inputs(stage, list(dict.fromkeys(recon_keys)))
    keys = [input_key(s) for s in sources]
    with_labels = set(ctx.archive.committed(SOURCE))
    ids = [
        s for s in ctx.archive.scans(stage.split) if s in with_labels and ctx.archive.has_array(s, "labels")
    ]
    if not ids:
        raise StageError(f"segment stage {stage.name!r}: no {stage.split} scans with a label volume to score")
    unit = f"segment/{stage.name}"
    outcomes = fan_out(
        ctx.archive,
        unit,
        ids,
        fingerprint,
        segment_scan,
        [f"seg/{stage.name}.{k}" for k in keys],
        {
            "stage_name": stage.name,
            "model_uri": model_uri,
            "tracking_uri": ctx.tracking_uri,
            "sources": sources,
            "overlap": stage.overlap,
        },
        num_cpus=stage.num_cpus,
        console=ctx.console,
        description=f"segment ({len(sources)} inputs)",
        stage=stage.name,
    )
    done = [o for o in outcomes if o.status != "failed"]
    per_scan = {o.scan_id: (o.info or {})["scores"] for o in done}
    names = next(((o.info or {}).get("classes") for o in done), None) or []
    summary = _summary(per_scan, keys, names)
    if summary:
        print_table(
            ctx.console,
            f"{stage.name}: segmentation by input ({len(per_scan)} {stage.split} scans)",
            summary,
            names,
        )
    ctx.tracker.log_metrics(
        {f"{stage.name}/{k}/{m}": v for k, d in summary.items() for m, v in d.items() if np.isfinite(v)}
    )
    rows = [
        {
            "scan_id": sid,
            "input": key,
            "class": name,
            "dice": r["dice"][c],
            "hd95": r["hd95"][c],
            "psnr": r.get("psnr"),
        }
        for sid, scores in per_scan.items()
        for key, r in scores.items()
        for c, name in enumerate(names[1:])
    ]
    ctx.tracker.log_table(rows, "per_scan_segmentation.parquet", f"segment/{stage.name}")
    if per_scan and stage.figures:
        import matplotlib.pyplot as plt

        from pipelines.methods import load_model_uri

        lut = np.asarray(load_model_uri(model_uri, ctx.tracking_uri)[1]["task"]["lut"], np.int64)
        for sid in sorted(per_scan)[: stage.figures]:
            fig = overlay_figure(ctx.archive, sid, stage.name, keys, sources, lut)
            ctx.tracker.log_figure(fig, f"segment/{stage.name}/{sid}_overlay.png")
            plt.close(fig)
    outputs = {
        "model_uri": model_uri,
        "inputs": keys,
        "classes": names,
        "summary": summary,
        "n_scans": len(per_scan),
    }
    return summarise(outcomes, outputs, {unit: fingerprint})
