"""Checks that refuse a pipeline before Ray starts: memory per task, tracking and storage reachability.

A spec can validate and still be unable to run here: a 10¹²-voxel phantom, an MLflow server that
is down, an archive path that does not exist. :func:`preflight` finds these in seconds, before the
lease is taken or Ray started, and raises :class:`~pipelines.errors.PreflightError` (exit code 2)
with what was found and how to fix it, instead of failing minutes later in a worker.

Memory estimates are per task (one scan, one slab, one training worker), from the spec's shapes,
coils, slabs and batch sizes, with the working-set factors measured for each stage's code:

* phantoms: ~48 bytes a voxel (the float32 coordinate grid, image, labels, intensity field and
  the temporaries of one ellipsoid test);
* simulate: the image (kept whole if at most 256 MiB, else one slab) and ~6 complex copies of a
  slab's k-space per coil (operator output, noise, the acquired columns);
* train, per worker: the scan cache (8 scans of image and measurements) and the activations of
  forward and backward, ~3 x n_iter x features x depth floats a pixel of the batch;
* recon, per actor: the slab's measurements and ~14 image-sized solver arrays (PDHG for TV);
* evaluate: the reference, each reconstruction and ~12 image-sized SSIM temporaries.

They are deliberately rough (within ~2x): the point is to refuse what cannot fit, not to plan.
"""

from __future__ import annotations

import math
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.errors import PreflightError
from pipelines.secrets import redact_uri
from pipelines.spec import PipelineSpec

__all__ = [
    "TaskEstimate",
    "estimate_tasks",
    "check_memory",
    "check_tracking",
    "check_storage",
    "s3_endpoint",
    "archive_shape",
    "check_models",
    "check_resources",
    "ray_resources",
]

GiB = 1 << 30
#: What a simulate task keeps of the image when it fits (pipelines.simulate.IMAGE_CACHE_BYTES).
_IMAGE_CACHE = 256 << 20


@dataclass(frozen=True)
class TaskEstimate:
    """The memory one task of a stage needs, and what it is made of (for the message)."""

    stage: str
    bytes: int
    what: str


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def _activation_floats(kwargs: dict[str, Any]) -> int:
    """Floats a pixel of a batch keeps for backward: ~3 x unrolled steps x widest layer x depth."""
    features = kwargs.get("features", 32)
    width = max(features) if isinstance(features, (list, tuple)) else int(features)
    steps = next((int(kwargs[k]) for k in ("n_iter", "n_blocks", "n_cascades") if k in kwargs), 5)
    return 3 * steps * width * int(kwargs.get("depth", 3))


def estimate_tasks(spec: PipelineSpec, shape: tuple[int, int, int] | None = None) -> list[TaskEstimate]:
    """The largest task of each stage whose size the spec (or ``shape``, from the catalog) determines."""
    phantoms = next(iter(spec.of_kind("phantoms")), None)
    shape = tuple(phantoms.shape) if phantoms is not None else shape
    if shape is None:
        return []
    d, h, w = shape
    voxels, plane = d * h * w, h * w
    sim = next(iter(spec.of_kind("simulate")), None)
    coils = sim.coils if sim is not None and sim.modality == "mri" else 1
    slab = min(sim.slab or d, d) if sim is not None else d
    meas_plane = plane * coils * 8 if sim is None or sim.modality == "mri" else plane * 4 * 2
    out = []
    for stage in spec.stages:
        if stage.kind == "phantoms":
            out.append(TaskEstimate(stage.name, 48 * voxels, f"a {d}x{h}x{w} phantom at ~48 bytes a voxel"))
        elif stage.kind == "simulate":
            image = 4 * voxels if 4 * voxels <= _IMAGE_CACHE else 4 * slab * plane
            need = image + 6 * slab * meas_plane
            out.append(
                TaskEstimate(stage.name, need, f"a slab of {slab} slices of {h}x{w} with {coils} coil(s)")
            )
        elif stage.kind == "train":
            per_pixel = 4 * _activation_floats(stage.model.kwargs)
            need = 8 * (4 * voxels + d * meas_plane) + stage.batch_size * plane * per_pixel
            out.append(
                TaskEstimate(stage.name, need, f"a worker: 8 cached scans and a batch of {stage.batch_size}")
            )
        elif stage.kind == "recon":
            need = slab * (meas_plane + 14 * plane * 8) + 4 * voxels
            out.append(TaskEstimate(stage.name, need, f"an actor reconstructing a slab of {slab} slices"))
        elif stage.kind == "evaluate":
            need = (2 + 12) * 4 * voxels
            out.append(TaskEstimate(stage.name, need, f"scoring a {d}x{h}x{w} volume"))
    return out


