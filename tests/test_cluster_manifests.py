"""The Kubernetes manifests under ``cluster/`` parse, run commands that exist, and hold no secrets.

No cluster and no Ray: every YAML document under ``cluster/`` is read with ``yaml.safe_load_all`` and
checked against what the repository itself says (the ``medrecon`` command's subcommands and options,
the spec files it names, one image name), plus the rules the nightly retraining relies on: a
CronJob never runs two nights at once, tokens come only from ``secretKeyRef``, and Ray's object
store has a ``/dev/shm`` as large as it is told to use.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
IMAGE = "medrecon:latest"
TOKEN_SECRET = "medrecon-ray-token"
TOKEN_KEY = "auth_token"  # the key KubeRay's authOptions.secretName expects
KNOWN_KINDS = {
    ("ray.io/v1", "RayCronJob"),
    ("ray.io/v1", "RayJob"),
    ("ray.io/v1", "RayCluster"),
    ("batch/v1", "CronJob"),
    ("batch/v1", "Job"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
}
SECRET_WORDS = re.compile(r"token|secret|password|passwd|key|credential", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
          "Ti": 2**40}  # fmt: skip


def _files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in {".yaml", ".yml"})


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in _files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((str(path.relative_to(ROOT)), doc))
    return docs


def _of_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in _documents() if doc.get("kind") == kind]


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Every ``(path, key, value)`` of a parsed document, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs of a manifest: every ``template.spec`` that has containers."""
    return [v["spec"] for _, k, v in _walk(doc) if k == "template" and "containers" in v.get("spec", {})]


def _quantity(text: str | int) -> int:
    found = re.fullmatch(r"(\d+)([kMGT]i?)?", str(text))
    assert found, f"not a Kubernetes quantity: {text!r}"
    return int(found.group(1)) * _UNITS[found.group(2) or ""]


@dataclass(frozen=True)
class Command:
    """A command a manifest runs, and the environment variables its container defines."""

    file: str
    where: str
    argv: list[str]
    env: frozenset[str]

    def __str__(self) -> str:
        return f"{self.file} ({self.where})"


def _env(container: dict[str, Any]) -> frozenset[str]:
    return frozenset(v["name"] for v in container.get("env", []))


def _commands() -> list[Command]:
    """Every command a manifest runs: RayJob entrypoints (run by the driver on the Ray head, with the
    head's environment) and the commands of Job/CronJob containers (Ray's own containers run what
    KubeRay gives them)."""
    found = []
    for name, doc in _documents():
        if doc["kind"] in {"RayCronJob", "RayJob"}:
            job, where = (
                (doc["spec"]["jobTemplate"], "spec.jobTemplate.entrypoint")
                if doc["kind"] == "RayCronJob"
                else (doc["spec"], "spec.entrypoint")
            )
            head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
            found.append(Command(name, where, shlex.split(job["entrypoint"]), _env(head)))
        elif doc["kind"] in {"CronJob", "Job"}:
            for pod in _pod_specs(doc):
                for c in pod["containers"]:
                    argv = [*c.get("command", []), *c.get("args", [])]
                    found.append(Command(name, f"container {c['name']}", argv, _env(c)))
    return found


def _medrecon_calls(argv: list[str], in_shell: bool = False) -> list[tuple[list[str], bool]]:
    """Each ``medrecon ...`` invocation in ``argv`` (looking inside ``bash -c``/``sh -c`` scripts), with
    whether a shell runs it (so that ``$(...)`` expands)."""
    if len(argv) >= 3 and Path(argv[0]).name in {"bash", "sh"} and argv[1] in {"-c", "-ec", "-ce"}:
        # A command substitution is one word to the caller: $(date -u +%F) is not three.
        return _medrecon_calls(shlex.split(re.sub(r"\$\([^()]*\)", "$(...)", argv[2])), in_shell=True)
    calls = []
    words = list(argv)
    for i, word in enumerate(words):
        if Path(word).name == "medrecon":
            end = next(
                (j for j in range(i + 1, len(words)) if words[j] in {"&&", ";", "||", "|"}), len(words)
            )
            calls.append((words[i + 1 : end], in_shell))
    return calls


