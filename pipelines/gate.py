"""Gate stage: promote a freshly trained model to ``champion`` only when it is measurably better.

1. The challenger is the version the train stage ``stage.challenger`` registered in this run (its
   ``alias`` is usually ``challenger``); the champion is ``models:/NAME@champion`` now.
2. Without a champion (a first night) the challenger is promoted: there is nothing to compare with.
3. Otherwise both models reconstruct the same hold-out scans (``stage.split``, the same list for
   both, recorded with the decision) in one Ray task, and are scored with evaluate's metrics.
4. The challenger is promoted when it beats the champion by ``margin`` on ``metric`` and loses no
   more than ``guard_tolerance`` on any ``guard`` metric; otherwise it is tagged rejected, with the
   reason. Promotion is a compare-and-set on the alias (:func:`pipelines.champion.promote`): if
   another run moved ``champion`` meanwhile, this run promotes nothing and says so.
5. A version already decided (a re-run of the same night) is not decided again.

Every decision is kept in MLflow's history of the model (``medrecon models history NAME``) and in
this run's metrics (``<stage>/challenger_<metric>``, ``<stage>/champion_<metric>``, ``<stage>/promoted``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.context import StageContext, StageResult
from pipelines.errors import StageError
from pipelines.spec import METRICS, GateStage
from pipelines.store import MEASUREMENTS

__all__ = ["score_models", "decide", "run"]


def score_models(
    archive: Any, tracking_uri: str, uris: list[str], scan_ids: list[str], metrics: list[str]
) -> dict[str, dict[str, float]]:
    """``{uri: {metric: mean over scans}}`` of each model reconstructing ``scan_ids`` (a Ray task)."""
    import torch

    from models.inference import reconstruct_slices
    from operators.metrics import score
    from operators.transforms import on_grid
    from pipelines.methods import load_model_uri
    from pipelines.physics import Acquisition

    torch.set_num_threads(1)
    models = {uri: load_model_uri(uri, tracking_uri)[0].eval() for uri in uris}
    per_model: dict[str, list[dict[str, float]]] = {uri: [] for uri in uris}
    for sid in scan_ids:
        acq = Acquisition.from_archive(archive, sid)
        y = acq.read(archive, sid)
        ref = archive.read_array(sid, archive.reference_name(sid))
        for uri, model in models.items():
            x = on_grid(reconstruct_slices(model, y, acq.slab_op), ref.shape)
            per_model[uri].append(score(x, ref, metrics))
    return {
        uri: {m: float(np.mean([s[m] for s in rows])) for m in metrics} for uri, rows in per_model.items()
    }


def decide(stage: GateStage, challenger: dict[str, float], champion: dict[str, float]) -> tuple[bool, str]:
    """``(promote, reason)`` from both models' mean metrics (see the module docstring)."""

    def gain(metric: str) -> float:  # positive: the challenger is better
        diff = challenger[metric] - champion[metric]
        return diff if METRICS[metric] == "max" else -diff

    main = gain(stage.metric)
    if main < stage.margin or main <= 0:  # never promote a model that is not better
        return False, (
            f"{stage.metric} {challenger[stage.metric]:.4g} against the champion's "
            f"{champion[stage.metric]:.4g}: gain {main:+.4g}, the gate asks for at least {stage.margin:g}"
            + (" and more than 0" if stage.margin == 0 else "")
        )
    for metric in stage.guard:
        if gain(metric) < -stage.guard_tolerance:
            return False, (
                f"guard {metric} regresses: {challenger[metric]:.4g} against the champion's "
                f"{champion[metric]:.4g} (tolerance {stage.guard_tolerance:g})"
            )
    return True, (
        f"{stage.metric} {challenger[stage.metric]:.4g} against the champion's {champion[stage.metric]:.4g} "
        f"({main:+.4g}, margin {stage.margin:g}); guards {stage.guard or 'none'} hold"
    )


