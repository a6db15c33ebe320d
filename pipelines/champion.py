"""Champion and challenger: which version of a registered model serves, and why.

Nightly retraining registers a version and points the alias ``challenger`` at it
(:func:`set_challenger`); a gate then moves the alias ``champion`` to it (:func:`promote`) or
turns it down (:func:`reject`). A person can promote by hand or :func:`rollback`.

**History.** Every decision is an :class:`Event`, stored as one MLflow run in the experiment
``medrecon-model-history`` (tags ``medrecon.model``, ``medrecon.action``, ``medrecon.version``,
``medrecon.previous``, ``medrecon.run_key``, ``medrecon.reason``, ``medrecon.time``; the event's
metrics as run metrics), so it lives with the registry and outlives any archive. The decided
version also carries tags ``medrecon.gate`` (``promoted``, ``rejected``, ``rolled-back``) and
``medrecon.gate_reason``, so the MLflow UI shows the decision on the version itself. The alias is
moved first, then the version tagged, then the event recorded: a crash in between leaves the
alias right and a later :func:`promote` of that version refused, never a history that claims a
champion the registry does not have.

**Rollback** undoes the latest promotion not already undone: it returns to the ``previous`` of the
event that made the current champion, and a second rollback to the champion before that one.
Replaying the history, a promotion pushes its version and a rollback pops one, so two rollbacks
after promoting 1, 2, 3 give 1 (not a toggle between 2 and 3).

**Compare-and-set.** MLflow has no atomic compare-and-set on aliases, so :func:`promote` and
:func:`rollback` read the champion, compare, set and record inside a lock where one exists:

* ``sqlite:///PATH``: an exclusive ``fcntl.flock`` on ``PATH.registry.lock`` (created on first
  use, never deleted: deleting a lock file races with its next taker), held from reading the
  alias to recording the event. It serialises every process on hosts sharing that file (flock
  works on local disks; on NFS only where the server supports it), and the kernel releases it
  when a holder dies, so there are no stale locks to take over.
* Any other URI (an MLflow server): check-set-verify. Read the alias, compare, set it, wait
  ``_SETTLE_S`` seconds, read it again; a writer whose value was overwritten returns ``None``.
  This is not atomic. Two writers that both read the old champion before either sets still both
  win if the first verifies before the second sets: the alias ends at the second's version and
  the history holds two promotions with the same ``previous``. The window is the gap between one
  writer's read and its set, minus ``_SETTLE_S``; run one gate per model at a time where that
  matters.

Example:
    >>> promote(uri, "quickstart-model", "3", expected="2", reason="psnr +0.4 dB")  # doctest: +SKIP
    Event(time='2026-11-30T02:14:05.123456+00:00', action='promote', ...)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipelines.errors import PipelineError, SpecError, TrackingError
from pipelines.secrets import redact_uri
from pipelines.tracking import _artifact_root, client

__all__ = [
    "CHAMPION",
    "CHALLENGER",
    "HISTORY_EXPERIMENT",
    "Event",
    "ModelSummary",
    "VersionInfo",
    "alias_version",
    "set_challenger",
    "promote",
    "reject",
    "rollback",
    "history",
    "decided",
    "registered_models",
    "model_versions",
]

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_EXPERIMENT = "medrecon-model-history"
_PROMOTIONS = ("promote", "manual-promote")
_DECISIONS = (*_PROMOTIONS, "reject")
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_TAG_MAX = 5000  # MLflow's smallest tag value limit across its versions
_LOCK_TIMEOUT_S = 120.0
_SETTLE_S = 1.0


@dataclass(frozen=True)
class Event:
    """One entry of a model's promotion history.

    Attributes:
        time: When, ISO 8601 in UTC with microseconds.
        action: ``promote``, ``reject``, ``rollback`` or ``manual-promote``.
        model: The registered model's name.
        version: The version acted on: promoted, rejected, or rolled back to.
        previous: The champion version before the event; None if there was none.
        reason: Why, in words.
        metrics: What the decision saw, e.g. ``{"challenger/psnr": 30.1, "champion/psnr": 29.8}``.
        run_key: The night's key (e.g. ``"2026-11-30"``); None for manual actions.
        run_id: The MLflow run ID of the pipeline run that decided, if any.
    """

    time: str
    action: str
    model: str
    version: str
    previous: str | None
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)
    run_key: str | None = None
    run_id: str | None = None


@dataclass(frozen=True)
class ModelSummary:
    """A registered model: its champion and challenger versions (None if unset) and how many versions."""

    name: str
    champion: str | None
    challenger: str | None
    versions: int


@dataclass(frozen=True)
class VersionInfo:
    """One version of a registered model, with its aliases and the gate's decision tags."""

    version: str
    created: str
    aliases: tuple[str, ...]
    gate: str | None
    reason: str | None
    run_id: str | None


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(f"invalid model name {name!r}: expected [A-Za-z0-9._-]+, e.g. quickstart-model")
    return name