def _cli() -> Any:
    import typer.main

    from pipelines.cli import app

    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    names += [g.name or g.typer_instance.info.name for g in app.registered_groups]
    return names, typer.main.get_command(app)


def test_there_are_manifests_and_each_file_parses():
    names = [p.name for p in _files()]
    assert "raycronjob-nightly.yaml" in names and "cronjob-nightly.yaml" in names, names
    assert _documents()


@pytest.mark.parametrize("name,doc", _documents(), ids=lambda v: v if isinstance(v, str) else v.get("kind"))
def test_each_document_is_a_known_kind_with_its_api_version(name, doc):
    found = (doc.get("apiVersion"), doc.get("kind"))
    assert found in KNOWN_KINDS, f"{name}: unexpected apiVersion/kind {found}; known: {sorted(KNOWN_KINDS)}"
    assert doc.get("metadata", {}).get("name"), f"{name}: {doc['kind']} has no metadata.name"


def test_the_cronjob_never_runs_two_nights_at_once():
    (name, cron), *_ = _of_kind("CronJob") or pytest.fail("no batch/v1 CronJob under cluster/")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid", (
        f"{name}: concurrencyPolicy is {spec.get('concurrencyPolicy')}"
    )
    assert isinstance(spec.get("startingDeadlineSeconds"), int) and spec["startingDeadlineSeconds"] > 0, name
    backoff = spec["jobTemplate"]["spec"].get("backoffLimit")
    assert isinstance(backoff, int) and backoff >= 0, f"{name}: jobTemplate.spec.backoffLimit is {backoff!r}"
    assert cron["spec"]["schedule"] == "0 2 * * *", name


def test_the_raycronjob_runs_nightly_and_shuts_its_cluster_down():
    (name, cron), *_ = _of_kind("RayCronJob") or pytest.fail("no ray.io/v1 RayCronJob under cluster/")
    spec = cron["spec"]
    assert spec["schedule"] == "0 2 * * *", name
    assert set(spec) <= {"schedule", "timeZone", "suspend", "jobTemplate"}, f"{name}: fields {sorted(spec)}"
    job = spec["jobTemplate"]
    assert job["shutdownAfterJobFinishes"] is True, name
    # RayCronJob has no concurrencyPolicy: a night must end before the next tick instead.
    assert 0 < job["activeDeadlineSeconds"] < 24 * 3600, (
        f"{name}: activeDeadlineSeconds {job.get('activeDeadlineSeconds')}"
    )
    auth = job["rayClusterSpec"]["authOptions"]
    assert auth == {"mode": "token", "secretName": TOKEN_SECRET}, f"{name}: authOptions {auth}"


def test_every_command_runs_an_existing_medrecon_subcommand_with_its_options():
    names, group = _cli()
    commands = _commands()
    assert commands, "no entrypoint or container command found under cluster/"
    for cmd in commands:
        calls = _medrecon_calls(cmd.argv)
        assert calls, f"{cmd}: does not run medrecon: {cmd.argv}"
        for args, in_shell in calls:
            assert args and args[0] in names, f"{cmd}: `medrecon {args[:1]}` is not one of {names}"
            options = {o for p in group.commands[args[0]].params for o in p.opts if o.startswith("-")}
            used = {a.split("=")[0] for a in args[1:] if a.startswith("-")}
            assert used <= options, f"{cmd}: medrecon {args[0]} has no {sorted(used - options)}"
            assert in_shell or not any("$" in a for a in args), (
                f"{cmd}: {args} holds $... but no shell runs it; wrap it in bash -c"
            )
            missing = {v for a in args for v in re.findall(r"\$\{?(\w+)", a)} - cmd.env
            assert not missing, f"{cmd}: uses ${sorted(missing)} but its container does not set it"


def _sets(args: list[str]) -> list[str]:
    """The ``--set`` overrides of a ``medrecon run``, with sample values for what the shell expands."""
    values = [b for a, b in zip(args, args[1:], strict=False) if a == "--set"]
    values += [a.removeprefix("--set=") for a in args if a.startswith("--set=")]
    values = [v.replace("$(...)", "2026-01-01") for v in values]  # run_key=$(date -u +%F)
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: f"/sample/{m[1].lower()}", v) for v in values]


