"""Ray for a run: attach to a cluster, or start an embedded one and clean up after killed runs.

An embedded Ray (no address in the spec or ``$MEDRECON_RAY_ADDRESS``) is started by the run and
shut down on every exit path the driver controls: normal end, an error, Ctrl-C and SIGTERM (the
CLI turns SIGTERM into the same path). A SIGKILLed driver controls nothing: Ray's GCS, raylet and
workers notice and exit, but the ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent`` of that
session stay behind (about 200 MB, measured for minutes). Before starting an embedded Ray,
:func:`reap_orphans` ends exactly those: processes of this user named ``ray::…`` whose raylet is
gone (their parent is no longer a ``raylet``) and whose open files lie in a Ray session folder
``session_…_<pid>`` whose starting driver ``<pid>`` is gone. A cluster started with ``ray start``
keeps its raylet, so its processes are never touched.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from typing import Any

from pipelines.spec import PipelineSpec, Settings

__all__ = ["ray_address", "ensure_ray", "reap_orphans"]

_SESSION = re.compile(r"/session_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+_(?P<pid>\d+)/")


def ray_address(spec: PipelineSpec) -> str | None:
    """The cluster a run attaches to, or None for an embedded Ray."""
    return spec.ray.address or Settings().ray_address


def reap_orphans(log: Any = None) -> list[tuple[int, str]]:
    """End the Ray processes killed embedded sessions left behind (module docstring); return them."""
    import psutil

    me = psutil.Process().username()
    reaped = []
    for proc in psutil.process_iter(["name", "cmdline", "username"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.info["username"] != me or not cmd.startswith("ray::"):
                continue
            parent = proc.parent()
            if parent is not None and parent.name() == "raylet":
                continue
            starters = {int(m["pid"]) for f in proc.open_files() for m in [_SESSION.search(f.path)] if m}
            if not starters or any(psutil.pid_exists(pid) for pid in starters):
                continue
            proc.kill()
            reaped.append((proc.pid, cmd.split()[0]))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    if reaped and log is not None:
        names = ", ".join(sorted({name for _, name in reaped}))
        log(f"cleaned up {len(reaped)} Ray process(es) a killed run left behind: {names}")
    return reaped


def ensure_ray(spec: PipelineSpec, verbose: bool = False, log: Any = None) -> bool:
    """Attach to the spec's or ``$MEDRECON_RAY_ADDRESS``'s cluster, else start an embedded one.

    Worker logs stay in Ray's log files unless ``verbose`` (the CLI's ``--debug``) streams them
    to the terminal. Returns True when this call started Ray (the caller then shuts it down).
    """
    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    if ray.is_initialized():
        return False
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")}
    address = ray_address(spec)
    options: dict[str, Any] = {
        "logging_level": "WARNING",
        "log_to_driver": verbose,
        "runtime_env": {"env_vars": env},
    }
    if address:
        options["address"] = address
    else:
        reap_orphans(log)
        options |= {"address": "local", "num_cpus": spec.ray.num_cpus, "include_dashboard": False}
    # ray.init installs a SIGTERM handler that exits at once; keep the caller's (the CLI turns SIGTERM
    # into Ctrl-C's path: Ray shut down, lease released, MLflow run marked KILLED).
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    ray.init(**options)
    if callable(handler):
        signal.signal(signal.SIGTERM, handler)
    return True
