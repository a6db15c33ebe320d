"""One Ray task per scan, with commit records, quarantine and a progress bar.

:func:`process_scan` is the single place that decides, for one scan and one commit unit
(:mod:`pipelines.store`):

* skip it when its commit record carries the current fingerprint;
* otherwise run the stage's function, then write the record (after the data), with the
  checksums of the arrays the function wrote;
* on any error, remove the arrays it may have half-written, record the error in the
  quarantine, and return the failure, so the rest of the batch goes on.

:func:`fan_out` runs :func:`process_scan` as Ray tasks over many scans. Tasks receive
the archive (which pickles as its URI) and scan IDs, never volumes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pipelines.context import StageResult
from pipelines.store import Archive

__all__ = [
    "ScanOutcome",
    "process_scan",
    "process_units",
    "quarantine",
    "fan_out",
    "gather",
    "progress_bar",
    "summarise",
]


@dataclass(frozen=True)
class ScanOutcome:
    """Result of one scan in one stage: status is "done", "skipped" or "failed"."""

    scan_id: str
    status: str
    seconds: float
    error: str | None = None
    info: dict[str, Any] | None = None


def process_scan(
    archive: Archive,
    unit: str,
    scan_id: str,
    fingerprint: str,
    fn: Callable[..., dict[str, Any]],
    outputs: Sequence[str],
    kwargs: dict[str, Any] | None = None,
    *,
    stage: str | None = None,
) -> ScanOutcome:
    """Run ``fn(archive, scan_id, **kwargs)`` for one scan unless ``unit`` is committed (module docs).

    ``outputs`` names the arrays ``fn`` writes, so a failure removes exactly those. ``fn`` returns
    a small dict for the commit record; its ``arrays`` entry (``{name: SlabWriter.record()}``) holds
    the checksums readers verify. ``stage`` names the stage in quarantine records.
    """
    record = archive.commit_record(unit, scan_id)
    if record is not None and record.get("fingerprint") == fingerprint:
        return ScanOutcome(scan_id, "skipped", 0.0, info=record)
    t0 = time.perf_counter()
    try:
        info = dict(fn(archive, scan_id, **(kwargs or {})) or {})
        arrays = info.pop("arrays", {})
        archive.commit(unit, scan_id, fingerprint, info, arrays)
        return ScanOutcome(scan_id, "done", time.perf_counter() - t0, info=info)
    except Exception as exc:  # one bad scan must not stop the batch: record it and go on
        message = f"{type(exc).__name__}: {exc}"
        message += quarantine(archive, unit, scan_id, message, outputs, stage)
        return ScanOutcome(scan_id, "failed", time.perf_counter() - t0, error=message)


def process_units(
    archive: Archive,
    scan_id: str,
    units: dict[str, str],
    fn: Callable[[Archive, str, list[str]], dict[str, Any]],
    *,
    stage: str | None = None,
) -> ScanOutcome:
    """:func:`process_scan` for several units of one scan that share their input (a recon stage's methods).

    ``units`` maps each unit to its fingerprint; the committed ones are skipped and
    ``fn(archive, scan_id, pending_units)`` runs the rest, returning per unit either the commit
    info (with ``arrays``) or the exception that unit failed with. Each unit is committed or
    quarantined on its own (its array is the unit's name, ``recon/<key>``).
    """
    pending = [u for u, fp in units.items() if not archive.is_committed(u, scan_id, fp)]
    if not pending:
        return ScanOutcome(scan_id, "skipped", 0.0)
    t0 = time.perf_counter()
    try:
        results = fn(archive, scan_id, pending)
    except Exception as exc:  # the shared input failed (e.g. unreadable measurements): every unit fails
        results = {u: exc for u in pending}
    errors = []
    for unit in pending:
        res = results.get(unit, RuntimeError(f"{unit} was not produced"))
        if isinstance(res, BaseException):
            message = f"{type(res).__name__}: {res}"
            message += quarantine(archive, unit, scan_id, message, [unit], stage)
            errors.append(f"{unit}: {message}" if len(pending) > 1 else message)
            continue
        info = dict(res)
        arrays = info.pop("arrays", {})
        archive.commit(unit, scan_id, units[unit], info, arrays)
    seconds = time.perf_counter() - t0
    if errors:
        return ScanOutcome(scan_id, "failed", seconds, error="; ".join(errors))
    return ScanOutcome(scan_id, "done", seconds)


def quarantine(
    archive: Archive, unit: str, scan_id: str, message: str, outputs: Sequence[str], stage: str | None
) -> str:
    """Remove what a failed unit half-wrote and record ``message``; returns a note if cleanup failed."""
    try:
        archive.uncommit(unit, scan_id)
        for name in outputs:
            archive.delete_array(scan_id, name)
        archive.quarantine(unit, scan_id, message, stage)
    except Exception as cleanup_exc:  # pragma: no cover - storage gone; report both
        return f" (and cleanup failed: {cleanup_exc})"
    return ""


PROGRESS_LINE = "progress:"  # the prefix of a progress line; `medrecon status` reads the last one


class _Progress(Progress):
    """A rich bar that, where nothing redraws it (a job's log, a CI log), also prints plain lines.

    Without a terminal a rich bar shows only when it ends. Here each task prints
    ``progress: DESCRIPTION DONE/TOTAL`` at most every ``$MEDRECON_PROGRESS_EVERY`` seconds (10 by
    default; ``medrecon submit`` sets 2) and when it completes: what a job's log needs to tell how
    far a stage is (:mod:`pipelines.jobs` reads it for ``medrecon status``).
    """

    def __init__(self, *columns: Any, console: Console, **kwargs: Any) -> None:
        super().__init__(*columns, console=console, **kwargs)
        self._lines = not console.is_terminal
        self._every = float(os.environ.get("MEDRECON_PROGRESS_EVERY", "10"))
        self._printed: dict[Any, float] = {}

    def update(self, task_id: Any, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._line(task_id)

    def advance(self, task_id: Any, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._line(task_id)

    def _line(self, task_id: Any) -> None:
        if not self._lines:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        finished = task.total is not None and task.completed >= task.total
        if not finished and now - self._printed.get(task_id, -1e9) < self._every:
            return
        if finished and self._printed.get(task_id) == float("inf"):
            return
        self._printed[task_id] = float("inf") if finished else now
        total = "?" if task.total is None else f"{task.total:.0f}"
        self.console.print(
            f"{PROGRESS_LINE} {task.description} {task.completed:.0f}/{total}", highlight=False, markup=False
        )


def progress_bar(console: Console) -> Progress:
    """The rich progress bar every long step uses (plain lines too where there is no terminal)."""
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def fan_out(
    archive: Archive,
    unit: str,
    scan_ids: Sequence[str],
    fingerprint: str | Mapping[str, str],
    fn: Callable[..., dict[str, Any]],
    outputs: Sequence[str],
    kwargs: dict[str, Any] | None = None,
    *,
    num_cpus: float = 1.0,
    memory: int | None = None,
    console: Console | None = None,
    description: str | None = None,
    stage: str | None = None,
) -> list[ScanOutcome]:
    """Run :func:`process_scan` as one Ray task per scan and wait for all, with a progress bar.

    ``fingerprint`` is one for every scan, or ``{scan_id: fingerprint}``
    (:func:`pipelines.fingerprint.scan_fingerprint`).
    """
    import ray

    console = console or Console()
    options: dict[str, Any] = {"num_cpus": num_cpus, "max_retries": 2}
    if memory:
        options["memory"] = memory
    task = ray.remote(process_scan).options(**options)
    fps = {s: fingerprint if isinstance(fingerprint, str) else fingerprint[s] for s in scan_ids}
    refs = [task.remote(archive, unit, s, fps[s], fn, list(outputs), kwargs, stage=stage) for s in scan_ids]
    return gather(refs, console, description or stage or unit)


def gather(refs: Sequence[Any], console: Console, description: str) -> list[Any]:
    """The results of Ray tasks ``refs``, in their order, with a progress bar advancing as each ends."""
    import ray

    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    with progress_bar(console) as progress:
        bar = progress.add_task(description, total=len(refs))
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=None)
            for ref in ready:
                results[index[ref]] = ray.get(ref)
                progress.advance(bar)
    return results


def summarise(
    outcomes: Sequence[ScanOutcome],
    outputs: dict[str, Any] | None = None,
    units: dict[str, Any] | None = None,
) -> StageResult:
    """A :class:`StageResult` counting done, skipped and failed scans."""
    return StageResult(
        outputs=outputs or {},
        units=units or {},
        done=sum(o.status == "done" for o in outcomes),
        skipped=sum(o.status == "skipped" for o in outcomes),
        failed={o.scan_id: o.error or "" for o in outcomes if o.status == "failed"},
    )
