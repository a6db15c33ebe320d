"""A real Ray head node on loopback, with token auth: ``ray start --head --block`` as a child process.

Used by tests/cluster/test_jobs.py and benchmarks/submit_overhead.py. Every port is a free one
(the session's embedded Ray holds some of Ray's defaults), the head keeps its session files in a
short folder of its own (Unix sockets have a path limit), and it is started and ended like the
other test servers (:mod:`tests.cluster.servers`: its own process group, ended by PID), never by
``ray stop`` (which ends every Ray on the machine). The Jobs API is polled over plain HTTP with the
token as a Bearer header, as any HTTP client would.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.cluster.servers import BIN, Server, free_port, spawn, wait_http

ROOT = Path(__file__).resolve().parents[2]


class RayHead:
    """Start with :meth:`start`, end with :meth:`stop` (or use it as a context manager)."""

    def __init__(self, num_cpus: int = 2, token: str | None = None) -> None:
        self.token = token or secrets.token_hex(24)
        self.num_cpus = num_cpus
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"  # the Jobs API
        self.gcs_port = free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"  # what a driver attaches to
        self.server: Server | None = None
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir=os.environ.get("TMPDIR", "/tmp")))

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
        log = self.temp_dir / "head.log"
        self.server = Server("ray head", self.address, spawn(cmd, log, env, ROOT), log)
        try:
            self.server.started_s = wait_http(f"{self.address}/api/jobs/", timeout, self.server.proc, log)
        except BaseException:
            self.stop()
            raise
        return self

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
        """End the head's process group: SIGTERM, then SIGKILL to what is left after ``grace``.

        (``ray start --block`` ends its raylet, GCS and dashboard on SIGTERM, then waited over a
        minute for its autoscaler monitor, which had lost the GCS.)
        """
        if self.server is not None:
            self.server.stop(grace)
            self.server = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

