"""Ray orchestration: specs, the archive, stages, tracking, the CLI.

Imports go pipelines -> models -> operators.

Modules (imported lazily; ``import pipelines`` loads nothing heavy):

- ``spec``: pydantic models of a pipeline file and the registry of stage kinds; ``specfile``: reading
  a file, ``--set`` overrides, readable errors; ``methods``: recon methods and their output keys
- ``store``: the Zarr archive, catalog, commit records; ``integrity``: checksummed writes and reads;
  ``lease``: one writer per archive
- ``fanout``: one Ray task per scan with skip / commit / quarantine; ``fingerprint``: fingerprints
- ``physics``: the typed Acquisition (operator and measurement layout)
- ``phantoms``, ``ingest``, ``preprocess``, ``simulate``, ``train``, ``gate``, ``recon``, ``evaluate``:
  one module per stage kind; ``champion``: champion/challenger aliases, promotion history, rollback
- ``runner``: runs a spec; ``reprocess``: the spec-less batch job; ``preflight``: checks before Ray;
  ``embedded``: the embedded Ray's life; ``secrets``: redaction; ``tracking``: MLflow; ``cli``
"""

__all__ = [
    "spec",
    "specfile",
    "methods",
    "store",
    "integrity",
    "lease",
    "fanout",
    "fingerprint",
    "physics",
    "ingest",
    "simulate",
    "train",
    "gate",
    "champion",
    "recon",
    "evaluate",
    "runner",
    "reprocess",
    "preflight",
    "embedded",
    "secrets",
    "tracking",
    "context",
    "cli",
    "models_cli",
    "errors",
]