def check_memory(
    spec: PipelineSpec, limit: int, where: str, shape: tuple[int, int, int] | None = None
) -> None:
    """Refuse when one task of a stage needs more than ``limit`` bytes (``where`` names the machine)."""
    for task in estimate_tasks(spec, shape):
        if task.bytes > limit:
            raise PreflightError(
                f"stage {task.stage!r}: one task needs about {_human(task.bytes)} ({task.what}), more than "
                f"the {_human(limit)} of memory of {where}; use smaller shapes, a smaller slab or batch, "
                "or a bigger machine"
            )


def _http_health(uri: str, timeout: float) -> str | None:
    """None if the MLflow server at ``uri`` answers, else why not (one short phrase)."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return None if response.status < 500 else f"it answered HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"it answered HTTP {exc.code}"
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused"
        if isinstance(reason, TimeoutError):
            return f"no answer within {timeout:.0f} s"
        return str(reason)
    except TimeoutError:
        return f"no answer within {timeout:.0f} s"
    except OSError as exc:
        return str(exc)


def _writable_dir(path: str) -> str | None:
    """None if ``path`` is a directory we can create files in (or can be created), else why not."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def check_tracking(uri: str, timeout: float = 3.0) -> None:
    """Refuse an MLflow URI that cannot be reached in ``timeout`` seconds (a server) or written (a file)."""
    shown = redact_uri(uri)
    if uri.startswith(("http://", "https://")):
        why = _http_health(uri, timeout)
        if why:
            raise PreflightError(
                f"MLflow server at {shown} is not reachable ({why}); start it, or fix tracking.uri "
                "(or MEDRECON_TRACKING_URI)"
            )
    elif uri.startswith("sqlite:///"):
        why = _writable_dir(os.path.dirname(uri[len("sqlite:///") :]) or ".")
        if why:
            raise PreflightError(f"MLflow database {shown} cannot be created: {why}; fix tracking.uri")
    elif uri.startswith("file:") or "://" not in uri:
        why = _writable_dir(uri.removeprefix("file://").removeprefix("file:"))
        if why:
            raise PreflightError(f"MLflow folder {shown} cannot be written: {why}; fix tracking.uri")


