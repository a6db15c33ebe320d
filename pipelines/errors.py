"""Errors raised by ``pipelines``.

Hierarchy::

    PipelineError                  base of everything raised on purpose here
    ├── SpecError                  a pipeline file is unreadable or invalid
    │                              (names file, field, expected, found)
    ├── ScanIdError (ValueError)   a scan ID that may not become a path part
    ├── ArchiveError               the archive is missing, unreadable, or lacks an array a stage needs
    ├── StageError                 a stage failed as a whole (not one scan: those are quarantined)
    └── TrackingError              MLflow is unreachable, or a model URI does not resolve

Library code raises these; only ``pipelines.cli`` turns them into exit codes.
"""

from __future__ import annotations

__all__ = ["PipelineError", "SpecError", "ScanIdError", "ArchiveError", "StageError", "TrackingError"]


class PipelineError(Exception):
    """Base class of the errors raised on purpose by ``pipelines``."""


class SpecError(PipelineError):
    """A pipeline file is unreadable or does not validate."""


class ScanIdError(PipelineError, ValueError):
    """A scan ID is not of the form ``[A-Za-z0-9._-]+`` (or is ``.``/``..``)."""


class ArchiveError(PipelineError):
    """The archive is missing, unreadable, or lacks an array a stage needs."""


class StageError(PipelineError):
    """A stage failed as a whole."""


class TrackingError(PipelineError):
    """MLflow could not be reached or a model URI did not resolve."""
