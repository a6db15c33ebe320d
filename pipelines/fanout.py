"""One Ray task per scan, with commit markers, quarantine and a progress bar.

:func:`process_scan` is the single place that decides, for one scan and one stage:

* skip it when its commit marker carries the current fingerprint;
* otherwise run the stage's function, then write the marker (after the data);
* on any error, remove the arrays it may have half-written, record the error in the
  quarantine, and return the failure, so the rest of the batch goes on.

:func:`fan_out` runs :func:`process_scan` as Ray tasks over many scans. Tasks receive
the archive (which pickles as its URI) and scan IDs, never volumes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
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

__all__ = ["ScanOutcome", "process_scan", "fan_out", "progress_bar", "summarise"]


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
    stage: str,
    scan_id: str,
    fingerprint: str,
    fn: Callable[..., dict[str, Any]],
    outputs: Sequence[str],
    kwargs: dict[str, Any] | None = None,
) -> ScanOutcome:
    """Run ``fn(archive, scan_id, **kwargs)`` for one scan unless already committed (see module docs).

    ``outputs`` names the arrays ``fn`` writes, so a failure removes exactly those.
    ``fn`` returns a small dict stored in the commit marker.
    """
    record = archive.commit_record(stage, scan_id)
    if record is not None and record.get("fingerprint") == fingerprint:
        return ScanOutcome(scan_id, "skipped", 0.0, info=record)
    t0 = time.perf_counter()
    try:
        info = fn(archive, scan_id, **(kwargs or {})) or {}
        archive.commit(stage, scan_id, fingerprint, info)
        return ScanOutcome(scan_id, "done", time.perf_counter() - t0, info=info)
    except Exception as exc:  # one bad scan must not stop the batch: record it and go on
        message = f"{type(exc).__name__}: {exc}"
        try:
            archive.uncommit(stage, scan_id)
            for name in outputs:
                archive.delete_array(scan_id, name)
            archive.quarantine(stage, scan_id, message)
        except Exception as cleanup_exc:  # pragma: no cover - storage gone; report both
            message += f" (and cleanup failed: {cleanup_exc})"
        return ScanOutcome(scan_id, "failed", time.perf_counter() - t0, error=message)


def progress_bar(console: Console) -> Progress:
    """The rich progress bar every long step uses."""
    return Progress(
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
    stage: str,
    scan_ids: Sequence[str],
    fingerprint: str,
    fn: Callable[..., dict[str, Any]],
    outputs: Sequence[str],
    kwargs: dict[str, Any] | None = None,
    *,
    num_cpus: float = 1.0,
    memory: int | None = None,
    console: Console | None = None,
    description: str | None = None,
) -> list[ScanOutcome]:
    """Run :func:`process_scan` as one Ray task per scan and wait for all, with a progress bar."""
    import ray

    console = console or Console()
    options: dict[str, Any] = {"num_cpus": num_cpus, "max_retries": 2}
    if memory:
        options["memory"] = memory
    task = ray.remote(process_scan).options(**options)
    pending = {task.remote(archive, stage, s, fingerprint, fn, list(outputs), kwargs): s for s in scan_ids}
    outcomes: list[ScanOutcome] = []
    with progress_bar(console) as progress:
        bar = progress.add_task(description or stage, total=len(pending))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=None)
            for ref in ready:
                pending.pop(ref)
                outcomes.append(ray.get(ref))
                progress.advance(bar)
    order = {s: i for i, s in enumerate(scan_ids)}
    return sorted(outcomes, key=lambda o: order[o.scan_id])


def summarise(outcomes: Sequence[ScanOutcome], outputs: dict[str, Any] | None = None) -> StageResult:
    """A :class:`StageResult` counting done, skipped and failed scans."""
    return StageResult(
        outputs=outputs or {},
        done=sum(o.status == "done" for o in outcomes),
        skipped=sum(o.status == "skipped" for o in outcomes),
        failed={o.scan_id: o.error or "" for o in outcomes if o.status == "failed"},
    )
