"""The archive writer lease: one writer per archive, with takeover of dead holders.

A run (``medrecon run``) or a batch job (``medrecon reprocess``) takes the lease before it writes
to an archive. The lease is one JSON file, ``<archive>/_meta/lease.json``::

    {"owner": "medrecon run quickstart", "host": "node-3", "pid": 1234,
     "token": "<uuid4 hex, new on every acquisition>", "acquired": <unix time>, "heartbeat": <unix time>}

* **Creation is atomic.** On a local disk the full record goes to a unique temp file that is then
  hard-linked to the lease path (``os.link`` fails if a lease exists): of two racing processes only
  one wins, and no reader sees half a record. Other fsspec filesystems get
  ``pipe_file(..., mode="create")`` and a read-back (a foreign token means a lost race). s3fs makes
  that a conditional PUT (``If-None-Match: *``), which is atomic; where a backend keeps fsspec's
  default (check existence, then write) it is best effort.
* **Stale leases are taken over.** A lease is stale when its heartbeat is older than
  ``stale_after`` seconds, or when its host is this host and its PID is gone (fast takeover after a
  SIGKILLed run). An unreadable record is stale only once its file is older than ``stale_after`` (a
  non-atomic backend may still be writing it). Locally the taker renames the lease aside (only one
  renamer wins), checks that it moved the very bytes it judged, and puts them back otherwise.
  Remotely it re-reads, deletes and creates: two takers may both delete in that short window.
  The run that then creates the next lease, having seen the stale one, reports the takeover.
  Heartbeat ages compare the clocks of different hosts, so ``stale_after`` must exceed their skew.
* **Heartbeat.** While held, a daemon thread rewrites the record every ``heartbeat_every`` seconds
  if the file still carries our token. If not, another run judged us stale and took over: the
  thread stops and sets :attr:`ArchiveLease.lost`. Check-then-write is not atomic, so keep
  ``stale_after`` several times ``heartbeat_every``.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any

from pipelines.errors import LeaseError
from pipelines.store import OBJECT_STORES

__all__ = ["ArchiveLease"]


def _parse(raw: bytes) -> dict[str, Any] | None:
    """Returns the lease record in ``raw``, or None if it is not a complete record."""
    try:
        record = json.loads(raw)
    except ValueError:  # also UnicodeDecodeError
        return None
    if not isinstance(record, dict):
        return None
    strings = all(isinstance(record.get(k), str) for k in ("owner", "host", "token"))
    numbers = all(type(record.get(k)) in (int, float) for k in ("acquired", "heartbeat"))
    return record if strings and numbers and type(record.get("pid")) is int else None


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)  # signal 0 only checks; pids <= 0 (groups, "all") are never a holder
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists but is not ours
        pass
    return pid > 0


class ArchiveLease:
    """An exclusive, heartbeated writer lease on one archive.

    Args:
        fs: The fsspec filesystem of the archive (``LocalFileSystem`` for local paths).
        path: Full path of the lease file, e.g. ``<archive>/_meta/lease.json``; parents are created.
        owner: What holds the lease, for humans, e.g. ``"medrecon run quickstart"``.
        stale_after: Seconds without a heartbeat after which another run may take the lease over.
        heartbeat_every: Seconds between heartbeats while held.

    Example:
        >>> from fsspec.implementations.local import LocalFileSystem
        >>> with ArchiveLease(LocalFileSystem(), "/tmp/a/_meta/lease.json", owner="doc") as lease:
        ...     pass  # write to the archive; lease.lost turns True if another run took over
    """

    def __init__(
        self, fs: Any, path: str, *, owner: str, stale_after: float = 30.0, heartbeat_every: float = 5.0
    ) -> None:
        self.fs, self.owner = fs, owner
        self.path: str = fs._strip_protocol(path)
        self.stale_after, self.heartbeat_every = stale_after, heartbeat_every
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        self._local = "file" in protocols
        self._object_store = bool(OBJECT_STORES & set(protocols))
        self.lost = False
        self._record: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _observe(self) -> tuple[bytes, dict[str, Any]] | None:
        """The lease file's bytes and record (a marker dict if unreadable), or None if there is none."""
        try:
            with open(self.path, "rb") if self._local else self.fs.open(self.path, "rb") as f:
                raw = bytes(f.read())
        except FileNotFoundError:
            return None
        record = _parse(raw)
        if record is None:
            try:
                stat = os.stat(self.path).st_mtime if self._local else self.fs.modified(self.path).timestamp()
                mtime: float | None = stat
            except (OSError, NotImplementedError):
                mtime = None
            record = {"unreadable": True, "path": self.path, "modified": mtime}
        return raw, record

    def _write_tmp(self, data: bytes) -> str:
        """Writes ``data`` to a new unique file next to the (local) lease and returns its path."""
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "xb") as f:
            f.write(data)
        return tmp

    def _create(self, data: bytes, token: str) -> bool:
        """Creates the lease file atomically; returns False if a lease already exists."""
        if self._local:
            os.makedirs(posixpath.dirname(self.path), exist_ok=True)
            tmp = self._write_tmp(data)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        if not self._object_store:  # object stores have no folders, and s3fs's makedirs would
            self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)  # create a missing bucket
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return False
        seen = self._observe()  # a lost race on a non-atomic backend shows as a foreign token
        return seen is not None and seen[1].get("token") == token

    def _remove_judged(self, judged: bytes) -> bool:
        """Removes the lease file if it still holds exactly ``judged``; returns whether it did.

        Whoever creates the next lease after a removal (this run, or one racing it) reports the takeover.
        """
        if not self._local:
            seen = self._observe()
            if seen is None or seen[0] != judged:
                return False
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path)
                return True
            return False
        aside = f"{self.path}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)  # atomic: of two takers only one moves the stale lease
        except FileNotFoundError:
            return False
        with open(aside, "rb") as f:
            moved = f.read()
        if moved != judged:  # a race moved a fresh lease (or heartbeat) instead: put it back
            with contextlib.suppress(FileExistsError):  # a third run took the empty slot: it wins
                os.link(aside, self.path)
        os.unlink(aside)
        return moved == judged

    def _is_stale(self, record: dict[str, Any]) -> bool:
        """Whether ``record`` (a lease record or an unreadable marker) may be taken over."""
        now = time.time()
        if record.get("unreadable"):
            return record["modified"] is not None and now - record["modified"] > self.stale_after
        if now - record["heartbeat"] > self.stale_after:
            return True
        return record["host"] == socket.gethostname() and not _pid_alive(record["pid"])

    def _describe(self, record: dict[str, Any]) -> str:
        """One phrase naming the holder of ``record`` and how alive it looks."""
        now = time.time()
        if record.get("unreadable"):
            age = "?" if record["modified"] is None else f"{now - record['modified']:.0f}"
            return (
                f"an unreadable lease file {record['path']} (modified {age} s ago; taken over once older "
                f"than {self.stale_after:g} s; delete it if no run uses the archive)"
            )
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record["acquired"]))
        return (
            f"{record['owner']!r} (pid {record['pid']} on host {record['host']}, since {since}, "
            f"heartbeat {now - record['heartbeat']:.0f} s ago)"
        )

    @property
    def archive(self) -> str:
        """The archive the lease guards: the directory above ``_meta/`` (else the lease's directory)."""
        parent = posixpath.dirname(self.path)
        root = posixpath.dirname(parent) if posixpath.basename(parent) == "_meta" else parent
        return root if self._local else self.fs.unstrip_protocol(root)

    @property
    def holder(self) -> dict[str, Any] | None:
        """The lease record on storage; None if there is none; ``{"unreadable": True, ...}`` if garbled."""
        seen = self._observe()
        return None if seen is None else seen[1]

    def acquire(
        self,
        *,
        wait: bool = False,
        timeout: float | None = None,
        poll: float = 1.0,
        on_wait: Callable[[dict[str, Any]], None] | None = None,
        on_takeover: Callable[[dict[str, Any]], None] | None = None,
    ) -> ArchiveLease:
        """Takes the lease (taking over a stale one) and starts the heartbeat.

        Args:
            wait: Queue behind a live holder instead of failing at once.
            timeout: With ``wait``, seconds to wait before giving up (None: forever).
            poll: With ``wait``, seconds between attempts.
            on_wait: Called once, with the holder's record, when ``wait`` and the lease is held.
            on_takeover: Called with the stale record once a stale lease has been taken over.

        Returns:
            self, now holding the lease.

        Raises:
            LeaseError: A live run holds the lease (and not ``wait``, or ``timeout`` ran out), or this
                object holds it already.
        """
        if self._record is not None:
            raise LeaseError(f"lease {self.path} is already held by this ArchiveLease; release() it first")
        start, waited = time.monotonic(), False
        displaced: dict[str, Any] | None = None  # the stale lease seen last, if none fresh since
        while True:
            token, now = uuid.uuid4().hex, time.time()
            record = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "token": token}
            data = json.dumps(record | {"acquired": now, "heartbeat": now}).encode()
            if self._create(data, token):
                self._hold(json.loads(data))
                if displaced is not None and on_takeover is not None:
                    on_takeover(displaced)  # removed by us, or by a racing taker that then lost to us
                return self
            seen = self._observe()
            if seen is None:
                continue  # released in between: try again at once
            raw, current = seen
            if self._is_stale(current):
                displaced = current
                self._remove_judged(raw)
                continue
            displaced = None
            if not wait:
                raise LeaseError(
                    f"archive {self.archive} is in use by {self._describe(current)}; wait for it to finish, "
                    "or pass --wait-for-lock to queue behind it"
                )
            if not waited and on_wait is not None:
                on_wait(current)
            waited, elapsed = True, time.monotonic() - start
            if timeout is not None and elapsed >= timeout:
                raise LeaseError(
                    f"gave up waiting for archive {self.archive} after {elapsed:.1f} s (timeout "
                    f"{timeout:g} s): it is still in use by {self._describe(current)}; "
                    "wait longer, or stop that run if it is stuck"
                )
            time.sleep(poll if timeout is None else min(poll, timeout - elapsed))

    def _hold(self, record: dict[str, Any]) -> ArchiveLease:
        """Records ``record`` as ours and starts the heartbeat thread."""
        self._record, self.lost, self._stop = record, False, threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {self.path}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        """Rewrites our record every ``heartbeat_every`` s until stopped or no longer ours."""
        while not self._stop.wait(self.heartbeat_every) and self._record is not None:
            try:
                seen = self._observe()
                if seen is None or seen[1].get("token") != self._record["token"]:
                    self.lost = True
                    return
                self._record = {**self._record, "heartbeat": time.time()}
                data = json.dumps(self._record).encode()
                if self._local:
                    os.replace(self._write_tmp(data), self.path)
                else:
                    self.fs.pipe_file(self.path, data)
            except OSError:
                continue  # a transient storage error: the next beat retries; stale_after gives slack

    def release(self) -> None:
        """Stops the heartbeat and deletes the lease file if it is still ours; a no-op if not held."""
        if self._record is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        token, self._record, self._thread = self._record["token"], None, None
        seen = self._observe()
        if seen is None or seen[1].get("token") != token:
            return  # taken over: the file is someone else's now
        with contextlib.suppress(FileNotFoundError):
            if self._local:
                os.unlink(self.path)
            else:
                self.fs.rm(self.path)

    def __enter__(self) -> ArchiveLease:
        """``acquire(wait=False)``, unless already held (``with lease.acquire(wait=True): ...``)."""
        return self if self._record is not None else self.acquire(wait=False)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
