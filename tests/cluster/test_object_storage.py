"""The quickstart on object storage and a tracking server: the same pipeline file, only URIs change.

One run keeps everything local (an archive in a temp folder, MLflow in SQLite); the other puts the
archive (with Ray Train's checkpoints under its ``_meta/train``) on a loopback S3 server (moto) and
tracks to a loopback ``mlflow server`` whose artifacts go to the same bucket. Both load
``pipelines/specs/quickstart.yaml`` with the same size overrides (:data:`SIZE`), so their scores
must agree. Credentials come only from the AWS environment (see ``conftest.py``), and the planted
secret must appear nowhere the run wrote or printed.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from pipelines.runner import PipelineResult, run_pipeline
from pipelines.specfile import load_spec
from tests.cluster.conftest import BUCKET, PLANTED_SECRET, Servers
from tests.cluster.servers import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

QUICKSTART = Path(__file__).resolve().parents[2] / "pipelines" / "specs" / "quickstart.yaml"
PREFIX = "quickstart"
#: Applied to both runs, to keep the pair near a minute on 2 cores: 6 scans of 8x48x48 (3 train,
#: 1 val, 2 test), 2 epochs of a 2-step unrolled net of 8 features, and 30 TV iterations.
SIZE = [
    "phantoms.n_scans=6",
    "phantoms.shape=[8, 48, 48]",
    "phantoms.split={train: 3, val: 1, test: 2}",
    "model.epochs=2",
    "model.batch_size=4",
    "model.model.kwargs={n_iter: 2, features: 8}",
    "recon.options={cs_tv: {max_iter: 30}}",
]
STAGES = [
    ("phantoms", "ran"),
    ("simulate", "ran"),
    ("model", "ran"),
    ("recon", "ran"),
    ("evaluate", "ran"),
]


# `medrecon run` in a fresh process that never had Ray: each case must fail in preflight (exit 2)
# and leave Ray unstarted. ``cases`` is [(name, env changes, --set overrides)].
_CLI_CASES = r"""
import json, os, sys, time
from typer.testing import CliRunner
from pipelines.cli import app
import pipelines.runner  # what `run` imports lazily: timed cases then time the checks, not imports

spec, cases = sys.argv[1], json.loads(sys.argv[2])
out = {}
for name, env, overrides in cases:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    t0 = time.monotonic()
    args = ["run", spec] + [a for o in overrides for a in ("--set", o)]
    result = CliRunner().invoke(app, args)
    seconds = time.monotonic() - t0
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    text = result.output  # stdout and stderr, as a terminal shows them
    out[name] = {"code": result.exit_code, "text": text, "seconds": seconds,
                 "error": repr(result.exception) if result.exit_code not in (0, 2) else None}
