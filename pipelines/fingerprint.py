"""Fingerprints that decide whether committed output can be reused, and per-scan seeds.

A stage's fingerprint hashes its own spec (all but its name), the fingerprints of the stages it
reads from, the pipeline seed, and its **code version**: the source of the stage's module and of
every module of ``operators``, ``models`` and ``pipelines`` it imports, followed transitively
(imports inside functions included; the spec module counts, but not what it imports to validate a
file). So editing the CLI's tables retrains nothing, editing a model redoes the stages that run
models and not the phantoms, and editing an operator the recon stage uses redoes reconstruction.

Models are counted one at a time (:data:`MODEL_LEAVES`): a train stage's code version follows the
``models`` package only into the module of the model it trains, and recon's not at all (a learned
method is identified by its trained model's version, whose train stage fingerprint holds that
model's code). So editing the Neumann network retrains the Neumann network, not MoDL, and
re-runs no classical method.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

__all__ = ["MODEL_LEAVES", "code_version", "module_closure", "stage_fingerprint", "combine", "scan_seed"]

ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ("operators", "models", "pipelines")
#: Modules whose own source counts but whose imports are not followed: the spec imports the model
#: registry, the classical methods and the mask kinds only to validate a file, and that must not
#: make every stage (the phantoms' too) depend on every model and solver.
_LEAVES = frozenset({"pipelines.spec"})
#: Leaves for the stages that run models: the ``models`` package's ``__init__`` and the registry
#: import every network; a train stage adds its own model's module as a root instead.
MODEL_LEAVES = ("models", "models.registry")


def _module_file(name: str) -> Path | None:
    """The source file of project module ``name`` (``pkg.mod``), or None if it is not one."""
    if name.split(".")[0] not in _PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path) -> set[str]:
    """Project modules imported anywhere in ``path`` (``from pkg import mod`` counts ``pkg.mod`` too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    out = set()
    for name in found:
        parts = name.split(".")
        # importing a.b.c runs a/__init__.py and a/b/__init__.py too
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {n for n in out if _module_file(n) is not None}


@functools.cache
def module_closure(*roots: str, leaves: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Every project module ``roots`` import, transitively, sorted (the roots included).

    The modules in ``leaves`` (beside the spec) count, but their imports are not followed.
    """
    stop = _LEAVES | set(leaves)
    seen: set[str] = set()
    todo = [r for r in roots if _module_file(r) is not None]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        assert path is not None
        if name not in stop:
            todo.extend(_imports(path) - seen)
    return tuple(sorted(seen))


@functools.cache
def code_version(*roots: str, leaves: tuple[str, ...] = ()) -> str:
    """SHA-256 (16 hex digits) of the sources of :func:`module_closure` of ``roots`` (and ``leaves``).

    With no roots, of every module of ``operators``, ``models`` and ``pipelines`` (a tag for runs).
    """
    modules = (
        module_closure(*roots, leaves=leaves)
        if roots
        else tuple(
            ".".join(p.relative_to(ROOT).with_suffix("").parts)
            for pkg in _PACKAGES
            for p in sorted((ROOT / pkg).rglob("*.py"))
        )
    )
    h = hashlib.sha256()
    for name in modules:
        path = _module_file(name) or ROOT.joinpath(*name.split(".")).with_suffix(".py")
        h.update(name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def combine(payload: dict[str, Any]) -> str:
    """A 20-hex-digit fingerprint of a JSON-able payload."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def stage_fingerprint(stage: BaseModel, upstream: list[str], seed: int, code: str) -> str:
    """Fingerprint of a stage: its spec (without its name), its upstream fingerprints, the seed, its code."""
    spec = stage.model_dump(mode="json", exclude={"name"})
    return combine({"stage": spec, "upstream": list(upstream), "seed": seed, "code": code})


def scan_fingerprint(identity: str, *inputs: str | None) -> str:
    """One scan's commit fingerprint: the stage's identity (spec, seed and code, not its upstream or
    run key) and the commit fingerprints of what it read for that scan.

    So a stage re-run because new scans arrived (or on a new night) redoes only the scans whose
    inputs changed.
    """
    return combine({"identity": identity, "inputs": list(inputs)})


def scan_seed(seed: int, scan_id: str, purpose: str) -> int:
    """A 63-bit seed for one scan and one purpose ("mask", "noise", ...), stable across runs and machines.

    Python's ``hash`` is salted per process, so it is never used for seeds.
    """
    digest = hashlib.sha256(f"{seed}/{scan_id}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
