"""The ``medrecon`` command line. Only this module turns errors into exit codes.

Exit codes of every command that runs work: 0 all done; 3 some scans were quarantined (a final
summary lists each with its stage and reason); 2 a spec or argument error; 1 anything else.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="medrecon",
    help=(
        "Distributed medical image reconstruction pipelines on Ray, Zarr and MLflow.\n\n"
        "Start with:  medrecon run pipelines/specs/quickstart.yaml\n\n"
        "Exit codes: 0 all done, 3 some scans quarantined (listed at the end), "
        "2 a spec or argument error, 1 anything else."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Piped to a file or a CI log there is no terminal width; 120 columns keeps the results table whole.
console = Console() if sys.stdout.isatty() else Console(width=int(os.environ.get("COLUMNS") or 120))
err_console = Console(stderr=True, soft_wrap=True)  # one error, one line: greppable in logs

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_QUARANTINED = 0, 1, 2, 3

SpecArg = Annotated[Path, typer.Argument(help="Pipeline file (YAML), e.g. pipelines/specs/quickstart.yaml")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a field: KEY.PATH=VALUE, repeatable. The first key may be a stage name, a stage "
        "kind when only one stage has it (--set train.epochs=3), or a top-level field (--set seed=1). "
        "VALUE is parsed as YAML.",
    ),
]
DebugOpt = Annotated[
    bool,
    typer.Option(
        "--debug", help="Show full tracebacks instead of one-line errors, and stream Ray worker logs."
    ),
]
WaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait-for-lock",
        help="If another run is writing to the archive, wait for it to finish instead of exiting with 2.",
    ),
]

_COLUMN_TITLES = {
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "nmse": "NMSE",
    "s_per_slice": "s/slice",
    "iterations": "iters",
    "converged": "conv.",
    "dc_residual": "‖Ax−y‖/‖y‖",
    "amplification": "amp.",
    "lam": "λ",
}
_FORMATS = {
    "psnr": "{:.2f}",
    "ssim": "{:.3f}",
    "nmse": "{:.4f}",
    "s_per_slice": "{:.4f}",
    "iterations": "{:.0f}",
    "converged": "{:.0%}",
    "dc_residual": "{:.3f}",
    "amplification": "{:.2f}",
    "lam": "{:.3g}",
}


def _format_metric(name: str, values: dict[str, float]) -> str:
    value = values.get(name)
    if value is None:
        return "-"
    text = _FORMATS.get(name, "{:.4f}").format(value)
    std = values.get(f"{name}_std") if name == "psnr" else None  # the other spreads are in MLflow
    return text if std is None else f"{text} ± {std:.2f}"


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


def _load(spec_path: Path, overrides: list[str] | None, debug: bool) -> Any:
    from pipelines.errors import SpecError
    from pipelines.specfile import load_spec

    try:
        return load_spec(spec_path, overrides or [])
    except SpecError as exc:
        _fail(exc, debug, EXIT_USAGE)


def _execute(pipeline: Any, debug: bool, wait_for_lock: bool = False) -> None:
    """Run a validated pipeline, print its tables, and exit with the code the outcome deserves."""
    from pipelines.errors import LeaseError, SpecError
    from pipelines.runner import run_pipeline

    try:
        result = run_pipeline(pipeline, console, verbose=debug, wait_for_lock=wait_for_lock)
    except (SpecError, LeaseError) as exc:
        _fail(exc, debug, EXIT_USAGE)
        return
    except _known_errors() as exc:
        _fail(exc, debug, EXIT_FAILED)
        return
    except KeyboardInterrupt:
        err_console.print("interrupted: what was committed stays; run again to do the rest")
        raise typer.Exit(130) from None
    except Exception as exc:  # a bug or an environment failure: one line, the traceback behind --debug
        if debug:
            raise
        err_console.print(
            f"[bold red]error:[/] {type(exc).__name__}: {exc} (run again with --debug for the traceback)",
            highlight=False,
        )
        raise typer.Exit(EXIT_FAILED) from None
    _print_stages(result)
    _print_results(result)
    console.print(
        f"total {result.seconds:.1f} s; MLflow run [cyan]{result.run_id}[/] at {result.tracking_uri}"
    )
    if result.quarantined:
        err_console.print(f"[bold yellow]{len(result.quarantined)} scan(s) quarantined:[/]", highlight=False)
        for stage, scan, reason in result.quarantined:
            err_console.print(f"  - {stage}: {scan}: {reason}", highlight=False)
        err_console.print(
            "fix or remove them, then run again: only what is missing is redone", highlight=False
        )
        raise typer.Exit(EXIT_QUARANTINED)


def _print_stages(result: Any) -> None:
    stages = Table(title="Stages")
    for col in ("stage", "status", "wall time (s)", "scans done", "skipped", "failed"):
        stages.add_column(col, justify="left" if col in ("stage", "status") else "right")
    for r in result.stages:
        stages.add_row(r.name, r.status, f"{r.seconds:.1f}", str(r.done), str(r.skipped), str(len(r.failed)))
    console.print(stages)


def _print_results(result: Any) -> None:
    if not result.metrics:
        return
    evaluation = result.evaluation
    labels = evaluation.get("labels", {})
    table = Table(title=f"Results ({evaluation.get('n_scans', 0)} scans)")
    found = {k for d in result.metrics.values() for k in d}
    names = [n for n in _COLUMN_TITLES if n in found]  # the rest (recon_s, *_std) is in MLflow
    table.add_column("method", no_wrap=True)
    for n in names:
        table.add_column(_COLUMN_TITLES.get(n, n), justify="right")
    order = [k for k in evaluation.get("methods", []) if k in result.metrics]
    order += [k for k in result.metrics if k not in order]
    for key in order:
        table.add_row(key, *(_format_metric(n, result.metrics[key]) for n in names))
    console.print(table)
    for key in order:
        if labels.get(key, key) != key:
            console.print(f"{key}: {labels[key]}")
    if evaluation.get("without_reference"):
        console.print(
            f"note: {evaluation['without_reference']} scan(s) have no reference image and were not scored"
        )
    for key in order:
        values = result.metrics[key]
        if values.get("converged", 1.0) < 1.0:
            console.print(
                f"[yellow]note:[/] {key} stopped at its iteration cap before its tolerance on "
                f"{1 - values['converged']:.0%} of the scans; raise recon.options.{key}.max_iter "
                "or loosen its tol"
            )


@app.command()
def run(spec: SpecArg, set_: SetOpt = None, wait_for_lock: WaitOpt = False, debug: DebugOpt = False) -> None:
    """Run a pipeline: each stage is skipped when its committed output is unchanged, else (re)done.

    One run writes to an archive at a time; a second one exits with 2 naming the first, or waits
    with --wait-for-lock.
    """
    _execute(_load(spec, set_, debug), debug, wait_for_lock)


@app.command()
def reprocess(
    archive: Annotated[str, typer.Argument(help="Archive path or URI")],
    method: Annotated[
        list[str],
        typer.Option(
            "--method",
            "-m",
            help="A classical method (zero_filled, fbp, nearest, bicubic, cg_sense, cs_wavelet, cs_tv; "
            "operators.recon.METHODS) or a model URI "
            "(models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH). Repeatable.",
        ),
    ],
    split: Annotated[str, typer.Option(help="train, val, test or all")] = "all",
    scans: Annotated[
        Path | None, typer.Option(help="A text file of scan IDs, one per line: reconstruct only those")
    ] = None,
    actors: Annotated[int, typer.Option(help="Ray Data actors (each loads every model once)")] = 2,
    cpus_per_actor: Annotated[float, typer.Option(help="CPUs reserved per actor")] = 0.5,
    gpus_per_actor: Annotated[float, typer.Option(help="GPUs per actor (models then run on CUDA)")] = 0.0,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            help="MLflow URI for model URIs and metrics; default $MEDRECON_TRACKING_URI, "
            "else mlflow.db beside the archive"
        ),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option", help="A solver option, METHOD.FIELD=VALUE (e.g. cs_tv.max_iter=100). Repeatable."
        ),
    ] = None,
    evaluate: Annotated[
        bool, typer.Option("--evaluate", help="Score against the reference images where they exist")
    ] = False,
    wait_for_lock: WaitOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Reconstruct an existing archive with classical methods or registered models; no spec file.

    Writes recon/<key> for each method (a model's key names its version: NAME.vN), with lineage,
    skipping what is already committed; a re-run does only what is missing.
    """
    from pipelines.errors import SpecError
    from pipelines.reprocess import read_scan_list, reprocess_spec
    from pipelines.specfile import apply_overrides

    try:
        options = apply_overrides({}, list(option or [])) if option else {}
        pipeline = reprocess_spec(
            archive,
            list(method),
            split=split,
            scans=read_scan_list(scans) if scans else None,
            actors=actors,
            cpus_per_actor=cpus_per_actor,
            gpus_per_actor=gpus_per_actor,
            tracking_uri=tracking_uri,
            evaluate=evaluate,
            options=options,
        )
    except SpecError as exc:
        _fail(exc, debug, EXIT_USAGE)
        return
    _execute(pipeline, debug, wait_for_lock)