def test_the_nightly_commands_wait_for_the_lock_and_their_spec_validates_with_their_overrides():
    from pipelines.specfile import load_spec

    runs = [(cmd, args) for cmd in _commands() for args, _ in _medrecon_calls(cmd.argv) if args[0] == "run"]
    assert runs, "no `medrecon run` under cluster/"
    for cmd, args in runs:
        assert "--wait-for-lock" in args, f"{cmd}: medrecon run without --wait-for-lock"
        spec = next(a for a in args[1:] if not a.startswith("-") and "=" not in a)
        assert (ROOT / spec).is_file(), f"{cmd}: spec {spec} does not exist in the repository"
        pipeline = load_spec(ROOT / spec, _sets(args))  # raises SpecError naming the field
        assert pipeline.run_key == "2026-01-01", f"{cmd}: run_key is {pipeline.run_key!r}"


def test_every_manifest_uses_one_image():
    images = {(name, value) for name, doc in _documents() for _, k, value in _walk(doc) if k == "image"}
    assert images, "no image under cluster/"
    assert {v for _, v in images} == {IMAGE}, f"images differ from {IMAGE}: {sorted(images)}"


def test_no_manifest_holds_a_token_only_secret_references():
    for name, doc in _documents():
        assert doc["kind"] != "Secret", (
            f"{name}: a Secret manifest would hold its value; create it with kubectl"
        )
        for path, key, value in _walk(doc):
            if key == "env":
                for var in value:
                    if SECRET_WORDS.search(var["name"]):
                        assert "value" not in var, f"{name}{path}: {var['name']} has a literal value"
                        assert "secretKeyRef" in var.get("valueFrom", {}), (
                            f"{name}{path}: {var['name']} is not a secretKeyRef"
                        )
            if key == "secretKeyRef":
                assert value == {"name": TOKEN_SECRET, "key": TOKEN_KEY} or "token" not in str(value), (
                    f"{name}{path}: token from {value}; expected Secret {TOKEN_SECRET} key {TOKEN_KEY}"
                )
    for path in _files():  # comments included
        found = re.search(r"(auth_token|RAY_AUTH_TOKEN)\s*[:=]\s*['\"]?\w{8,}", path.read_text())
        assert not found, f"{path.relative_to(ROOT)}: a token literal: {found.group(0) if found else ''}"


def test_every_ray_pod_with_token_auth_reads_the_token_from_the_secret():
    for name, doc in _documents():
        for pod in _pod_specs(doc):
            for c in pod["containers"]:
                env = {v["name"]: v for v in c.get("env", [])}
                if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
                    continue
                ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
                assert ref == {"name": TOKEN_SECRET, "key": TOKEN_KEY}, (
                    f"{name}: {c['name']} token from {ref}"
                )


def test_ray_pods_have_a_dev_shm_as_large_as_their_object_store():
    groups = []
    for name, doc in _of_kind("RayCronJob"):
        cluster = doc["spec"]["jobTemplate"]["rayClusterSpec"]
        groups += [(name, "head", cluster["headGroupSpec"])]
        groups += [(name, g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    assert groups, "no Ray node groups under cluster/"
    for name, group_name, group in groups:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        (c, *_) = pod["containers"]
        shm = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm, f"{name} ({group_name}): no /dev/shm mount"
        empty = volumes[shm[0]["name"]].get("emptyDir", {})
        assert empty.get("medium") == "Memory", (
            f"{name} ({group_name}): /dev/shm is not an emptyDir in Memory"
        )
        store = group["rayStartParams"].get("object-store-memory")
        assert store is not None, f"{name} ({group_name}): rayStartParams has no object-store-memory"
        assert _quantity(empty["sizeLimit"]) >= int(store), (
            f"{name} ({group_name}): /dev/shm {empty['sizeLimit']} is smaller than the object store {store}"
        )
        limit = c.get("resources", {}).get("limits", {}).get("memory")
        assert limit and _quantity(limit) > _quantity(empty["sizeLimit"]), (
            f"{name} ({group_name}): memory limit {limit} must exceed /dev/shm {empty['sizeLimit']}"
        )
