"""``medrecon reprocess`` throughput and driver memory, each against a baseline measured in the same run.

1. Throughput. An archive of ``N`` scans (default 24) of ``(16, 96, 96)`` float32 random-ellipsoid
   phantoms, simulated as single-coil Cartesian MRI with a 4x ``random_1d`` mask at 40 dB (setup,
   not timed): the quickstart's scans. Every scan is reconstructed with ``cs_tv`` at a fixed
   ``max_iter`` (default 300, cs_tv's default cap, which the quickstart's scans reach: about 1.5 s
   a scan on one thread; ``--max-iter 120`` gives about 0.6 s) and ``tol=0``, so every scan costs
   the same. Each actor pays a fixed start-up of about 3 s (its process imports torch, Ray Data and
   the recon code), so the cheaper the scans the more of it shows. Repeats
   (default 3) alternate between:

   * ``loop``: the same reconstructions in a plain one-process loop (``torch.set_num_threads(1)``,
     no Ray, no commit records): read the acquisition and the measurements, ``reconstruct``,
     write ``recon/loop``;
   * ``loop, 2 processes`` (context, no bar): the same loop split over two fresh processes without
     Ray, start-up included: how much two concurrent workers get out of the 2 cores at all (two
     solves at once each run ~12-15% slower than one alone on this machine);
   * ``reprocess, 1 actor`` and ``reprocess, 2 actors``: the ``medrecon reprocess`` job
     (:func:`pipelines.reprocess.reprocess_spec` run by :func:`pipelines.runner.run_pipeline` in
     this process) on a Ray instance this script started once (2 CPUs), as a running cluster would
     be; each actor uses one torch thread. Before each repeat the archive forgets the earlier
     reconstructions (recon commit records and recon stage records), so the job redoes every scan.

   Reports scans/s (medians), ``1 actor / loop`` (the issue's bar: >= 0.85), ``2 actors / 1
   actor`` (bar: >= 1.6, which applies when the loop costs >= 0.5 s a scan) and the loop's
   s/scan. As context without a bar, one run of the same 2-actor job through the real CLI
   (``python -m pipelines.cli reprocess``) in a subprocess attached to this Ray, so the reader
   sees what Python start-up and imports add. Diagnostic columns: from the commit records the
   job writes, when the first scan was committed (actor start-up: the worker imports Ray Data and
   torch; Ray Data planning; the first scan), the time after the last commit (stage record,
   MLflow, teardown) and the solver's seconds per scan inside the actors (against the loop's, to
   show contention for the 2 cores); and the share of the CPUs that processes outside this
   benchmark took meanwhile (``others' CPU %``). Ray workers run at nice 15, this process at
   nice 0, so other users' work slows the actors far more than the loop: read the ratios
   beside that column.
2. Driver memory. The peak RSS of the ``medrecon reprocess`` driver process (the CLI in a
   subprocess, ``--method zero_filled --actors 2``, attached to this Ray), sampled with psutil
   every 20 ms until it exits, on an archive of 100 tiny scans ``(2, 16, 16)`` and on one of
   1,000. Reports both peaks and the growth (bar: < 100 MB) and each job's wall time; a job must
   exit with 0.

Run: ``python benchmarks/reprocess.py [--quick]`` (``--quick``: 12 scans, 2 repeats, 100 and 300
tiny scans, for development only); writes ``benchmarks/results/reprocess.json``.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, Python puts benchmarks/ first on sys.path, and Ray hands the script's folder
# to its workers, where benchmarks/operators.py would shadow the operators package: drop it.
sys.path[:] = [str(ROOT)] + [
    p for p in sys.path if p and Path(p).resolve() != Path(__file__).resolve().parent
]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from benchmarks.archives import simulated_archive  # noqa: E402
from benchmarks.timing import measured_with_others_cpu, print_table, write_run  # noqa: E402
from operators import recon  # noqa: E402
from pipelines.physics import Acquisition  # noqa: E402
from pipelines.store import Archive  # noqa: E402

BAR_LOOP = 0.85  # 1 actor / loop
BAR_SCALING = 1.6  # 2 actors / 1 actor
BAR_SCAN_S = 0.5  # the loop's s/scan for the scaling bar to apply
BAR_GROWTH_MB = 100.0
SEED = 0
SHAPE = (16, 96, 96)
TINY = (2, 16, 16)
SAMPLE_S = 0.02


# -- archives (setup, not timed) -------------------------------------------------------------------
def build_archive(path: Path, n: int, shape: tuple[int, int, int]) -> tuple[Archive, list[str]]:
    """``n`` committed phantoms in split "test", each simulated (1 coil, 4x random_1d, 40 dB), no Ray."""
    ids = [f"s{i:04d}" for i in range(n)]
    return simulated_archive(path, ids, shape, "test", SEED), ids


def forget_recons(archive: Archive) -> None:
    """Drop every recon commit record and recon stage record, so the next job redoes every scan."""
    for unit in archive.units():
        if unit.startswith("recon/"):
            for scan_id in archive.committed(unit):
                archive.uncommit(unit, scan_id)
    for name, record in archive.stage_records().items():
        if record.get("kind") == "recon":
            archive.uncommit_stage(name)


def _recon_commits(archive: Archive) -> list[dict[str, Any]]:
    """The commit records of every ``recon/`` unit the job wrote (time, solver cost)."""
    out = []
    for unit in archive.units():
        if unit.startswith("recon/"):
            out += [r for s in archive.committed(unit) if (r := archive.commit_record(unit, s))]
    return out


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _niceness() -> int:
    return os.nice(0)


# -- part 1: throughput ----------------------------------------------------------------------------
def run_loop(archive: Archive, ids: list[str], max_iter: int) -> dict[str, float]:
    """The plain one-process loop, one torch thread; returns its wall and solver seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    solver = 0.0
    t0 = time.perf_counter()
    try:
        for scan_id in ids:
            acq = Acquisition.from_archive(archive, scan_id)
            y = acq.read(archive, scan_id)  # (D, H, W) complex, operator layout
            t1 = time.perf_counter()
            img = recon.reconstruct("cs_tv", y, acq.op, max_iter=max_iter, tol=0.0).image.abs().numpy()
            solver += time.perf_counter() - t1
            archive.create_array(scan_id, "recon/loop", img.shape, np.float32, slab=img.shape[0]).write(
                0, img
            )
    finally:
        torch.set_num_threads(threads)
    return {"wall": time.perf_counter() - t0, "solver": solver}