@app.command()
def ingest(
    sources: Annotated[list[str], typer.Argument(help="Folders of scans (NIfTI files, DICOM series)")],
    archive: Annotated[str, typer.Option("--archive", help="Archive path or URI; created if missing")],
    format: Annotated[
        str, typer.Option("--format", help="auto (.nii/.nii.gz as NIfTI, other files as DICOM), nifti, dicom")
    ] = "auto",
    manifest: Annotated[
        Path | None,
        typer.Option(
            help="CSV with columns path (relative to the CSV) and optionally scan_id, split, labels, "
            "modality: ingest exactly those files"
        ),
    ] = None,
    modality: Annotated[str | None, typer.Option(help="mri or ct, for files that do not say (NIfTI)")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split assignment (a hash of each scan ID)")] = 0,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow URI; default $MEDRECON_TRACKING_URI, else mlflow.db beside the archive"),
    ] = None,
    wait_for_lock: WaitOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Bring real scans into an archive: NIfTI files and DICOM series (de-identified), slab by slab.

    Scan IDs: a manifest's scan_id, else a keyed hash of the DICOM study and series UIDs (key from
    MEDRECON_DEID_KEY or the file MEDRECON_DEID_KEY_FILE names), else a hash of the NIfTI path.
    Bad files are quarantined with a reason (exit code 3) and the others committed. Into an
    existing archive, new scans are appended to the catalog and re-ingesting the same files does
    nothing.
    """
    from pipelines.errors import SpecError
    from pipelines.ingest import ingest_spec

    try:
        pipeline = ingest_spec(
            list(sources),
            archive,
            fmt=format,
            manifest=str(manifest) if manifest else None,
            modality=modality,
            seed=seed,
            tracking_uri=tracking_uri,
        )
    except SpecError as exc:
        _fail(exc, debug, EXIT_USAGE)
        return
    _execute(pipeline, debug, wait_for_lock)


@app.command()
def validate(spec: SpecArg, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Check a pipeline file and print it with defaults filled in; runs nothing."""
    import yaml

    from pipelines.secrets import redact

    pipeline = _load(spec, set_, debug)
    console.print(yaml.safe_dump(redact(pipeline.model_dump(mode="json")), sort_keys=False))
    console.print(f"[green]{spec}: valid[/]")


