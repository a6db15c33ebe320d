"""Errors raised by ``pipelines``.

Hierarchy::

    PipelineError                  base of everything raised on purpose here
    ├── SpecError                  a pipeline file or a command's arguments are invalid
    │   │                          (names file or option, field, expected, found)
    │   └── PreflightError         a valid spec that cannot run here: a task bigger than the
    │                              machine, an unreachable tracking server or archive
    ├── ScanIdError (ValueError)   a scan ID that may not become a path part
    ├── ArchiveError               the archive is missing, unreadable, of another layout version,
    │   │                          or lacks an array a stage needs
    │   └── IntegrityError         stored data does not match its commit record: a missing or
    │                              truncated chunk, a checksum mismatch, NaN/Inf in an output
    ├── LeaseError                 another run holds the archive's writer lease
    ├── StageError                 a stage failed as a whole (not one scan: those are quarantined)
    └── TrackingError              MLflow is unreachable, or a model URI does not resolve

Library code raises these; only ``pipelines.cli`` turns them into exit codes.
"""

from __future__ import annotations

__all__ = [
    "PipelineError",
    "SpecError",
    "PreflightError",
    "ScanIdError",
    "ArchiveError",
    "IntegrityError",
    "LeaseError",
    "StageError",
    "TrackingError",
]


class PipelineError(Exception):
    """Base class of the errors raised on purpose by ``pipelines``."""


class SpecError(PipelineError):
    """A pipeline file (or a command's arguments) is unreadable or does not validate."""


class PreflightError(SpecError):
    """A valid spec that cannot run here; found before Ray starts (the message says what and why)."""


class ScanIdError(PipelineError, ValueError):
    """A scan ID is not of the form ``[A-Za-z0-9._-]+`` (or is ``.``/``..``)."""


class ArchiveError(PipelineError):
    """The archive is missing, unreadable, of another layout version, or lacks an array a stage needs."""


class IntegrityError(ArchiveError):
    """Stored data does not match what its commit recorded (the message names scan, array and chunk)."""


class LeaseError(PipelineError):
    """Another run holds the archive's writer lease (the message names the holder)."""


class StageError(PipelineError):
    """A stage failed as a whole."""


class TrackingError(PipelineError):
    """MLflow could not be reached or a model URI did not resolve."""
