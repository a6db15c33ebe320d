"""Tracking: one small :class:`Tracker` interface and its MLflow implementation.

Every stage logs through a tracker bound to one MLflow run by ID, so the run can be
created on the driver and the same object shipped to Ray workers (it pickles as its
URI and run ID). Models are logged as an architecture spec plus safetensors weights
(see :mod:`models.registry`) and registered in the MLflow model registry; resolving and loading
them is :mod:`pipelines.methods` (this module never imports a model, so every stage can log
without depending on the models' code).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

from pipelines.errors import TrackingError

__all__ = [
    "Tracker",
    "MlflowTracker",
    "resolve_tracking_uri",
    "start_pipeline_run",
    "register_model",
    "client",
]


class Tracker(Protocol):
    """What stages need from experiment tracking."""

    run_id: str

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_figure(self, figure: Any, name: str) -> None: ...
    def log_table(self, rows: list[dict[str, Any]], name: str, artifact_path: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


def client(uri: str) -> Any:
    """An ``MlflowClient`` for tracking and registry at ``uri``."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


class MlflowTracker:
    """A :class:`Tracker` writing to one MLflow run through ``MlflowClient`` (no global active run)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.run_id = run_id
        self._c: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "run_id": self.run_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.uri, self.run_id, self._c = state["uri"], state["run_id"], None

    @property
    def client(self) -> Any:
        if self._c is None:
            self._c = client(self.uri)
        return self._c

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = {k: json.dumps(v) if isinstance(v, (dict, list)) else str(v) for k, v in params.items()}
        self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in flat.items()])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        )

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        local_path = Path(local_path)
        if local_path.is_dir():
            self.client.log_artifacts(self.run_id, str(local_path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def log_table(self, rows: list[dict[str, Any]], name: str, artifact_path: str) -> None:
        """``rows`` (one dict per row) as the Parquet file ``artifact_path/name``; nothing when empty."""
        if not rows:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            pq.write_table(pa.Table.from_pylist(rows), path)
            self.log_artifact(path, artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_model_dir(self, directory: str | Path, artifact_path: str) -> str:
        """Log a saved model directory (model.json + weights.safetensors) at ``artifact_path``."""
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)
        return f"runs:/{self.run_id}/{artifact_path}"


def resolve_tracking_uri(spec_uri: str | None, archive_uri: str, is_local: bool) -> str:
    """The MLflow URI: the spec's, else ``$MEDRECON_TRACKING_URI``, else SQLite beside a local archive."""
    from pipelines.spec import Settings

    uri = spec_uri or Settings().tracking_uri
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # Make a relative SQLite path absolute: Ray workers do not share the driver's working directory.
            return "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
        return uri
    if not is_local:
        raise TrackingError(
            f"archive {archive_uri} is remote, so tracking.uri (or MEDRECON_TRACKING_URI) "
            "must name an MLflow server"
        )
    return "sqlite:///" + os.path.join(os.path.dirname(archive_uri), "mlflow.db")


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///") :]), "mlartifacts")
    return None


def start_pipeline_run(
    uri: str, experiment: str, run_name: str, fingerprint: str, tags: dict[str, str]
) -> str:
    """Return the ID of this pipeline's MLflow run, creating it if needed.

    Re-running the same spec resumes the run tagged with the same pipeline fingerprint,
    so a retried night adds to one run instead of scattering duplicates.
    """
    try:
        c = client(uri)
        exp = c.get_experiment_by_name(experiment)
        exp_id = (
            exp.experiment_id
            if exp
            else c.create_experiment(experiment, artifact_location=_artifact_root(uri))
        )
        found = c.search_runs(
            [exp_id], filter_string=f"tags.`medrecon.fingerprint` = '{fingerprint}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
            c.update_run(run_id, status="RUNNING")
            return run_id
        run = c.create_run(exp_id, run_name=run_name, tags={"medrecon.fingerprint": fingerprint, **tags})
        return run.info.run_id
    except Exception as exc:  # MLflow raises many types; name the URI in one clear error
        raise TrackingError(
            f"could not start an MLflow run at {uri!r} (experiment {experiment!r}): {exc}"
        ) from exc


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def register_model(uri: str, name: str, run_id: str, artifact_path: str) -> str:
    """Register the run's model at ``artifact_path`` as a new version of ``name``.

    Returns ``models:/name/version``.
    """
    c = client(uri)
    try:
        c.get_registered_model(name)
    except Exception:
        c.create_registered_model(
            name, description="medrecon model: model.json (architecture) + weights.safetensors"
        )
    run = c.get_run(run_id)
    source = f"{run.info.artifact_uri}/{artifact_path}"
    version = c.create_model_version(
        name, source=source, run_id=run_id, tags={"medrecon.format": "spec+safetensors"}
    )
    return f"models:/{name}/{version.version}"
