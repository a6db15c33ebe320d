"""Preprocess-stage memory and throughput on a large volume, against a plain Zarr copy in the same run.

One scan, a ``(D, H, W)`` float32 volume (default ``400 x 512 x 512``, 419 MB: a smooth head-sized
blob plus noise) is written to a Zarr archive the way ingest writes it (shards of 16 slices; setup,
not timed). Repeats alternate between:

* ``preprocess``: :func:`pipelines.preprocess.preprocess_scan` through
  :func:`pipelines.fanout.process_scan` (commit included, fresh fingerprint per repeat) with
  ``clip_percentiles: [0.5, 99.5], normalize: zscore, shape: (D, H - 64, W - 64)`` on Ray (2 CPUs,
  Dask-on-Ray, one task per slab). It reads the volume 4 times (moments, histogram, clipped
  moments, transform-and-write), every read checked against the image's CRCs;
* ``zarr copy`` (the baseline): this process reads the image slab by slab with plain Zarr
  (no checksum) and writes each slab to an array of the same layout (``Archive.create_array``,
  shards of one slab), i.e. one read and one write of the volume, no Dask, no Ray.

Throughput is the input's MB over the median wall time. The stage's tasks are never given the
volume; whether they hold it anyway is measured, not assumed: Ray's ``memory=`` is a scheduling
hint and is not enforced on a worker's RSS, so a thread samples the RSS of every Ray worker
process of this run (the ``ray::`` children of this process) every 20 ms with psutil. RSS counts
the pages of Ray's shared-memory object store that a worker has touched; ``private`` is RSS minus
shared pages. The bar is a peak worker RSS under 1 GB (the volume alone is 419 MB).

Run: ``python benchmarks/preprocess.py [--size 400x512x512] [--repeats 3] [--slab 16]``;
writes ``benchmarks/results/preprocess.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, Python puts benchmarks/ first on sys.path, and Ray hands the script's folder
# to its workers, where benchmarks/operators.py would shadow the operators package: drop it.
sys.path[:] = [str(ROOT)] + [
    p for p in sys.path if p and Path(p).resolve() != Path(__file__).resolve().parent
]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TMPDIR", str(ROOT / ".tmp"))
os.environ.setdefault("RAY_TMPDIR", os.environ["TMPDIR"])

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402

from benchmarks.timing import RESULTS_DIR, print_table  # noqa: E402
from pipelines.fanout import process_scan  # noqa: E402
from pipelines.preprocess import preprocess_scan  # noqa: E402
from pipelines.spec import PreprocessStage  # noqa: E402
from pipelines.store import SOURCE, Archive, CatalogRow  # noqa: E402

BAR_PEAK_MB = 1000.0
SAMPLE_S = 0.02
INPUT_SLAB = 16


def build(root: Path, scan_id: str, shape: tuple[int, int, int]) -> Archive:
    """An archive with one committed image ``shape``, written slab by slab (never whole in memory)."""
    archive = Archive(str(root), create=True)
    writer = archive.create_array(
        scan_id, "image", shape, np.float32, slab=INPUT_SLAB, attrs={"spacing": [1.0, 1.0, 1.0]}
    )
    d, h, w = shape
    rng = np.random.default_rng(0)
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")  # (H, W)
    for z0 in range(0, d, INPUT_SLAB):
        zz = np.linspace(-1, 1, d)[z0 : z0 + INPUT_SLAB, None, None]  # (s, 1, 1)
        blob = 1000.0 * np.exp(-3.0 * (zz**2 + yy**2 + xx**2))  # (s, H, W)
        writer.write(z0, (blob + rng.normal(0, 20, blob.shape)).astype(np.float32))
    archive.commit(SOURCE, scan_id, "bench", arrays={"image": writer.record()})
    archive.write_catalog([CatalogRow(scan_id, "ct", shape, (1.0, 1.0, 1.0), "bench", "", "test")])
    return archive


class WorkerRss:
    """Peak RSS (and RSS minus shared pages) of this process's Ray worker processes, sampled in a thread."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.peak_rss = self.peak_private = 0
        self.samples = 0
        self.workers: set[int] = set()

    def sample(self) -> tuple[int, int]:
        """``(max RSS, max private)`` over the Ray workers now, in bytes."""
        rss = private = 0
        for p in self._me.children(recursive=True):
            try:
                if not p.cmdline()[:1] or not p.cmdline()[0].startswith("ray::"):
                    continue
                m = p.memory_info()
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied, IndexError):
                continue
            self.workers.add(p.pid)
            rss, private = max(rss, m.rss), max(private, m.rss - m.shared)
        return rss, private

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            rss, private = self.sample()
            self.peak_rss, self.peak_private = max(self.peak_rss, rss), max(self.peak_private, private)
            self.samples += 1

    def __enter__(self) -> WorkerRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_preprocess(archive: Archive, scan_id: str, stage: PreprocessStage) -> float:
    """Wall seconds of the stage's work on one scan, committed under a fresh fingerprint."""
    t0 = time.perf_counter()
    outcome = process_scan(archive, stage.output, scan_id, uuid.uuid4().hex, preprocess_scan, [stage.output],
                           {"stage": stage}, stage="bench")  # fmt: skip
    seconds = time.perf_counter() - t0
    if outcome.status != "done":
        raise RuntimeError(f"preprocess failed: {outcome.error}")
    return seconds