def _loop_worker(uri: str, ids: list[str], max_iter: int, out: Any) -> None:
    """One of the two plain processes: the loop over its share of the scans; reports solver seconds."""
    result = run_loop(Archive(uri), ids, max_iter)
    out.put(result["solver"])


def run_two_processes(archive: Archive, ids: list[str], max_iter: int) -> dict[str, float]:
    """The loop split over two fresh processes (no Ray), start-up included: what 2 cores give two workers."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_loop_worker, args=(archive.uri, ids[i::2], max_iter, out)) for i in range(2)]
    for proc in procs:
        proc.start()
    solver = out.get() + out.get()
    for proc in procs:
        proc.join()
    return {"wall": time.perf_counter() - t0, "solver": solver}


def run_reprocess(
    archive: Archive, ids: list[str], actors: int, max_iter: int, tracking_uri: str, subset: bool = False
) -> dict[str, float]:
    """The ``medrecon reprocess`` job in this process (on ``ids`` only if ``subset``, else the whole
    archive); wall seconds and what its commit records say."""
    from pipelines.reprocess import reprocess_spec
    from pipelines.runner import run_pipeline

    forget_recons(archive)
    spec = reprocess_spec(
        archive.uri, ["cs_tv"], actors=actors, options={"cs_tv": {"max_iter": max_iter, "tol": 0.0}},
        tracking_uri=tracking_uri, scans=ids if subset else None,
    )  # fmt: skip
    start = time.time()
    t0 = time.perf_counter()
    result = run_pipeline(spec, Console(file=io.StringIO()))
    wall = time.perf_counter() - t0
    (report,) = result.stages
    if report.status != "ran" or report.done != len(ids):
        raise RuntimeError(
            f"reprocess did {report.done} of {len(ids)} scans ({report.status}): {report.failed}"
        )
    return {"wall": wall, **_commit_timing(archive, start, wall), "stage_s": report.seconds}


def _commit_timing(archive: Archive, start: float, wall: float) -> dict[str, float]:
    commits = _recon_commits(archive)
    times = sorted(r["time"] for r in commits)
    return {
        "first_commit": times[0] - start,
        "after_last": wall - (times[-1] - start),
        "solver": sum(r["solver"]["recon_s"] for r in commits),
    }


def run_cli(args: list[str], gcs_address: str, sample: bool = False) -> dict[str, Any]:
    """``python -m pipelines.cli <args>`` attached to this Ray: wall, exit code, printed total, peak RSS."""
    import psutil

    env = {**os.environ, "MEDRECON_RAY_ADDRESS": gcs_address, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "pipelines.cli", *args]
    start, t0 = time.time(), time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        peak, samples = 0, 0
        if sample:
            ps = psutil.Process(proc.pid)
            while proc.poll() is None:
                try:
                    peak = max(peak, ps.memory_info().rss)
                    samples += 1
                except psutil.NoSuchProcess:
                    break
                time.sleep(SAMPLE_S)
        rc = proc.wait(timeout=1800)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {rc}:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    found = re.search(r"^total ([0-9.]+) s;", stdout, re.MULTILINE)
    return {
        "wall": wall,
        "start": start,
        "rc": rc,
        "pipeline_total": float(found.group(1)) if found else None,
        "peak_mb": peak / 2**20,
        "samples": samples,
    }


def throughput(
    archive: Archive, ids: list[str], repeats: int, max_iter: int, tracking_uri: str, log: Console
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import ray

    n = len(ids)
    runs: dict[str, Callable[[], dict[str, float]]] = {
        "loop": lambda: run_loop(archive, ids, max_iter),
        "loop, 2 processes": lambda: run_two_processes(archive, ids, max_iter),
        "reprocess, 1 actor": lambda: run_reprocess(archive, ids, 1, max_iter, tracking_uri),
        "reprocess, 2 actors": lambda: run_reprocess(archive, ids, 2, max_iter, tracking_uri),
    }
    # Warm-up on a few scans: imports, the MLflow database's first migration, Ray Data's first plan.
    t0 = time.perf_counter()
    run_loop(archive, ids[:2], max_iter)
    for k in (1, 2):
        run_reprocess(archive, ids[:k], k, max_iter, tracking_uri, subset=True)
    log.log(f"warm-up {time.perf_counter() - t0:.1f} s")
    measured: dict[str, list[dict[str, float]]] = {k: [] for k in runs}
    for r in range(repeats):  # interleaved, so drift on the shared machine hits all three
        for key, fn in runs.items():
            measured[key].append(measured_with_others_cpu(fn))
        log.log(
            f"repeat {r + 1}/{repeats}: "
            + ", ".join(f"{k} {v[-1]['wall']:.1f} s" for k, v in measured.items())
        )

    forget_recons(archive)
    gcs = ray.get_runtime_context().gcs_address
    cli_args = ["reprocess", archive.uri, "--method", "cs_tv", "--option", f"cs_tv.max_iter={max_iter}",
                "--option", "cs_tv.tol=0", "--actors", "2", "--tracking-uri", tracking_uri]  # fmt: skip
    cli = measured_with_others_cpu(lambda: run_cli(cli_args, gcs))
    cli |= _commit_timing(archive, cli["start"], cli["wall"])
    log.log(f"CLI 2 actors {cli['wall']:.1f} s (pipeline's own total {cli['pipeline_total']} s)")

    def med(key: str, field: str) -> float:
        return statistics.median(m[field] for m in measured[key])

    wall = {k: med(k, "wall") for k in runs}
    loop_scan_s = wall["loop"] / n
    ratio_loop = wall["loop"] / wall["reprocess, 1 actor"]
    ratio_scaling = wall["reprocess, 1 actor"] / wall["reprocess, 2 actors"]
    scaling_applies = loop_scan_s >= BAR_SCAN_S

    ceiling = wall["loop"] / wall["loop, 2 processes"]
    bars = {  # way: (ratio shown, bar, result)
        "loop": (f"s/scan {loop_scan_s:.3f}", f">= {BAR_SCAN_S}", _verdict(scaling_applies)),
        "loop, 2 processes": (f"2 processes / loop {ceiling:.3f}", "- (the 2 cores' ceiling)", "-"),
        "reprocess, 1 actor": (
            f"1 actor / loop {ratio_loop:.3f}",
            f">= {BAR_LOOP}",
            _verdict(ratio_loop >= BAR_LOOP),
        ),
        "reprocess, 2 actors": (
            f"2 actors / 1 actor {ratio_scaling:.3f}",
            f">= {BAR_SCALING}",
            _verdict(ratio_scaling >= BAR_SCALING) if scaling_applies else "n/a (loop < 0.5 s/scan)",
        ),
    }
    rows = []
    for key in runs:
        actors = key.startswith("reprocess")
        ratio, bar, result = bars[key]
        rows.append(
            {
                "way": key,
                "scans": n,
                "wall s (median)": wall[key],
                "repeats s": ", ".join(f"{m['wall']:.1f}" for m in measured[key]),
                "scans/s": n / wall[key],
                "s/scan": wall[key] / n,
                "solver s/scan": med(key, "solver") / n,
                "1st commit s": f"{med(key, 'first_commit'):.2f}" if actors else "-",
                "after last s": f"{med(key, 'after_last'):.2f}" if actors else "-",
                "others' CPU %": round(100 * med(key, "others_cpu"), 1),
                "ratio": ratio,
                "bar": bar,
                "result": result,
            }
        )
    startup = cli["wall"] - (cli["pipeline_total"] or 0.0)
    rows.append(
        {
            "way": "CLI reprocess, 2 actors (1 run)",
            "scans": n,
            "wall s (median)": cli["wall"],
            "repeats s": f"{cli['wall']:.1f}",
            "scans/s": n / cli["wall"],
            "s/scan": cli["wall"] / n,
            "solver s/scan": cli["solver"] / n,
            "1st commit s": f"{cli['first_commit']:.2f}",
            "after last s": f"{cli['after_last']:.2f}",
            "others' CPU %": round(100 * cli["others_cpu"], 1),
            "ratio": f"start-up {startup:.1f} s + job {cli['pipeline_total']} s",
            "bar": "-",
            "result": "-",
        }
    )
    ratios = {"1 actor / loop": ratio_loop, "2 actors / 1 actor": ratio_scaling, "loop s/scan": loop_scan_s,
              "2 processes / loop": ceiling}  # fmt: skip
    detail = {"runs": measured, "cli": cli, "ratios": ratios}
    return rows, detail


# -- part 2: driver memory -------------------------------------------------------------------------
def memory(workdir: Path, sizes: list[int], tracking_uri: str, log: Console) -> list[dict[str, Any]]:
    import ray

    from pipelines.tracking import client

    client(tracking_uri).search_experiments()  # the database exists before either job, so both pay alike
    gcs = ray.get_runtime_context().gcs_address
    rows: list[dict[str, Any]] = []
    for n in sizes:
        t0 = time.perf_counter()
        archive, _ = build_archive(workdir / f"tiny{n}.zarr", n, TINY)
        log.log(f"memory setup, {n} tiny scans: {time.perf_counter() - t0:.1f} s")
        args = ["reprocess", archive.uri, "--method", "zero_filled", "--actors", "2"]
        args += ["--tracking-uri", tracking_uri]
        res = run_cli(args, gcs, sample=True)
        done = len(archive.committed("recon/zero_filled"))
        if done != n:
            raise RuntimeError(f"reprocess of {n} tiny scans committed {done}")
        log.log(f"memory {n} scans: peak {res['peak_mb']:.0f} MB, {res['wall']:.1f} s")
        rows.append(
            {
                "archive": f"{n} x {'x'.join(map(str, TINY))}",
                "driver peak RSS MB": res["peak_mb"],
                "job wall s": res["wall"],
                "pipeline total s": res["pipeline_total"],
                "exit code": res["rc"],
                "RSS samples": res["samples"],
            }
        )
    growth = rows[-1]["driver peak RSS MB"] - rows[0]["driver peak RSS MB"]
    for row in rows:
        row["growth MB"] = "-"
        row["bar"] = "-"
        row["result"] = "-"
    rows[-1] |= {
        "growth MB": f"{growth:.1f} (vs {sizes[0]} scans)",
        "bar": f"< {BAR_GROWTH_MB:.0f}",
        "result": _verdict(growth < BAR_GROWTH_MB),
    }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="12 scans, 2 repeats, 100 and 300 tiny scans")
    parser.add_argument(
        "--scans", type=int, default=None, help="scans in the throughput archive (default 24)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per way (default 3)")
    parser.add_argument("--max-iter", type=int, default=300, help="cs_tv iterations (default 300)")
    parser.add_argument("--skip-throughput", action="store_true", help="only the memory measurement")
    parser.add_argument("--skip-memory", action="store_true", help="only the throughput measurement")
    args = parser.parse_args()
    scans = args.scans or (12 if args.quick else 24)
    repeats = args.repeats or (2 if args.quick else 3)
    sizes = [100, 300] if args.quick else [100, 1000]

    import ray

    log = Console(stderr=True)
    wide = Console(width=max(Console().width, 220))  # tables unwrapped when piped to a file
    t_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-reprocess-", dir=os.environ.get("TMPDIR")))
    tracking_uri = f"sqlite:///{workdir}/mlflow.db"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    payload: dict[str, Any] = {"scans": scans, "shape": SHAPE, "repeats": repeats, "max_iter": args.max_iter}
    payload |= {
        "tiny_sizes": sizes,
        "tiny_shape": TINY,
        "quick": args.quick,
        "loadavg_start": os.getloadavg(),
    }
    try:
        if not args.skip_throughput:
            t0 = time.perf_counter()
            archive, ids = build_archive(workdir / "throughput.zarr", scans, SHAPE)
            log.log(f"throughput setup {time.perf_counter() - t0:.1f} s")
            rows, detail = throughput(archive, ids, repeats, args.max_iter, tracking_uri, log)
            print_table(
                f"Reprocess throughput: {scans} scans of {'x'.join(map(str, SHAPE))}, cs_tv max_iter="
                f"{args.max_iter} tol=0, 1 torch thread per process, Ray 2 CPUs; medians of {repeats}",
                rows,
                wide,
            )
            nice = ray.get(ray.remote(num_cpus=0)(_niceness).remote())
            wide.print(
                f"Ray workers run at nice {nice} (RAY_worker_niceness), this process at nice {os.nice(0)}: "
                'CPU that other processes take ("others\' CPU %") slows the actors more than the loop.'
            )
            payload["throughput"] = {"rows": rows, "ray_worker_niceness": nice, **detail}
        if not args.skip_memory:
            rows = memory(workdir, sizes, tracking_uri, log)
            print_table(
                f"Reprocess driver memory: peak RSS of the CLI driver (psutil every {SAMPLE_S * 1000:.0f} "
                "ms), --method zero_filled --actors 2, attached to this Ray",
                rows,
                wide,
            )
            payload["memory"] = rows
    finally:
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    write_run("reprocess", payload, t_start)


if __name__ == "__main__":
    main()
