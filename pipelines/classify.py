"""The ``classify`` stage: per-scan probabilities from trained classifiers, their AUC and ROC curves.

One Ray task per scan runs every classifier on the input it was trained on (its ``task.json``:
the image, a reconstruction, or the measurements themselves) and reads the scan's target from
its label volume. The scores live in the scan's commit record (unit ``classify/<stage>``). The
driver prints and logs each classifier's AUC (``<stage>/<model>/auc``) and accuracy at 0.5, and
one ROC figure with a curve per classifier: the same question asked of k-space and of images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.context import StageContext, StageResult
from pipelines.errors import StageError
from pipelines.fanout import fan_out, summarise
from pipelines.methods import stage_model_uri
from pipelines.scores import auc, roc
from pipelines.spec import ClassifyStage
from pipelines.store import SOURCE, Archive
from pipelines.volumes import read_input, scan_target

__all__ = ["classify_scan", "roc_figure", "run"]


def classify_scan(
    archive: Archive, scan_id: str, *, models: dict[str, str], tracking_uri: str
) -> dict[str, Any]:
    """``{"target": 0/1, "probability": {name: p}}`` for one scan and every classifier."""
    import torch

    from pipelines.methods import load_model_uri

    torch.set_num_threads(1)
    probability, target = {}, None
    for name, uri in models.items():
        model, spec = load_model_uri(uri, tracking_uri)
        task = spec.get("task") or {}
        if task.get("task") != "classify":
            raise StageError(f"{uri} is not a classifier (its task.json says {task.get('task')!r})")
        x = torch.from_numpy(read_input(archive, scan_id, task["input"]))[None]
        with torch.no_grad():
            probability[name] = float(torch.sigmoid(model(x))[0])
        target = scan_target(archive, scan_id, task["target"]) if target is None else target
    return {"target": target, "probability": probability}


def roc_figure(targets: list[int], probabilities: dict[str, list[float]], title: str) -> Any:
    """One ROC curve per classifier, with its AUC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")
    for name, p in probabilities.items():
        fpr, tpr = roc(p, targets)
        ax.plot(fpr, tpr, drawstyle="steps-post", label=f"{name} (AUC {auc(p, targets):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def run(ctx: StageContext, stage: ClassifyStage, fingerprint: str) -> StageResult:
    """Classify the split's scans with every model; log AUC, accuracy and the ROC figure."""
    from rich.table import Table

    models = {
        name: stage_model_uri(ctx.upstream, ctx.tracking_uri, name, f"classify stage {stage.name!r}")
        for name in stage.models
    }
    has = set(ctx.archive.committed(SOURCE))
    ids = [s for s in ctx.archive.scans(stage.split) if s in has and ctx.archive.has_array(s, "labels")]
    if not ids:
        raise StageError(f"classify stage {stage.name!r}: no {stage.split} scans with a label volume")
    unit = f"classify/{stage.name}"
    outcomes = fan_out(
        ctx.archive,
        unit,
        ids,
        fingerprint,
        classify_scan,
        [],
        {"models": models, "tracking_uri": ctx.tracking_uri},
        num_cpus=stage.num_cpus,
        console=ctx.console,
        description=f"classify ({len(models)} models)",
        stage=stage.name,
    )
    per_scan = {o.scan_id: o.info or {} for o in outcomes if o.status != "failed"}
    targets = [int(r["target"]) for r in per_scan.values()]
    probabilities = {m: [float(r["probability"][m]) for r in per_scan.values()] for m in models}
    summary: dict[str, dict[str, float]] = {}
    table = Table(title=f"{stage.name}: {len(targets)} {stage.split} scans, {sum(targets)} positive")
    for col in ("model", "input", "AUC", "accuracy at 0.5"):
        table.add_column(col)
    both = len(set(targets)) == 2
    for name, p in probabilities.items():
        accuracy = float(np.mean([(q > 0.5) == bool(t) for q, t in zip(p, targets, strict=True)]))
        summary[name] = {"accuracy": accuracy, **({"auc": auc(p, targets)} if both else {})}
        source = ctx.upstream.get(name, {}).get("input", "?")
        table.add_row(
            name, source, f"{summary[name]['auc']:.3f}" if both else "n/a (one class)", f"{accuracy:.3f}"
        )
    ctx.console.print(table)
    ctx.tracker.log_metrics({f"{stage.name}/{m}/{k}": v for m, d in summary.items() for k, v in d.items()})
    if both:
        import matplotlib.pyplot as plt

        fig = roc_figure(targets, probabilities, f"{stage.name} ({stage.split} split)")
        ctx.tracker.log_figure(fig, f"classify/{stage.name}/roc.png")
        plt.close(fig)
    else:
        ctx.console.print(f"[yellow]{stage.name}: the {stage.split} scans hold one class only: no AUC[/]")
    outputs = {
        "models": models,
        "summary": summary,
        "targets": dict(zip(per_scan, targets, strict=True)),
        "probabilities": {m: dict(zip(per_scan, p, strict=True)) for m, p in probabilities.items()},
    }
    return summarise(outcomes, outputs, {unit: fingerprint})
