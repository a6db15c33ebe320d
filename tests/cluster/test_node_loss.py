"""A killed node (issue "Clusters for real"): a worker node removed in the middle of simulate and of recon.

:mod:`tests.cluster.node_loss_job` runs, in a child process (this session has its own embedded
Ray), a 3-node :class:`ray.cluster_utils.Cluster` and the same 30-scan pipeline twice through
:func:`pipelines.runner.run_pipeline`: a clean run, and a run that loses a busy worker node in the
middle of simulate (a fresh one joins) and again in the middle of recon. The bar: both stages
complete, 0 scans lost, 0 duplicated, every output's checksum equal to the clean run's.

"Exactly once" is checked on the writes of commit records, not on the records themselves: a second
commit of a scan overwrites its record, so the records alone cannot show it. The job counts, from
the kernel (inotify), every commit record put in place in each unit folder; two commits of one scan
are two, whichever node made them. A retried task that finds the scan committed with the same
fingerprint skips it and writes no record: that is not a duplicate. The workers' journal of commits
(one line per commit, naming the node) must agree, and tells on which nodes the tasks ran.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines.store import SOURCE, Archive
from tests.cluster.node_loss_job import RECON_METHODS, UNITS, read_journal

ROOT = Path(__file__).resolve().parents[2]
SCANS = 30
JOB_TIMEOUT_S = 240  # the job takes ~50-80 s on the 2-core VM
MARKER = "MEDRECON_NODE_LOSS_JOB"  # in the environment of every process of the job's cluster
RECON_UNITS = [f"recon/{m}" for m in RECON_METHODS]
ARRAYS = {SOURCE: ["image", "labels"], "measurements": ["kspace", "mask"], **{u: [u] for u in RECON_UNITS}}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(JOB_TIMEOUT_S + 60)]


@dataclass(frozen=True)
class Job:
    report: dict[str, Any]
    journal: list[dict[str, Any]]
    leftovers: list[str]
    output: str

    def archive(self, run: str) -> Archive:
        return Archive(self.report[run]["archive"])

    def commits(self, run: str, unit: str | None = None) -> list[dict[str, Any]]:
        uri = self.report[run]["archive"]
        return [
            e
            for e in self.journal
            if e["event"] == "commit" and e["archive"] == uri and (unit is None or e["unit"] == unit)
        ]


def _processes_with(marker: str) -> list[Any]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.environ().get(MARKER) == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _leftovers(marker: str, grace_s: float = 10.0) -> list[str]:
    """The job's processes still alive ``grace_s`` after it ended; they are killed (they are ours)."""
    deadline = time.monotonic() + grace_s
    while (procs := _processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = []
    for proc in procs:
        try:
            left.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
        except Exception:  # already gone
            continue
    return left


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    root = tmp_path_factory.mktemp("node_loss")
    out = root / "report.json"
    marker = uuid.uuid4().hex
    env = {**os.environ, MARKER: marker, "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_ADDRESS", "MEDRECON_RAY_ADDRESS"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "tests.cluster.node_loss_job", "--root", str(root), "--out", str(out)]
    cmd += ["--scans", str(SCANS)]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the job's own process group
        output, _ = proc.communicate()
        _leftovers(marker, grace_s=2.0)
        pytest.fail(f"the node-loss job ran past {JOB_TIMEOUT_S} s; its output ends:\n{output[-6000:]}")
    leftovers = _leftovers(marker)
    report = json.loads(out.read_text()) if out.exists() else {}
    assert proc.returncode == 0 and report.get("ok"), (
        f"the node-loss job failed (rc {proc.returncode}): {report.get('error', '')}\n"
        f"output:\n{output[-6000:]}"
    )
    print(
        f"\nnode-loss job: {time.monotonic() - t0:.1f} s (cluster start {report['cluster_start_s']} s, "
        f"clean run {report['clean']['seconds']} s, lossy run {report['lossy']['seconds']} s); "
        f"removals: {[(r['unit'], r['committed_before']) for r in report['lossy']['removals']]}"
    )
    return Job(report, read_journal(report["journal"]), leftovers, output)


@pytest.mark.parametrize("run", ["clean", "lossy"])
def test_every_stage_completes_with_every_scan_committed_and_none_quarantined(job: Job, run: str) -> None:
    report = job.report[run]
    stages = {s["name"]: s for s in report["stages"]}
    assert [s["status"] for s in report["stages"]] == ["ran", "ran", "ran"], report["stages"]
    for name in ("simulate", "recon"):
        assert stages[name]["failed"] == {}, stages[name]
        assert stages[name]["done"] + stages[name]["skipped"] == SCANS, stages[name]
    assert report["quarantined"] == []
    archive = job.archive(run)
    scans = archive.scans("all")
    assert len(scans) == SCANS
    for unit in UNITS:
        assert sorted(archive.committed(unit)) == sorted(scans), f"{run}: {unit} lacks scans"
        assert archive.quarantined(unit) == {}, f"{run}: {unit} quarantined scans"


@pytest.mark.parametrize("run", ["clean", "lossy"])
def test_every_scan_is_committed_exactly_once(job: Job, run: str) -> None:
    scans = sorted(job.archive(run).scans("all"))
    writes = job.report[run]["record_writes"]
    assert not job.report[run]["record_writes_overflow"], "the kernel dropped events: counts unknown"
    for unit in UNITS:
        counts = writes[unit]
        duplicated = {scan: n for scan, n in counts.items() if n != 1}
        lost = sorted(set(scans) - set(counts))
        assert not duplicated and not lost, (
            f"{run} {unit}: committed more than once {duplicated}, never {lost}"
        )
        assert sorted(counts) == scans
        # the workers' journal agrees (a worker killed right after a commit may miss its line)
        journaled = Counter(e["scan"] for e in job.commits(run, unit))
        assert all(journaled[scan] <= counts.get(scan, 0) for scan in journaled), (unit, journaled)
        assert sum(journaled.values()) >= len(scans) - 2, f"{run} {unit}: the journal lacks commits"


def test_outputs_equal_the_clean_run(job: Job) -> None:
    """Same fingerprints and array checksums in the commit records, and the same bytes read back
    (every read is checked against its record's CRCs)."""
    clean, lossy = job.archive("clean"), job.archive("lossy")
    assert lossy.scans("all") == clean.scans("all")
    for unit in UNITS:
        assert lossy.committed(unit) == clean.committed(unit), f"{unit}: fingerprints differ"
    for scan in clean.scans("all"):
        for unit in UNITS:
            a, b = clean.commit_record(unit, scan), lossy.commit_record(unit, scan)
            assert a is not None and b is not None
            assert b["arrays"] == a["arrays"], f"{scan} {unit}: checksums differ from the clean run's"
            for name in ARRAYS[unit]:
                assert np.array_equal(lossy.read_array(scan, name), clean.read_array(scan, name)), (
                    f"{scan} {name}"
                )


def test_a_busy_worker_node_was_lost_in_each_stage_and_tasks_ran_on_several_nodes(job: Job) -> None:
    nodes = job.report["nodes"]
    removals = job.report["lossy"]["removals"]
    assert [r["unit"] for r in removals] == ["measurements", RECON_UNITS[0]], removals
    assert all(r["node"] in nodes["workers"] + [removals[0].get("added")] for r in removals)
    assert removals[0].get("added"), "a fresh worker joins after the first loss"
    for removal in removals:
        unit = removal["unit"]
        commits = job.commits("lossy", unit)
        mine = [e for e in commits if e["node"] == removal["node"]]
        after = [e for e in commits if e["t"] > removal["removed"]]
        # mid-stage: the node had committed some of the stage's scans, and the stage went on after it was gone
        assert mine, f"{unit}: the removed node committed nothing of the stage"
        assert 0 < removal["committed_before"] < SCANS and after, removal
    for run in ("clean", "lossy"):
        for unit in ("measurements", *RECON_UNITS):
            used = {e["node"] for e in job.commits(run, unit)}
            assert len(used) > 1, f"{run} {unit}: every scan was committed on one node"
            assert nodes["head"] not in used, "the head has no CPUs: no task runs there"


def test_no_ray_process_of_the_cluster_is_left_behind(job: Job) -> None:
    assert job.leftovers == []
