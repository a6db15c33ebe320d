"""Everything under ``cluster/`` parses, runs commands that exist, holds no secrets, and agrees with the
repository: the Kubernetes manifests, the Ray cluster launcher YAML, the Dockerfile and the pages.

No cluster, no cloud and no Ray cluster: every YAML under ``cluster/`` is read with ``yaml.safe_load``
and checked against what the repository itself says (the ``medrecon`` command's subcommands and
options, read from its typer app; ``ray``'s, read from its click CLI; the spec files; the Makefile's
torch pin; constraints.txt's ray), against Ray's own JSON schema for the launcher, and against the
rules the clusters rely on: token auth on every Ray process with the token only from a Secret or a
file, a CPU and a GPU group that autoscale, ``/dev/shm`` as large as the object store, one image
whose working directory is the one the manifests use. Structure only: nothing here starts a cluster.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "launcher" / "medrecon-cluster.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PAGES = ("laptop.md", "vm-cluster.md", "kubernetes.md")
IMAGE = "medrecon:latest"
TOKEN_SECRET = "medrecon-ray-token"
TOKEN_KEY = "auth_token"  # the key KubeRay's authOptions.secretName expects
TOKEN_FILE = "~/.ray/auth_token"  # where Ray looks for its token when no variable names one
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
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
# What neither the image nor the nodes get: outputs, local state, caches (the list).
LOCAL_STATE = {".venv", ".tmp", "runs", "mlruns", "mlartifacts", "*.db", "benchmarks/results", ".git",
               "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}  # fmt: skip
SECRET_WORDS = re.compile(r"token|secret|password|passwd|key|credential", re.IGNORECASE)
TOKEN_LITERAL = re.compile(r"(auth_token|RAY_AUTH_TOKEN)\s*[:=]\s*['\"]?\w{8,}")
_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
          "Ti": 2**40}  # fmt: skip
_SUBST = "__SUBST__"  # what a $(...) command substitution becomes before a command line is split


# --- reading the files -------------------------------------------------------------------------


def _files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in {".yaml", ".yml"})


def _manifest_files() -> list[Path]:
    """The Kubernetes manifests: every YAML under ``cluster/`` except the launcher's."""
    return [p for p in _files() if LAUNCHER.parent not in p.parents]


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in _manifest_files():
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


def _ray_clusters() -> list[tuple[str, dict[str, Any]]]:
    """Every RayCluster spec under ``cluster/``: a RayCluster's, a RayJob's and a RayCronJob's."""
    found = []
    for name, doc in _documents():
        if doc["kind"] == "RayCluster":
            found.append((f"{name} (RayCluster)", doc["spec"]))
        elif doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
            found.append((f"{name} (RayJob)", doc["spec"]["rayClusterSpec"]))
        elif doc["kind"] == "RayCronJob":
            found.append((f"{name} (RayCronJob)", doc["spec"]["jobTemplate"]["rayClusterSpec"]))
    return found


