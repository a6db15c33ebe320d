"""Shared fixtures: one embedded Ray instance per test session, workspace-local temp dirs.

Every Ray test also has a hard timeout (pytest-timeout, pyproject's ``timeout``):
Ray resource deadlocks otherwise hang silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TMPDIR", str(ROOT / ".tmp"))
os.environ.setdefault("RAY_TMPDIR", str(ROOT / ".tmp"))
Path(os.environ["TMPDIR"]).mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole session (ray.init costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            logging_level="WARNING",
            runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}},
        )
    yield ray
    ray.shutdown()


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=_devices())
def device(request) -> str:
    """Runs a test on the CPU, and on the GPU too when one is present."""
    return request.param
