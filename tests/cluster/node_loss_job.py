"""A 3-node Ray cluster in one process, a clean pipeline run and one that loses a worker node per stage.

Run by tests/cluster/test_node_loss.py in a child process (the pytest session holds its own
embedded Ray)::

    python -m tests.cluster.node_loss_job --root DIR --out REPORT.json [--scans 30]

It starts :class:`ray.cluster_utils.Cluster`: a head with no CPUs (the driver's node; no task lands
there) and two workers of 1 CPU each. Through the real runner (:func:`pipelines.runner.run_pipeline`,
``ray.address`` = the cluster) it runs the same tiny pipeline twice, into two archives:

* ``clean``: phantoms, simulate, recon, nothing removed;
* ``lossy``: the same, but a watcher thread removes a worker node in the middle of simulate (once a
  few scans are committed, the node that committed the latest one: it is busy) and adds a fresh
  one, then removes a worker in the middle of recon the same way.

Two records of commits, made to tell a scan committed twice from one committed once, which the
commit records cannot (a second commit overwrites the first):

* :class:`RecordWrites` counts, from the kernel (inotify), every commit record put in place in the
  archive's unit folders: each commit is one rename of a finished temporary file onto
  ``_meta/commits/<unit>/<scan>.json``, so two commits of a scan are two events, whichever process
  or node made them and even if that process was killed the next instant. This is what the test's
  exactly-once check counts.
* The journal (``journal.jsonl``): a ``worker_process_setup_hook`` wraps
  :meth:`pipelines.store.Archive.commit` in every worker of the job to append a line after each
  commit, naming the node (how the test knows tasks ran on more than one node). Writes of arrays
  are journaled too (``write``): work redone after a node loss shows there. A worker killed right
  after a commit may miss its line, so the journal is not what counts commits.

The report (``--out``) has, per run, the stage reports, the record writes per unit and scan and, for
the lossy run, the removals (node, stage unit, how many scans were committed when it went); the
test reads the archives and the journal itself.

Cleanup: every Ray process of the cluster runs with ``RAY_TMPDIR`` set to a private folder made
here, and is ended by :meth:`Cluster.shutdown` (never ``ray stop``); the folder also keeps Ray's
``ray_current_cluster`` file away from other Ray users of the machine.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import shutil
import struct
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

#: The journal every worker appends its commits to (set through the job's runtime_env).
JOURNAL_ENV = "MEDRECON_TEST_COMMIT_JOURNAL"
#: ``SECONDS:ARCHIVE``: each array write into ARCHIVE waits SECONDS first (slow storage), so that with
#: tiny scans a stage of the lossy run still lasts long enough (about 2 s) for a node to be removed
#: while it runs, and a task is likely caught mid-write.
SLOW_WRITE_ENV = "MEDRECON_TEST_SLOW_WRITES"
OBJECT_STORE = 80 * 1024 * 1024  # per node: the scans are tiny
RECON_METHODS = ["zero_filled", "cg_sense"]
#: Ray settings of the test cluster (the head passes them to every node):
#: * a node that dies without saying so (``--hard``) is declared dead after about 5 s instead of Ray's
#:   default of about 15 s (its tasks are retried only then); lenient enough for a loaded 2-core VM;
#: * idle workers are kept a minute (not 1 s), so the second run does not start Python processes anew.
SYSTEM_CONFIG = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 2000,
    "health_check_failure_threshold": 5,
    "idle_worker_killing_time_threshold_ms": 60_000,
    "num_workers_soft_limit": 3,
}
UNITS = ["source", "measurements", *(f"recon/{m}" for m in RECON_METHODS)]  # the pipeline's commit units
ROOT = Path(__file__).resolve().parents[2]


# -- the commit journal (runs in every Ray worker of the job) -------------------------------------
def _append(path: str, entry: dict[str, Any]) -> None:
    """One JSON line in one O_APPEND write: lines from concurrent processes never interleave."""
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def install_journal(path: str) -> None:
    """Make :class:`~pipelines.store.Archive` journal every commit and array write to ``path``.

    A commit is journaled after its record is in place, so a line is a commit that happened.
    """
    from pipelines.store import Archive

    if getattr(Archive.commit, "_journal", None) == path:
        return
    commit, create_array, write_array = Archive.commit, Archive.create_array, Archive.write_array
    seconds, _, slow_archive = (os.environ.get(SLOW_WRITE_ENV) or "0:").partition(":")

    def slow(archive: Archive) -> None:
        if archive.uri == slow_archive:
            time.sleep(float(seconds))

    def entry(archive: Archive, event: str, scan_id: str, **more: Any) -> dict[str, Any]:
        return {
            "event": event,
            "archive": archive.uri,
            "scan": scan_id,
            "node": _node(),
            "pid": os.getpid(),
            "t": time.time(),
            **more,
        }

    def journaled_commit(
        self: Archive, unit: str, scan_id: str, fingerprint: str, *args: Any, **kw: Any
    ) -> None:
        commit(self, unit, scan_id, fingerprint, *args, **kw)
        _append(path, entry(self, "commit", scan_id, unit=unit, fingerprint=fingerprint))

    def journaled_create(self: Archive, scan_id: str, name: str, *args: Any, **kw: Any) -> Any:
        _append(path, entry(self, "write", scan_id, name=name))
        slow(self)
        return create_array(self, scan_id, name, *args, **kw)

    def journaled_write(self: Archive, scan_id: str, name: str, *args: Any, **kw: Any) -> Any:
        _append(path, entry(self, "write", scan_id, name=name))
        slow(self)
        return write_array(self, scan_id, name, *args, **kw)

    journaled_commit._journal = path  # type: ignore[attr-defined]
    Archive.commit = journaled_commit  # type: ignore[method-assign]
    Archive.create_array = journaled_create  # type: ignore[method-assign]
    Archive.write_array = journaled_write  # type: ignore[method-assign]


def journal_hook() -> None:
    """The job's ``worker_process_setup_hook``: journal this worker's commits."""
    path = os.environ.get(JOURNAL_ENV)
    if path:
        install_journal(path)


def read_journal(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


# -- commit records written, as the kernel saw them ----------------------------------------------
class RecordWrites(threading.Thread):
    """Counts the ``<scan>.json`` files renamed or written into the given unit folders (inotify).

    The folders are created first (the archive's own writes would create them later: too late to
    watch). ``counts[unit][scan]`` is how many times that scan's commit record was put in place.
    """

    IN_CLOSE_WRITE, IN_MOVED_TO, IN_Q_OVERFLOW = 0x8, 0x80, 0x4000

    def __init__(self, archive: Path, units: list[str]) -> None:
        super().__init__(daemon=True, name="record-writes")
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.units: dict[int, str] = {}
        for unit in units:
            folder = archive / "_meta" / "commits" / unit
            folder.mkdir(parents=True, exist_ok=True)
            wd = libc.inotify_add_watch(self.fd, str(folder).encode(), self.IN_CLOSE_WRITE | self.IN_MOVED_TO)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
            self.units[wd] = unit
        self.counts: dict[str, dict[str, int]] = {unit: {} for unit in units}
        self.overflow = False
        self._done = threading.Event()

    def _drain(self) -> None:
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            offset = 0
            while offset < len(buf):
                wd, mask, _cookie, size = struct.unpack_from("iIII", buf, offset)
                name = buf[offset + 16 : offset + 16 + size].rstrip(b"\0").decode()
                offset += 16 + size
                self.overflow |= bool(mask & self.IN_Q_OVERFLOW)
                if wd in self.units and name.endswith(".json"):  # not the temporary files
                    scans = self.counts[self.units[wd]]
                    scans[name[: -len(".json")]] = scans.get(name[: -len(".json")], 0) + 1

    def run(self) -> None:
        while not self._done.is_set():
            select.select([self.fd], [], [], 0.1)
            self._drain()

    def stop(self) -> dict[str, dict[str, int]]:
        """Stop after reading every event so far; the counts."""
        self._done.set()
        self.join()
        self._drain()
        os.close(self.fd)
        return self.counts


# -- the pipeline --------------------------------------------------------------------------------
def pipeline_spec(root: Path, name: str, address: str, scans: int) -> Any:
    """A tiny MRI pipeline of ``scans`` phantoms of (8, 32, 32): simulate, recon every scan."""
    from pipelines.spec import PipelineSpec

    return PipelineSpec.model_validate(
        {
            "name": f"node-loss-{name}",
            "seed": 0,
            "archive": {"path": str(root / name / "archive")},
            "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "node-loss"},
            "ray": {"address": address},
            "stages": [
                {
                    "kind": "phantoms",
                    "n_scans": scans,
                    "shape": [8, 32, 32],
                    "split": {"train": 1, "val": 0, "test": scans - 1},
                },
                {
                    "kind": "simulate",
                    "modality": "mri",
                    "snr_db": 30,
                    "mask": {"kind": "random_1d", "acceleration": 4, "center_fraction": 0.08},
                },
                {
                    "kind": "recon",
                    "methods": RECON_METHODS,
                    "split": "all",
                    "actors": 2,
                    "cpus_per_actor": 0.5,
                    "options": {"cg_sense": {"max_iter": 30}},
                },
            ],
        }
    )


def stage_reports(result: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": r.name,
            "kind": r.kind,
            "status": r.status,
            "seconds": round(r.seconds, 2),
            "done": r.done,
            "skipped": r.skipped,
            "failed": r.failed,
        }
        for r in result.stages
    ]


# -- removing nodes mid-stage ---------------------------------------------------------------------
class NodeKiller:
    """Watches a run's commit records; per phase, removes a busy worker node once ``after`` scans of
    the phase's unit are committed (and, where asked, adds a fresh worker node right after).

    It runs in the main thread (Ray starts a node only there: it installs signal handlers), while
    the pipeline runs in another.
    """

    def __init__(
        self,
        cluster: Any,
        archive: Path,
        journal: Path,
        phases: list[tuple[str, bool]],
        after: int,
        hard: bool = False,
    ) -> None:
        self.cluster, self.archive, self.journal = cluster, archive, journal
        self.phases, self.after, self.graceful = phases, after, not hard
        self.removals: list[dict[str, Any]] = []

    def committed(self, unit: str) -> int:
        folder = self.archive / "_meta" / "commits" / unit
        try:
            return sum(name.endswith(".json") for name in os.listdir(folder))
        except FileNotFoundError:
            return 0

    def busy_worker(self, unit: str) -> Any:
        """The worker node that committed the latest scan of ``unit`` (it has work running), else any."""
        workers = {n.node_id: n for n in self.cluster.worker_nodes}
        uri = str(self.archive)
        for line in reversed(read_journal(self.journal)):
            if line["event"] == "commit" and line["archive"] == uri and line["unit"] == unit:
                if line["node"] in workers:
                    return workers[line["node"]]
        return next(iter(workers.values()))

    def watch(self, running: Any) -> None:
        """Run the phases until they are done or not ``running()`` (the pipeline ended)."""
        for unit, add_back in self.phases:
            while self.committed(unit) < self.after:
                if not running():
                    return
                time.sleep(0.01)
            node = self.busy_worker(unit)
            before = self.committed(unit)
            t0 = time.time()
            self.cluster.remove_node(node, allow_graceful=self.graceful)
            removal = {
                "unit": unit,
                "node": node.node_id,
                "committed_before": before,
                "started": t0,
                "removed": time.time(),
                "committed_after": self.committed(unit),
            }
            if add_back:
                removal["added"] = self.cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE).node_id
                removal["add_s"] = round(time.time() - removal["removed"], 2)
            self.removals.append(removal)
            print(f"node-loss: removed {removal}", file=sys.stderr, flush=True)


class PipelineThread(threading.Thread):
    """:func:`pipelines.runner.run_pipeline` in a thread of its own: its result, or its traceback."""

    def __init__(self, spec: Any, console: Any) -> None:
        super().__init__(daemon=True, name="pipeline")
        self.spec, self.console = spec, console
        self.result: Any = None
        self.error: str | None = None

    def run(self) -> None:
        from pipelines.runner import run_pipeline

        try:
            self.result = run_pipeline(self.spec, self.console)
        except BaseException:
            self.error = traceback.format_exc()


# -- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="a new folder for archives, MLflow, journal")
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    parser.add_argument("--scans", type=int, default=30)
    parser.add_argument(
        "--slow-write", type=float, default=0.05, help="seconds each write of the lossy run waits"
    )
    parser.add_argument(
        "--hard", action="store_true", help="SIGKILL the node's processes (default: SIGTERM, then SIGKILL)"
    )
    parser.add_argument("--after", type=int, default=4, help="committed scans of a stage before a node goes")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    journal = root / "journal.jsonl"
    # Before Ray is imported: a private temp folder (short: Unix socket paths are limited) that every
    # process of the cluster inherits, no auth token (loopback only), no usage stats.
    ray_tmp = tempfile.mkdtemp(prefix="nl", dir=os.environ.get("TMPDIR") or None)
    os.environ.update(
        RAY_TMPDIR=ray_tmp,
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        MEDRECON_PROGRESS_EVERY="1",
    )
    os.environ.pop("MEDRECON_RAY_ADDRESS", None)
    # Workers import the setup hook (this module) before Ray adds the driver's sys.path to theirs.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

    import ray
    from ray.cluster_utils import Cluster
    from rich.console import Console

    report: dict[str, Any] = {
        "root": str(root),
        "journal": str(journal),
        "ray_tmp": ray_tmp,
        "scans": args.scans,
    }
    console = Console(file=sys.stderr, width=140)
    t_start = time.monotonic()
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "object_store_memory": OBJECT_STORE,
                "include_dashboard": False,
                "_system_config": SYSTEM_CONFIG,
            },
        )
        for _ in range(2):  # starting together
            cluster.add_node(wait=False, num_cpus=1, object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes()
        report["cluster_start_s"] = round(time.monotonic() - t_start, 2)
        report["nodes"] = {
            "head": cluster.head_node.node_id,
            "workers": [n.node_id for n in cluster.worker_nodes],
        }
        # Connected here rather than by the runner only to give the job its setup hook (the journal);
        # the runner attaches to this connection, as it would to ray.init(address=...) of its own.
        ray.init(
            address=cluster.address,
            logging_level="WARNING",
            log_to_driver=False,
            runtime_env={
                "worker_process_setup_hook": "tests.cluster.node_loss_job.journal_hook",
                "env_vars": {
                    JOURNAL_ENV: str(journal),
                    SLOW_WRITE_ENV: f"{args.slow_write}:{root / 'lossy' / 'archive'}",
                    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                },
            },
        )
        install_journal(str(journal))  # the driver's own commits (none expected) count too

        for name in ("clean", "lossy"):
            t0 = time.monotonic()
            writes = RecordWrites(root / name / "archive", UNITS)
            writes.start()
            pipeline = PipelineThread(pipeline_spec(root, name, cluster.address, args.scans), console)
            pipeline.start()
            run: dict[str, Any] = {}
            if name == "lossy":
                phases = [("measurements", True), (f"recon/{RECON_METHODS[0]}", False)]
                killer = NodeKiller(cluster, root / name / "archive", journal, phases, args.after, args.hard)
                try:
                    killer.watch(pipeline.is_alive)
                finally:
                    run["removals"] = killer.removals
            pipeline.join()
            run |= {"record_writes": writes.stop(), "record_writes_overflow": writes.overflow}
            if pipeline.error is not None:
                raise RuntimeError(f"the {name} pipeline failed:\n{pipeline.error}")
            result = pipeline.result
            run |= {
                "seconds": round(time.monotonic() - t0, 2),
                "archive": result.archive_uri,
                "stages": stage_reports(result),
                "quarantined": result.quarantined,
            }
            report[name] = run
        report["ok"] = True
    except BaseException:
        report["ok"] = False
        report["error"] = traceback.format_exc()
        print(report["error"], file=sys.stderr, flush=True)
    finally:
        t0 = time.monotonic()
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        report["shutdown_s"] = round(time.monotonic() - t0, 2)
        report["total_s"] = round(time.monotonic() - t_start, 2)
        args.out.write_text(json.dumps(report, indent=1, default=str))
        if report["ok"]:  # else Ray's logs stay there to read
            shutil.rmtree(ray_tmp, ignore_errors=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
