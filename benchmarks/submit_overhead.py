"""What `medrecon submit` costs beyond the pipeline's own run time, on a real local Ray head.

The bar: submitting to the local head and reaching SUCCEEDED costs under 60 s beyond the pipeline's
own run time.

Setup (not timed): one head, ``ray start --head --block`` with token auth on loopback and 2 CPUs
(:class:`tests.cluster.head.RayHead`, the one the tests use), and the test pipeline
``tests/cluster/specs/tiny.yaml`` (4 phantoms of 8x32x32, MRI simulation, zero-filled recon,
evaluate; about 10 s of work).

Two ways, interleaved, ``--repeats`` times each (default 3), each on a fresh archive (so a new
fingerprint, so a new job, and no stage skipped):

* ``submit --wait``: the wall time of ``medrecon submit SPEC --address HEAD --wait`` as a user runs
  it, from the command's start to its exit after the job reached SUCCEEDED: the CLI's start, the
  repository's packaging and upload, the job's runtime environment, the driver's start on the head,
  the pipeline, and following the log to the end;
* ``run, attached``: the same pipeline with ``medrecon run`` on this machine attached to the same
  head (``MEDRECON_RAY_ADDRESS`` = its GCS address): the same CLI, pipeline and cluster, with no
  Jobs API.

Both print the pipeline's own time (the runner's ``total N s`` line). Reported: medians of the wall
times, of the pipeline's own time, and of the overheads ``wall - pipeline``; the bar is checked on
the submitted one. The difference of the two overheads is what the Jobs API adds.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TMPDIR", str(ROOT / ".tmp"))
os.environ.setdefault("RAY_TMPDIR", str(ROOT / ".tmp"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.timing import print_table, write_run  # noqa: E402
from tests.cluster.head import BIN, RayHead  # noqa: E402

SPEC = "tests/cluster/specs/tiny.yaml"
BAR_S = 60.0
_TOTAL = re.compile(r"^total ([\d.]+) s;", re.MULTILINE)


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """``(wall s, the pipeline's own s, output)`` of one command that runs the pipeline."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    out = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}:\n{out[-3000:]}")
    found = _TOTAL.search(out)
    if not found:
        raise RuntimeError(f"no 'total N s' line in the output of {' '.join(cmd)}:\n{out[-3000:]}")
    return wall, float(found.group(1)), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows: dict[str, list[tuple[float, float]]] = {"submit --wait": [], "run, attached": []}
    work = Path(tempfile.mkdtemp(prefix="submit-bench-", dir=os.environ["TMPDIR"]))
    loadavg_start = os.getloadavg()
    t_head = time.perf_counter()
    with RayHead(num_cpus=2) as head:
        head_start = time.perf_counter() - t_head
        medrecon = str(BIN / "medrecon")
        for i in range(args.repeats):
            for way in rows:
                archive = work / f"{way.split()[0]}-{i}" / "archive"
                if way == "submit --wait":
                    cmd = [medrecon, "submit", SPEC, "--address", head.address, "--wait"]
                    env = head.env()
                else:
                    cmd = [medrecon, "run", SPEC]
                    env = head.env() | {"MEDRECON_RAY_ADDRESS": head.gcs_address}
                cmd += ["--set", f"archive.path={archive}"]
                wall, own, _ = _timed(cmd, env)
                rows[way].append((wall, own))
                print(f"  {way:14s} repeat {i + 1}: wall {wall:.1f} s, pipeline {own:.1f} s", flush=True)
    table = []
    summary = {}
    for way, runs in rows.items():
        wall = statistics.median(w for w, _ in runs)
        own = statistics.median(o for _, o in runs)
        overhead = statistics.median(w - o for w, o in runs)
        summary[way] = {"wall_s": wall, "pipeline_s": own, "overhead_s": overhead, "runs": runs}
        table.append({"way": way, "wall (s)": wall, "pipeline (s)": own, "overhead (s)": overhead,
                      "repeats": len(runs)})  # fmt: skip
    submitted = summary["submit --wait"]["overhead_s"]
    added = submitted - summary["run, attached"]["overhead_s"]
    title = f"Submit overhead on a local Ray head (medians of {args.repeats}; head start {head_start:.1f} s)"
    print_table(title, table)
    verdict = "PASS" if submitted < BAR_S else "MISS"
    print(f"submit overhead {submitted:.1f} s beyond the pipeline's own time (bar < {BAR_S:.0f} s): "
          f"{verdict}; the Jobs API adds {added:.1f} s to an attached run's")  # fmt: skip
    write_run(
        "submit_overhead",
        {"bar_s": BAR_S, "head_start_s": head_start, "ways": summary, "jobs_api_adds_s": added,
         "verdict": verdict, "loadavg_start": loadavg_start},
        t_head,
    )  # fmt: skip
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
