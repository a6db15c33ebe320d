"""The ``medrecon`` command line. Only this module turns errors into exit codes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="medrecon",
    help=(
        "Distributed medical image reconstruction pipelines on Ray, Zarr and MLflow.\n\n"
        "Start with:  medrecon run pipelines/specs/quickstart.yaml"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # one error, one line: greppable in logs

SpecArg = Annotated[Path, typer.Argument(help="Pipeline file (YAML), e.g. pipelines/specs/quickstart.yaml")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a field: KEY.PATH=VALUE, repeatable. The first key may be a stage kind "
        "(--set train.epochs=3) or a top-level field (--set seed=1). VALUE is parsed as YAML.",
    ),
]
DebugOpt = Annotated[
    bool,
    typer.Option(
        "--debug", help="Show full tracebacks instead of one-line errors, and stream Ray worker logs."
    ),
]


_COLUMN_TITLES = {
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "nmse": "NMSE",
    "recon_s": "s/scan",
    "iterations": "iters/slab",
    "converged": "converged",
}


def _format_metric(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    formats = {"psnr": f"{value:.2f}", "recon_s": f"{value:.3f}", "iterations": f"{value:.1f}"}
    return formats.get(name, f"{value:.0%}" if name == "converged" else f"{value:.4f}")


def _fail(exc: BaseException, debug: bool, code: int) -> None:
    if debug:
        raise exc
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(code)


def _known_errors() -> tuple[type[BaseException], ...]:
    from models.registry import ModelError
    from operators.errors import OperatorError
    from pipelines.errors import PipelineError

    return (PipelineError, OperatorError, ModelError)


def _load(spec_path: Path, overrides: list[str] | None, debug: bool):  # type: ignore[no-untyped-def]
    from pipelines.errors import SpecError
    from pipelines.spec import load_spec

    try:
        return load_spec(spec_path, overrides or [])
    except SpecError as exc:
        _fail(exc, debug, 2)


@app.command()
def run(spec: SpecArg, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Run a pipeline: each stage is skipped when its committed output is unchanged, else (re)done."""
    pipeline = _load(spec, set_, debug)
    from pipelines.runner import run_pipeline

    try:
        result = run_pipeline(pipeline, console, verbose=debug)
    except _known_errors() as exc:
        _fail(exc, debug, 1)
        return
    stages = Table(title="Stages")
    for col in ("stage", "status", "wall time (s)", "scans done", "skipped", "failed"):
        stages.add_column(col, justify="left" if col in ("stage", "status") else "right")
    for r in result.stages:
        stages.add_row(r.kind, r.status, f"{r.seconds:.1f}", str(r.done), str(r.skipped), str(len(r.failed)))
    console.print(stages)
    if result.metrics:
        metrics = Table(
            title=f"Results on the test split ({result.outputs['evaluate'].get('n_scans', 0)} scans)"
        )
        found = {k for d in result.metrics.values() for k in d}
        names = [n for n in _COLUMN_TITLES if n in found] + sorted(found - set(_COLUMN_TITLES))
        metrics.add_column("method", no_wrap=True)
        for n in names:
            metrics.add_column(_COLUMN_TITLES.get(n, n), justify="right")
        for method, values in result.metrics.items():
            metrics.add_row(method, *(_format_metric(n, values.get(n)) for n in names))
        console.print(metrics)
        for method, values in result.metrics.items():
            if values.get("converged", 1.0) < 1.0:
                console.print(
                    f"[yellow]note:[/] {method} stopped at its iteration cap before its tolerance on "
                    f"{1 - values['converged']:.0%} of the scans; raise recon.options.{method}.max_iter "
                    "or loosen its tol"
                )
    console.print(
        f"total {result.seconds:.1f} s; MLflow run [cyan]{result.run_id}[/] at {result.tracking_uri}"
    )


@app.command()
def validate(spec: SpecArg, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Check a pipeline file and print it with defaults filled in; runs nothing."""
    import yaml

    pipeline = _load(spec, set_, debug)
    console.print(yaml.safe_dump(pipeline.model_dump(mode="json"), sort_keys=False))
    console.print(f"[green]{spec}: valid[/]")


@app.command()
def show(
    archive: Annotated[str, typer.Argument(help="Archive path or URI")],
    debug: DebugOpt = False,
) -> None:
    """List an archive's scans: split, shape, and which stages have committed each."""
    from pipelines.store import Archive

    try:
        a = Archive(archive)
        rows = a.catalog()
    except _known_errors() as exc:
        _fail(exc, debug, 1)
        return
    table = Table(title=f"{a.uri}: {len(rows)} scans")
    stages = ("phantoms", "simulate", "recon", "evaluate")
    for col in ("scan_id", "split", "shape", *stages):
        table.add_column(col)
    for r in rows:
        marks = [
            "✓" if a.commit_record(s, r.scan_id) else ("✗" if r.scan_id in a.quarantined(s) else "·")
            for s in stages
        ]
        table.add_row(r.scan_id, r.split, "×".join(map(str, r.shape)), *marks)
    console.print(table)


def main() -> None:  # pragma: no cover - entry point
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
