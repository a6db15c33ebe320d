"""`medrecon submit | jobs list | status | logs | stop` against a real Ray head with token auth.

One head (``ray start --head --block``, a child process on loopback, :mod:`tests.cluster.head`)
serves the module and is ended by its PID. Every command runs as a user runs it: the ``medrecon``
executable in a subprocess, with the token in its environment (or not). The head's Jobs API is
also read directly over HTTP to check what it stores.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess

import pytest

from tests.cluster.head import BIN, ROOT, RayHead

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SPEC = "tests/cluster/specs/tiny.yaml"


@pytest.fixture(scope="module")
def head():
    with RayHead(num_cpus=2) as h:
        yield h


def medrecon(head: RayHead, *args: str, token: bool = True, env: dict | None = None, timeout: float = 240):
    """Run ``medrecon ARGS --address HEAD`` as a user would; returns the completed process."""
    return subprocess.run(
        [str(BIN / "medrecon"), *args, "--address", head.address],
        cwd=ROOT,
        env={**head.env(token), "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submitted_id(out: str) -> str:
    found = re.search(r"(?:submitted|already submitted:) (medrecon-\S+)", out)
    assert found, out
    return found.group(1)


@pytest.mark.timeout(300)
def test_submit_runs_once_and_is_followed_to_the_end(head, tmp_path):
    archive = tmp_path / "archive"
    done = medrecon(head, "submit", SPEC, "--set", f"archive.path={archive}", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    job = submitted_id(done.stdout)
    assert re.fullmatch(r"medrecon-tiny-[0-9a-f]{16}", job)
    # --wait streamed the driver's log: every stage, the results table, the job's end
    for stage in ("phantoms", "simulate", "recon", "evaluate"):
        assert f"stage: {stage} ({stage}) running" in done.stdout
    assert "zero_filled" in done.stdout and f"job {job}: SUCCEEDED" in done.stdout
    assert (archive / "zarr.json").is_file() and (tmp_path / "mlflow.db").is_file()

    # The same submission again is the same job: nothing new starts.
    again = medrecon(head, "submit", SPEC, "--set", f"archive.path={archive}")
    assert again.returncode == 0, again.stderr
    assert submitted_id(again.stdout) == job and "already submitted" in again.stdout
    jobs = [j for j in head.get("/api/jobs/") if j["submission_id"].startswith("medrecon-tiny-")]
    assert [j["submission_id"] for j in jobs if j["submission_id"] == job] == [job]
    assert len({j["submission_id"] for j in jobs}) == len(jobs)

    listed = medrecon(head, "jobs", "list")
    assert listed.returncode == 0 and job in listed.stdout and "SUCCEEDED" in listed.stdout
    status = medrecon(head, "status", job)
    assert status.returncode == 0, status.stderr
    assert re.search(r"status\s+SUCCEEDED", status.stdout)
    assert re.search(r"stage\s+evaluate \(evaluate\) running", status.stdout)  # the last one to start
    logs = medrecon(head, "logs", job)
    assert logs.returncode == 0 and "progress: simulate k-space 4/4" in logs.stdout

    # The token is nowhere the job or its results can be read back.
    info = head.job(job)
    captured = done.stdout + done.stderr + again.stdout + status.stdout + logs.stdout + listed.stdout
    assert head.token not in json.dumps(info) + captured
    assert info["metadata"]["medrecon.pipeline"] == "tiny"
    assert info["entrypoint"].startswith("medrecon run tests/cluster/specs/tiny.yaml")
    for path in archive.rglob("*"):
        if path.is_file():
            assert head.token.encode() not in path.read_bytes(), path
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
            rows = db.execute(f"SELECT * FROM {table}").fetchall()
            assert head.token not in repr(rows), table


@pytest.mark.timeout(120)
def test_a_missing_or_wrong_token_is_refused_with_how_to_give_one(head, tmp_path):
    no_home_token = {"HOME": str(tmp_path)}  # no ~/.ray/auth_token either
    missing = medrecon(head, "submit", SPEC, token=False, env=no_home_token)
    assert missing.returncode == 2
    assert f"the Ray cluster at {head.address} requires a token and none was given" in missing.stderr
    assert "RAY_AUTH_TOKEN" in missing.stderr and "--token-file" in missing.stderr
    wrong = tmp_path / "token"
    wrong.write_text("not-the-token\n")
    refused = medrecon(head, "jobs", "list", "--token-file", str(wrong), token=False, env=no_home_token)
    assert refused.returncode == 2
    assert f"refused the token from --token-file {wrong}" in refused.stderr
    right = tmp_path / "right"
    right.write_text(head.token)
    listed = medrecon(head, "jobs", "list", "--token-file", str(right), token=False, env=no_home_token)
    assert listed.returncode == 0, listed.stderr
    unknown = medrecon(head, "status", "medrecon-nope")
    assert unknown.returncode == 2 and "no job 'medrecon-nope'" in unknown.stderr
    nothing = subprocess.run(
        [str(BIN / "medrecon"), "jobs", "list", "--address", "http://127.0.0.1:9"],
        env=head.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert nothing.returncode == 2 and "no Ray Jobs API answers at http://127.0.0.1:9" in nothing.stderr


@pytest.mark.timeout(400)
def test_stop_leaves_the_archive_resumable(head, tmp_path):
    archive = tmp_path / "archive"
    slow = [
        "--set", f"archive.path={archive}", "--set", "phantoms.n_scans=12", "--set", "recon.split=all",
        "--set", "phantoms.split={train: 4, val: 4, test: 4}", "--set", "phantoms.shape=[8, 64, 64]",
        "--set", "recon.methods=[cs_tv]", "--set", "recon.options={cs_tv: {max_iter: 2000, tol: 1.0e-9}}",
        "--set", "recon.actors=1",
    ]  # fmt: skip
    first = medrecon(head, "submit", SPEC, *slow)
    assert first.returncode == 0, first.stderr
    job = submitted_id(first.stdout)
    # stop once the recon stage has committed some scans, not all (about 2.5 s a scan)
    head.wait(job, lambda info, log: re.search(r"progress: reconstruct \(cs_tv\) ([1-9]|1[01])/12", log))
    stopped = medrecon(head, "stop", job)
    assert stopped.returncode == 0, stopped.stderr
    assert f"job {job}: STOPPED" in stopped.stdout
    status = medrecon(head, "status", job)
    assert re.search(r"status\s+STOPPED", status.stdout), status.stdout
    assert re.search(r"stage\s+recon \(recon\) running", status.stdout), status.stdout
    assert re.search(r"progress\s+reconstruct \(cs_tv\) \d+/12", status.stdout), status.stdout
    log = head.logs(job)
    assert "interrupted: what was committed stays" in log  # SIGTERM took Ctrl-C's path
    assert not (archive / "_meta" / "lease.json").exists()  # the lease was released
    committed = sorted((archive / "_meta" / "commits" / "recon" / "cs_tv").glob("*.json"))
    assert 0 < len(committed) < 12, committed
    with sqlite3.connect(tmp_path / "mlflow.db") as db:  # the run was ended, as KILLED
        assert db.execute("SELECT status FROM runs").fetchall() == [("KILLED",)]

    again = medrecon(head, "submit", SPEC, *slow, "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    assert submitted_id(again.stdout) == f"{job}-r2"  # a stopped job is submitted afresh
    out = again.stdout
    assert "phantoms: unchanged" in out and "simulate: unchanged" in out
    row = re.search(r"recon\s+│\s+ran\s+│\s+[\d.]+\s+│\s+(\d+)\s+│\s+(\d+)\s+│\s+0", out)
    assert row, out
    assert int(row.group(1)) + int(row.group(2)) == 12 and int(row.group(2)) >= len(committed)
