"""Refusing before Ray starts: memory per task, tracking and storage reachability."""

import socket
import time
from pathlib import Path

import pytest

from pipelines.errors import PreflightError
from pipelines.preflight import check_memory, check_storage, check_tracking, estimate_tasks
from pipelines.specfile import apply_overrides, load_spec

QUICKSTART = Path(__file__).resolve().parents[2] / "pipelines" / "specs" / "quickstart.yaml"
GiB = 1 << 30


def _spec(*overrides):
    import yaml

    from pipelines.spec import PipelineSpec

    return PipelineSpec.model_validate(
        apply_overrides(yaml.safe_load(QUICKSTART.read_text()), list(overrides))
    )


def test_the_quickstart_fits_a_laptop_and_each_stage_is_estimated():
    spec = load_spec(QUICKSTART)
    tasks = {t.stage: t for t in estimate_tasks(spec)}
    assert list(tasks) == ["phantoms", "simulate", "model", "recon", "evaluate"]
    assert all(0 < t.bytes < 1 * GiB for t in tasks.values())
    check_memory(spec, 4 * GiB, "a laptop")


def test_a_huge_volume_is_refused_with_the_estimate():
    spec = _spec("phantoms.shape=[10000, 10000, 10000]")
    with pytest.raises(
        PreflightError, match=r"stage 'phantoms': one task needs about 43\.7 TiB .* of memory of m"
    ):
        check_memory(spec, 24 * GiB, "m")


def test_more_coils_and_bigger_slabs_need_more():
    small = {t.stage: t.bytes for t in estimate_tasks(_spec("simulate.coils=1"))}
    big = {t.stage: t.bytes for t in estimate_tasks(_spec("simulate.coils=16"))}
    assert big["simulate"] > 4 * small["simulate"] and big["recon"] > small["recon"]


def test_an_mlflow_server_that_is_down_is_named_in_seconds():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(PreflightError, match=rf"MLflow server at http://127\.0\.0\.1:{port} is not reachable "
                                             r"\(connection refused\)"):  # fmt: skip
        check_tracking(f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5


def test_tracking_and_archive_paths_that_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PreflightError, match=r"MLflow database .* cannot be created: .*file is a file"):
        check_tracking(f"sqlite:///{tmp_path}/file/mlflow.db")
    check_tracking(f"sqlite:///{tmp_path}/new/dir/mlflow.db")  # creatable
    with pytest.raises(PreflightError, match=r"archive path .*file is a file; expected a directory"):
        check_storage(str(tmp_path / "file"), {}, creates=True)
    with pytest.raises(PreflightError, match=r"archive .*nope not found .*phantoms stage first"):
        check_storage(str(tmp_path / "nope"), {}, creates=False)
    check_storage(str(tmp_path / "new"), {}, creates=True)


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_an_autoscaler_that_can_add_gpus_counts_as_having_them(ray_session):
    """A GPU group at 0 nodes (the launcher's and KubeRay's) has no GPU until asked: its maxima count."""
    import ray._raylet as raylet
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    from pipelines.preflight import ray_resources

    now = ray_resources()
    assert now.get("GPU", 0.0) == 0.0 and now["CPU"] == 2.0  # the session's embedded Ray
    config = autoscaler_pb2.ClusterConfig()
    for name, resources, most in (("cpu", {"CPU": 4}, 3), ("gpu", {"CPU": 8, "GPU": 1}, 2)):
        group = config.node_group_configs.add(name=name, max_count=most)
        group.resources.update(resources)
    namespace, key = raylet.GCS_AUTOSCALER_STATE_NAMESPACE, raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY
    _internal_kv_put(key, config.SerializeToString(), overwrite=True, namespace=namespace)
    try:
        assert ray_resources() == {"CPU": 28.0, "GPU": 2.0}  # 3 x 4 + 2 x 8 CPUs, 2 x 1 GPUs
    finally:
        _internal_kv_del(key, namespace=namespace)
    assert ray_resources() == now