def _groups(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, group)`` of a RayCluster spec's head group and worker groups."""
    return [("head", cluster["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])
    ]


def _gpus(group: dict[str, Any]) -> int:
    """The ``nvidia.com/gpu`` limit of a group's Ray container (0 if none)."""
    ray_container = group["template"]["spec"]["containers"][0]
    return int(ray_container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _claim_mounts(pod: dict[str, Any]) -> set[tuple[str, str]]:
    """``(claim name, mount path)`` of each PersistentVolumeClaim a pod's first container mounts."""
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod.get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    mounts = pod["containers"][0].get("volumeMounts", [])
    return {(claims[m["name"]], m["mountPath"]) for m in mounts if m["name"] in claims}


@cache
def _launcher() -> dict[str, Any]:
    return yaml.safe_load(LAUNCHER.read_text())


def _torch_pin(text: str, where: str) -> str:
    pins = set(re.findall(r"torch==([\w.+-]+)", text))
    assert len(pins) == 1, f"{where}: expected one torch==VERSION, found {sorted(pins) or 'none'}"
    return pins.pop()


def _makefile_torch_pin() -> str:
    install = [line for line in (ROOT / "Makefile").read_text().splitlines() if "pip install" in line]
    return _torch_pin("\n".join(line for line in install if "torch==" in line), "Makefile install line")


# --- command lines -----------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Shell:
    """One simple command of a shell line: its ``NAME=value`` prefixes, its words, and what the line
    exported before it."""

    assigned: dict[str, str]
    argv: list[str]
    line: str


_OPERATORS = {";", "&&", "||", "|", "&", "(", ")"}
_REDIRECTS = {">", ">>", "<", "&>", ">&"}


def _simple_commands(text: str) -> list[Shell]:
    """Split shell text (one or more lines, ``\\`` continuations joined) into simple commands."""
    found = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = re.sub(r"\$\([^()]*\)", _SUBST, line).strip()
        if not line or line.startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError as exc:
            pytest.fail(f"cannot split the shell line {line!r}: {exc}")
        exported: dict[str, str] = {}
        words: list[str] = []
        for token in [*tokens, ";"]:
            if token not in _OPERATORS:
                words.append(token)
                continue
            argv = [
                w
                for i, w in enumerate(words)
                if w not in _REDIRECTS
                and (i == 0 or words[i - 1] not in _REDIRECTS)  # a redirection's target
                and not (w.isdigit() and words[i + 1 : i + 2] and words[i + 1] in _REDIRECTS)  # 2>
            ]
            assigned = dict(exported)
            while argv and re.fullmatch(r"\w+=.*", argv[0]):
                key, value = argv.pop(0).split("=", 1)
                assigned[key] = value
            while argv and argv[0] in {"exec", "sudo", "time", "nohup"}:
                argv.pop(0)
            if argv and argv[0] == "export":
                exported.update(a.split("=", 1) for a in argv[1:] if "=" in a)
            elif argv:
                found.append(Shell(assigned, argv, line))
            words = []
    return found


def _resolve(group: Any, args: list[str], program: str) -> tuple[Any, list[str]]:
    """The click command ``args`` names under ``group`` (through subgroups), and the words after it.

    (typer carries its own copy of click, so a group is whatever has ``commands``.)"""
    command, path = group, [program]
    while isinstance(getattr(command, "commands", None), dict):
        assert args and args[0] in command.commands, (
            f"`{' '.join([*path, *args[:1]])}` is not a command; `{' '.join(path)}` has "
            f"{sorted(command.commands)}"
        )
        path.append(args[0])
        command, args = command.commands[args[0]], args[1:]
    return command, args


def _check_options(command: Any, args: list[str], what: str) -> None:
    options = {"--help"} | {
        o for p in command.params for o in [*p.opts, *p.secondary_opts] if o.startswith("-")
    }
    used = {a.split("=")[0] for a in args if re.match(r"--?[A-Za-z]", a)}
    assert used <= options, f"{what}: no option {sorted(used - options)}; it has {sorted(options)}"


@cache
def _medrecon_cli() -> Any:
    import typer.main

    from pipelines.cli import app

    return typer.main.get_command(app)


@cache
def _ray_cli() -> Any:
    from ray.scripts.scripts import cli

    return cli


def _sets(args: list[str]) -> list[str]:
    """The ``--set`` overrides of a ``medrecon run``, with sample values for what the shell expands."""
    values = [b for a, b in zip(args, args[1:], strict=False) if a == "--set"]
    values += [a.removeprefix("--set=") for a in args if a.startswith("--set=")]
    values = [v.replace("$(...)", "2026-01-01").replace(_SUBST, "2026-01-01") for v in values]  # run_key
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: f"/sample/{m[1].lower()}", v) for v in values]


# --- the pages ---------------------------------------------------------------------------------


def _pages() -> list[Path]:
    return sorted(CLUSTER.glob("*.md"))


def _fenced(path: Path) -> list[str]:
    """The text of every fenced code block of a Markdown file."""
    return re.findall(r"^```[^\n]*\n(.*?)^```", path.read_text(), flags=re.MULTILINE | re.DOTALL)


def _page_commands(program: str) -> list[tuple[str, Shell]]:
    """Every ``program ...`` simple command in the fenced code blocks of ``cluster/*.md``."""
    return [
        (path.name, cmd)
        for path in _pages()
        for block in _fenced(path)
        for cmd in _simple_commands(block)
        if Path(cmd.argv[0]).name == program
    ]


def _dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.MULTILINE)]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether ``path`` (relative to the build context) matches a .dockerignore pattern, roughly."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        pattern = pattern.strip("/").removeprefix("**/")
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(Path(p).name, pattern) for p in prefixes):
            return True
    return False