def _check_version(version: str | int) -> str:
    text = str(version)
    if not text.isdigit() or int(text) < 1:
        raise SpecError(f"invalid model version {version!r}: expected a version number such as 3")
    return str(int(text))


def _sqlite_path(uri: str) -> str | None:
    """The database file of a ``sqlite:///PATH`` URI (``sqlite:////abs`` gives ``/abs``); else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return uri[len("sqlite:///") :].split("?", 1)[0]


def _client(uri: str) -> Any:
    """An MlflowClient; for SQLite, only if the database exists (MLflow would create an empty one)."""
    path = _sqlite_path(uri)
    if path is not None and not os.path.exists(path):
        raise TrackingError(
            f"no MLflow database at {path} (tracking URI {redact_uri(uri)}); "
            "pass the tracking URI of the run that registered the model"
        )
    return client(uri)


@contextlib.contextmanager
def _mlflow(uri: str, what: str) -> Iterator[None]:
    """Turns any MLflow failure inside into one TrackingError naming ``what`` and the (redacted) URI."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as exc:  # MLflow raises many types (REST, SQL, connection errors)
        raise TrackingError(f"{what} failed at {redact_uri(uri)}: {redact_uri(str(exc))}") from exc


def _missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _aliases(c: Any, uri: str, name: str, *, required: bool = False) -> dict[str, str] | None:
    """The model's aliases as ``{alias: version}``; None if the model does not exist (an error if
    ``required``)."""
    try:
        model = c.get_registered_model(name)
    except Exception as exc:
        if not _missing(exc):
            raise
        if required:
            known = sorted(m.name for m in c.search_registered_models(max_results=20))
            raise TrackingError(
                f"no registered model {name!r} at {redact_uri(uri)} (registered: "
                f"{', '.join(known) or 'none'}); check the name and the tracking URI"
            ) from None
        return None
    return {alias: str(v) for alias, v in (model.aliases or {}).items()}


def _require_version(c: Any, uri: str, name: str, version: str) -> Any:
    """The ModelVersion, or a TrackingError naming the model, the version, the URI and what exists."""
    _aliases(c, uri, name, required=True)
    try:
        return c.get_model_version(name, version)
    except Exception as exc:
        if not _missing(exc):
            raise
        found = sorted(int(v.version) for v in c.search_model_versions(f"name='{name}'"))
        raise TrackingError(
            f"model {name!r} has no version {version} at {redact_uri(uri)} (versions: "
            f"{', '.join(map(str, found)) or 'none'})"
        ) from None


@contextlib.contextmanager
def _registry_lock(uri: str, timeout: float = _LOCK_TIMEOUT_S) -> Iterator[bool]:
    """Holds the registry lock of a SQLite URI (yields True); other URIs have none (yields False)."""
    path = _sqlite_path(uri)
    if path is None:
        yield False
        return
    lock = path + ".registry.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TrackingError(
                        f"registry lock {lock} still held by another process after {timeout:g} s; "
                        "wait for that medrecon command to finish"
                    ) from None
                time.sleep(0.02)
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _set_champion(c: Any, uri: str, name: str, version: str, locked: bool) -> bool:
    """Points ``champion`` at ``version``; without a lock, whether it still does after ``_SETTLE_S``."""
    c.set_registered_model_alias(name, CHAMPION, version)
    if locked:
        return True
    time.sleep(_SETTLE_S)
    return (_aliases(c, uri, name) or {}).get(CHAMPION) == version


