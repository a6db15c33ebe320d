"""``medrecon submit | jobs list | status | logs | stop``: pipelines on a Ray cluster (:mod:`pipelines.jobs`).

Every command takes ``--address http://HEAD:8265`` (default ``$RAY_API_SERVER_ADDRESS``, Ray's own
variable) and the cluster's token from ``$RAY_AUTH_TOKEN``, ``--token-file`` / ``$RAY_AUTH_TOKEN_PATH``,
or ``~/.ray/auth_token``. Exit codes: 0 done, 2 a usage error (a bad address or spec, a refused or
missing token, an unknown job), 1 anything else; ``submit --wait`` exits with the job's own code.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

AddressOpt = Annotated[
    str,
    typer.Option(
        "--address",
        envvar="RAY_API_SERVER_ADDRESS",
        help="The cluster's Jobs API, http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS).",
        show_default=False,
    ),
]
TokenOpt = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        help="A file holding the cluster's token (else $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or "
        "~/.ray/auth_token). Never put the token in the spec.",
    ),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Full tracebacks instead of one-line errors.")]
JobArg = Annotated[str, typer.Argument(help="The job's submission ID (medrecon submit prints it)")]


def _cli() -> Any:
    from pipelines import cli

    return cli


def _client(address: str, token_file: Path | None, debug: bool = False) -> Any:
    from pipelines.jobs import connect

    return _guard(lambda: connect(address, token_file), debug)


def _guard(fn: Any, debug: bool = False) -> Any:
    """Run ``fn()``; a JobsError or SpecError exits with 2, another known error with 1."""
    from pipelines.errors import SpecError
    from pipelines.jobs import JobsError

    cli = _cli()
    try:
        return fn()
    except (JobsError, SpecError) as exc:
        cli._fail(exc, debug, cli.EXIT_USAGE)
    except cli._known_errors() as exc:
        cli._fail(exc, debug, cli.EXIT_FAILED)


def _when(seconds: float | None) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S") if seconds else "-"


def _duration(start: float | None, end: float | None) -> str:
    if not start:
        return "-"
    return f"{(end or time.time()) - start:.0f} s"


def submit(
    spec: Annotated[Path, typer.Argument(help="Pipeline file (YAML) inside the repository")],
    address: AddressOpt,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field, KEY.PATH=VALUE, as for `medrecon run`. Repeatable."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the job's log until it ends, and exit with its code.")
    ] = False,
    token_file: TokenOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Run a pipeline on a Ray cluster through its Jobs API: `medrecon run SPEC` on the head.

    The repository is the job's working directory (runs, archives, virtual environments and caches
    left out). The submission ID comes from the pipeline's fingerprint: submitting the same pipeline
    again while its job is pending, running or has succeeded reports that job and starts nothing;
    after a job stopped or failed it runs again and redoes only what was not committed.
    """
    from pipelines.jobs import submit as submit_job

    cli = _cli()
    client = _client(address, token_file, debug)
    sub = _guard(lambda: submit_job(client, spec, list(set_ or []), log=cli.console.print), debug)
    if sub.created:
        cli.console.print(f"submitted [cyan]{sub.submission_id}[/] to {client.address}")
    else:
        cli.console.print(
            f"[yellow]already submitted:[/] [cyan]{sub.submission_id}[/] is {sub.status} at "
            f"{client.address}; nothing new started"
        )
    cli.console.print(f"  follow it: medrecon logs {sub.submission_id} --address {client.address} --follow")
    if not wait:
        return
    _stream(client, sub.submission_id, debug)
    _exit_with_job(client, sub.submission_id, debug)


def _stream(client: Any, job: str, debug: bool) -> None:
    from pipelines.jobs import follow_logs

    def run() -> None:
        for chunk in follow_logs(client, job):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    _guard(run, debug)


