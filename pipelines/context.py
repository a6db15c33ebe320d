"""What every stage receives (:class:`StageContext`) and returns (:class:`StageResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from pipelines.spec import PipelineSpec
from pipelines.store import Archive
from pipelines.tracking import MlflowTracker

__all__ = ["StageContext", "StageResult"]


@dataclass(frozen=True)
class StageContext:
    """The pipeline-wide objects a stage wires together.

    Attributes:
        spec: the whole validated pipeline spec.
        archive: the Zarr archive.
        tracker: the pipeline's MLflow run.
        tracking_uri: the MLflow URI (workers open their own client from it).
        console: where progress and tables go.
        upstream: outputs recorded by the stages that ran (or were skipped) before this one, by name.
        fingerprints: the fingerprint of every stage of the pipeline, by name.
        data_fingerprint: the fingerprint of the measurements this stage reads: the last data stage's,
            or, when the pipeline has none, the one the archive records for its measurements.
        identity: the stage's spec, seed and code version without its upstream or the run key: what
            per-scan commit fingerprints build on (:func:`pipelines.fingerprint.scan_fingerprint`).
    """

    spec: PipelineSpec
    archive: Archive
    tracker: MlflowTracker
    tracking_uri: str
    console: Console
    upstream: dict[str, dict[str, Any]] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    data_fingerprint: str = ""
    identity: str = ""


@dataclass(frozen=True)
class StageResult:
    """What a stage did.

    Attributes:
        outputs: small JSON-able facts later stages need (a model URI, metric means).
        units: ``{unit: fingerprint}`` of the commit units it wrote (``medrecon show`` reads them).
        done: scans processed now; skipped: scans already committed; failed: ``{scan_id: error}``.
    """

    outputs: dict[str, Any] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    done: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
