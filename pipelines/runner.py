"""Run a pipeline spec: plan fingerprints, skip or run each stage in order, track, time.

:func:`plan` gives every stage its fingerprint: its spec, the fingerprints of what it reads, the
seed, and its code version (:func:`pipelines.fingerprint.code_version`). What a stage reads:

* a data stage (phantoms, simulate): the data stage before it;
* a train stage: the measurements (the last data stage);
* a recon stage: the measurements and the train stages its ``learned:<name>`` methods name;
* an evaluate stage: the measurements and the recon stages before it.

So a second train stage does not retrain the first, and a changed recon stage does not retrain
anything. A pipeline without data stages reads the measurements the archive records (the
fingerprint of the stage that last wrote them), which is how ``medrecon reprocess`` and a
pipeline that wrote the same outputs agree on what is already done.

A stage whose record in the archive carries the same fingerprint and is complete is skipped, and
its recorded outputs (a model URI, metric means) feed the stages after it. Otherwise it runs;
inside it, per-scan commit records make the work resume where a previous run stopped.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich.console import Console

from models.registry import model_module
from pipelines.context import StageContext
from pipelines.embedded import ensure_ray, ray_address
from pipelines.errors import PipelineError
from pipelines.fingerprint import MODEL_LEAVES, code_version, combine, stage_fingerprint
from pipelines.lease import ArchiveLease
from pipelines.preflight import (
    archive_shape,
    check_memory,
    check_models,
    check_resources,
    check_storage,
    check_tracking,
    ray_resources,
)
from pipelines.secrets import redact, redact_uri
from pipelines.spec import STAGE_KINDS, PipelineSpec
from pipelines.store import MEASUREMENTS, SOURCE, Archive, locate
from pipelines.tracking import MlflowTracker, finish_run, resolve_tracking_uri, start_pipeline_run

STAGE_LINE = "stage:"  # the prefix of the line each stage starts with; `medrecon status` reads the last one

__all__ = [
    "PlannedStage",
    "StageReport",
    "PipelineResult",
    "plan",
    "run_pipeline",
    "external_data_fingerprint",
]


@dataclass(frozen=True)
class PlannedStage:
    """A stage with its fingerprint and the fingerprint of the measurements it reads."""

    stage: Any
    fingerprint: str
    data_fingerprint: str
    identity: str = ""


@dataclass(frozen=True)
class StageReport:
    """One stage of one run: status is "ran", "skipped" or "failed"."""

    name: str
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
    def evaluation(self) -> dict[str, Any]:
        """The outputs of the last evaluate stage (empty without one)."""
        names = [r.name for r in self.stages if r.kind == "evaluate"]
        return self.outputs.get(names[-1], {}) if names else {}

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        """``{output key: {metric: mean}}`` from the last evaluate stage."""
        return self.evaluation.get("means", {})

    @property
    def quarantined(self) -> list[tuple[str, str, str]]:
        """``(stage, scan_id, reason)`` of every scan a stage of this run quarantined."""
        return [(r.name, scan, why) for r in self.stages for scan, why in r.failed.items()]


def external_data_fingerprint(archive: Archive) -> str:
    """What a pipeline without data stages reads: the fingerprint of the archive's current measurements.

    It is the fingerprint of the simulate stage that wrote them (which chains the images'), the very
    value a full pipeline's recon stage reads, so both give one method the same fingerprint.
    """
    current = archive.current_fingerprints()
    found = current.get(MEASUREMENTS) or current.get(SOURCE) or ""
    return found if isinstance(found, str) else combine({"scans": found})  # fingerprinted per scan


def stage_code_version(stage: Any) -> str:
    """The code a stage's output depends on: its module's import closure, models counted one by one.

    A train stage counts the module of the model it trains and no other network; recon counts
    none (a learned method's identity is its trained model, see :data:`MODEL_LEAVES`).
    """
    module = STAGE_KINDS[stage.kind].module
    if stage.kind in ("train", "train_task"):
        return code_version(module, model_module(stage.model.name), leaves=MODEL_LEAVES)
    if stage.kind in ("recon", "segment", "classify"):  # recon: as pipelines.recon.recon_code_version()
        return code_version(module, leaves=MODEL_LEAVES)
    return code_version(module)


def _reads(stage: Any, before: list[Any]) -> list[str]:
    """The stages before it whose outputs an analysis stage reads: the models it uses or starts from,
    and the recon stages when it reads reconstructions."""
    names = {"segment": lambda: [stage.model], "classify": lambda: list(stage.models)}.get(
        stage.kind, lambda: [stage.init_encoder] if stage.init_encoder else []
    )()
    inputs = stage.inputs if stage.kind == "segment" else [stage.input] if stage.kind == "train_task" else []
    reads = [s.name for s in before if s.name in names]
    if any(i.startswith("recon/") for i in inputs) or stage.kind == "classify":
        reads += [s.name for s in before if s.kind == "recon"]
    return reads


def plan(spec: PipelineSpec, external_data: str = "") -> list[PlannedStage]:
    """Every stage with its fingerprint (see the module docstring), in order."""
    fingerprints: dict[str, str] = {}
    data = external_data
    out = []
    for stage in spec.stages:
        kind = STAGE_KINDS[stage.kind]
        upstream = [data]
        if stage.kind == "recon":
            upstream += [fingerprints[r.target] for r in stage.refs() if r.kind in ("learned", "gan_prior")]
        elif stage.kind == "evaluate":
            upstream += [fingerprints[s.name] for s in spec.stages[: len(out)] if s.kind == "recon"]
        elif stage.kind in ("train_task", "segment", "classify"):
            upstream += [fingerprints[name] for name in _reads(stage, spec.stages[: len(out)])]
        elif stage.kind == "ingest" and spec.run_key is None:  # what the sources hold: new files re-run it
            # (a keyed run is fresh per key instead, and resuming a key never takes in files that
            # arrived after it started: they are the next key's)
            from pipelines.ingest import source_listing

            upstream.append(source_listing(stage.sources, stage.manifest))
        if spec.run_key is not None:  # a new key (night) runs every stage afresh; the same key resumes
            upstream.append(f"run_key={spec.run_key}")
        code = stage_code_version(stage)
        fp = stage_fingerprint(stage, upstream, spec.seed, code)
        out.append(PlannedStage(stage, fp, data, stage_fingerprint(stage, [], spec.seed, code)))
        fingerprints[stage.name] = fp
        if kind.role == "data":
            data = fp
    return out


def _params(spec: PipelineSpec) -> dict[str, Any]:
    """The fingerprinted settings, flat and redacted: ``<stage name>.<field>`` and ``pipeline.seed``.

    Environment facts (archive, Ray, CPUs) are tags instead: they may change between runs of one
    pipeline, and MLflow refuses a changed param.
    """
    out: dict[str, Any] = {"pipeline.seed": spec.seed}
    for stage in spec.stages:
        for key, value in redact(stage.model_dump(mode="json", exclude={"name"})).items():
            out[f"{stage.name}.{key}"] = value
    return out


def _environment_tags(spec: PipelineSpec, archive: Archive, tracking_uri: str) -> dict[str, str]:
    return {
        "medrecon.pipeline": spec.name,
        "medrecon.code_version": code_version(),
        "medrecon.archive": redact_uri(archive.uri),
        "medrecon.tracking_uri": redact_uri(tracking_uri),
        "medrecon.ray": redact_uri(ray_address(spec) or "embedded"),
        "medrecon.ray_num_cpus": str(spec.ray.num_cpus or "all"),
    }


def _memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _describe_holder(holder: dict[str, Any]) -> str:
    if holder.get("unreadable"):
        return f"an unreadable lease file at {holder.get('path')}"
    return f"{holder.get('owner')!r} (pid {holder.get('pid')} on host {holder.get('host')})"


def run_pipeline(
    spec: PipelineSpec, console: Console | None = None, *, verbose: bool = False, wait_for_lock: bool = False
) -> PipelineResult:
    """Run every stage of ``spec`` (see the module docstring); raise on a failed stage.

    Before Ray starts: the archive and tracking are checked (:mod:`pipelines.preflight`) and the
    archive's writer lease is taken (:mod:`pipelines.lease`): a second run on the same archive
    raises :class:`~pipelines.errors.LeaseError` naming the holder, or with ``wait_for_lock``
    queues behind it. The MLflow run ends FINISHED, FAILED, or KILLED (Ctrl-C, SIGTERM).
    """
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    console = console or Console()
    t_start = time.perf_counter()
    creates = bool(spec.of_kind("phantoms") or spec.of_kind("ingest"))
    check_storage(spec.archive.path, spec.archive.storage_options, creates=creates)
    _, _, archive_uri, is_local = locate(spec.archive.path, spec.archive.storage_options)
    tracking_uri = resolve_tracking_uri(spec.tracking.uri, archive_uri, is_local)
    check_tracking(tracking_uri)
    embedded = ray_address(spec) is None
    if embedded and creates:  # before anything is written
        check_memory(spec, _memory(), "this machine")
    archive = Archive(spec.archive.path, spec.archive.storage_options, create=creates)
    if embedded and not creates:
        check_memory(spec, _memory(), "this machine", archive_shape(archive))
    check_models(spec, tracking_uri, archive)

    lease = ArchiveLease(
        archive.fs, archive._path("_meta", "lease.json"), owner=f"medrecon pipeline {spec.name}"
    )
    lease.acquire(
        wait=wait_for_lock,
        on_wait=lambda h: console.print(f"waiting for the archive, in use by {_describe_holder(h)} ..."),
        on_takeover=lambda h: console.print(
            f"[yellow]took over the archive lease of {_describe_holder(h)}: that run is gone[/]"
        ),
    )
    try:
        return _run(spec, archive, tracking_uri, console, verbose, t_start)
    finally:
        lease.release()


def _record_run(archive: Archive, spec: PipelineSpec, started_at: str, run_id: str, status: str) -> None:
    """Record a keyed run's status; FINISHED adds the time the next key counts new scans from."""
    if spec.run_key is None:
        return
    record = {"started_at": started_at, "status": status, "run_id": run_id}
    if status == "FINISHED":
        record["finished_at"] = datetime.now(UTC).isoformat(timespec="microseconds")
    elif (archive.run_record(spec.name, spec.run_key) or {}).get("status") == "FINISHED":
        return  # a re-run that fails (or is starting) does not undo a finished night
    archive.record_run(spec.name, spec.run_key, record)


def _run(
    spec: PipelineSpec, archive: Archive, tracking_uri: str, console: Console, verbose: bool, t_start: float
) -> PipelineResult:
    has_data = any(STAGE_KINDS[s.kind].role == "data" for s in spec.stages)
    planned = plan(spec, "" if has_data else external_data_fingerprint(archive))
    fingerprints = {p.stage.name: p.fingerprint for p in planned}
    run_id = start_pipeline_run(
        tracking_uri,
        spec.tracking.experiment,
        spec.name,
        combine({"name": spec.name, "stages": fingerprints}),
        {},
    )
    tracker = MlflowTracker(tracking_uri, run_id)
    tracker.log_params(_params(spec))
    tracker.set_tags(_environment_tags(spec, archive, tracking_uri))
    console.print(
        f"[bold]medrecon[/] pipeline [cyan]{spec.name}[/]: archive {redact_uri(archive.uri)}, "
        f"MLflow run {run_id} at {redact_uri(tracking_uri)}"
    )
    upstream: dict[str, dict[str, Any]] = {}
    reports: list[StageReport] = []
    started = False
    started_at = datetime.now(UTC).isoformat(timespec="microseconds")
    if spec.run_key is not None:
        tracker.set_tags({"medrecon.run_key": spec.run_key})
        _record_run(archive, spec, started_at, run_id, "RUNNING")
    try:
        started = ensure_ray(spec, verbose, console.print)
        check_resources(
            spec.of_kind("train") + spec.of_kind("train_task"), ray_resources()
        )  # before any stage: Ray would wait forever
        for step in planned:
            stage, fp = step.stage, step.fingerprint
            keyed = (spec.name, spec.run_key) if spec.run_key is not None else None
            record = archive.stage_record(stage.name, keyed)
            if record and record.get("fingerprint") == fp and record.get("complete", False):
                upstream[stage.name] = record.get("outputs", {})
                reports.append(StageReport(stage.name, stage.kind, "skipped", 0.0, fp))
                console.print(f"[dim]{stage.name}: unchanged (fingerprint {fp}), skipped[/]")
                continue
            ctx = StageContext(
                spec,
                archive,
                tracker,
                tracking_uri,
                console,
                dict(upstream),
                fingerprints,
                step.data_fingerprint,
                step.identity,
            )
            console.print(f"{STAGE_LINE} {stage.name} ({stage.kind}) running", highlight=False, markup=False)
            t0 = time.perf_counter()
            try:
                result = STAGE_KINDS[stage.kind].runner()(ctx, stage, fp)
            except PipelineError:
                reports.append(StageReport(stage.name, stage.kind, "failed", time.perf_counter() - t0, fp))
                raise
            seconds = time.perf_counter() - t0
            archive.commit_stage(
                stage.name,
                fp,
                result.outputs,
                kind=stage.kind,
                units=result.units,
                complete=not result.failed,
                run=keyed,
            )
            upstream[stage.name] = result.outputs
            tracker.log_metrics({f"stage_seconds/{stage.name}": seconds})
            reports.append(
                StageReport(
                    stage.name, stage.kind, "ran", seconds, fp, result.done, result.skipped, result.failed
                )
            )
            for scan_id, error in result.failed.items():
                console.print(f"[yellow]{stage.name}: scan {scan_id} quarantined: {error}[/]")
        _record_run(archive, spec, started_at, run_id, "FINISHED")
        finish_run(tracking_uri, run_id, "FINISHED")
    except KeyboardInterrupt:
        _record_run(archive, spec, started_at, run_id, "KILLED")
        finish_run(tracking_uri, run_id, "KILLED")
        raise
    except BaseException:
        _record_run(archive, spec, started_at, run_id, "FAILED")
        finish_run(tracking_uri, run_id, "FAILED")
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
    return PipelineResult(run_id, tracking_uri, archive.uri, reports, upstream, time.perf_counter() - t_start)
