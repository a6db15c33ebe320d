"""Pipelines on a Ray cluster, through the Ray Jobs API: submit, list, status, logs, stop.

``medrecon submit SPEC --address http://HEAD:8265`` sends the repository (without runs, archives,
virtual environments and caches: :data:`EXCLUDES`) as the job's working directory, and runs the same
``medrecon run SPEC`` there, on the head, attached to the cluster (``MEDRECON_RAY_ADDRESS=auto``).

* **One job per submission.** The submission ID is ``medrecon-<pipeline>-<fingerprint>``, the
  fingerprint of the pipeline after ``--set`` (:func:`pipeline_fingerprint`: every stage's spec, the
  seed, the code version, the run key, and the archive and tracking URIs). Submitting it again
  while that job is pending, running or has succeeded reports that job and starts nothing. After
  a job stopped or failed, the same submission runs again as ``...-r2``, ``-r3``: the runner then
  redoes only what was not committed.
* **Token.** Ray 2.60 guards the Jobs API with a token. It is read from ``$RAY_AUTH_TOKEN``, from
  the file ``--token-file`` or ``$RAY_AUTH_TOKEN_PATH`` name, or from Ray's own ``~/.ray/auth_token``;
  never from the spec, and it is never written to the job's metadata, entrypoint or runtime
  environment (all of which anyone with the token can read back).
* **Status.** The runner prints a ``stage:`` line as each stage starts and, without a terminal,
  ``progress:`` lines (:mod:`pipelines.fanout`); :func:`job_status` reads the last of each from the
  job's log.
* **Stop.** Ray sends SIGTERM to the driver, which the CLI turns into Ctrl-C's path: the archive
  lease is released and the MLflow run marked KILLED. :data:`STOP_GRACE_S` gives it that time
  before Ray's SIGKILL. Whatever was committed stays committed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError, SpecError
from pipelines.fanout import PROGRESS_LINE
from pipelines.runner import STAGE_LINE

__all__ = [
    "EXCLUDES",
    "JobsError",
    "JobState",
    "Submission",
    "connect",
    "submit",
    "pipeline_fingerprint",
    "submission_base",
    "job_status",
    "list_jobs",
    "read_logs",
    "follow_logs",
    "stop_job",
    "wait_for",
]

# What the working directory sent to the cluster leaves out (Ray's gitignore-style patterns).
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    ".tmp",
    "runs",
    "mlruns",
    "mlartifacts",
    "*.db",
    "*.zarr",
    "benchmarks/results",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    ".ruff_cache",
    "*.egg-info",
    ".whl",
]
AGENT_WAIT_S = 60  # how long a submission waits for a just-started head's job agent
STOP_GRACE_S = 30  # seconds between Ray's SIGTERM and its SIGKILL of a stopped driver
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
_REUSED = {"PENDING", "RUNNING", "SUCCEEDED"}  # a submission finding one of these starts nothing
_ATTEMPT = re.compile(r"-r(\d+)$")


class JobsError(PipelineError):
    """The Jobs API could not be reached, refused the token, or does not know the job."""


@dataclass(frozen=True)
class Submission:
    """What ``medrecon submit`` did: ``created`` is False when the same submission already ran."""

    submission_id: str
    status: str
    created: bool
    entrypoint: str


@dataclass(frozen=True)
class JobState:
    """A job as ``medrecon status`` shows it."""

    submission_id: str
    status: str
    pipeline: str | None
    stage: str | None
    progress: str | None
    message: str
    started: float | None
    ended: float | None
    exit_code: int | None


# --- the client --------------------------------------------------------------------------------


def _token_source(token_file: Path | None) -> str | None:
    """Point Ray's token loader at the token and turn token mode on; return where it came from."""
    if token_file is not None:
        path = token_file.expanduser()
        if not path.is_file() or not path.read_text().strip():
            raise JobsError(f"token file {path} does not exist or is empty")
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(path.resolve())
        source = f"--token-file {path}"
    elif os.environ.get("RAY_AUTH_TOKEN"):
        source = "$RAY_AUTH_TOKEN"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        source = f"$RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    elif (Path.home() / ".ray" / "auth_token").is_file():
        source = "~/.ray/auth_token"
    else:
        return None
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled":
        os.environ["RAY_AUTH_MODE"] = "token"  # Ray's client sends a token only in token mode
    return source


