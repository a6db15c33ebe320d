"""The archive writer lease: one writer per archive, waiting, takeover of dead holders, heartbeat."""

from __future__ import annotations

import json
import multiprocessing
import os
import posixpath
import socket
import subprocess
import sys
import threading
import time
import uuid

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from pipelines.errors import LeaseError
from pipelines.lease import ArchiveLease

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    """A filesystem and a lease path in a fresh archive: a local directory, or fsspec's memory fs."""
    if request.param == "local":
        yield LocalFileSystem(), str(tmp_path / "archive" / "_meta" / "lease.json")
        return
    fs = fsspec.filesystem("memory")  # one store per process: a unique root per test
    root = f"/lease-test-{uuid.uuid4().hex}"
    yield fs, f"{root}/archive/_meta/lease.json"
    fs.rm(root, recursive=True)


def _read(fs, path: str) -> dict:
    return json.loads(fs.cat_file(path))


def _write(fs, path: str, **fields) -> dict:
    """Writes a lease record by hand (as another run would have left it) and returns it."""
    now = time.time()
    record = {"owner": "medrecon run other", "host": "elsewhere", "pid": 4242, "token": uuid.uuid4().hex}
    record |= {"acquired": now, "heartbeat": now} | fields
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, json.dumps(record).encode())
    return record


def _until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_acquire_writes_a_record_naming_this_process_and_release_removes_it(store):
    fs, path = store
    lease = ArchiveLease(fs, path, owner="medrecon run quickstart").acquire()
    record = _read(fs, path)
    assert record["owner"] == "medrecon run quickstart" and lease.holder == record
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    assert len(record["token"]) == 32 and abs(record["heartbeat"] - time.time()) < 5
    lease.release()
    assert not fs.exists(path) and lease.holder is None


def test_each_acquisition_gets_a_new_token_and_release_twice_or_unheld_is_a_no_op(store):
    fs, path = store
    lease = ArchiveLease(fs, path, owner="a")
    lease.release()
    with lease:
        first = _read(fs, path)["token"]
    lease.release()
    with lease:
        assert _read(fs, path)["token"] != first
    assert not fs.exists(path)


def test_a_second_run_fails_at_once_naming_the_holder_and_the_fix(store):
    fs, path = store
    with ArchiveLease(fs, path, owner="medrecon run quickstart"):
        second = ArchiveLease(fs, path, owner="medrecon reprocess")
        pattern = (
            rf"archive \S*archive is in use by 'medrecon run quickstart' \(pid {os.getpid()} on host "
            rf"{socket.gethostname()}, since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC, heartbeat 0 s ago\); "
            r".*--wait-for-lock"
        )
        with pytest.raises(LeaseError, match=pattern):
            second.acquire()
        assert _read(fs, path)["owner"] == "medrecon run quickstart"


def test_acquiring_a_lease_this_object_already_holds_is_an_error(store):
    fs, path = store
    with ArchiveLease(fs, path, owner="a") as lease, pytest.raises(LeaseError, match="already held"):
        lease.acquire()


def test_with_on_an_acquired_lease_keeps_it_and_releases_it_at_exit(store):
    fs, path = store
    with ArchiveLease(fs, path, owner="a").acquire(wait=True) as lease:
        assert lease.holder["owner"] == "a"
    assert not fs.exists(path)


def test_waiting_run_acquires_once_the_holder_releases_and_reports_the_wait_once(store):
    fs, path = store
    first = ArchiveLease(fs, path, owner="medrecon run first").acquire()
    waits: list[dict] = []
    threading.Timer(0.3, first.release).start()
    second = ArchiveLease(fs, path, owner="medrecon run second")
    second.acquire(wait=True, poll=0.02, on_wait=waits.append)
    assert _read(fs, path)["owner"] == "medrecon run second"
    assert len(waits) == 1 and waits[0]["owner"] == "medrecon run first"
    second.release()


def test_waiting_run_gives_up_after_the_timeout_naming_the_holder_and_the_wait(store):
    fs, path = store
    with ArchiveLease(fs, path, owner="medrecon run first"):
        t0 = time.monotonic()
        with pytest.raises(LeaseError, match=r"after 0\.[2-9] s \(timeout 0\.25 s\).*'medrecon run first'"):
            ArchiveLease(fs, path, owner="second").acquire(wait=True, timeout=0.25, poll=0.05)
        assert 0.25 <= time.monotonic() - t0 < 2


def test_a_lease_whose_heartbeat_is_older_than_stale_after_is_taken_over(store):
    fs, path = store
    stale = _write(fs, path, heartbeat=time.time() - 60)
    taken: list[dict] = []
    lease = ArchiveLease(fs, path, owner="new", stale_after=30).acquire(on_takeover=taken.append)
    assert taken == [stale]
    assert _read(fs, path)["token"] == lease._record["token"] != stale["token"]
    lease.release()


def test_a_fresh_lease_of_another_host_is_not_taken_over(store):
    fs, path = store
    _write(fs, path, host="elsewhere", pid=1)
    with pytest.raises(LeaseError, match="pid 1 on host elsewhere"):
        ArchiveLease(fs, path, owner="new", stale_after=30).acquire(on_takeover=pytest.fail)


