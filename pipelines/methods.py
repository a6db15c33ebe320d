"""Reconstruction methods as a recon stage or ``medrecon reprocess`` names them, and their output keys.

A method is written as one of:

* a classical name from :data:`operators.recon.METHODS` (``zero_filled``, ``fbp``, ``nearest``,
  ``bicubic``, ``cg_sense``, ``cs_wavelet``, ``cs_tv``), each for the modalities it serves;
* ``learned:<train stage name>``: the model a train stage of the same pipeline registered;
* ``gan_prior:<train_task stage name>``: a search over the latent space of the DCGAN generator a
  ``task: generate`` stage trained, ``min_z ‖A G(z) − y‖²`` (:func:`models.gan.gan_prior_reconstruct`);
  ``gan_prior+adapt:`` then adapts a copy of the generator's weights to each image's measurements
  (image-adaptive GAN), and ``+dc`` (``gan_prior+dc:``, ``gan_prior+adapt+dc:``) ends with a
  data-consistency step (:data:`GAN_PRIOR_FORMS`). The key is the form with ``_`` for ``+`` and
  the model's key: ``gan_prior.<model key>``, ``gan_prior_dc.…``, ``gan_prior_adapt.…``,
  ``gan_prior_adapt_dc.…``;
* a model URI: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or ``runs:/RUN_ID/PATH``.

Each method writes its own array ``recon/<key>`` and has its own fingerprint. A classical method's
key is its name; a model's key names the registered model and its resolved version
(``quickstart-model.v3``), so version 3 and version 4 both stay in the archive. An alias
(``@champion``) is resolved to its version when the stage starts, and the version is what the
output records.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Literal

from operators.recon import METHODS

__all__ = [
    "stage_model_uri",
    "MethodRef",
    "ResolvedMethod",
    "parse_method",
    "resolve_model_uri",
    "load_model_uri",
    "classical",
]

_MODEL_URI = re.compile(
    r"^models:/(?P<name>[A-Za-z0-9._-]+)(/(?P<version>[0-9]+)|@(?P<alias>[A-Za-z0-9_-]+))$"
)
_RUN_URI = re.compile(r"^runs:/(?P<run_id>[0-9a-f]{8,64})/(?P<path>[A-Za-z0-9._/-]+)$")
_STAGE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
LEARNED_PREFIX = "learned:"
#: The forms of a GAN-prior method, written ``<form>:<train_task stage name>``.
GAN_PRIOR_FORMS = ("gan_prior", "gan_prior+dc", "gan_prior+adapt", "gan_prior+adapt+dc")


@dataclass(frozen=True)
class MethodRef:
    """A method as written: ``kind`` is ``classical``, ``learned``, ``gan_prior`` or ``model``;
    ``target`` is the classical name, the train (or train_task) stage name, or the model URI."""

    text: str
    kind: Literal["classical", "learned", "model", "gan_prior"]
    target: str

    @property
    def form(self) -> str:
        """A GAN-prior method's form (one of :data:`GAN_PRIOR_FORMS`); ``""`` for other kinds."""
        return self.text.split(":", 1)[0] if self.kind == "gan_prior" else ""

    @property
    def data_consistency(self) -> bool:
        """A ``…+dc:`` GAN-prior method: the GAN prior followed by a data-consistency step."""
        return self.form.endswith("+dc")

    @property
    def adapt(self) -> bool:
        """A ``gan_prior+adapt…:`` method: the generator adapted to each image after the search."""
        return "+adapt" in self.form


def parse_method(text: str) -> MethodRef:
    """Parse one method entry; raise ValueError saying what forms are accepted."""
    if not isinstance(text, str):
        raise ValueError(f"a method is a string; found {text!r}")
    if text in METHODS:
        return MethodRef(text, "classical", text)
    if text.startswith(LEARNED_PREFIX):
        stage = text[len(LEARNED_PREFIX) :]
        if not _STAGE.match(stage):
            raise ValueError(f"{text!r}: expected learned:<train stage name>, e.g. learned:train")
        return MethodRef(text, "learned", stage)
    form, _, stage = text.partition(":")
    if form in GAN_PRIOR_FORMS:
        if not _STAGE.match(stage):
            raise ValueError(f"{text!r}: expected {form}:<train_task stage name>, e.g. {form}:gan")
        return MethodRef(text, "gan_prior", stage)
    if _MODEL_URI.match(text) or _RUN_URI.match(text):
        return MethodRef(text, "model", text)
    raise ValueError(
        f"unknown method {text!r}; expected a classical method ({', '.join(METHODS)}), "
        f"learned:<train stage name>, {GAN_PRIOR_FORMS[0]}:<train_task stage name> "
        f"(or {', '.join(f + ':' for f in GAN_PRIOR_FORMS[1:])}), or a model URI "
        "(models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/model)"
    )


