"""A real Ray head node on loopback, with token auth: ``ray start --head --block`` as a child process.

Used by tests/cluster/test_jobs.py and benchmarks/submit_overhead.py. Every port is a free one
(the session's embedded Ray holds some of Ray's defaults), the head keeps its session files in a
short folder of its own (Unix sockets have a path limit), and it is ended by its PID, never by
``ray stop`` (which ends every Ray on the machine). The Jobs API is polled over plain HTTP with the
token as a Bearer header, as any HTTP client would.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.cluster.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: `medrecon` and `ray` live there


class RayHead:
    """Start with :meth:`start`, end with :meth:`stop` (or use it as a context manager)."""

    def __init__(self, num_cpus: int = 2, token: str | None = None) -> None:
        self.token = token or secrets.token_hex(24)
        self.num_cpus = num_cpus
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"  # the Jobs API
        self.gcs_port = free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"  # what a driver attaches to
        self.process: subprocess.Popen[bytes] | None = None
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir=os.environ.get("TMPDIR", "/tmp")))
        self.log_path = self.temp_dir / "head.log"

    def env(self, token: bool = True) -> dict[str, str]:
        """An environment for a client of this head: with its token, or (``token=False``) with none."""
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS"):
            env.pop(name, None)
        if token:
            env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        return env

    def start(self, timeout: float = 90.0) -> RayHead:
        ports = {
            "--port": self.gcs_port,
            "--dashboard-port": self.dashboard_port,
            "--ray-client-server-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        cmd = [
            str(BIN / "ray"), "start", "--head", "--block", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}",
            "--object-store-memory=200000000", f"--temp-dir={self.temp_dir}",
            *(f"{k}={v}" for k, v in ports.items()),
        ]  # fmt: skip
        env = self.env() | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(self.temp_dir)}
        with open(self.log_path, "wb") as log:
            # its own session: stop() signals the whole group (raylet, GCS, dashboard, workers)
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log()}")
            try:
                self.get("/api/jobs/")
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the head's Jobs API did not answer in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def get(self, path: str, token: bool = True) -> Any:
        """``GET`` a Jobs API path (JSON, or text for logs) with the token as a Bearer header."""
        request = urllib.request.Request(self.address + path)
        if token:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=10) as reply:
            body = reply.read().decode()
        return json.loads(body) if body[:1] in "[{" else body

    def job(self, submission_id: str) -> dict[str, Any]:
        return self.get(f"/api/jobs/{submission_id}")

    def logs(self, submission_id: str) -> str:
        return self.get(f"/api/jobs/{submission_id}/logs")["logs"]

    def wait(self, submission_id: str, until: Any, timeout: float = 180.0, poll: float = 0.5) -> dict:
        """Poll the job until ``until(job_info, logs)`` is true; return the job's info."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(submission_id)
            if until(info, self.logs(submission_id)):
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {submission_id} after {timeout} s: {self.job(submission_id)}")

    def stop(self, grace: float = 5.0) -> None:
        """End the head by its PID: SIGTERM to its process group, SIGKILL to what is left after ``grace``.

        (``ray start --block`` ends its raylet, GCS and dashboard on SIGTERM, then waited here over a
        minute for its autoscaler monitor, which had lost the GCS.)
        """
        if self.process is None:
            return
        pgid = self.process.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.process.wait()
        deadline = time.monotonic() + 10
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.process = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