def run(ctx: StageContext, stage: GateStage, fingerprint: str) -> StageResult:
    """Compare the challenger with the champion and promote or reject it (module docstring)."""
    import ray

    from pipelines import champion as registry

    trained = ctx.upstream.get(stage.challenger, {})
    challenger_uri = trained.get("model_uri")
    if not challenger_uri:
        raise StageError(f"gate stage {stage.name!r}: train stage {stage.challenger!r} registered no model")
    name, version = challenger_uri.removeprefix("models:/").rsplit("/", 1)
    uri = ctx.tracking_uri
    metrics_needed = sorted({stage.metric, *stage.guard})
    outputs: dict[str, Any] = {"model": name, "challenger": version}

    earlier = registry.decided(uri, name, version)
    if earlier is not None:  # the same night again: its decision stands
        ctx.console.print(
            f"{stage.name}: {name} v{version} was decided before ({earlier.action}): {earlier.reason}"
        )
        champion_now = registry.alias_version(uri, name, registry.CHAMPION)
        return StageResult(
            outputs | {"decision": earlier.action, "reason": earlier.reason, "champion": champion_now}
        )

    champion = registry.alias_version(uri, name, registry.CHAMPION)
    run_facts = {"run_key": ctx.spec.run_key, "run_id": ctx.tracker.run_id}
    if champion is None:
        event = registry.promote(
            uri, name, version, expected=None, reason="no champion yet: the first model", **run_facts
        )
        decision = "promote" if event is not None else "reject"
        reason = event.reason if event is not None else "another run promoted a champion meanwhile"
        if event is None:
            registry.reject(uri, name, version, reason=reason, **run_facts)
        ctx.tracker.log_metrics({f"{stage.name}/promoted": float(event is not None)})
        ctx.console.print(f"{stage.name}: {name} v{version}: {decision} ({reason})")
        return StageResult(outputs | {"decision": decision, "reason": reason, "champion": version})

    scans = ctx.archive.scans(stage.split)
    measured = ctx.archive.committed(MEASUREMENTS)
    scans = [s for s in scans if s in measured]
    if not scans:
        raise StageError(
            f"gate stage {stage.name!r}: no {stage.split} scans with measurements to compare "
            f"{name} v{version} with champion v{champion}; the gate needs a hold-out split"
        )
    champion_uri = f"models:/{name}/{champion}"
    ctx.console.print(
        f"{stage.name}: scoring challenger v{version} and champion v{champion} "
        f"on {len(scans)} {stage.split} scans"
    )
    task = ray.remote(score_models).options(num_cpus=stage.num_cpus, max_retries=1)
    scored = ray.get(task.remote(ctx.archive, uri, [challenger_uri, champion_uri], scans, metrics_needed))
    ours, theirs = scored[challenger_uri], scored[champion_uri]
    promote, reason = decide(stage, ours, theirs)
    metrics = {f"challenger/{k}": v for k, v in ours.items()} | {
        f"champion/{k}": v for k, v in theirs.items()
    }
    if promote:
        event = registry.promote(
            uri, name, version, expected=champion, reason=reason, metrics=metrics, **run_facts
        )
        if event is None:
            promote, reason = False, "the champion changed while this gate compared (another run promoted)"
    if not promote:
        registry.reject(uri, name, version, reason=reason, metrics=metrics, **run_facts)
    now = registry.alias_version(uri, name, registry.CHAMPION)
    ctx.tracker.log_metrics(
        {f"{stage.name}/{k.replace('/', '_')}": v for k, v in metrics.items()}
        | {f"{stage.name}/promoted": float(promote)}
    )
    verdict = "[green]promoted[/]" if promote else "[yellow]rejected[/]"
    ctx.console.print(f"{stage.name}: {name} v{version} {verdict}: {reason}")
    return StageResult(
        outputs
        | {
            "decision": "promote" if promote else "reject",
            "reason": reason,
            "champion": now,
            "previous": champion,
            "scans": scans,
            "metrics": metrics,
        }
    )
