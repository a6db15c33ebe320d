"""Fingerprints that decide whether a stage's committed output can be reused.

A stage's fingerprint hashes its own spec, the fingerprint of the stage before it,
the pipeline seed and the code version, so changing one stage's settings redoes
that stage and every stage after it, and changing the code redoes everything.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

__all__ = ["code_version", "stage_fingerprint", "scan_seed"]

_PACKAGES = ("operators", "models", "pipelines")


@functools.cache
def code_version() -> str:
    """SHA-256 (16 hex digits) of the Python sources of operators/, models/ and pipelines/."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in _PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def stage_fingerprint(stage: BaseModel, upstream: str, seed: int, extra: dict[str, Any] | None = None) -> str:
    """Fingerprint of a stage: its spec, the upstream fingerprint, the seed and the code version."""
    payload = {
        "stage": stage.model_dump(mode="json"),
        "upstream": upstream,
        "seed": seed,
        "code": code_version(),
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def scan_seed(seed: int, scan_id: str, purpose: str) -> int:
    """A 63-bit seed for one scan and one purpose ("mask", "noise", ...), stable across runs and machines.

    Python's ``hash`` is salted per process, so it is never used for seeds.
    """
    digest = hashlib.sha256(f"{seed}/{scan_id}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
