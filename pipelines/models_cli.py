"""``medrecon models``: registered models, their champion and challenger, and the promotion history.

Exit codes: 0 success; 2 an argument error, no tracking URI, an unknown model or version, a refused
promotion or rollback, or MLflow unreachable; 1 anything else (including the champion changing
while the command ran). The library side is :mod:`pipelines.champion`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

# Defined here as in pipelines.cli: importing that module from this one is circular under
# ``python -m pipelines.cli`` (it runs as __main__ and would be imported a second time).
console = Console() if sys.stdout.isatty() else Console(width=int(os.environ.get("COLUMNS") or 120))
err_console = Console(stderr=True, soft_wrap=True)
EXIT_FAILED, EXIT_USAGE = 1, 2

app = typer.Typer(
    name="models",
    help=(
        "Registered models: list versions, see the champion/challenger promotion history, promote by "
        "hand, roll back.\n\nExit codes: 0 success, 2 an argument error, unknown model or version, or "
        "refused action, 1 anything else."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

NameArg = Annotated[
    str, typer.Argument(help="Registered model name, e.g. quickstart-model", show_default=False)
]
TrackingOpt = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking and registry URI (e.g. sqlite:///runs/quickstart/mlflow.db); "
        "default $MEDRECON_TRACKING_URI",
        show_default=False,
    ),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")]


def _fail(exc: BaseException, debug: bool, code: int) -> None:
    if debug:
        raise exc
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(code)


@contextlib.contextmanager
def _errors(debug: bool) -> Iterator[None]:
    """Our errors exit 2 with one line; anything else exits 1 with one line (tracebacks with --debug)."""
    from pipelines.errors import PipelineError
    from pipelines.secrets import redact_uri

    try:
        yield
    except typer.Exit:
        raise
    except PipelineError as exc:
        _fail(exc, debug, EXIT_USAGE)
    except Exception as exc:
        if debug:
            raise
        err_console.print(
            f"[bold red]error:[/] {type(exc).__name__}: {redact_uri(str(exc))} "
            "(run again with --debug for the traceback)",
            highlight=False,
        )
        raise typer.Exit(EXIT_FAILED) from None


def _uri(tracking_uri: str | None) -> str:
    from pipelines.errors import SpecError

    if tracking_uri:
        return tracking_uri
    from pipelines.spec import Settings  # imports torch (through operators): only when needed

    uri = Settings().tracking_uri
    if not uri:
        raise SpecError(
            "no tracking URI: pass --tracking-uri URI (e.g. sqlite:///runs/quickstart/mlflow.db) "
            "or set MEDRECON_TRACKING_URI"
        )
    return uri


def _dash(value: str | None) -> str:
    return "-" if value in (None, "") else str(value)


def _key_metrics(metrics: dict[str, float], most: int = 4) -> str:
    """Up to ``most`` metrics, PSNR and SSIM first: ``challenger/psnr=30.10 champion/psnr=29.80``."""
    order = sorted(metrics, key=lambda k: (0 if "psnr" in k else 1 if "ssim" in k else 2, k))
    text = " ".join(f"{k}={metrics[k]:.4g}" for k in order[:most])
    return text + (f" (+{len(order) - most} in MLflow)" if len(order) > most else "") if text else "-"


@app.command("list")
def list_(
    name: Annotated[
        str | None, typer.Argument(help="A registered model: list its versions instead", show_default=False)
    ] = None,
    tracking_uri: TrackingOpt = None,
    debug: DebugOpt = False,
) -> None:
    """List registered models with their champion and challenger; with NAME, that model's versions.

    A version's row shows its aliases, the gate's decision (promoted, rejected, rolled-back) with
    its reason, and the MLflow run that logged it.
    """
    from pipelines.champion import model_versions, registered_models
    from pipelines.secrets import redact_uri

    with _errors(debug):
        uri = _uri(tracking_uri)
        if name is None:
            models = registered_models(uri)
            table = Table(title="Registered models")
            for col in ("model", "champion", "challenger", "versions"):
                table.add_column(col, no_wrap=True, justify="left" if col == "model" else "right")
            for m in models:
                table.add_row(m.name, _dash(m.champion), _dash(m.challenger), str(m.versions))
            console.print(table if models else "no registered models")
            console.print(f"tracking URI: {redact_uri(uri)}", highlight=False)
            return
        versions = model_versions(uri, name)
        table = Table(title=f"{name}: {len(versions)} version(s)")
        for col in ("version", "created (UTC)", "aliases", "gate", "reason", "run ID"):
            table.add_column(col, justify="right" if col == "version" else "left", no_wrap=col != "reason")
        for v in versions:
            table.add_row(
                v.version,
                v.created,
                ", ".join(v.aliases) or "-",
                _dash(v.gate),
                _dash(v.reason),
                _dash(v.run_id),
            )
        console.print(table)


@app.command()
def history(name: NameArg, tracking_uri: TrackingOpt = None, debug: DebugOpt = False) -> None:
    """Show a model's promotion history, oldest first: promotions, rejections and rollbacks.

    Each event names the version acted on, the champion before it, the reason, the metrics the
    decision saw and the night it belongs to (- for manual actions).
    """
    from pipelines.champion import history as read_history
    from pipelines.champion import model_versions

    with _errors(debug):
        uri = _uri(tracking_uri)
        events = read_history(uri, name)
        if not events:
            model_versions(uri, name)  # an unknown model is an error, a known one just has no history
            console.print(f"{name}: no promotions, rejections or rollbacks recorded yet")
            return
    table = Table(title=f"{name}: history ({len(events)} events)")
    for col in ("time (UTC)", "action", "version", "previous", "reason", "metrics", "night"):
        table.add_column(col, no_wrap=col in ("time (UTC)", "action"))
    for e in events:
        table.add_row(
            e.time[:19].replace("T", " "),
            e.action,
            e.version,
            _dash(e.previous),
            e.reason,
            _key_metrics(e.metrics),
            _dash(e.run_key),
        )
    console.print(table)


@app.command()
def promote(
    name: NameArg,
    version: Annotated[str, typer.Argument(help="The version to make champion, e.g. 3", show_default=False)],
    reason: Annotated[str, typer.Option(help="Why; recorded on the version and in the history")] = (
        "manual promotion"
    ),
    tracking_uri: TrackingOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Make VERSION the champion by hand (recorded as manual-promote).

    Refused if VERSION is already the champion. If another run moves the champion while this runs,
    nothing changes and the command exits 1: check and run again.
    """
    from pipelines.champion import CHAMPION, alias_version
    from pipelines.champion import promote as promote_version

    with _errors(debug):
        uri = _uri(tracking_uri)
        before = alias_version(uri, name, CHAMPION)
        event = promote_version(uri, name, version, expected=before, reason=reason, action="manual-promote")
        if event is None:
            now = alias_version(uri, name, CHAMPION)
            err_console.print(
                f"[bold red]error:[/] the champion of {name} changed while promoting (was "
                f"{_dash(before)}, now {_dash(now)}); nothing was changed: check and run again",
                highlight=False,
            )
            raise typer.Exit(EXIT_FAILED)
    was = f"v{event.previous}" if event.previous else "none"
    console.print(f"{name}: v{event.version} is now the champion (was {was}); reason: {event.reason}")


@app.command()
def rollback(
    name: NameArg,
    reason: Annotated[str, typer.Option(help="Why; recorded in the history")] = "manual rollback",
    tracking_uri: TrackingOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Undo the latest promotion: the champion before the current one becomes champion again.

    Repeated rollbacks walk further back through the history; it is an error when there is no
    earlier champion.
    """
    from pipelines.champion import rollback as rollback_model

    with _errors(debug):
        event = rollback_model(_uri(tracking_uri), name, reason=reason)
    console.print(f"{name}: rolled back from v{event.previous} to v{event.version}; reason: {event.reason}")