@app.command()
def show(
    archive: Annotated[str, typer.Argument(help="Archive path or URI")],
    debug: DebugOpt = False,
) -> None:
    """List an archive's scans and, per output: done (✓), stale (~), quarantined (✗) or not done (·).

    An output counts as done only if its commit carries the fingerprint of the latest stage run
    that wrote it; a commit left from an earlier run is stale.
    """
    from pipelines.store import Archive

    try:
        a = Archive(archive)
        rows = a.catalog()
        order = {"source": 0, "measurements": 1, "recon": 2, "evaluate": 3}
        units = sorted(a.units(), key=lambda u: (order.get(u.split("/")[0], 4), u))
        current = a.current_fingerprints()
        committed = {u: a.committed(u) for u in units}
        quarantined = {u: a.quarantined(u) for u in units}
    except _known_errors() as exc:
        _fail(exc, debug, EXIT_FAILED)
        return
    table = Table(title=f"{a.uri}: {len(rows)} scans")
    table.add_column("scan_id", no_wrap=True)
    table.add_column("split")
    table.add_column("shape", no_wrap=True)
    for unit in units:  # recon/<key> shows as <key>; headers fold rather than cut
        table.add_column(unit.removeprefix("recon/"), overflow="fold", justify="center")

    def mark(unit: str, scan: str) -> str:
        if scan in quarantined[unit]:
            return "✗"
        fp = committed[unit].get(scan)
        if fp is None:
            return "·"
        expected = current.get(unit, fp)
        if isinstance(expected, dict):  # a unit fingerprinted per scan
            expected = expected.get(scan, fp)
        return "✓" if expected == fp else "~"

    for r in rows:
        table.add_row(r.scan_id, r.split, "×".join(map(str, r.shape)), *(mark(u, r.scan_id) for u in units))
    console.print(table)
    console.print("✓ done  ~ stale (an earlier run's output)  ✗ quarantined  · not done")
    for unit in units:
        for scan, error in quarantined[unit].items():
            console.print(f"[yellow]{unit}: {scan}: {error}[/]")


def _interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler stopping the job) takes Ctrl-C's path: Ray shut down, lease released,
    MLflow run marked KILLED."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


from pipelines import jobs_cli  # noqa: E402
from pipelines.models_cli import app as models_app  # noqa: E402

app.add_typer(models_app, name="models")
jobs_cli.register(app)


def main() -> None:  # pragma: no cover - entry point
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _interrupt_on_sigterm()
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