def _with_timeout(fn: Callable[[], Any], timeout: float) -> tuple[bool, Any]:
    """``(finished, result or exception)`` of ``fn()`` run in a thread for at most ``timeout`` seconds."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn)
    try:
        return True, future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        return False, None
    except Exception as exc:  # the storage's own error, reported below
        return True, exc
    finally:
        pool.shutdown(wait=False)


def check_storage(
    path: str, storage_options: dict[str, Any], *, creates: bool, timeout: float = 10.0
) -> None:
    """Refuse an archive that is missing (and not created by this pipeline), a file, or unreachable.

    An ``s3://`` archive is checked first for its endpoint and bucket (:func:`_check_s3`): messages
    name both, and a missing bucket is refused even when the pipeline creates the archive.
    """
    import fsspec

    shown = redact_uri(path)
    protocol = fsspec.core.split_protocol(path)[0]
    if protocol in _S3_PROTOCOLS:
        fs, root = _check_s3(path, storage_options, timeout)
    else:
        finished, result = _with_timeout(lambda: fsspec.core.url_to_fs(path, **storage_options), timeout)
        if not finished or isinstance(result, Exception):
            raise PreflightError(
                f"archive storage {shown} is not reachable ({result or f'no answer in {timeout:.0f} s'})"
            )
        fs, root = result
    finished, found = _with_timeout(lambda: (fs.exists(f"{root}/zarr.json"), fs.isfile(root)), timeout)
    if not finished:
        raise PreflightError(f"archive storage {shown} is not reachable (no answer within {timeout:.0f} s)")
    if isinstance(found, Exception):
        raise PreflightError(f"archive storage {shown} is not reachable ({type(found).__name__}: {found})")
    exists, is_file = found
    if is_file:
        raise PreflightError(f"archive path {shown} is a file; expected a directory holding a Zarr archive")
    if not exists and not creates:
        raise PreflightError(
            f"archive {shown} not found (no zarr.json there); run a pipeline with a phantoms stage first, "
            "or check the path"
        )
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        why = _writable_dir(root)
        if why:
            raise PreflightError(f"archive {shown} cannot be written: {why}")


_S3_PROTOCOLS = ("s3", "s3a")


def s3_endpoint(storage_options: dict[str, Any]) -> str | None:
    """The S3 endpoint an archive's s3fs talks to, as botocore chooses it: ``storage_options``'
    ``endpoint_url`` (or ``client_kwargs.endpoint_url``), else ``$AWS_ENDPOINT_URL_S3``, else
    ``$AWS_ENDPOINT_URL``; None for AWS's own endpoint."""
    client_kwargs = storage_options.get("client_kwargs") or {}
    found = storage_options.get("endpoint_url") or client_kwargs.get("endpoint_url")
    if found:
        return str(found)
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _tcp_refusal(url: str, timeout: float) -> str | None:
    """Why nothing accepts a TCP connection at ``url``'s host and port (None if something does)."""
    import socket
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        return f"not a valid URL: {exc}"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except ConnectionRefusedError:
        return "refuses connections (connection refused)"
    except TimeoutError:
        return f"does not accept a connection within {timeout:.0f} s"
    except socket.gaierror as exc:
        return f"cannot be resolved ({exc.strerror or exc})"
    except OSError as exc:
        return f"cannot be reached ({exc.strerror or exc})"


def _check_s3(path: str, storage_options: dict[str, Any], timeout: float) -> tuple[Any, str]:
    """Check that the S3 endpoint answers and the archive's bucket exists; return a probe filesystem.

    The probe filesystem is s3fs with one attempt and short timeouts (botocore and s3fs otherwise
    retry with backoff: an endpoint that refuses connections took 11 s to fail one ``exists``).
    The bucket is listed, never created: s3fs's ``makedirs`` would create a missing bucket, and
    writing into a bucket named by a typo is worse than refusing it.
    """
    import fsspec

    shown = redact_uri(path)
    endpoint = s3_endpoint(storage_options)
    where = redact_uri(endpoint) if endpoint else "the AWS S3 endpoint (no AWS_ENDPOINT_URL set)"
    fix = "start it, or fix AWS_ENDPOINT_URL (or archive.storage_options.endpoint_url)"
    if endpoint:
        why = _tcp_refusal(endpoint, min(timeout, 3.0))
        if why:
            raise PreflightError(f"archive storage {shown}: the S3 endpoint {where} {why}; {fix}")
    config = dict(storage_options.get("config_kwargs") or {})
    config.update(
        connect_timeout=min(timeout, 3.0),
        read_timeout=timeout,
        retries={"max_attempts": 1, "mode": "standard"},
    )
    probe_options = {**storage_options, "config_kwargs": config, "skip_instance_cache": True}
    finished, result = _with_timeout(lambda: fsspec.core.url_to_fs(path, **probe_options), timeout)
    if not finished or isinstance(result, Exception):
        why = f"{type(result).__name__}: {result}" if finished else f"no answer in {timeout:.0f} s"
        raise PreflightError(f"archive storage {shown}: cannot open the S3 filesystem at {where} ({why})")
    fs, root = result
    fs.retries = 1  # s3fs's own retry loop (a class attribute, 5); this instance is not shared
    bucket, _, key = root.partition("/")
    finished, listed = _with_timeout(
        lambda: fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1), timeout
    )
    if not finished:
        raise PreflightError(
            f"archive storage {shown}: the S3 endpoint {where} did not answer within {timeout:.0f} s; {fix}"
        )
    if isinstance(listed, Exception):
        raise PreflightError(f"archive storage {shown}: {_s3_failure(listed, bucket, where)}")
    return fs, root