def _translate(address: str, source: str | None, exc: BaseException) -> JobsError:
    """One clear error, naming the address, for what the Jobs API client raised."""
    from ray.exceptions import AuthenticationError

    if isinstance(exc, AuthenticationError):
        how = (
            "set RAY_AUTH_TOKEN to the cluster's token, or name a file holding it with --token-file "
            "or RAY_AUTH_TOKEN_PATH (on the head, `ray get-auth-token` prints it)"
        )
        if source is None:
            return JobsError(f"the Ray cluster at {address} requires a token and none was given: {how}")
        return JobsError(f"the Ray cluster at {address} refused the token from {source}: {how}")
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, ConnectionError) or "Failed to connect" in text or "Connection refused" in text:
        return JobsError(
            f"no Ray Jobs API answers at {address} ({text}); start the head (ray start --head), "
            "or check --address (the dashboard port, 8265 by default)"
        )
    return JobsError(f"the Ray Jobs API at {address} failed: {type(exc).__name__}: {text}")


class _Client:
    """A JobSubmissionClient whose every call raises :class:`JobsError` naming the address."""

    def __init__(self, address: str, token_file: Path | None = None) -> None:
        if not re.match(r"^https?://[^/\s]+", address or ""):
            raise JobsError(
                f"--address {address!r} is not a Jobs API address; expected http://HOST:8265 "
                "(or set RAY_API_SERVER_ADDRESS)"
            )
        self.address = address.rstrip("/")
        self.source = _token_source(token_file)
        self._client = self.call(self._connect)

    def _connect(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        logging.getLogger("ray").setLevel(logging.ERROR)  # (after Ray's import sets it) a line per file
        return JobSubmissionClient(self.address)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except JobsError:
            raise
        except Exception as exc:
            raise _translate(self.address, self.source, exc) from None

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._client, name)
        return lambda *a, **k: self.call(method, *a, **k)

    def info(self, job: str) -> Any:
        try:
            return self._client.get_job_info(job)
        except Exception as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                raise JobsError(
                    f"no job {job!r} at {self.address}; `medrecon jobs list --address {self.address}` "
                    "lists them"
                ) from None
            raise _translate(self.address, self.source, exc) from None


def connect(address: str, token_file: Path | None = None) -> _Client:
    """A client of the Jobs API at ``address`` (token as in the module docstring)."""
    return _Client(address, token_file)


# --- submit ------------------------------------------------------------------------------------


def project_root() -> Path:
    """The repository the job runs from: the folder holding this package and pyproject.toml."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise JobsError(
            f"medrecon is installed at {root}, not run from its repository: submit sends the "
            "repository as the job's working directory, so run it from a clone"
        )
    return root


def pipeline_fingerprint(spec: Any) -> str:
    """A submission's identity: its stages' fingerprints (spec, seed, code, run key) and where it writes.

    The archive and tracking URIs are part of it: the same pipeline sent to another archive is
    another job.
    """
    from pipelines.fingerprint import combine
    from pipelines.runner import plan

    stages = {p.stage.name: p.fingerprint for p in plan(spec, "")}
    return combine({"name": spec.name, "archive": spec.archive.path, "tracking": spec.tracking.uri,
                    "stages": stages})  # fmt: skip


def submission_base(spec: Any) -> str:
    """``medrecon-<pipeline>-<fingerprint>``: the same pipeline gives the same ID."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.name).strip("-") or "pipeline"
    return f"medrecon-{name}-{pipeline_fingerprint(spec)[:16]}"


def _absolute_paths(spec: Any, cwd: Path) -> list[str]:
    """``--set`` overrides making a relative local archive or SQLite path absolute.

    The job runs in a copy of the repository that Ray unpacks on the head: a path relative to it
    would put the archive in a folder Ray deletes.
    """
    overrides = []
    path = spec.archive.path
    if "://" not in path and not os.path.isabs(path):
        overrides.append(f"archive.path={(cwd / path).resolve()}")
    uri = spec.tracking.uri or ""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        overrides.append(f"tracking.uri=sqlite:///{(cwd / uri[len('sqlite:///'):]).resolve()}")
    return overrides


def _attempts(client: _Client, base: str) -> list[Any]:
    """The jobs of earlier submissions of ``base`` (``base``, ``base-r2``, ...), oldest first."""
    found = []
    for job in client.list_jobs():
        sid = job.submission_id or ""
        if sid == base or (sid.startswith(base + "-r") and _ATTEMPT.search(sid)):
            found.append(job)
    return sorted(found, key=lambda j: _attempt_number(j.submission_id))


def _attempt_number(submission_id: str) -> int:
    m = _ATTEMPT.search(submission_id)
    return int(m.group(1)) if m else 1