def _tag_version(c: Any, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, value[:_TAG_MAX])


def _history_experiment(c: Any, uri: str) -> str:
    exp = c.get_experiment_by_name(HISTORY_EXPERIMENT)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(c.create_experiment(HISTORY_EXPERIMENT, artifact_location=_artifact_root(uri)))
    except Exception:  # created meanwhile by another process (no lock on a server)
        exp = c.get_experiment_by_name(HISTORY_EXPERIMENT)
        if exp is None:
            raise
        return str(exp.experiment_id)


def _record(c: Any, uri: str, event: Event) -> Event:
    """Stores ``event`` as one finished run in the history experiment; returns it."""
    from mlflow.entities import Metric

    optional = {"previous": event.previous, "run_key": event.run_key, "run_id": event.run_id}
    tags = {
        "medrecon.model": event.model,
        "medrecon.action": event.action,
        "medrecon.version": event.version,
        "medrecon.reason": event.reason[:_TAG_MAX],
        "medrecon.time": event.time,
        **{f"medrecon.{k}": v for k, v in optional.items() if v is not None},
    }
    run = c.create_run(
        _history_experiment(c, uri), run_name=f"{event.model} v{event.version} {event.action}", tags=tags
    )
    if event.metrics:
        now = int(time.time() * 1000)
        c.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in event.metrics.items()])
    c.set_terminated(run.info.run_id, status="FINISHED")
    return event


