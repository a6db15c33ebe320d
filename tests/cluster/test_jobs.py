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


@pytest.mark.timeout(400)
def test_submit_stop_resubmit_and_submit_again(head, tmp_path):
    """One pipeline through the whole life of a job: submitted, stopped in its recon stage,
    submitted again (it resumes, followed to SUCCEEDED), and submitted once more (nothing new)."""
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
    assert re.fullmatch(r"medrecon-tiny-[0-9a-f]{16}", job) and "submitted" in first.stdout

    # Stop it once the recon stage has committed some scans, not all (about 2.5 s a scan).
    head.wait(job, lambda info, log: re.search(r"progress: reconstruct \(cs_tv\) ([1-9]|1[01])/12", log))
    stopped = medrecon(head, "stop", job)
    assert stopped.returncode == 0, stopped.stderr
    assert f"job {job}: STOPPED" in stopped.stdout
    status = medrecon(head, "status", job)
    assert re.search(r"status\s+STOPPED", status.stdout), status.stdout
    assert re.search(r"stage\s+recon \(recon\) running", status.stdout), status.stdout
    assert re.search(r"progress\s+reconstruct \(cs_tv\) \d+/12", status.stdout), status.stdout
    assert "interrupted: what was committed stays" in head.logs(job)  # SIGTERM took Ctrl-C's path
    assert not (archive / "_meta" / "lease.json").exists()  # the lease was released
    committed = sorted((archive / "_meta" / "commits" / "recon" / "cs_tv").glob("*.json"))
    assert 0 < len(committed) < 12, committed
    with sqlite3.connect(tmp_path / "mlflow.db") as db:  # the run was ended, as KILLED
        assert db.execute("SELECT status FROM runs").fetchall() == [("KILLED",)]

    # Submitted again: a new job that redoes only what was not committed, followed to its end.
    again = medrecon(head, "submit", SPEC, *slow, "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    assert submitted_id(again.stdout) == f"{job}-r2"
    out = again.stdout
    assert "phantoms: unchanged" in out and "simulate: unchanged" in out
    assert "stage: recon (recon) running" in out and "stage: evaluate (evaluate) running" in out
    row = re.search(r"recon\s+│\s+ran\s+│\s+[\d.]+\s+│\s+(\d+)\s+│\s+(\d+)\s+│\s+0", out)
    assert row, out
    assert int(row.group(1)) + int(row.group(2)) == 12 and int(row.group(2)) >= len(committed)
    assert "cs_tv" in out and f"job {job}-r2: SUCCEEDED" in out

    # Once more: that job succeeded, so nothing new starts.
    once_more = medrecon(head, "submit", SPEC, *slow)
    assert once_more.returncode == 0, once_more.stderr
    assert submitted_id(once_more.stdout) == f"{job}-r2" and "already submitted" in once_more.stdout
    ids = [j["submission_id"] for j in head.get("/api/jobs/")]
    assert sorted(i for i in ids if i.startswith(job)) == [job, f"{job}-r2"]

    listed = medrecon(head, "jobs", "list")
    assert listed.returncode == 0 and f"{job}-r2" in listed.stdout and "STOPPED" in listed.stdout
    done = medrecon(head, "status", f"{job}-r2")
    assert re.search(r"status\s+SUCCEEDED", done.stdout), done.stdout
    assert re.search(r"stage\s+evaluate \(evaluate\) running", done.stdout)  # the last one to start
    logs = medrecon(head, "logs", f"{job}-r2")
    assert logs.returncode == 0 and "progress: reconstruct (cs_tv) 12/12" in logs.stdout

    # The token is nowhere the jobs or their results can be read back.
    infos = json.dumps([head.job(job), head.job(f"{job}-r2")])
    assert '"medrecon.pipeline": "tiny"' in infos and "medrecon run tests/cluster/specs/tiny.yaml" in infos
    commands = (first, stopped, status, again, once_more, listed, done, logs)
    captured = "".join(p.stdout + p.stderr for p in commands)
    assert head.token not in infos + captured + head.logs(job)
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
