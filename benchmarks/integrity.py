"""What checking every read costs the recon stage: checksummed reads against unchecked ones.

An archive of ``N`` simulated scans (quickstart-sized by default: 16x96x96, single-coil Cartesian
MRI at 4x; or 8 coils with ``--coils 8``) is reconstructed by the recon stage's own code
(:class:`pipelines.recon.Reconstructor`, in this process, one torch thread, as one Ray actor runs
it), per method, in two ways, interleaved over repeats:

* ``checked``: as shipped: every read loads the array's commit record and compares a CRC-32 per
  slab (:class:`pipelines.integrity.ArrayReader`), every write records one
  (:class:`pipelines.integrity.SlabWriter`);
* ``unchecked``: the same code with those checks switched off (reads return the Zarr data, writes
  record no CRC), i.e. what the stage cost before integrity was added.

It reports seconds per scan (medians) and the overhead ``checked / unchecked - 1``; the issue's
bar is under 5%. ``zero_filled`` is the worst case (the cheapest method, so I/O is the largest
share); ``cs_tv`` is the quickstart's iterative method.

Run: ``python benchmarks/integrity.py [--quick] [--coils 8]``; writes ``benchmarks/results/integrity.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [
    p for p in sys.path if p and Path(p).resolve() != Path(__file__).resolve().parent
]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

import pipelines.integrity as integrity  # noqa: E402
from benchmarks.timing import print_table, write_json  # noqa: E402
from operators.phantoms import random_ellipsoids  # noqa: E402
from pipelines.fanout import process_scan  # noqa: E402
from pipelines.methods import parse_method  # noqa: E402
from pipelines.recon import Reconstructor, recon_code_version, resolve_methods  # noqa: E402
from pipelines.simulate import simulate_scan  # noqa: E402
from pipelines.spec import SimulateStage, SolverOptions  # noqa: E402
from pipelines.store import MEASUREMENTS, SOURCE, Archive  # noqa: E402

BAR = 0.05


def build(root: Path, n: int, shape: tuple[int, int, int], coils: int) -> Archive:
    archive = Archive(str(root), create=True)
    stage = SimulateStage(kind="simulate", coils=coils)
    for i in range(n):
        sid = f"s{i:03d}"
        record = archive.write_array(sid, "image", random_ellipsoids(shape, seed=i).image)
        archive.commit(SOURCE, sid, "bench", arrays={"image": record})
        outcome = process_scan(
            archive, MEASUREMENTS, sid, "bench", simulate_scan, [], {"stage": stage, "seed": 0}
        )
        assert outcome.status == "done", outcome.error
    return archive


@contextmanager
def unchecked() -> Any:
    """Switch the integrity checks off: reads return Zarr's data, writes keep no CRC."""
    reader_init, reader_read, crc = integrity.ArrayReader.__init__, integrity.ArrayReader.read, integrity._crc

    def init(self: Any, archive: Any, scan_id: str, name: str, record: Any = None) -> None:
        self.archive, self.array, self.where = archive, archive.open_array(scan_id, name), f"{scan_id}/{name}"
        self.record = None

    def read(self: Any, z0: int | None = None, z1: int | None = None) -> np.ndarray:
        return np.asarray(self.array[z0:z1])

    integrity.ArrayReader.__init__, integrity.ArrayReader.read = init, read  # type: ignore[method-assign]
    integrity._crc = lambda block: 0
    try:
        yield
    finally:
        integrity.ArrayReader.__init__, integrity.ArrayReader.read = reader_init, reader_read  # type: ignore[method-assign]
        integrity._crc = crc


def reconstruct_all(archive: Archive, method: str, options: dict[str, Any]) -> float:
    """Seconds for the Reconstructor to do every scan anew with ``method``."""
    for scan in archive.committed(f"recon/{method}"):
        archive.uncommit(f"recon/{method}", scan)
    resolved = resolve_methods(
        [parse_method(method)], {method: SolverOptions(**options)}, "sqlite:///unused.db"
    )
    fps = {m.key: m.fingerprint("bench", recon_code_version()) for m in resolved}
    rec = Reconstructor(archive.uri, {}, [asdict(m) for m in resolved], fps)
    ids = np.array(sorted(archive.committed(MEASUREMENTS)))
    t0 = time.perf_counter()
    out = rec({"scan_id": ids})
    seconds = time.perf_counter() - t0
    assert set(out["status"]) == {"done"}, out["error"]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="8 scans, 3 repeats")
    parser.add_argument("--scans", type=int, default=None, help="scans (default 24; quick 8)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per way (default 7; quick 3)")
    parser.add_argument("--coils", type=int, default=1, help="receive coils (default 1)")
    args = parser.parse_args()
    n = args.scans or (8 if args.quick else 24)
    repeats = args.repeats or (3 if args.quick else 7)
    shape = (16, 96, 96)
    torch.set_num_threads(1)
    log = Console(stderr=True)
    t_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-integrity-", dir=os.environ.get("TMPDIR")))
    rows: list[dict[str, Any]] = []
    try:
        archive = build(workdir / "a.zarr", n, shape, args.coils)
        methods = {"zero_filled": {}, "cs_tv": {"max_iter": 100, "tol": 0.0}}
        for method, options in methods.items():
            times: dict[str, list[float]] = {"checked": [], "unchecked": []}
            reconstruct_all(archive, method, options)  # warm-up
            for r in range(repeats):
                times["checked"].append(reconstruct_all(archive, method, options))
                with unchecked():
                    times["unchecked"].append(reconstruct_all(archive, method, options))
                log.log(
                    f"{method} {r + 1}/{repeats}: "
                    + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items())
                )
            med = {k: statistics.median(v) for k, v in times.items()}
            overhead = med["checked"] / med["unchecked"] - 1
            rows.append(
                {
                    "method": method + (f" (max_iter {options['max_iter']})" if options else ""),
                    "scans": n,
                    "checked s/scan": med["checked"] / n,
                    "unchecked s/scan": med["unchecked"] / n,
                    "overhead": overhead,
                    "overhead best-of": min(times["checked"]) / min(times["unchecked"]) - 1,
                    "bar<5%": "pass" if overhead < BAR else "MISS",
                    "_times": times,
                }
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    title = f"Recon stage with and without integrity checks: {n} scans {'x'.join(map(str, shape))}, "
    title += f"{args.coils} coil(s), 1 thread, medians of {repeats}"
    print_table(title, [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
                Console(width=max(Console().width, 160)))  # fmt: skip
    payload = {"rows": rows, "coils": args.coils, "wall_s": time.perf_counter() - t_start}
    path = write_json("integrity", payload)
    print(f"wrote {path} (wall {payload['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