def _event(run: Any) -> Event:
    tags = run.data.tags
    return Event(
        time=tags.get("medrecon.time", ""),
        action=tags.get("medrecon.action", ""),
        model=tags.get("medrecon.model", ""),
        version=tags.get("medrecon.version", ""),
        previous=tags.get("medrecon.previous"),
        reason=tags.get("medrecon.reason", ""),
        metrics={k: float(v) for k, v in run.data.metrics.items()},
        run_key=tags.get("medrecon.run_key"),
        run_id=tags.get("medrecon.run_id"),
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _metrics(metrics: dict[str, float] | None) -> dict[str, float]:
    return {str(k): float(v) for k, v in (metrics or {}).items()}


def alias_version(uri: str, name: str, alias: str) -> str | None:
    """The version ``alias`` of model ``name`` points at; None if the alias or the model does not exist."""
    _check_name(name)
    c = _client(uri)
    with _mlflow(uri, f"reading alias {alias!r} of model {name!r}"):
        return (_aliases(c, uri, name) or {}).get(alias)


def set_challenger(uri: str, name: str, version: str | int) -> None:
    """Points alias ``challenger`` at ``version`` and tags the version ``medrecon.role=challenger``."""
    _check_name(name)
    version = _check_version(version)
    c = _client(uri)
    with _mlflow(uri, f"making {name} v{version} the challenger"):
        _require_version(c, uri, name, version)
        c.set_registered_model_alias(name, CHALLENGER, version)
        c.set_model_version_tag(name, version, "medrecon.role", CHALLENGER)


def promote(
    uri: str,
    name: str,
    version: str | int,
    *,
    expected: str | int | None,
    reason: str,
    metrics: dict[str, float] | None = None,
    run_key: str | None = None,
    run_id: str | None = None,
    action: str = "promote",
) -> Event | None:
    """Makes ``version`` the champion if the champion is still ``expected`` (compare-and-set).

    Args:
        uri: MLflow tracking and registry URI.
        name: Registered model name.
        version: The version to promote.
        expected: The champion version the caller decided against; None: there was no champion.
        reason: Why, recorded on the version and in the history.
        metrics: What the decision saw, recorded in the history.
        run_key: The night's key; None for manual actions.
        run_id: The MLflow run ID of the pipeline run that decided.
        action: ``promote`` (the gate) or ``manual-promote`` (a person).

    Returns:
        The recorded Event; None if the champion is no longer ``expected`` (another run promoted
        meanwhile), in which case nothing changed.

    Raises:
        TrackingError: ``version`` is already the champion (a version is never promoted twice in a
            row), the model or version does not exist, or MLflow failed.
        SpecError: An invalid name, version or action.
    """
    _check_name(name)
    version = _check_version(version)
    expected = None if expected is None else _check_version(expected)
    if action not in _PROMOTIONS:
        raise SpecError(f"invalid promote action {action!r}: expected one of {', '.join(_PROMOTIONS)}")
    c = _client(uri)
    with _mlflow(uri, f"promoting {name} v{version}"), _registry_lock(uri) as locked:
        _require_version(c, uri, name, version)
        current = (_aliases(c, uri, name) or {}).get(CHAMPION)
        if current == version:
            raise TrackingError(
                f"{name} v{version} is already the champion at {redact_uri(uri)}; not promoting it again "
                "(to go back to an earlier champion, roll back)"
            )
        if current != expected or not _set_champion(c, uri, name, version, locked):
            return None
        _tag_version(c, name, version, {"medrecon.gate": "promoted", "medrecon.gate_reason": reason})
        event = Event(_now(), action, name, version, current, reason, _metrics(metrics), run_key, run_id)
        return _record(c, uri, event)


def reject(
    uri: str,
    name: str,
    version: str | int,
    *,
    reason: str,
    metrics: dict[str, float] | None = None,
    run_key: str | None = None,
    run_id: str | None = None,
) -> Event:
    """Tags ``version`` ``medrecon.gate=rejected`` with ``reason`` and records the Event.

    Raises:
        TrackingError: ``version`` is the champion (roll back or promote another first), the model
            or version does not exist, or MLflow failed.
    """
    _check_name(name)
    version = _check_version(version)
    c = _client(uri)
    with _mlflow(uri, f"rejecting {name} v{version}"), _registry_lock(uri):
        _require_version(c, uri, name, version)
        current = (_aliases(c, uri, name) or {}).get(CHAMPION)
        if current == version:
            raise TrackingError(
                f"{name} v{version} is the champion at {redact_uri(uri)}; roll back or promote another "
                "version before rejecting it"
            )
        _tag_version(c, name, version, {"medrecon.gate": "rejected", "medrecon.gate_reason": reason})
        event = Event(_now(), "reject", name, version, current, reason, _metrics(metrics), run_key, run_id)
        return _record(c, uri, event)


def _history(c: Any, name: str) -> list[Event]:
    exp = c.get_experiment_by_name(HISTORY_EXPERIMENT)
    if exp is None:
        return []
    runs: list[Any] = []
    token = None
    while True:
        page = c.search_runs(
            [exp.experiment_id], filter_string=f"tags.`medrecon.model` = '{name}'", page_token=token
        )
        runs += list(page)
        token = page.token
        if not token:
            break
    return sorted((_event(r) for r in runs), key=lambda e: e.time)


def history(uri: str, name: str) -> list[Event]:
    """Every recorded event of model ``name``, oldest first (empty if none, even for an unknown model)."""
    _check_name(name)
    c = _client(uri)
    with _mlflow(uri, f"reading the history of model {name!r}"):
        return _history(c, name)


def decided(uri: str, name: str, version: str | int) -> Event | None:
    """The latest promote, manual-promote or reject event of ``version``; None if it was never decided."""
    version = _check_version(version)
    found = [e for e in history(uri, name) if e.version == version and e.action in _DECISIONS]
    return found[-1] if found else None


def _champions(events: list[Event]) -> list[str]:
    """The stack of champions the history leaves, the current one last.

    A promotion pushes its version on top of its ``previous`` (a ``previous`` that is not the top,
    e.g. a champion set before medrecon kept history, goes in first; None empties the stack); a
    rollback pops the top, leaving its target.
    """
    stack: list[str] = []
    for e in events:
        if e.action in _PROMOTIONS:
            if e.previous is None:
                stack = []
            elif not stack or stack[-1] != e.previous:
                stack.append(e.previous)
            stack.append(e.version)
        elif e.action == "rollback":
            stack = stack[:-1]
            if not stack or stack[-1] != e.version:
                stack.append(e.version)
    return stack


def rollback(uri: str, name: str, *, reason: str = "manual rollback") -> Event:
    """Makes the champion before the current one champion again, undoing the latest promotion.

    Raises:
        TrackingError: There is no champion, no earlier one in the history, the alias was moved
            outside medrecon (the history does not end at it), the earlier version was deleted, or
            MLflow failed.
    """
    _check_name(name)
    c = _client(uri)
    with _mlflow(uri, f"rolling back model {name!r}"), _registry_lock(uri) as locked:
        current = (_aliases(c, uri, name, required=True) or {}).get(CHAMPION)
        if current is None:
            raise TrackingError(f"model {name!r} at {redact_uri(uri)} has no champion to roll back")
        stack = _champions(_history(c, name))
        if stack and stack[-1] != current:
            raise TrackingError(
                f"the champion of {name!r} is v{current}, but its history ends at v{stack[-1]}: the alias "
                f"was moved outside medrecon; promote the version you want with `medrecon models promote`"
            )
        if len(stack) < 2:
            raise TrackingError(
                f"{name} v{current} has no earlier champion in its history to roll back to; "
                "promote the version you want with `medrecon models promote`"
            )
        target = stack[-2]
        _require_version(c, uri, name, target)
        if not _set_champion(c, uri, name, target, locked):
            raise TrackingError(f"the champion of {name!r} changed during the rollback; check and run again")
        _tag_version(c, name, current, {"medrecon.gate": "rolled-back", "medrecon.gate_reason": reason})
        return _record(c, uri, Event(_now(), "rollback", name, target, current, reason))


def registered_models(uri: str) -> list[ModelSummary]:
    """Every registered model at ``uri``, by name, with its champion, challenger and version count."""
    c = _client(uri)
    with _mlflow(uri, "listing registered models"):
        models, token = [], None
        while True:
            page = c.search_registered_models(max_results=100, page_token=token)
            models += list(page)
            token = page.token
            if not token:
                break
        counts: dict[str, int] = {}
        for v in c.search_model_versions():
            counts[v.name] = counts.get(v.name, 0) + 1
    summaries = []
    for m in sorted(models, key=lambda m: m.name):
        aliases = {a: str(v) for a, v in (m.aliases or {}).items()}
        summaries.append(
            ModelSummary(m.name, aliases.get(CHAMPION), aliases.get(CHALLENGER), counts.get(m.name, 0))
        )
    return summaries


def model_versions(uri: str, name: str) -> list[VersionInfo]:
    """The versions of model ``name``, oldest first, with aliases and decision tags.

    Raises:
        TrackingError: No such model, or MLflow failed.
    """
    _check_name(name)
    c = _client(uri)
    with _mlflow(uri, f"listing the versions of model {name!r}"):
        aliases = _aliases(c, uri, name, required=True) or {}
        versions = list(c.search_model_versions(f"name='{name}'"))
    by_version: dict[str, list[str]] = {}
    for alias, v in sorted(aliases.items()):
        by_version.setdefault(v, []).append(alias)
    infos = []
    for v in sorted(versions, key=lambda v: int(v.version)):
        created = datetime.fromtimestamp(v.creation_timestamp / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        infos.append(
            VersionInfo(
                version=str(v.version),
                created=created,
                aliases=tuple(by_version.get(str(v.version), [])),
                gate=v.tags.get("medrecon.gate"),
                reason=v.tags.get("medrecon.gate_reason"),
                run_id=v.run_id or None,
            )
        )
    return infos