def submit(
    client: _Client,
    spec_path: Path,
    overrides: list[str],
    *,
    cwd: Path | None = None,
    log: Callable[[str], None] = print,
) -> Submission:
    """Submit the pipeline in ``spec_path`` (with ``--set`` ``overrides``) once; see the module docs."""
    from pipelines.specfile import load_spec

    cwd = (cwd or Path.cwd()).resolve()
    root = project_root()
    spec_file = (cwd / spec_path).resolve()
    if not spec_file.is_file():
        raise SpecError(f"pipeline file {spec_path} not found")
    try:
        relative = spec_file.relative_to(root)
    except ValueError:
        raise SpecError(
            f"pipeline file {spec_path} is outside the repository {root}, which is what the cluster "
            "receives: put it inside (e.g. pipelines/specs/)"
        ) from None
    spec = load_spec(spec_file, overrides)
    fixed = _absolute_paths(spec, cwd)
    for o in fixed:
        log(f"note: {o.split('=', 1)[0]} is a relative local path: sent as {o.split('=', 1)[1]} (every node "
            "must see it; use s3:// and an MLflow server on a multi-host cluster)")
    if fixed:
        spec = load_spec(spec_file, overrides + fixed)
    base = submission_base(spec)
    earlier = _attempts(client, base)
    if earlier and earlier[-1].status.value in _REUSED:
        job = earlier[-1]
        return Submission(job.submission_id, job.status.value, False, job.entrypoint)
    submission_id = base if not earlier else f"{base}-r{_attempt_number(earlier[-1].submission_id) + 1}"
    args = ["medrecon", "run", relative.as_posix()]
    for o in [*overrides, *fixed]:
        args += ["--set", o]
    entrypoint = shlex.join(args)
    runtime_env = {
        "working_dir": str(root),
        "excludes": EXCLUDES,
        "env_vars": {
            "MEDRECON_RAY_ADDRESS": "auto",  # the driver runs on the head: attach to its cluster
            "MEDRECON_PROGRESS_EVERY": "2",
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "120",
            "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S),
        },
    }
    metadata = {
        "medrecon.pipeline": spec.name,
        "medrecon.spec": relative.as_posix(),
        "medrecon.fingerprint": pipeline_fingerprint(spec),
    }
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client._client.submit_job(
                entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env, metadata=metadata
            )
            return Submission(submission_id, "PENDING", True, entrypoint)
        except Exception as exc:
            if "already exists" in str(exc):  # a second submit won the race: report its job
                job = client.info(submission_id)
                return Submission(submission_id, job.status.value, False, job.entrypoint)
            # A head that has just started answers before its job agent is up (measured: seconds).
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise _translate(client.address, client.source, exc) from None
            time.sleep(1.0)


# --- follow ------------------------------------------------------------------------------------


def _last(lines: list[str], prefix: str) -> tuple[int, str | None]:
    """The index and text (after ``prefix``) of the last line starting with ``prefix``; (-1, None)."""
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(prefix):
            return i, lines[i][len(prefix) :].strip()
    return -1, None


def job_status(client: _Client, job: str) -> JobState:
    """The job's state, with the stage its log says is running and that stage's last progress line."""
    info = client.info(job)
    status = info.status.value
    stage = progress = None
    if info.driver_info is not None or status != "PENDING":
        lines = client.get_job_logs(job).splitlines()
        at_stage, stage = _last(lines, STAGE_LINE)
        at_progress, progress = _last(lines, PROGRESS_LINE)
        if at_progress < at_stage:  # a progress line from before the current stage began is stale
            progress = None
    return JobState(
        submission_id=info.submission_id or job,
        status=status,
        pipeline=(info.metadata or {}).get("medrecon.pipeline"),
        stage=stage,
        progress=progress,
        message=(info.message or "").split("\n")[0].strip(),  # Ray appends the log's tail
        started=info.start_time / 1000 if info.start_time else None,
        ended=info.end_time / 1000 if info.end_time else None,
        exit_code=getattr(info, "driver_exit_code", None),
    )


def list_jobs(client: _Client, every: bool = False) -> list[Any]:
    """The cluster's jobs, newest first; only medrecon's unless ``every``."""
    jobs = [j for j in client.list_jobs() if every or "medrecon.pipeline" in (j.metadata or {})]
    return sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)


def read_logs(client: _Client, job: str) -> str:
    client.info(job)  # a clear error for an unknown job
    return client.get_job_logs(job)


def follow_logs(client: _Client, job: str) -> Iterator[str]:
    """The job's log as it grows, until the job ends."""
    client.info(job)
    agen = client._client.tail_job_logs(job)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
            except Exception as exc:
                raise _translate(client.address, client.source, exc) from None
    finally:
        loop.run_until_complete(agen.aclose())
        loop.close()


def wait_for(client: _Client, job: str, timeout: float | None = None, poll: float = 0.5) -> str:
    """Wait until the job ends (or ``timeout`` seconds pass); return its status."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = client.info(job).status.value
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(poll)


def stop_job(client: _Client, job: str, timeout: float = STOP_GRACE_S + 15) -> str:
    """Stop the job and wait for it to end; return its final status."""
    status = client.info(job).status.value
    if status in TERMINAL:
        return status
    client.stop_job(job)
    return wait_for(client, job, timeout)