def _dockerignore() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


# --- every file --------------------------------------------------------------------------------


def test_there_are_manifests_and_each_file_parses():
    names = [p.name for p in _files()]
    for expected in ("raycronjob-nightly.yaml", "cronjob-nightly.yaml", "raycluster.yaml", "rayjob.yaml",
                     "medrecon-cluster.yaml"):  # fmt: skip
        assert expected in names, f"cluster/ has no {expected}: {names}"
    assert _documents()
    assert isinstance(_launcher(), dict), f"{LAUNCHER}: not a mapping"


@pytest.mark.parametrize("name,doc", _documents(), ids=lambda v: v if isinstance(v, str) else v.get("kind"))
def test_each_document_is_a_known_kind_with_its_api_version(name, doc):
    found = (doc.get("apiVersion"), doc.get("kind"))
    assert found in KNOWN_KINDS, f"{name}: unexpected apiVersion/kind {found}; known: {sorted(KNOWN_KINDS)}"
    assert doc.get("metadata", {}).get("name"), f"{name}: {doc['kind']} has no metadata.name"


def test_no_file_holds_a_token_literal():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()] + [DOCKERIGNORE]
    for path in files:  # comments and pages included
        found = TOKEN_LITERAL.search(path.read_text())
        assert not found, f"{path.relative_to(ROOT)}: a token literal: {found.group(0) if found else ''}"


# --- the nightly schedules ---------------------------------------------------------------------


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


def test_the_plain_cronjob_reaches_a_raycluster_that_serves_it():
    (name, cron), *_ = _of_kind("CronJob") or pytest.fail("no batch/v1 CronJob under cluster/")
    clusters = {doc["metadata"]["name"]: doc["spec"] for _, doc in _of_kind("RayCluster")}
    (pod,) = _pod_specs(cron)
    env = {v["name"]: v for v in pod["containers"][0].get("env", [])}
    address = env.get("MEDRECON_RAY_ADDRESS", {}).get("value", "")
    found = re.fullmatch(r"ray://([\w-]+)-head-svc:(\d+)", address)
    assert found, f"{name}: MEDRECON_RAY_ADDRESS {address!r} is not ray://<RayCluster>-head-svc:PORT"
    assert found[1] in clusters, (
        f"{name}: no RayCluster {found[1]!r} under cluster/ (have {sorted(clusters)})"
    )
    cluster = clusters[found[1]]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["containerPort"] for p in head.get("ports", [])}
    assert int(found[2]) in ports, f"{name}: the RayCluster's head exposes {sorted(ports)}, not {found[2]}"
    assert cluster.get("authOptions", {}).get("secretName") == TOKEN_SECRET, (
        f"{name}: RayCluster {found[1]} does not use the token Secret {TOKEN_SECRET}"
    )
    # Ingest lists the folder in the CronJob's pod and reads each file in a Ray task: every Ray pod
    # must mount the same claim at the same path.
    wanted = _claim_mounts(pod)
    for group_name, group in _groups(cluster):
        mounted = _claim_mounts(group["template"]["spec"])
        assert wanted <= mounted, f"{name}: RayCluster {found[1]} group {group_name} lacks {wanted - mounted}"


# --- commands the manifests run ----------------------------------------------------------------


