"""Timing and table helpers shared by the benchmark scripts.

Benchmarks compare against a baseline measured side by side in the same run and
report medians of repeated runs and ratios, because these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = [
    "median_time",
    "print_table",
    "write_json",
    "write_run",
    "parse_device",
    "OthersCpu",
    "measured_with_others_cpu",
    "RESULTS_DIR",
]

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


def write_run(name: str, payload: dict[str, Any], t_start: float) -> Path:
    """Finish a benchmark run: add its wall time and the load average now (beside ``loadavg_start``,
    if the payload has one), write ``benchmarks/results/<name>.json`` and say so in one line."""
    payload["wall_s"] = time.perf_counter() - t_start
    payload["loadavg_end"] = os.getloadavg()
    path = write_json(name, payload)
    loads = {k: ", ".join(f"{x:.1f}" for x in payload[f"loadavg_{k}"]) for k in ("start", "end")
             if f"loadavg_{k}" in payload}  # fmt: skip
    load = "; ".join(f"load average at {k} {v}" for k, v in loads.items())
    print(f"wrote {path} (wall {payload['wall_s']:.0f} s; {load}; {os.cpu_count()} CPUs)")
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


class OthersCpu:
    """The share of the CPUs that processes outside this process tree used while it was open.

    The machine's busy time comes from ``psutil.cpu_times``; this tree's (Ray's processes and the
    actors included) from sampling each descendant every 0.25 s, since the raylet does not account
    for the actors it reaps. A descendant that exits loses at most its last 0.25 s (actors sit idle
    at the end of a job).
    """

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._seen: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, daemon=True)

    def _busy(self) -> float:
        t = self._psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq

    def _sample(self) -> None:
        for p in self._me.children(recursive=True):
            try:
                with p.oneshot():
                    c = p.cpu_times()
                    self._seen[(p.pid, p.create_time())] = c.user + c.system
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                continue

    def _sample_loop(self) -> None:
        while not self._stop.wait(0.25):
            self._sample()

    def __enter__(self) -> OthersCpu:
        self._sample()
        self._base = dict(self._seen)
        own = self._me.cpu_times()
        self._own0, self._busy0, self._t0 = own.user + own.system, self._busy(), time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        own = self._me.cpu_times()
        tree = own.user + own.system - self._own0
        tree += sum(v - self._base.get(k, 0.0) for k, v in self._seen.items())
        wall = time.perf_counter() - self._t0
        self.share = max(0.0, self._busy() - self._busy0 - tree) / (wall * (os.cpu_count() or 1))


def measured_with_others_cpu(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``'s numbers plus ``others_cpu``: the share of the CPUs other processes used meanwhile."""
    with OthersCpu() as meter:
        res = fn()
    return {**res, "others_cpu": meter.share}
