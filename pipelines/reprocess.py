"""``medrecon reprocess``: reconstruct an existing archive with classical methods or registered models.

No spec file: the command's options become a pipeline of one recon stage (and an evaluate stage
with ``--evaluate``), run by :func:`pipelines.runner.run_pipeline` like any other. It has no data
stages, so it reads the measurements the archive records, and each method's output gets the same
fingerprint a pipeline's recon stage would give it: what a pipeline already wrote is not redone,
and a re-run (after a crash, a Ctrl-C or a killed actor) does only what is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipelines.errors import SpecError
from pipelines.fingerprint import combine
from pipelines.spec import PipelineSpec
from pipelines.specfile import format_validation_error

__all__ = ["reprocess_spec", "read_scan_list"]


def read_scan_list(path: Path) -> list[str]:
    """Scan IDs from a text file: one per line; blank lines and ``#`` comments are ignored."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise SpecError(
            f"--scans {path}: cannot read it ({exc.strerror}); expected a text file of scan IDs"
        ) from None
    ids = [line.split("#", 1)[0].strip() for line in lines]
    ids = [i for i in ids if i]
    if not ids:
        raise SpecError(f"--scans {path}: no scan IDs in it; expected one scan ID per line")
    return ids


def reprocess_spec(
    archive: str,
    methods: list[str],
    *,
    split: str = "all",
    scans: list[str] | None = None,
    actors: int = 2,
    cpus_per_actor: float = 0.5,
    gpus_per_actor: float = 0.0,
    tracking_uri: str | None = None,
    evaluate: bool = False,
    options: dict[str, dict[str, Any]] | None = None,
) -> PipelineSpec:
    """The pipeline a ``medrecon reprocess`` command runs (see the module docstring).

    Raises:
        SpecError: a bad method, option, split or scan ID, named as the command line wrote it.
    """
    if not methods:
        raise SpecError("reprocess: give at least one --method (a classical name or a model URI)")
    recon: dict[str, Any] = {
        "kind": "recon",
        "name": "reprocess-" + combine({"methods": methods, "options": options or {}})[:8],
        "methods": methods,
        "split": split,
        "scans": scans,
        "actors": actors,
        "cpus_per_actor": cpus_per_actor,
        "gpus_per_actor": gpus_per_actor,
        "options": options or {},
    }
    raw = {
        "name": "reprocess",
        "archive": {"path": archive},
        "tracking": {"uri": tracking_uri, "experiment": "medrecon-reprocess"},
        "stages": [recon] + ([{"kind": "evaluate", "name": f"{recon['name']}-evaluate"}] if evaluate else []),
    }
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as err:
        message = format_validation_error(err, raw, "reprocess")
        message = message.replace("stages[0] (recon", "--method/--option (recon")
        raise SpecError(message) from None