def _s3_failure(exc: BaseException, bucket: str, where: str) -> str:
    """One phrase for why listing ``bucket`` at ``where`` failed, with how to fix it."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    code = str(((getattr(cause, "response", None) or {}).get("Error") or {}).get("Code", ""))
    name = type(cause).__name__
    if code == "NoSuchBucket" or (isinstance(exc, FileNotFoundError) and not code):
        return (
            f"bucket {bucket!r} does not exist at {where}; create it (e.g. `aws s3 mb s3://{bucket}`) "
            "or fix archive.path: medrecon never creates buckets"
        )
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or isinstance(
        exc, PermissionError
    ):
        return (
            f"access to bucket {bucket!r} at {where} was denied ({code or name}); check "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and the bucket's policy"
        )
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return (
            f"no S3 credentials for {where} ({cause}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(credentials never go in the pipeline file)"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"):
        return f"the S3 endpoint {where} cannot be reached ({cause}); fix AWS_ENDPOINT_URL"
    return f"listing bucket {bucket!r} at {where} failed ({name}: {str(cause).splitlines()[0][:300]})"


def archive_shape(archive: Any) -> tuple[int, int, int] | None:
    """The largest scan shape in an archive's catalog (None without a catalog), for memory estimates."""
    from pipelines.errors import ArchiveError

    try:
        rows = archive.catalog()
    except ArchiveError:
        return None
    shapes = [tuple(r.shape) for r in rows if len(r.shape) == 3]
    return max(shapes, key=math.prod) if shapes else None  # type: ignore[return-value]


def check_models(spec: PipelineSpec, tracking_uri: str, archive: Any = None) -> None:
    """Refuse model URIs that do not resolve, ``init_from`` of another architecture, and models that do
    not fit the pipeline's operator, before Ray starts.

    The operator is the one the spec simulates (phantoms' shape, simulate's settings) or, for a
    pipeline without them, the first measured scan's. A model is tried on one zero slice of it.
    """
    from pipelines.errors import PipelineError, TrackingError
    from pipelines.methods import resolve_model_uri

    # A gate of this pipeline sets ``champion`` on the model its challenger stage registers, so that
    # alias may not exist before the first night; nor may the champion a first night fine-tunes from.
    gated = {f"models:/{spec.model_name(g.challenger)}@champion" for g in spec.of_kind("gate")}
    optional = {
        s.init_from for s in spec.of_kind("train") if s.init_from and s.init_from_missing == "scratch"
    }
    uris = [(s.name, r.target) for s in spec.of_kind("recon") for r in s.refs() if r.kind == "model"]
    for stage in spec.of_kind("train"):
        if stage.init_from:
            uris.append((stage.name, stage.init_from))
    if not uris:
        return
    from pipelines.methods import load_model_uri

    op = _pipeline_operator(spec, archive)
    for name, uri in uris:
        try:
            _, exact, _ = resolve_model_uri(uri, tracking_uri)
        except TrackingError as exc:
            if uri in gated or uri in optional:
                continue
            raise PreflightError(f"stage {name!r}: {exc}") from None
        try:
            model, model_spec = load_model_uri(exact, tracking_uri)
        except (TrackingError, PipelineError) as exc:
            raise PreflightError(f"stage {name!r}: {exc}") from None
        train = spec.stage(name) if spec.stage(name).kind == "train" else None
        if train is not None:
            want = (train.model.name, train.model.kwargs)
            found = (model_spec.get("name"), model_spec.get("kwargs", {}))
            if want != found:
                raise PreflightError(
                    f"train stage {name!r}: init_from {uri} is a {found[0]} with {found[1]}; this stage "
                    f"trains a {want[0]} with {want[1]}. Fine-tune a model of the same architecture"
                )
        elif op is not None:
            _fits(model, model_spec, op, f"stage {name!r}: model {uri}")