def classical(name: str) -> Any:
    """The :class:`operators.recon.Method` of a classical name."""
    return METHODS[name]


@dataclass(frozen=True)
class ResolvedMethod:
    """A method ready to run: its output key, the model to load, and what its fingerprint hashes.

    Attributes:
        ref: the method as written.
        key: the output array is ``recon/<key>``; metrics are ``<key>/psnr`` and so on.
        model_uri: the exact model to load (``models:/NAME/VERSION`` or ``runs:/…``); None if classical.
        identity: what makes two runs of this method the same: the classical name and its solver
            options, or the model's name, version and source run.
    """

    ref: MethodRef
    key: str
    model_uri: str | None = None
    identity: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self, upstream: str, code: str) -> str:
        """This method's fingerprint over one measurement fingerprint and the recon code version."""
        payload = {"identity": self.identity, "upstream": upstream, "code": code}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    @property
    def lineage(self) -> dict[str, Any]:
        """What the output array's attributes record about the method."""
        return {"method": self.ref.text, "key": self.key, "model_uri": self.model_uri, **self.identity}


def resolve_model_uri(uri: str, tracking_uri: str) -> tuple[str, str, dict[str, Any]]:
    """``(output key, exact model URI, identity)`` of a model URI, resolving an alias to its version.

    Raises:
        TrackingError: the registry is unreachable or has no such model, version or alias.
    """
    from pipelines.errors import TrackingError
    from pipelines.tracking import client

    run = _RUN_URI.match(uri)
    if run:
        run_id, path = run["run_id"], run["path"]
        return f"run.{run_id[:12]}", uri, {"model_run_id": run_id, "model_path": path}
    m = _MODEL_URI.match(uri)
    if m is None:
        raise TrackingError(f"{uri!r} is not a model URI (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/…)")
    name = m["name"]
    c = client(tracking_uri)
    try:
        mv = (
            c.get_model_version(name, m["version"])
            if m["version"]
            else c.get_model_version_by_alias(name, m["alias"])
        )
    except Exception as exc:  # MLflow raises RestException / MlflowException for a missing version
        what = f"version {m['version']}" if m["version"] else f"alias @{m['alias']}"
        raise TrackingError(
            f"model {uri!r}: the registry at {tracking_uri} has no {what} of {name!r} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); check the name and version "
            "(mlflow ui lists them) or the tracking URI"
        ) from None
    version = str(mv.version)
    return (
        f"{name}.v{version}",
        f"models:/{name}/{version}",
        {"model": name, "model_version": version, "model_run_id": mv.run_id},
    )


def load_model_uri(model_uri: str, tracking_uri: str, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """Download ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or ``runs:/ID/PATH``; rebuild the module.

    The download goes to a temporary folder that is removed once the weights are in memory.
    """
    import mlflow

    from models.registry import load_model
    from pipelines.errors import TrackingError
    from pipelines.tracking import client

    _, _, identity = resolve_model_uri(model_uri, tracking_uri)  # one URI grammar; aliases resolved
    with tempfile.TemporaryDirectory(prefix="medrecon-model-") as target:
        try:  # URIs passed, never set globally: one process may talk to several tracking servers
            source = model_uri
            if "model_version" in identity:
                source = client(tracking_uri).get_model_version_download_uri(
                    identity["model"], identity["model_version"]
                )
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=target, tracking_uri=tracking_uri
            )
        except Exception as exc:
            raise TrackingError(
                f"could not download model {model_uri!r} from {tracking_uri!r}: {exc}"
            ) from exc
        module, spec = load_model(local, device=device)
        facts = os.path.join(local, "task.json")  # an analysis model's task, classes and input
        if os.path.exists(facts):
            with open(facts) as f:
                spec["task"] = json.load(f)
        return module, spec


def stage_model_uri(upstream: dict[str, dict[str, Any]], tracking_uri: str, ref: str, who: str) -> str:
    """The exact model a stage names: a registry URI (``models:/NAME/VERSION`` or ``@ALIAS``)
    resolved to its version, or the model an earlier train stage of the pipeline registered
    (``upstream``: the outputs of the stages before, by name).

    It lives here, not on the stage context, so that stages which load no model do not count
    this module (and every model it reaches) in their code version.

    Raises:
        StageError: the URI does not resolve; the message starts with ``who``
            (``"segment stage 'seg'"``).
    """
    if not ref.startswith("models:/"):
        return str(upstream[ref]["model_uri"])
    from pipelines.errors import StageError, TrackingError

    try:
        return resolve_model_uri(ref, tracking_uri)[1]
    except TrackingError as exc:
        raise StageError(f"{who}: {exc}") from None