def run_copy(archive: Archive, scan_id: str, slab: int) -> float:
    """Wall seconds of a plain Zarr slab loop in this process: read each slab, write it to a new array."""
    t0 = time.perf_counter()
    src = archive.open_array(scan_id, "image")
    out = archive.create_array(scan_id, "derived/copy", src.shape, np.float32, slab=slab).array
    for z0 in range(0, src.shape[0], slab):
        out[z0 : z0 + slab] = src[z0 : z0 + slab]
    return time.perf_counter() - t0


def to_markdown(title: str, rows: list[dict[str, Any]], notes: list[str]) -> str:
    keys = list(rows[0])
    fmt = [f"{v:.4g}" if isinstance(v, float) else str(v) for r in rows for v in r.values()]
    lines = [f"# {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for i in range(len(rows)):
        lines.append("| " + " | ".join(fmt[i * len(keys) : (i + 1) * len(keys)]) + " |")
    return "\n".join([*lines, "", *notes, ""])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="400x512x512", help="volume D x H x W (default 400x512x512)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per way (default 3)")
    parser.add_argument(
        "--slab", type=int, default=16, help="slices per task and per output shard (default 16)"
    )
    args = parser.parse_args()
    try:
        shape = tuple(int(s) for s in args.size.lower().split("x"))
        assert len(shape) == 3 and min(shape) > 64
    except (ValueError, AssertionError):
        parser.error(f"--size: expected D x H x W with each size > 64, e.g. 400x512x512; found {args.size!r}")
    import ray

    log = Console(stderr=True)
    t_start = time.perf_counter()
    mb = int(np.prod(shape)) * 4 / 1e6
    stage = PreprocessStage(kind="preprocess", clip_percentiles=(0.5, 99.5), normalize="zscore",
                            shape=(shape[0], shape[1] - 64, shape[2] - 64), slab=args.slab)  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="bench-preprocess-", dir=os.environ["TMPDIR"]))
    try:
        t0 = time.perf_counter()
        archive = build(workdir / "a.zarr", "big", shape)  # type: ignore[arg-type]
        build_s = time.perf_counter() - t0
        warm = Archive(str(workdir / "warm.zarr"), create=True)  # starts and warms the workers
        warm_rec = warm.write_array("w", "image", np.random.default_rng(1).random((40, 64, 64), np.float32))
        warm.commit(SOURCE, "w", "bench", arrays={"image": warm_rec})
        log.log(f"archive written: {mb:.0f} MB in {build_s:.1f} s")
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
        run_preprocess(warm, "w", stage.model_copy(update={"shape": (40, 32, 32)}))
        idle_rss = max(WorkerRss().sample()[0], 1) / 2**20
        times: dict[str, list[float]] = {"preprocess": [], "copy": []}
        with WorkerRss() as rss:
            for r in range(args.repeats):  # interleaved, so drift on the shared machine hits both
                times["preprocess"].append(run_preprocess(archive, "big", stage))
                times["copy"].append(run_copy(archive, "big", args.slab))
                log.log(
                    f"{r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items())
                )
        out = archive.open_array("big", stage.output)
        attrs = out.attrs.asdict()
        ray.shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    peak_mb = rss.peak_rss / 2**20
    slab_mb = args.slab * shape[1] * shape[2] * 4 / 2**20
    rows = [
        {
            "way": "preprocess (Dask on Ray, 2 CPUs)",
            "median s": med["preprocess"],
            "input MB/s": mb / med["preprocess"],
            "vs copy": med["copy"] / med["preprocess"],
            "reads of input": 4,
            "peak worker RSS MB": peak_mb,
            "peak worker private MB": rss.peak_private / 2**20,
            "bar RSS<1GB": "pass" if peak_mb < BAR_PEAK_MB else "MISS",
        },
        {
            "way": "zarr copy (1 process, baseline)",
            "median s": med["copy"],
            "input MB/s": mb / med["copy"],
            "vs copy": 1.0,
            "reads of input": 1,
            "peak worker RSS MB": "-",
            "peak worker private MB": "-",
            "bar RSS<1GB": "-",
        },
    ]
    title = (f"Preprocess (clip 0.5-99.5 %, zscore, crop) of one {'x'.join(map(str, shape))} float32 volume "
             f"({mb:.0f} MB), slab {args.slab}, medians of {args.repeats}")  # fmt: skip
    print_table(title, rows, Console(width=max(Console().width, 170)))
    notes = [
        f"- Volume {mb:.0f} MB; one output slab {slab_mb:.0f} MiB; "
        f"an idle Ray worker's RSS {idle_rss:.0f} MiB; "
        f"{len(rss.workers)} worker processes sampled {rss.samples} times (every {SAMPLE_S * 1000:.0f} ms).",
        f"- Wall times (s): preprocess {[round(t, 2) for t in times['preprocess']]}, "
        f"copy {[round(t, 2) for t in times['copy']]}.",
        f"- Clip values {attrs['clip']['values']} (tolerance {attrs['clip']['tolerance']:.3g}), "
        f"mean {attrs['normalize']['mean']:.4g}, std {attrs['normalize']['std']:.4g}.",
        f"- Machine: {platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"load average at the end {os.getloadavg()[0]:.1f} (other jobs were running).",
        f"- Command: `python benchmarks/preprocess.py --size {args.size} --repeats {args.repeats} "
        f"--slab {args.slab}`; wall {time.perf_counter() - t_start:.0f} s.",
    ]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "preprocess.md"
    path.write_text(to_markdown(title, rows, notes))
    print("\n".join(notes))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