def _pipeline_operator(spec: PipelineSpec, archive: Any) -> Any:
    from pipelines.physics import Acquisition
    from pipelines.store import MEASUREMENTS

    sim = next(iter(spec.of_kind("simulate")), None)
    phantoms = next(iter(spec.of_kind("phantoms")), None)
    if sim is not None and phantoms is not None:
        return Acquisition.simulated(sim, 0, tuple(phantoms.shape[1:])).op
    if archive is not None:
        measured = sorted(archive.committed(MEASUREMENTS))
        if measured:
            return Acquisition.from_archive(archive, measured[0]).op
    return None


def _fits(model: Any, model_spec: dict[str, Any], op: Any, what: str) -> None:
    """Run ``model`` on one zero slice of ``op``; a failure names the model and both shapes."""
    import torch

    dtype = torch.complex64 if op.complex_out else torch.float32
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *op.out_shape, dtype=dtype), op)
    except Exception as exc:
        raise PreflightError(
            f"{what} ({model_spec.get('name')}) does not fit this pipeline's operator "
            f"{type(op).__name__}: images {tuple(op.in_shape)}, measurements {tuple(op.out_shape)} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"
        ) from None
    if tuple(out.shape[1:]) != tuple(op.in_shape):
        raise PreflightError(
            f"{what} ({model_spec.get('name')}) returns images {tuple(out.shape[1:])}; this pipeline's "
            f"operator {type(op).__name__} expects {tuple(op.in_shape)}"
        )


def ray_resources() -> dict[str, float]:
    """The CPUs and GPUs the Ray cluster has, or can grow to: the larger of what is up now and what
    its autoscaler's node groups may add at most.

    An autoscaling cluster (the launcher YAML's and KubeRay's GPU groups start at 0 nodes) has no
    GPU until a task asks for one; its autoscaler publishes its node groups' maxima in the GCS,
    which is what Ray Train itself checks a worker group against (the same call). Without an
    autoscaler only what is up counts.
    """
    import ray

    have = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # a private API: without it, what is up now is what counts
        most = {}
    for key in ("CPU", "GPU"):
        if most.get(key):
            have[key] = max(have.get(key, 0.0), float(most[key]))
    return have


def check_resources(stages: list[Any], available: dict[str, float]) -> None:
    """Refuse a train stage that asks for more CPUs or GPUs than the cluster has or can grow to
    (:func:`ray_resources`): Ray would wait forever."""
    for stage in stages:
        _check_stage_resources(stage, available)


def _check_stage_resources(stage: Any, available: dict[str, float]) -> None:
    asked = {"CPU": stage.workers * stage.cpus_per_worker, "GPU": stage.workers * stage.gpus_per_worker}
    for what, need in asked.items():
        have = available.get(what, 0.0)
        if need > have:
            per = stage.cpus_per_worker if what == "CPU" else stage.gpus_per_worker
            raise PreflightError(
                f"train stage {stage.name!r} asks for {need:g} {what}s ({stage.workers} workers x {per:g}), "
                f"but the Ray cluster has {have:g} (counting what its autoscaler may add); lower workers "
                f"or {what.lower()}s_per_worker, or use a larger cluster"
            )
