"""Ray orchestration: specs, the archive, stages, tracking, the CLI.

Imports go pipelines -> models -> operators.

Modules (imported lazily; ``import pipelines`` loads nothing heavy):

- ``spec``: pydantic models of a pipeline file; ``store``: the Zarr archive, catalog, commit markers
- ``fanout``: one Ray task per scan with skip / commit / quarantine; ``fingerprint``: stage fingerprints
- ``ingest``, ``simulate``, ``train``, ``recon``, ``evaluate``: one module per stage;
  ``physics``: acquisitions
- ``runner``: runs a spec; ``tracking``: MLflow; ``cli``: the ``medrecon`` command
"""

__all__ = [
    "spec",
    "store",
    "fanout",
    "fingerprint",
    "physics",
    "ingest",
    "simulate",
    "train",
    "recon",
    "evaluate",
    "runner",
    "tracking",
    "context",
    "cli",
    "errors",
]
