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

    def model_uri(self, ref: str, who: str) -> str:
        """The exact model a stage names: a registry URI (``models:/NAME/VERSION`` or ``@ALIAS``)
        resolved to its version, or the model an earlier train stage of this pipeline registered.

        Args:
            ref: the URI, or the name of an earlier ``train``/``train_task`` stage.
            who: the stage, for messages (``"segment stage 'seg'"``).

        Raises:
            StageError: the URI does not resolve; the message starts with ``who``.
        """
        if not ref.startswith("models:/"):
            return str(self.upstream[ref]["model_uri"])
        from pipelines.errors import StageError, TrackingError
        from pipelines.methods import resolve_model_uri

        try:
            return resolve_model_uri(ref, self.tracking_uri)[1]
        except TrackingError as exc:
            raise StageError(f"{who}: {exc}") from None


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