def test_every_command_runs_an_existing_medrecon_subcommand_with_its_options():
    group = _medrecon_cli()
    commands = _commands()
    assert commands, "no entrypoint or container command found under cluster/"
    for cmd in commands:
        calls = _medrecon_calls(cmd.argv)
        assert calls, f"{cmd}: does not run medrecon: {cmd.argv}"
        for args, in_shell in calls:
            command, rest = _resolve(group, args, f"{cmd}: medrecon")
            _check_options(command, rest, f"{cmd}: medrecon {args[0]}")
            assert in_shell or not any("$" in a for a in args), (
                f"{cmd}: {args} holds $... but no shell runs it; wrap it in bash -c"
            )
            missing = {v for a in args for v in re.findall(r"\$\{?(\w+)", a)} - cmd.env
            assert not missing, f"{cmd}: uses ${sorted(missing)} but its container does not set it"


def test_every_run_waits_for_the_lock_and_its_spec_validates_with_its_overrides():
    from pipelines.specfile import load_spec

    runs = [(cmd, args) for cmd in _commands() for args, _ in _medrecon_calls(cmd.argv) if args[0] == "run"]
    assert runs, "no `medrecon run` under cluster/"
    assert any(cmd.file.endswith("rayjob.yaml") for cmd, _ in runs), "rayjob.yaml does not run `medrecon run`"
    for cmd, args in runs:
        assert "--wait-for-lock" in args, f"{cmd}: medrecon run without --wait-for-lock"
        spec = next(a for a in args[1:] if not a.startswith("-") and "=" not in a)
        assert (ROOT / spec).is_file(), f"{cmd}: spec {spec} does not exist in the repository"
        pipeline = load_spec(ROOT / spec, _sets(args))  # raises SpecError naming the field
        if "nightly" in cmd.file:  # a scheduled night: its key is the date the shell expands
            assert pipeline.run_key == "2026-01-01", f"{cmd}: run_key is {pipeline.run_key!r}"


def test_entrypoints_run_in_the_images_working_directory():
    workdirs = {
        (name, c.get("workingDir"))
        for name, doc in _documents()
        for pod in _pod_specs(doc)
        for c in pod["containers"]
    }
    assert {w for _, w in workdirs} == {_workdir()}, (
        f"workingDir differs from the Dockerfile's WORKDIR {_workdir()}: {sorted(workdirs, key=str)}"
    )
    for cmd in _commands():
        script = cmd.argv[2] if Path(cmd.argv[0]).name in {"bash", "sh"} else ""
        for target in re.findall(r"\bcd\s+(\S+)", script):
            assert target == _workdir(), f"{cmd}: cd {target}, but the repository is at {_workdir()}"


# --- the Ray clusters on Kubernetes ------------------------------------------------------------


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


def test_every_ray_cluster_turns_token_auth_on_in_every_ray_container():
    clusters = _ray_clusters()
    kinds = {name.rsplit("(", 1)[1].rstrip(")") for name, _ in clusters}
    assert {"RayCluster", "RayJob", "RayCronJob"} <= kinds, f"Ray clusters found only in {sorted(kinds)}"
    for name, cluster in clusters:
        auth = cluster.get("authOptions")
        assert auth == {"mode": "token", "secretName": TOKEN_SECRET}, f"{name}: authOptions {auth}"
        for group_name, group in _groups(cluster):
            ray_container = group["template"]["spec"]["containers"][0]
            env = {v["name"]: v for v in ray_container.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", (
                f"{name} ({group_name}): RAY_AUTH_MODE is not token"
            )
            assert "RAY_AUTH_TOKEN" in env, f"{name} ({group_name}): no RAY_AUTH_TOKEN"


