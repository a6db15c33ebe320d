"""Timing and table helpers shared by the benchmark scripts.

Benchmarks compare against a baseline measured side by side in the same run and
report medians of repeated runs and ratios, because these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["median_time", "print_table", "write_json", "parse_device", "RESULTS_DIR"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def median_time(
    fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None
) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(title: str, rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """Print ``rows`` (dicts with the same keys) as a rich table."""
    console = console or Console()
    if not rows:
        console.print(f"[bold]{title}[/]: no rows")
        return
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(str(key), justify="right" if isinstance(rows[0][key], (int, float)) else "left")
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` with machine facts to ``benchmarks/results/<name>.json``; return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    import torch

    payload = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        **payload,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def parse_device(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Add ``--device`` (cpu or cuda) to ``parser``, parse, and refuse cuda when there is none."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
    return args
