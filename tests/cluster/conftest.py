"""A loopback S3 server (moto) and a loopback ``mlflow server``, one of each per test session.

Credentials and the endpoint reach every client only through the standard AWS environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``), never through a spec. They
are set when this file is imported, before any test starts Ray: the embedded Ray's workers inherit
the environment the driver had when Ray started. The secret is a random planted value that the
tests then look for everywhere it must not be.

The servers start on free ports of 127.0.0.1 as child processes in their own process groups and
are ended by PID (group) when the session ends; a watchdog ends them too if pytest dies first.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.servers import Server, free_port, server_wait, start_mlflow, start_moto

BUCKET = "medrecon"
#: The planted secret: moto accepts any credentials, so this value is ours to hunt for afterwards.
PLANTED_SECRET = f"planted-s3-secret-{secrets.token_hex(12)}"
ACCESS_KEY = "MEDRECONTESTKEY"
MOTO_PORT = free_port()

for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"):
    os.environ.pop(_name, None)
os.environ.update(
    AWS_ACCESS_KEY_ID=ACCESS_KEY,
    AWS_SECRET_ACCESS_KEY=PLANTED_SECRET,
    AWS_DEFAULT_REGION="us-east-1",
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{MOTO_PORT}",
    AWS_EC2_METADATA_DISABLED="true",  # no credential probing of an instance metadata service
)

_WATCHDOG = """
import os, signal, sys, time
parent, group = int(sys.argv[1]), int(sys.argv[2])
while True:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        sys.exit(0)  # the server ended normally
    if os.getppid() != parent:  # pytest is gone: end the server it left
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        sys.exit(0)
    time.sleep(1)
"""


def _watch(server: Server) -> subprocess.Popen:
    """A tiny process that ends ``server``'s group if this pytest process dies without stopping it."""
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(server.pid)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


@dataclass
class Servers:
    """The session's servers; ``mlflow`` may still be starting until :meth:`mlflow_ready`."""

    moto: Server
    mlflow: Server
    workdir: Path
    bucket: str = BUCKET
    _ready: bool = False

    @property
    def endpoint(self) -> str:
        return self.moto.url

    def mlflow_ready(self) -> Server:
        if not self._ready:
            server_wait(self.mlflow)
            self._ready = True
        return self.mlflow

    def s3fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True)  # endpoint and keys from the environment

    def objects(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under ``prefix`` (listed with boto3, no caches)."""
        import boto3

        s3 = boto3.client("s3")
        keys: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """moto on ``$AWS_ENDPOINT_URL`` with bucket ``medrecon``, and ``mlflow server`` (started, maybe
    not ready yet: it needs ~5-12 s) whose artifacts go to ``s3://medrecon/mlartifacts``."""
    import boto3

    workdir = tmp_path_factory.mktemp("servers")
    env = dict(os.environ)
    moto = start_moto(workdir, env, port=MOTO_PORT)
    watchers = [_watch(moto)]
    mlflow: Server | None = None
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        mlflow = start_mlflow(workdir / "mlflow", env, f"s3://{BUCKET}/mlartifacts", wait=False)
        watchers.append(_watch(mlflow))
        yield Servers(moto, mlflow, workdir)
    finally:
        for server in (mlflow, moto):
            if server is not None:
                server.stop()
        for watcher in watchers:
            watcher.kill()
            watcher.wait()


@pytest.fixture(scope="session")
def mlflow_server(servers: Servers) -> Server:
    """The loopback ``mlflow server``, answering /health."""
    return servers.mlflow_ready()