def _exit_with_job(client: Any, job: str, debug: bool) -> None:
    from pipelines.jobs import job_status, wait_for

    cli = _cli()
    _guard(lambda: wait_for(client, job), debug)
    state = _guard(lambda: job_status(client, job), debug)
    colour = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow"}.get(state.status, "white")
    cli.console.print(f"job {job}: [{colour}]{state.status}[/] {state.message}".rstrip(), highlight=False)
    if state.status == "SUCCEEDED":
        raise typer.Exit(cli.EXIT_OK)
    if state.status == "STOPPED":
        raise typer.Exit(130)
    raise typer.Exit(state.exit_code if state.exit_code not in (None, 0) else cli.EXIT_FAILED)


def jobs_list(
    address: AddressOpt,
    every: Annotated[
        bool, typer.Option("--all", help="Every job on the cluster, not only medrecon's.")
    ] = False,
    token_file: TokenOpt = None,
    debug: DebugOpt = False,
) -> None:
    """List the cluster's medrecon jobs, newest first."""
    from pipelines.jobs import list_jobs

    cli = _cli()
    client = _client(address, token_file, debug)
    jobs = _guard(lambda: list_jobs(client, every), debug)
    table = Table(title=f"jobs at {client.address}")
    for col in ("submission ID", "status", "pipeline", "started", "wall time"):
        table.add_column(col, no_wrap=col == "submission ID")
    for j in jobs:
        start = j.start_time / 1000 if j.start_time else None
        end = j.end_time / 1000 if j.end_time else None
        table.add_row(
            j.submission_id or j.job_id or "-",
            j.status.value,
            (j.metadata or {}).get("medrecon.pipeline", "-"),
            _when(start),
            _duration(start, end),
        )
    cli.console.print(table)
    if not jobs:
        cli.console.print("no medrecon jobs" + ("" if every else " (--all lists every job)"))


def status(
    job: JobArg,
    address: AddressOpt,
    token_file: TokenOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Show a job's status, the stage it is running and that stage's progress."""
    from pipelines.jobs import job_status

    cli = _cli()
    client = _client(address, token_file, debug)
    s = _guard(lambda: job_status(client, job), debug)
    cli.console.print(f"job        {s.submission_id}", highlight=False)
    cli.console.print(f"status     {s.status}", highlight=False)
    cli.console.print(f"pipeline   {s.pipeline or '-'}", highlight=False)
    cli.console.print(f"stage      {s.stage or '-'}", highlight=False)
    cli.console.print(f"progress   {s.progress or '-'}", highlight=False)
    cli.console.print(f"started    {_when(s.started)}  ({_duration(s.started, s.ended)})", highlight=False)
    if s.exit_code is not None:
        cli.console.print(f"exit code  {s.exit_code}", highlight=False)
    if s.message:
        cli.console.print(f"message    {s.message}", highlight=False)


def logs(
    job: JobArg,
    address: AddressOpt,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
    token_file: TokenOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Print a job's log (the driver's output: stage lines, progress, the results table)."""
    from pipelines.jobs import read_logs

    client = _client(address, token_file, debug)
    if follow:
        _stream(client, job, debug)
    else:
        sys.stdout.write(_guard(lambda: read_logs(client, job), debug))


def stop(
    job: JobArg,
    address: AddressOpt,
    token_file: TokenOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Stop a job. What it committed stays; submitting the same pipeline again does the rest."""
    from pipelines.jobs import stop_job

    cli = _cli()
    client = _client(address, token_file, debug)
    final = _guard(lambda: stop_job(client, job), debug)
    cli.console.print(f"job {job}: {final}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the cluster commands to the ``medrecon`` app."""
    app.command("submit")(submit)
    app.command("status")(status)
    app.command("logs")(logs)
    app.command("stop")(stop)
    jobs = typer.Typer(help="The cluster's jobs.", no_args_is_help=True)
    jobs.command("list")(jobs_list)
    app.add_typer(jobs, name="jobs")
