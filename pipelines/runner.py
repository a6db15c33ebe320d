"""Run a pipeline spec: fingerprints, skip-or-run per stage, tracking, timing.

For each stage in order the runner computes its fingerprint (its spec, the stage
before it, the seed, the code version). A stage whose record in the archive carries
the same fingerprint and is complete is skipped, and its recorded outputs (a model
URI, metric means) feed the stages after it. Otherwise the stage runs; inside it,
per-scan commit markers make the work resume where a previous run stopped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from pipelines.context import StageContext, StageResult
from pipelines.errors import PipelineError
from pipelines.fingerprint import code_version, stage_fingerprint
from pipelines.spec import PipelineSpec, Settings
from pipelines.store import Archive
from pipelines.tracking import MlflowTracker, finish_run, resolve_tracking_uri, start_pipeline_run

__all__ = ["StageReport", "PipelineResult", "run_pipeline", "ensure_ray", "STAGES"]


def _stages() -> dict[str, Callable[[StageContext, Any, str], StageResult]]:
    from pipelines.evaluate import run_evaluate
    from pipelines.ingest import run_phantoms
    from pipelines.recon import run_recon
    from pipelines.simulate import run_simulate
    from pipelines.train import run_train

    return {
        "phantoms": run_phantoms,
        "simulate": run_simulate,
        "train": run_train,
        "recon": run_recon,
        "evaluate": run_evaluate,
    }


STAGES = ("phantoms", "simulate", "train", "recon", "evaluate")


@dataclass(frozen=True)
class StageReport:
    """One stage of one run: status is "ran", "skipped" or "failed"."""

    kind: str
    status: str
    seconds: float
    fingerprint: str
    done: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineResult:
    """What a pipeline run did and where its results are."""

    run_id: str
    tracking_uri: str
    archive_uri: str
    stages: list[StageReport]
    outputs: dict[str, dict[str, Any]]
    seconds: float

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        """``{method: {metric: mean}}`` from the evaluate stage (empty without one)."""
        return self.outputs.get("evaluate", {}).get("means", {})


def ensure_ray(spec: PipelineSpec, verbose: bool = False) -> bool:
    """Connect to the spec's or ``$MEDRECON_RAY_ADDRESS``'s cluster, else start an embedded one.

    Worker logs stay in Ray's log files unless ``verbose`` (the CLI's ``--debug``) streams them
    to the terminal. Returns True when this call started Ray (the caller then shuts it down).
    """
    import logging

    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    if ray.is_initialized():
        return False
    env = {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"),
    }
    address = spec.ray.address or Settings().ray_address
    if address:
        ray.init(
            address=address, runtime_env={"env_vars": env}, logging_level="WARNING", log_to_driver=verbose
        )
    else:
        ray.init(
            address="local",
            num_cpus=spec.ray.num_cpus,
            include_dashboard=False,
            logging_level="WARNING",
            log_to_driver=verbose,
            runtime_env={"env_vars": env},
        )
    return True


def run_pipeline(
    spec: PipelineSpec, console: Console | None = None, *, verbose: bool = False
) -> PipelineResult:
    """Run every stage of ``spec`` (see the module docstring); raise on a failed stage."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    console = console or Console()
    t_start = time.perf_counter()
    creates = spec.stage("phantoms") is not None
    archive = Archive(spec.archive.path, spec.archive.storage_options, create=creates)
    tracking_uri = resolve_tracking_uri(spec.tracking.uri, archive.uri, archive.is_local)

    fingerprints: dict[str, str] = {}
    upstream_fp = ""
    for stage in spec.stages:
        upstream_fp = stage_fingerprint(stage, upstream_fp, spec.seed)
        fingerprints[stage.kind] = upstream_fp
    run_id = start_pipeline_run(
        tracking_uri,
        spec.tracking.experiment,
        spec.name,
        upstream_fp,
        {
            "medrecon.pipeline": spec.name,
            "medrecon.code_version": code_version(),
            "medrecon.archive": archive.uri,
        },
    )
    tracker = MlflowTracker(tracking_uri, run_id)
    tracker.log_params(
        {
            "pipeline.seed": spec.seed,
            "pipeline.spec": json.dumps(spec.model_dump(mode="json"), sort_keys=True),
        }
    )
    console.print(
        f"[bold]medrecon[/] pipeline [cyan]{spec.name}[/]: archive {archive.uri}, "
        f"MLflow run {run_id} at {tracking_uri}"
    )

    started = ensure_ray(spec, verbose)
    stage_fns = _stages()
    upstream: dict[str, dict[str, Any]] = {}
    reports: list[StageReport] = []
    try:
        for stage in spec.stages:
            fp = fingerprints[stage.kind]
            record = archive.stage_record(stage.kind)
            if record and record.get("fingerprint") == fp and record.get("complete", False):
                upstream[stage.kind] = record.get("outputs", {})
                reports.append(StageReport(stage.kind, "skipped", 0.0, fp))
                console.print(f"[dim]{stage.kind}: unchanged (fingerprint {fp}), skipped[/]")
                continue
            ctx = StageContext(spec, archive, tracker, tracking_uri, console, dict(upstream))
            t0 = time.perf_counter()
            try:
                result = stage_fns[stage.kind](ctx, stage, fp)
            except PipelineError:
                reports.append(StageReport(stage.kind, "failed", time.perf_counter() - t0, fp))
                raise
            seconds = time.perf_counter() - t0
            archive.commit_stage(stage.kind, fp, result.outputs, complete=not result.failed)
            upstream[stage.kind] = result.outputs
            tracker.log_metrics({f"stage_seconds/{stage.kind}": seconds})
            reports.append(
                StageReport(stage.kind, "ran", seconds, fp, result.done, result.skipped, result.failed)
            )
            for scan_id, error in result.failed.items():
                console.print(f"[yellow]{stage.kind}: scan {scan_id} quarantined: {error}[/]")
        finish_run(tracking_uri, run_id, "FINISHED")
    except BaseException:
        finish_run(tracking_uri, run_id, "FAILED")
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
    return PipelineResult(run_id, tracking_uri, archive.uri, reports, upstream, time.perf_counter() - t_start)