def test_a_lease_of_a_dead_pid_on_this_host_is_taken_over_at_once_despite_a_fresh_heartbeat(tmp_path):
    fs, path = LocalFileSystem(), str(tmp_path / "archive" / "_meta" / "lease.json")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = _write(fs, path, host=socket.gethostname(), pid=child.pid)
    taken: list[dict] = []
    with ArchiveLease(fs, path, owner="new", stale_after=3600).acquire(on_takeover=taken.append):
        assert taken == [dead] and _read(fs, path)["owner"] == "new"
    assert not [p for p in os.listdir(tmp_path / "archive" / "_meta") if p != "lease.json"], "temp files left"


def test_an_unreadable_lease_is_taken_over_only_once_older_than_stale_after(tmp_path):
    fs, path = LocalFileSystem(), str(tmp_path / "archive" / "_meta" / "lease.json")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write('{"owner": "half-wri')
    with pytest.raises(LeaseError, match="unreadable lease file .*lease.json"):
        ArchiveLease(fs, path, owner="new", stale_after=30).acquire()
    os.utime(path, (time.time() - 60, time.time() - 60))
    taken: list[dict] = []
    with ArchiveLease(fs, path, owner="new", stale_after=30).acquire(on_takeover=taken.append):
        assert taken[0]["unreadable"] and _read(fs, path)["owner"] == "new"


def test_the_heartbeat_thread_advances_the_heartbeat_and_keeps_the_token(store):
    fs, path = store
    with ArchiveLease(fs, path, owner="a", heartbeat_every=0.05):
        first = _read(fs, path)
        assert _until(lambda: _read(fs, path)["heartbeat"] > first["heartbeat"])
        later = _read(fs, path)
        assert later["token"] == first["token"] and later["acquired"] == first["acquired"]


def test_a_taker_that_moved_a_lease_other_than_the_one_it_judged_puts_it_back(store):
    fs, path = store
    judged = json.dumps(_write(fs, path, heartbeat=time.time() - 60)).encode()
    _write(fs, path, owner="medrecon run fresh")  # a race: the stale lease was replaced meanwhile
    fresh = fs.cat_file(path)
    assert not ArchiveLease(fs, path, owner="taker")._remove_judged(judged)
    assert fs.cat_file(path) == fresh


def test_release_returns_promptly_despite_a_long_heartbeat_interval(store):
    fs, path = store
    lease = ArchiveLease(fs, path, owner="a", heartbeat_every=3600).acquire()
    t0 = time.monotonic()
    lease.release()
    assert time.monotonic() - t0 < 1


def test_release_does_not_delete_a_lease_that_now_belongs_to_someone_else(store):
    fs, path = store
    lease = ArchiveLease(fs, path, owner="a", heartbeat_every=3600).acquire()
    theirs = _write(fs, path, owner="medrecon run taker")
    lease.release()
    assert _read(fs, path) == theirs


def test_a_lease_taken_over_stops_heartbeating_and_reports_lost(store):
    fs, path = store
    slow = ArchiveLease(fs, path, owner="slow", heartbeat_every=0.5).acquire()
    time.sleep(0.05)
    taker = ArchiveLease(fs, path, owner="taker", stale_after=0.01, heartbeat_every=3600)
    taken: list[dict] = []
    taker.acquire(on_takeover=taken.append)
    assert taken[0]["owner"] == "slow"
    theirs = fs.cat_file(path)
    assert _until(lambda: slow.lost)
    time.sleep(0.6)  # a heartbeat period more: the taken-over lease must never be overwritten
    assert fs.cat_file(path) == theirs and not taker.lost
    slow.release()
    assert fs.cat_file(path) == theirs
    taker.release()


def _race(path: str, rounds: int, barrier, results) -> None:
    """One racer: each round, take the lease at the barrier and report (round, won, took over).

    After an even round the winner leaves a stale lease behind, so odd rounds race a takeover.
    """
    fs = LocalFileSystem()
    lease = ArchiveLease(fs, path, owner=f"racer {os.getpid()}", heartbeat_every=3600, stale_after=30)
    for i in range(rounds):
        taken: list[dict] = []
        barrier.wait()
        try:
            lease.acquire(wait=False, on_takeover=taken.append)
            won = True
        except LeaseError:
            won = False
        results.put((i, won, bool(taken)))
        barrier.wait()
        if won:
            lease.release()
            if i % 2 == 0:
                _write(fs, path, heartbeat=time.time() - 60)
        barrier.wait()


def test_of_two_processes_racing_for_the_lease_or_its_takeover_exactly_one_wins_every_time(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    path, rounds = str(tmp_path / "archive" / "_meta" / "lease.json"), 6
    barrier, results = ctx.Barrier(2, timeout=30), ctx.Queue()
    racers = [ctx.Process(target=_race, args=(path, rounds, barrier, results)) for _ in range(2)]
    for p in racers:
        p.start()
    outcomes = [results.get(timeout=30) for _ in range(2 * rounds)]
    for p in racers:
        p.join(timeout=30)
        assert p.exitcode == 0
    for i in range(rounds):
        this_round = sorted((won, took) for r, won, took in outcomes if r == i)
        assert [won for won, _ in this_round] == [False, True], f"round {i}: {outcomes}"
        assert this_round[0] == (False, False), f"round {i}: a loser reported a takeover: {outcomes}"
        if i % 2 == 0:
            assert this_round[1] == (True, False), f"round {i}: a takeover of a free lease: {outcomes}"
    assert os.listdir(tmp_path / "archive" / "_meta") == [], "no lease, temp or aside file is left"