def test_every_ray_cluster_runs_the_ray_of_constraints():
    (ray_version,) = re.findall(r"^ray==([\w.]+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    for name, cluster in _ray_clusters():
        assert cluster.get("rayVersion") == ray_version, (
            f"{name}: rayVersion {cluster.get('rayVersion')!r}, but constraints.txt pins ray=={ray_version}"
        )


def test_the_raycluster_and_the_rayjob_have_a_cpu_and_a_gpu_group_that_autoscale():
    clusters = [(n, c) for n, c in _ray_clusters() if n.endswith(("(RayCluster)", "(RayJob)"))]
    kinds = {n.rsplit("(", 1)[1] for n, _ in clusters}
    assert kinds == {"RayCluster)", "RayJob)"}, f"expected a RayCluster and a RayJob cluster: {sorted(kinds)}"
    for name, cluster in clusters:
        assert cluster.get("enableInTreeAutoscaling") is True, f"{name}: enableInTreeAutoscaling is not true"
        assert _gpus(cluster["headGroupSpec"]) == 0, f"{name}: the head asks for a GPU"
        workers = [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
        gpu = [n for n, g in workers if _gpus(g) > 0]
        cpu = [n for n, g in workers if _gpus(g) == 0]
        assert gpu and cpu, f"{name}: CPU groups {cpu}, GPU groups {gpu}; want at least one of each"
        for group_name, g in workers:
            low, high = g.get("minReplicas", 0), g.get("maxReplicas")
            replicas = g.get("replicas", low)
            assert isinstance(high, int) and 0 <= low <= replicas <= high and high >= 1, (
                f"{name} ({group_name}): min {low} <= replicas {replicas} <= max {high} does not hold"
            )
        assert any(g["maxReplicas"] > g.get("minReplicas", 0) for _, g in workers), (
            f"{name}: no group can grow: min == max everywhere"
        )


def test_each_groups_num_gpus_is_its_gpu_request():
    for name, cluster in _ray_clusters():
        for group_name, group in _groups(cluster):
            resources = group["template"]["spec"]["containers"][0].get("resources", {})
            limit = _gpus(group)
            request = int(resources.get("requests", {}).get("nvidia.com/gpu", limit))
            assert request == limit, (
                f"{name} ({group_name}): nvidia.com/gpu request {request} != limit {limit}"
            )
            told = int(group["rayStartParams"].get("num-gpus", 0))
            assert told == limit, (
                f"{name} ({group_name}): rayStartParams num-gpus {told}, "
                f"but the pod gets {limit} nvidia.com/gpu"
            )


def test_ray_pods_have_a_dev_shm_as_large_as_their_object_store():
    groups = [(name, g_name, g) for name, cluster in _ray_clusters() for g_name, g in _groups(cluster)]
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


# --- the Ray cluster launcher ------------------------------------------------------------------


def test_the_launcher_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(_launcher()), key=str)
    assert not errors, "\n".join(f"{LAUNCHER.name}: {list(e.absolute_path)}: {e.message}" for e in errors)
    # Ray's own checks after its defaults are filled in (the head type exists, min_workers fit).
    validate_config(prepare_config(copy.deepcopy(_launcher())))


def test_the_launcher_has_a_head_a_cpu_group_and_a_gpu_group_that_autoscale():
    config = _launcher()
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types, f"head_node_type {head!r} is not one of {sorted(types)}"
    assert {"cpu_worker", "gpu_worker"} <= set(types), f"node types {sorted(types)}"
    assert types[head]["resources"].get("GPU", 0) == 0, "the head asks for a GPU"
    assert types["cpu_worker"]["resources"].get("GPU", 0) == 0, "cpu_worker asks for a GPU"
    assert types["gpu_worker"]["resources"].get("GPU", 0) >= 1, "gpu_worker does not ask for a GPU"
    workers = {k: v for k, v in types.items() if k != head}
    for name, t in workers.items():
        low, high = t.get("min_workers", 0), t.get("max_workers")
        assert isinstance(high, int) and 0 <= low <= high and high >= 1, f"{name}: min {low}, max {high}"
    assert any(t["max_workers"] > t.get("min_workers", 0) for t in workers.values()), "no group can grow"
    total = sum(t["max_workers"] for t in workers.values())
    assert total <= config["max_workers"], (
        f"the groups' max_workers add up to {total}, above the cluster's max_workers {config['max_workers']}"
    )
    assert config.get("idle_timeout_minutes", 0) > 0, "idle_timeout_minutes: idle workers are never removed"


def _launcher_commands() -> dict[str, list[str]]:
    """Every command list of the launcher YAML, by where it is."""
    config = _launcher()
    found = {key: list(config.get(key) or []) for key in (
        "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
        "head_start_ray_commands", "worker_start_ray_commands")}  # fmt: skip
    for name, t in config["available_node_types"].items():
        for key in ("initialization_commands", "worker_setup_commands"):
            if key in t:
                found[f"available_node_types.{name}.{key}"] = list(t[key])
    return found


def test_every_ray_start_in_the_launcher_turns_token_auth_on_with_the_token_from_a_file():
    starts = []
    for where, commands in _launcher_commands().items():
        for text in commands:
            for cmd in _simple_commands(text):
                if Path(cmd.argv[0]).name == "ray":
                    command, rest = _resolve(_ray_cli(), cmd.argv[1:], f"{where}: ray")
                    _check_options(command, rest, f"{where}: {cmd.line}")
                    if cmd.argv[1] == "start":
                        starts.append((where, cmd))
    wheres = {w for w, _ in starts}
    assert {"head_start_ray_commands", "worker_start_ray_commands"} <= wheres, f"ray start only in {wheres}"
    for where, cmd in starts:
        assert cmd.assigned.get("RAY_AUTH_MODE") == "token", (
            f"{where}: `{cmd.line}` without RAY_AUTH_MODE=token"
        )
        assert "RAY_AUTH_TOKEN" not in cmd.assigned, f"{where}: the token is written in the YAML"
        path = cmd.assigned.get("RAY_AUTH_TOKEN_PATH", TOKEN_FILE)
        assert path in _launcher().get("file_mounts", {}), (
            f"{where}: Ray reads its token from {path}, which file_mounts does not copy to the nodes"
        )
    assert "RAY_AUTH_TOKEN=" not in LAUNCHER.read_text(), f"{LAUNCHER.name}: RAY_AUTH_TOKEN= in the YAML"


def test_the_launcher_keeps_the_dashboard_closed_to_the_internet():
    rules = _launcher()["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        ranges += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if {"0.0.0.0/0", "::/0"} & set(ranges):
            assert (rule.get("FromPort"), rule.get("ToPort")) == (22, 22), (
                f"{LAUNCHER.name}: {rule} opens more than SSH to the internet; the Jobs API (8265) must be "
                "reached through `ray dashboard`, or from your own network only"
            )


def test_every_launcher_node_installs_the_project_with_the_makefiles_torch_pin():
    pin = _makefile_torch_pin()
    config = _launcher()
    commands = _launcher_commands()
    setup = commands["setup_commands"]
    per_type = {}
    for name, t in config["available_node_types"].items():
        if name == config["head_node_type"]:
            per_type[name] = setup + commands["head_setup_commands"]
        else:  # a node type's own worker_setup_commands replace the shared ones
            per_type[name] = list(t.get("worker_setup_commands", setup + commands["worker_setup_commands"]))
    for name, lines in per_type.items():
        installs = [line for line in lines if "pip install" in line and re.search(r"-e\s+\.", line)]
        assert installs, f"{name}: no `pip install ... -e .` of the project"
        for line in installs:
            assert _torch_pin(line, f"{name}: {line}") == pin, (
                f"{name}: torch pin differs from the Makefile's {pin}"
            )
            assert re.search(r"-c\s+constraints\.txt", line), f"{name}: {line} without -c constraints.txt"
            gpu = config["available_node_types"][name]["resources"].get("GPU", 0) > 0
            assert (CPU_INDEX in line) != gpu, (
                f"{name}: {'a GPU node takes' if gpu else 'a CPU node does not take'} "
                f"torch's CPU build: {line}"
            )
    # The nodes get what installs the project, from the repository, and none of its local state.
    mounts = config.get("file_mounts", {})
    sources = {v for k, v in mounts.items() if k != TOKEN_FILE}
    needed = {"pyproject.toml", "constraints.txt", "operators", "models", "pipelines"}
    assert needed <= sources, f"file_mounts does not copy {sorted(needed - sources)} to the nodes"
    for source in sources:
        assert source not in {".", "./"}, "file_mounts copies the whole repository (.venv, runs, ...)"
        assert (ROOT / source).exists(), f"file_mounts copies {source}, which is not in the repository"
        assert not _ignored(source, sorted(LOCAL_STATE)), f"file_mounts copies local state: {source}"
    project = next(Path(k).parent.as_posix() for k, v in mounts.items() if v == "pyproject.toml")
    for lines in per_type.values():
        for line in lines:
            for target in re.findall(r"\bcd\s+(\S+)\s*&&[^;&|]*\bpip install", line):
                assert target == project, (
                    f"`{line}` installs from {target}, the project is copied to {project}"
                )


# --- the image ---------------------------------------------------------------------------------


def _workdir() -> str:
    dirs = [args for op, args in _dockerfile() if op == "WORKDIR"]
    assert dirs, f"{DOCKERFILE.name}: no WORKDIR"
    return dirs[-1]


def test_the_dockerfile_installs_the_project_as_the_makefile_does():
    instructions = _dockerfile()
    base = next(args for op, args in instructions if op == "FROM")
    assert base == "python:3.11-slim", f"{DOCKERFILE.name}: FROM {base}"
    runs = [args for op, args in instructions if op == "RUN"]
    pinned = [r for r in runs if "torch==" in r]
    assert pinned, f"{DOCKERFILE.name}: no RUN installs torch==..."
    assert _torch_pin("\n".join(pinned), DOCKERFILE.name) == _makefile_torch_pin(), (
        f"{DOCKERFILE.name}: torch pin differs from the Makefile's {_makefile_torch_pin()}"
    )
    for r in pinned:
        assert re.search(r"-c\s+constraints\.txt", r), f"{DOCKERFILE.name}: {r} without -c constraints.txt"
    assert any(re.search(r"pip install .*-e\s+\.", r) for r in runs), (
        f"{DOCKERFILE.name}: the project is not installed"
    )
    # The CPU build by default; a build argument chooses another index (a CUDA one).
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    chosen = [name for name, default in args.items() if default == CPU_INDEX]
    assert chosen, f"{DOCKERFILE.name}: no ARG defaults to {CPU_INDEX}"
    assert any(re.search(rf"\$\{{?{chosen[0]}\b", r) for r in pinned), (
        f"{DOCKERFILE.name}: the torch install does not use ${chosen[0]}"
    )


def test_the_dockerfile_runs_as_a_user_in_the_directory_the_manifests_use():
    users = [args for op, args in _dockerfile() if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, (
        f"{DOCKERFILE.name}: runs as {users or 'root'}"
    )
    assert _workdir() == "/app", f"{DOCKERFILE.name}: WORKDIR {_workdir()}"


def test_the_build_context_leaves_out_local_state_and_keeps_what_the_image_needs():
    patterns = _dockerignore()
    normalised = {p.strip("/").removeprefix("**/") for p in patterns}
    assert LOCAL_STATE <= normalised, f".dockerignore lacks {sorted(LOCAL_STATE - normalised)}"
    copied = [
        word
        for op, args in _dockerfile()
        if op == "COPY"
        for word in args.split()[:-1]
        if not word.startswith("--") and word != "."
    ]
    needed = [*copied, "pyproject.toml", "constraints.txt", "operators", "models", "pipelines"]
    for path in needed:
        assert (ROOT / path).exists(), f"{DOCKERFILE.name} needs {path}, which is not in the repository"
        assert not _ignored(path, patterns), f".dockerignore leaves out {path}, which the image needs"


# --- the pages ---------------------------------------------------------------------------------


def test_the_index_links_a_page_per_target_and_every_link_resolves():
    index = (CLUSTER / "README.md").read_text()
    for page in PAGES:
        assert (CLUSTER / page).is_file(), f"cluster/{page} does not exist"
        assert f"]({page}" in index, f"cluster/README.md does not link {page}"
    for path in _pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"\w+://", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file) if file else path
            assert linked.is_file(), f"{path.name}: link to {target}, which does not exist"
            if anchor:
                headings = re.findall(r"^#+\s+(.*)$", linked.read_text(), re.MULTILINE)
                slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
                assert anchor in slugs, f"{path.name}: link to {target}; {linked.name} has no such heading"


def test_every_medrecon_command_in_the_pages_exists_with_its_options():
    from pipelines.specfile import load_spec

    group = _medrecon_cli()
    calls = _page_commands("medrecon")
    assert calls, "no `medrecon` command in the pages' code blocks"
    shown = set()
    for page, cmd in calls:
        command, rest = _resolve(group, cmd.argv[1:], f"{page}: medrecon")
        _check_options(command, rest, f"{page}: {cmd.line}")
        shown.add(" ".join(cmd.argv[1 : len(cmd.argv) - len(rest)]))
        specs = [a for a in rest if a.startswith("pipelines/specs/")]
        for spec in specs:
            assert (ROOT / spec).is_file(), f"{page}: {spec} does not exist"
            load_spec(ROOT / spec, _sets(rest))  # the overrides a page shows validate
    # The pages document how to run on a cluster: each of these appears at least once.
    missing = {"run", "submit", "jobs list", "status", "logs", "stop"} - shown
    assert not missing, f"the pages never show `medrecon {sorted(missing)}`"


def test_every_ray_command_in_the_pages_exists_with_its_options():
    calls = _page_commands("ray")
    assert calls, "no `ray` command in the pages' code blocks"
    for page, cmd in calls:
        command, rest = _resolve(_ray_cli(), cmd.argv[1:], f"{page}: ray")
        _check_options(command, rest, f"{page}: {cmd.line}")
        for word in rest:
            if word.endswith((".yaml", ".yml")):
                assert (ROOT / word).is_file(), f"{page}: `{cmd.line}` names {word}, which does not exist"
        if cmd.argv[1] == "start":
            assert cmd.assigned.get("RAY_AUTH_MODE") == "token", f"{page}: `{cmd.line}` without token auth"


def test_the_files_the_pages_apply_exist():
    for page, cmd in _page_commands("kubectl"):
        if cmd.argv[1] not in {"apply", "create", "delete"}:
            continue  # kubectl logs -f is --follow
        for flag, value in zip(cmd.argv, cmd.argv[1:], strict=False):
            if flag == "-f":
                assert (ROOT / value).is_file(), f"{page}: `{cmd.line}` applies {value}, which does not exist"


def test_the_image_the_pages_build_is_the_one_the_manifests_use():
    builds = [(page, cmd) for page, cmd in _page_commands("docker") if cmd.argv[1:2] == ["build"]]
    assert builds, "no `docker build` in the pages"
    arg_names = {a.split("=", 1)[0] for op, a in _dockerfile() if op == "ARG"}
    for page, cmd in builds:
        argv = cmd.argv
        options = dict(zip(argv, argv[1:], strict=False))
        assert options.get("-f") and (ROOT / options["-f"]).resolve() == DOCKERFILE, (
            f"{page}: `{cmd.line}` does not build {DOCKERFILE.relative_to(ROOT)}"
        )
        assert options.get("-t") == IMAGE, (
            f"{page}: `{cmd.line}` tags {options.get('-t')}, manifests use {IMAGE}"
        )
        assert argv[-1] == ".", f"{page}: `{cmd.line}`: the build context must be the repository root"
        for flag, value in zip(argv, argv[1:], strict=False):
            if flag == "--build-arg":
                assert value.split("=", 1)[0] in arg_names, f"{page}: {value}: the Dockerfile has no such ARG"