ray = sys.modules.get("ray")
out["ray_initialized"] = bool(ray is not None and ray.is_initialized())
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def refused(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The three preflight failures, run through the CLI in one subprocess with its own Ray temp dir."""
    dead_s3, dead_mlflow = free_port(), free_port()
    cases = [
        ("endpoint", {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{dead_s3}"},
         [f"archive.path=s3://{BUCKET}/refused", f"tracking.uri=http://127.0.0.1:{dead_mlflow}"]),
        ("bucket", {}, ["archive.path=s3://no-such-bucket/quickstart", f"tracking.uri={servers.mlflow.url}"]),
        ("mlflow", {}, [f"archive.path=s3://{BUCKET}/down", f"tracking.uri=http://127.0.0.1:{dead_mlflow}"]),
    ]  # fmt: skip
    ray_tmp = tmp_path_factory.mktemp("ray-tmp")
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "COLUMNS": "400"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MEDRECON_RAY_ADDRESS", None)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _CLI_CASES, str(QUICKSTART), json.dumps(cases)],
        capture_output=True, text=True, env=env, cwd=QUICKSTART.parents[2], timeout=120,
    )  # fmt: skip
    print(f"\nthree preflight failures through the CLI, one process: {time.monotonic() - t0:.1f} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT") :])
    out.update(dead_s3=dead_s3, dead_mlflow=dead_mlflow, ray_tmp=ray_tmp, stderr=proc.stderr)
    return out


def _refused(refused: dict[str, Any], case: str) -> str:
    found = refused[case]
    print(f"\n{case}: exit {found['code']} after {found['seconds']:.2f} s: {found['text'].strip()}")
    assert found["code"] == 2, found
    assert found["seconds"] < 8, "preflight must answer in seconds, not after retries"
    assert not refused["ray_initialized"], "preflight failures come before Ray starts"
    assert not list(Path(refused["ray_tmp"]).rglob("session_*")), "no Ray session was created"
    assert PLANTED_SECRET not in found["text"] + refused["stderr"]
    return " ".join(found["text"].split())  # rich may wrap; compare on single spaces


def test_an_s3_endpoint_that_refuses_connections_is_named(refused):
    text = _refused(refused, "endpoint")
    endpoint = f"http://127.0.0.1:{refused['dead_s3']}"
    assert f"archive storage s3://{BUCKET}/refused: the S3 endpoint {endpoint} refuses connections" in text


def test_a_missing_bucket_is_named_and_not_created(refused, servers):
    import boto3

    text = _refused(refused, "bucket")
    assert f"bucket 'no-such-bucket' does not exist at {servers.endpoint}" in text
    assert "no-such-bucket" not in {b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]}


def test_an_mlflow_server_that_is_down_is_named(refused, servers):
    text = _refused(refused, "mlflow")
    address = f"http://127.0.0.1:{refused['dead_mlflow']}"
    assert f"MLflow server at {address} is not reachable (connection refused)" in text
    assert servers.objects("down/") == [], "nothing was written to the archive"


def test_the_endpoint_is_found_where_botocore_finds_it(monkeypatch):
    from pipelines.preflight import s3_endpoint

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://general:1")
    assert s3_endpoint({}) == "http://general:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")
    assert s3_endpoint({}) == "http://s3-only:2"
    assert s3_endpoint({"client_kwargs": {"endpoint_url": "http://kw:3"}}) == "http://kw:3"
    assert s3_endpoint({"endpoint_url": "http://opt:4"}) == "http://opt:4"
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert s3_endpoint({}) is None


def test_the_lease_is_atomic_on_s3_and_never_creates_a_bucket(servers):
    from pipelines.errors import LeaseError
    from pipelines.lease import ArchiveLease

    fs = servers.s3fs()
    path = f"s3://{BUCKET}/lease-test/_meta/lease.json"
    with ArchiveLease(fs, path, owner="first"):
        with pytest.raises(LeaseError, match=r"archive s3://medrecon/lease-test is in use by 'first'"):
            ArchiveLease(fs, path, owner="second").acquire()
    assert servers.objects("lease-test/") == [], "released"
    with pytest.raises(FileNotFoundError):
        ArchiveLease(fs, "s3://no-such-lease-bucket/a/_meta/lease.json", owner="x").acquire()
    assert "no-such-lease-bucket" not in {p.rstrip("/") for p in fs.ls("", refresh=True)}


def test_records_another_process_writes_are_seen(servers):
    """s3fs caches listings per process; the archive turns that off, or a Ray worker's commit stays
    invisible to a driver that had listed the folder before (pipelines.store.fs_options)."""
    from pipelines.store import Archive

    archive = Archive(f"s3://{BUCKET}/listing-test", create=True)
    archive.commit("measurements", "s1", "fp")
    assert archive.committed("measurements") == {"s1": "fp"}  # the folder is listed now
    other = servers.s3fs()  # another process's filesystem: its own cache
    other.pipe_file(archive._commit_path("measurements", "s2"), json.dumps({"fingerprint": "fp"}).encode())
    again = Archive(f"s3://{BUCKET}/listing-test")
    assert again.committed("measurements") == {"s1": "fp", "s2": "fp"}
    assert again.is_committed("measurements", "s2", "fp")


def _run(overrides: list[str]) -> tuple[PipelineResult, str, float]:
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=False, color_system=None)
    t0 = time.perf_counter()
    result = run_pipeline(load_spec(QUICKSTART, [*SIZE, *overrides]), console)
    return result, out.getvalue(), time.perf_counter() - t0


def _stage_seconds(result: PipelineResult) -> str:
    return ", ".join(f"{r.name} {r.seconds:.1f} s" for r in result.stages)


@pytest.fixture(scope="module")
def local_run(ray_session: Any, servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The quickstart with a local archive and SQLite tracking (the servers start meanwhile)."""
    root = tmp_path_factory.mktemp("local")
    result, text, seconds = _run([f"archive.path={root}/archive", f"tracking.uri=sqlite:///{root}/mlflow.db"])
    print(f"\nlocal run: {seconds:.1f} s ({_stage_seconds(result)})")
    return result, text


@pytest.fixture(scope="module")
def s3_run(
    ray_session: Any, servers: Servers, mlflow_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """The quickstart with the archive on s3://medrecon/quickstart and tracking on the mlflow server,
    run from an empty working directory (which must stay empty)."""

    @ray_session.remote(num_cpus=0)
    def worker_endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    assert ray_session.get(worker_endpoint.remote()) == servers.endpoint, (
        "Ray's workers lack the loopback AWS environment: Ray started before tests/cluster/conftest.py "
        "was imported"
    )
    cwd = tmp_path_factory.mktemp("s3cwd")
    before = os.getcwd()
    os.chdir(cwd)
    try:
        result, text, seconds = _run(
            [f"archive.path=s3://{BUCKET}/{PREFIX}", f"tracking.uri={mlflow_server.url}"]
        )
    finally:
        os.chdir(before)
    print(f"\ns3 + mlflow server run: {seconds:.1f} s ({_stage_seconds(result)})")
    return result, text, cwd


def test_the_quickstart_runs_on_s3_and_a_tracking_server(s3_run, servers):
    result, text, cwd = s3_run
    assert [(r.name, r.status) for r in result.stages] == STAGES
    assert not result.quarantined
    assert result.archive_uri == f"s3://{BUCKET}/{PREFIX}"
    assert result.tracking_uri == servers.mlflow.url
    assert list(cwd.iterdir()) == [], "nothing may be written to the working directory"

    keys = servers.objects(f"{PREFIX}/")
    names = {k[len(PREFIX) + 1 :] for k in keys}
    assert {"zarr.json", "catalog.parquet"} <= names
    assert {f"_meta/stages/{s}.json" for s, _ in STAGES} <= names
    assert any(n.startswith("_meta/commits/measurements/") for n in names)
    assert "_meta/lease.json" not in names, "the lease is released at the end"
    for method in ("zero_filled", "cs_tv", "quickstart-model.v1"):
        recon = [n for n in names if f"/recon/{method}/" in n]
        assert any(n.endswith("/zarr.json") for n in recon) and any("/c/" in n for n in recon), method
        assert any(n.startswith(f"_meta/commits/recon/{method}/") for n in names), method
    train = sorted(n for n in names if n.startswith("_meta/train/"))
    print("\nRay Train's files on S3:\n  " + "\n  ".join(train))
    checkpoints = [n for n in train if "/checkpoint_" in n]
    assert any(n.endswith("/weights.safetensors") for n in checkpoints), train


def test_models_go_to_s3_through_the_server_and_load_back(s3_run, servers):
    from mlflow.tracking import MlflowClient

    from pipelines.methods import load_model_uri

    result, _, _ = s3_run
    c = MlflowClient(result.tracking_uri, registry_uri=result.tracking_uri)
    run = c.get_run(result.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
    artifacts = servers.objects("mlartifacts/")
    weights = [
        k for k in artifacts if k.endswith(f"{result.run_id}/artifacts/models/model/weights.safetensors")
    ]
    assert weights, artifacts
    assert any("evaluation/evaluate/per_scan_metrics.parquet" in k for k in artifacts)
    version = c.get_model_version("quickstart-model", "1")
    assert version.run_id == result.run_id and version.status == "READY"
    model, spec = load_model_uri("models:/quickstart-model/1", result.tracking_uri)
    assert spec["name"] == "unrolled_gd" and sum(p.numel() for p in model.parameters()) > 0


def test_scores_equal_the_local_run(local_run, s3_run):
    local, _ = local_run
    remote, _, _ = s3_run
    assert [(r.name, r.status) for r in local.stages] == STAGES
    assert list(local.metrics) == list(remote.metrics) == ["zero_filled", "cs_tv", "quickstart-model.v1"]
    print("\nPSNR (dB)            local     s3+server   difference")
    for method in local.metrics:
        a, b = local.metrics[method]["psnr"], remote.metrics[method]["psnr"]
        print(f"  {method:<20} {a:8.3f}  {b:8.3f}   {b - a:+.4f}")
    for method in local.metrics:
        assert remote.metrics[method]["psnr"] == pytest.approx(local.metrics[method]["psnr"], abs=0.1)


def test_the_planted_secret_is_nowhere(s3_run, servers, ray_session):
    from mlflow.tracking import MlflowClient

    result, text, _ = s3_run
    secret = PLANTED_SECRET.encode()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == PLANTED_SECRET, "the run used the planted secret"
    assert PLANTED_SECRET not in text, "console output"
    assert f"MLflow run {result.run_id}" in text, "the console output was captured"

    fs = servers.s3fs()
    keys = servers.objects()
    assert any(k.startswith(f"{PREFIX}/_meta/") for k in keys) and any(
        k.startswith("mlartifacts/") for k in keys
    )
    leaked = [k for k in keys if secret in fs.cat_file(f"{BUCKET}/{k}")]
    assert not leaked, f"objects holding the secret: {leaked}"

    store = Path(servers.mlflow.extra["db"]).parent  # the backend store (and any -wal/-journal beside it)
    files = [p for p in store.iterdir() if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files)
    assert not [p.name for p in files if secret in p.read_bytes()], "mlflow server files"
    assert secret not in servers.moto.log.read_bytes(), "moto's log"

    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    tracked = " ".join([*run.data.params.values(), *run.data.params, *run.data.tags.values()])
    assert PLANTED_SECRET not in tracked, "MLflow params and tags"

    logs = Path(ray_session._private.worker._global_node.get_session_dir_path()) / "logs"
    leaked_logs = [p.name for p in logs.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not leaked_logs, f"Ray logs holding the secret: {leaked_logs}"
