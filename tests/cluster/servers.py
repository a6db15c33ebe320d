"""Real servers on loopback for the cluster tests: an S3-compatible store (moto) and ``mlflow server``.

Each runs as a child process in its own process group (``start_new_session``), bound to 127.0.0.1 on
a free port, with its output in a log file. :meth:`Server.stop` signals the whole group (SIGTERM,
then SIGKILL after a grace period), so workers the server forked (uvicorn, gunicorn) end with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BIN", "Server", "free_port", "spawn", "start_moto", "start_mlflow", "wait_http"]

BIN = Path(sys.executable).parent  # the venv's bin: `medrecon`, `ray` and `mlflow` live there


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> float:
    """Seconds until ``url`` answers HTTP < 500; raises if ``proc`` exits or ``timeout`` passes."""
    t0 = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return time.monotonic() - t0
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return time.monotonic() - t0
        except OSError:
            pass
        tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}:\n{tail}")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s:\n{tail}")
        time.sleep(0.2)


@dataclass
class Server:
    """A server child process and where to reach it."""

    name: str
    url: str
    proc: subprocess.Popen
    log: Path
    started_s: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, grace: float = 10.0) -> None:
        """End the server and every process of its group; waits until the leader is reaped."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # The leader may be gone while workers it forked still run: kill whatever is left in the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)
        deadline = time.monotonic() + grace  # SIGKILLed members leave the group within moments
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def group_alive(self) -> bool:
        """Whether any process of the server's group still runs."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def spawn(cmd: list[str], log: Path, env: Mapping[str, str], cwd: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,  # its own process group: stop() ends the workers with it
        )


def start_moto(workdir: Path, env: Mapping[str, str], port: int | None = None, wait: bool = True) -> Server:
    """``python -m moto.server`` on 127.0.0.1 (any credentials are accepted)."""
    port = port or free_port()
    log = workdir / "moto.log"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    t0 = time.monotonic()
    proc = spawn(cmd, log, env, workdir)
    server = Server("moto", f"http://127.0.0.1:{port}", proc, log)
    if wait:
        try:
            wait_http(f"{server.url}/moto-api/", 60, proc, log)
        except BaseException:
            server.stop()
            raise
        server.started_s = time.monotonic() - t0
    return server


def start_mlflow(
    workdir: Path,
    env: Mapping[str, str],
    artifacts_destination: str,
    port: int | None = None,
    wait: bool = True,
) -> Server:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend store in ``workdir`` and proxied artifacts.

    Clients get the default artifact root ``mlflow-artifacts:/``; the server writes artifacts to
    ``artifacts_destination`` (an ``s3://`` URI; the server's ``env`` carries the AWS settings).
    """
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "mlflow.db"
    log = workdir / "mlflow.log"
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{db}",
        "--artifacts-destination",
        artifacts_destination,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # No job runner: mlflow 3 otherwise forks a runner and seven huey consumers, which these tests
    # never use and a 2-core machine feels.
    env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    t0 = time.monotonic()
    proc = spawn(cmd, log, env, workdir)
    server = Server("mlflow", f"http://127.0.0.1:{port}", proc, log, extra={"db": str(db)})
    if wait:
        server_wait(server)
        server.started_s = time.monotonic() - t0
    return server


def server_wait(server: Server, timeout: float = 120) -> None:
    """Wait for ``server``'s /health (mlflow) or API (moto); stop it and raise if it never answers."""
    path = "/health" if server.name == "mlflow" else "/moto-api/"
    try:
        wait_http(f"{server.url}{path}", timeout, server.proc, server.log)
    except BaseException:
        server.stop()
        raise
