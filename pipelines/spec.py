"""Typed, frozen, closed pydantic models of a pipeline file.

A pipeline file is YAML::

    name: quickstart
    seed: 0
    archive: {path: runs/quickstart/archive}
    tracking: {uri: sqlite:///runs/quickstart/mlflow.db, experiment: medrecon-quickstart}
    stages:
      - {kind: phantoms, n_scans: 16, shape: [16, 96, 96], split: {train: 10, val: 2, test: 4}}
      - {kind: simulate, modality: mri, mask: {kind: random_1d, acceleration: 4, center_fraction: 0.08}}
      - {kind: train, model: {name: unrolled_gd, kwargs: {n_iter: 5}}, workers: 2, epochs: 6}
      - {kind: recon, methods: [zero_filled, learned]}
      - {kind: evaluate}

Every model inherits :class:`Spec` (frozen, unknown fields forbidden). Stage kinds are
a discriminated union on ``kind``. Environment facts (Ray address, MLflow URI) come
from :class:`Settings` (``MEDRECON_*`` variables) when the file leaves them out.

:func:`load_spec` reads a file, applies ``--set key.path=value`` overrides and turns
validation errors into one :class:`~pipelines.errors.SpecError` whose message names
the file, the field, what was expected and what was found.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.errors import SpecError

__all__ = [
    "Spec",
    "Settings",
    "ArchiveSpec",
    "TrackingSpec",
    "RaySpec",
    "SplitSpec",
    "PhantomStage",
    "MaskSpec",
    "SimulateStage",
    "CTSpec",
    "ModelSpec",
    "TrainStage",
    "ReconStage",
    "EvaluateStage",
    "Stage",
    "PipelineSpec",
    "load_spec",
    "apply_overrides",
    "LEARNED",
]

_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
#: The recon method name that means "the model trained (or named) in this pipeline".
LEARNED = "learned"
CLASSICAL = ("zero_filled", "fbp", "cg_sense", "cs_wavelet", "cs_tv")
#: Which recon methods apply to which modality.
METHODS_BY_MODALITY = {
    "mri": ("zero_filled", "cg_sense", "cs_wavelet", "cs_tv", "learned"),
    "ct": ("fbp", "cg_sense", "cs_wavelet", "cs_tv"),
}


class Spec(BaseModel):
    """Base of every spec model: immutable, and unknown fields are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Settings(BaseSettings):
    """Facts about the environment, from ``MEDRECON_*`` variables; a pipeline file may override them."""

    model_config = SettingsConfigDict(env_prefix="MEDRECON_", extra="ignore")

    ray_address: str | None = None
    tracking_uri: str | None = None


class ArchiveSpec(Spec):
    """Where the Zarr v3 archive lives: a local directory or an fsspec URI (``s3://bucket/prefix``)."""

    path: str = Field(min_length=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)


class TrackingSpec(Spec):
    """MLflow settings.

    ``uri`` defaults to ``$MEDRECON_TRACKING_URI``, else a SQLite file beside the archive.
    """

    uri: str | None = None
    experiment: str = "medrecon"
    registered_model: str | None = Field(
        default=None, description="registry name; default '<pipeline name>-model'"
    )


class RaySpec(Spec):
    """How to reach Ray. With no address, an embedded local instance is started."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)


class SplitSpec(Spec):
    """Number of scans in each split; they must add up to the number of scans."""

    train: int = Field(ge=1)
    val: int = Field(default=0, ge=0)
    test: int = Field(ge=1)


class PhantomStage(Spec):
    """Create seeded random-ellipsoid phantoms in the archive (the embedded data source)."""

    kind: Literal["phantoms"]
    n_scans: int = Field(ge=2)
    shape: tuple[int, int, int] = Field(description="(D, H, W) of each volume")
    split: SplitSpec
    prefix: str = "phantom"
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @field_validator("shape")
    @classmethod
    def _positive(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(v) < 8:
            raise ValueError(f"every size must be >= 8, found {list(v)}")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix_is_id(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"must match [A-Za-z0-9._-]+, found {v!r}")
        return v

    @model_validator(mode="after")
    def _split_adds_up(self) -> PhantomStage:
        total = self.split.train + self.split.val + self.split.test
        if total != self.n_scans:
            raise ValueError(
                f"split train+val+test = {total} must equal n_scans = {self.n_scans}; "
                "change the split counts or n_scans"
            )
        return self


class MaskSpec(Spec):
    """An undersampling mask: seeded per scan from the pipeline seed and the scan ID."""

    kind: Literal["random_1d", "equispaced_1d", "variable_density_2d", "poisson_disc"] = "random_1d"
    acceleration: float = Field(default=4.0, ge=1.0)
    center_fraction: float = Field(default=0.08, ge=0.0, lt=1.0)


class CTSpec(Spec):
    """CT acquisition: geometry, views and dose."""

    geometry: Literal["parallel", "fan"] = "parallel"
    views: int = Field(default=180, ge=1, description="number of projection angles (sparse view: fewer)")
    arc_degrees: float | None = Field(
        default=None, gt=0, le=360, description="default 180 (parallel), 360 (fan)"
    )
    detectors: int | None = Field(
        default=None, ge=1, description="default: image width (parallel), 1.5x (fan)"
    )
    source_distance: float = Field(
        default=2.0, gt=0, description="fan beam: source to centre, in image widths"
    )
    detector_distance: float = Field(
        default=1.0, gt=0, description="fan beam: centre to detector, in image widths"
    )
    i0: float | None = Field(
        default=None, gt=0, description="photons per ray for low-dose noise; null: noiseless"
    )
    attenuation: float = Field(
        default=0.02,
        gt=0,
        description="attenuation (1/pixel) of unit image intensity: photons see exp(-attenuation·Ax)",
    )


class SimulateStage(Spec):
    """Simulate measurements from each scan's image, one Ray task per scan, slab by slab."""

    kind: Literal["simulate"]
    modality: Literal["mri", "ct"] = "mri"
    mask: MaskSpec = Field(default_factory=MaskSpec)
    coils: int = Field(default=1, ge=1, description="MRI coils; > 1 simulates SENSE with birdcage maps")
    snr_db: float | None = Field(default=40.0, description="MRI k-space SNR in dB; null for no noise")
    ct: CTSpec | None = None
    slab: int | None = Field(default=None, ge=1, description="slices per slab; bounds a task's memory")
    num_cpus: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _modality_fields(self) -> SimulateStage:
        if self.modality == "mri" and self.ct is not None:
            raise ValueError("'ct' settings given for modality 'mri'; remove them or set modality: ct")
        return self

    @property
    def ct_spec(self) -> CTSpec:
        """The CT settings, with defaults when the file gives none."""
        return self.ct or CTSpec()


class ModelSpec(Spec):
    """A model from the registry in ``models/``: its name and keyword arguments."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        from models.registry import MODELS

        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; expected one of {sorted(MODELS)}")
        return v


class TrainStage(Spec):
    """Train a model with Ray Train on 2D slices streamed from the archive."""

    kind: Literal["train"]
    model: ModelSpec
    workers: int = Field(default=2, ge=1)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    loss: Literal["l1", "mse"] = "l1"
    threads_per_worker: int = Field(default=1, ge=1)


class SolverOptions(Spec):
    """Options of one classical method (``operators.recon.reconstruct``); unset ones keep its defaults."""

    lam: float | None = Field(
        default=None, ge=0, description="regularisation weight, relative to the data's scale"
    )
    max_iter: int | None = Field(default=None, ge=1, description="iteration cap")
    tol: float | None = Field(default=None, ge=0, description="tolerance on the relative residual")
    wavelet: Literal["haar", "db4"] = "haar"
    wavelet_levels: int | None = Field(default=None, ge=1)
    wavelet_shifts: int = Field(default=2, ge=1, description="cycle spinning: shifts per axis")
    fbp_filter: Literal["ramp", "shepp-logan", "cosine", "hann"] = "ramp"


class ReconStage(Spec):
    """Reconstruct the test split with Ray Data; each method writes ``recon/<method>``."""

    kind: Literal["recon"]
    methods: list[str] = Field(default_factory=lambda: ["zero_filled", LEARNED], min_length=1)
    model_uri: str | None = Field(
        default=None, description="models:/NAME/VERSION; default: this pipeline's trained model"
    )
    split: Literal["train", "val", "test", "all"] = "test"
    actors: int = Field(default=2, ge=1)
    cpus_per_actor: float = Field(default=0.5, gt=0)
    options: dict[str, SolverOptions] = Field(
        default_factory=dict,
        description="per-method solver options, e.g. {cs_tv: {lam: 0.02, max_iter: 200}}",
    )

    @model_validator(mode="after")
    def _options_name_methods(self) -> ReconStage:
        stray = sorted(set(self.options) - (set(self.methods) - {LEARNED}))
        if stray:
            raise ValueError(
                f"options given for {stray}, which are not classical methods of this stage; "
                f"expected keys among {[m for m in self.methods if m != LEARNED]}"
            )
        return self

    @field_validator("methods")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        valid = (*CLASSICAL, LEARNED)
        bad = [m for m in v if m not in valid]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; expected any of {list(valid)}")
        if len(set(v)) != len(v):
            raise ValueError(f"methods must be unique, found {v}")
        return v


class EvaluateStage(Spec):
    """Score every reconstruction against the reference image; log means, a table and a figure."""

    kind: Literal["evaluate"]
    metrics: list[Literal["psnr", "ssim", "nmse"]] = Field(default_factory=lambda: ["psnr", "ssim", "nmse"])
    figure_slice: int | None = Field(
        default=None, description="slice index for the figure; default the middle"
    )


Stage = Annotated[
    PhantomStage | SimulateStage | TrainStage | ReconStage | EvaluateStage, Field(discriminator="kind")
]

_ORDER = ["phantoms", "simulate", "train", "recon", "evaluate"]


class PipelineSpec(Spec):
    """A whole pipeline: where data and tracking live, and the ordered stages."""

    name: str
    seed: int = 0
    archive: ArchiveSpec
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    stages: list[Stage] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name_is_id(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                f"must match [A-Za-z0-9._-]+ (it names MLflow experiments and models), found {v!r}"
            )
        return v

    @model_validator(mode="after")
    def _stages_in_order(self) -> PipelineSpec:
        kinds = [s.kind for s in self.stages]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"each stage kind may appear once; found {kinds}")
        positions = [_ORDER.index(k) for k in kinds]
        if positions != sorted(positions):
            raise ValueError(f"stages must run in the order {_ORDER}; found {kinds}")
        sim = self.stage("simulate")
        if sim is not None and (sim.modality != "mri" or sim.coils != 1) and "train" in kinds:
            raise ValueError(
                f"the train stage supports single-coil MRI; found simulate modality={sim.modality!r}, "
                f"coils={sim.coils}. Remove the train stage or simulate single-coil MRI"
            )
        recon = self.stage("recon")
        if recon is not None and sim is not None:
            wrong = [m for m in recon.methods if m not in METHODS_BY_MODALITY[sim.modality]]
            if wrong:
                raise ValueError(
                    f"recon methods {wrong} do not apply to modality {sim.modality!r}; "
                    f"expected any of {list(METHODS_BY_MODALITY[sim.modality])}"
                )
        if (
            recon is not None
            and LEARNED in recon.methods
            and recon.model_uri is None
            and "train" not in kinds
        ):
            raise ValueError(
                "recon method 'learned' needs a model: add a train stage or set recon.model_uri "
                "(e.g. models:/NAME/VERSION)"
            )
        return self

    def stage(self, kind: str) -> Any:
        """The stage of ``kind``, or None."""
        return next((s for s in self.stages if s.kind == kind), None)


# -- loading --------------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a raw spec dict (a new dict is returned).

    The first key may name a stage by its kind (``train.epochs=3``) or by index
    (``stages.2.epochs=3``). Values are parsed as YAML (``3`` is an int, ``[a, b]`` a list).
    """
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. train.epochs=3")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise SpecError(f"--set {item!r}: the key is empty")
        node: Any = out
        stage_kinds = {s.get("kind"): s for s in out.get("stages", []) if isinstance(s, dict)}
        if parts[0] in stage_kinds:
            node = stage_kinds[parts[0]]
            parts = parts[1:]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SpecError(f"--set {item!r}: '{part}' is not an index of a list of {len(node)}")
                if last:
                    node[int(part)] = _parse_value(value)
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = _parse_value(value)
                else:
                    node = node.setdefault(part, {})
            else:
                raise SpecError(f"--set {item!r}: cannot descend into '{part}' of a {type(node).__name__}")
    return out


def _loc(loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    """A readable field path: stages[2] (train).epochs."""
    out: list[str] = []
    node: Any = raw
    for part in loc:
        if isinstance(part, int):
            kind = (
                node[part].get("kind")
                if isinstance(node, list) and part < len(node) and isinstance(node[part], dict)
                else None
            )
            out[-1] = f"{out[-1]}[{part}]" + (f" ({kind})" if kind else "")
            node = node[part] if isinstance(node, list) and part < len(node) else None
        elif (
            part in ("phantoms", "simulate", "train", "recon", "evaluate")
            and out
            and out[-1].startswith("stages[")
        ):
            continue  # pydantic's discriminator tag; the kind is already shown
        else:
            out.append(str(part))
            node = node.get(part) if isinstance(node, dict) else None
    return ".".join(out) or "(top level)"


def format_validation_error(err: ValidationError, raw: dict[str, Any], source: str) -> str:
    """One readable message per problem: file, field, what was expected, what was found."""
    lines = [
        f"{source}: invalid pipeline spec ({err.error_count()} problem{'s' if err.error_count() > 1 else ''})"
    ]
    for e in err.errors():
        where = _loc(tuple(e["loc"]), raw)
        kind = e["type"]
        if kind == "extra_forbidden":
            msg = f"unknown field '{e['loc'][-1]}' (check the spelling; unknown fields are not allowed)"
        elif kind == "missing":
            msg = "is required but missing"
        elif kind == "union_tag_invalid":
            msg = (
                f"unknown stage kind {e['input'].get('kind')!r}; expected one of {_ORDER}"
                if isinstance(e["input"], dict)
                else e["msg"]
            )
        else:
            found = e.get("input")
            msg = f"{e['msg'].removeprefix('Value error, ')}" + (
                "" if kind.startswith("value_error") else f" (found {found!r})"
            )
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)


def load_spec(path: str | Path, overrides: list[str] | None = None) -> PipelineSpec:
    """Read, override and validate a pipeline file; every problem becomes one :class:`SpecError`."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(
            f"{path}: pipeline file not found (expected a YAML file, e.g. pipelines/specs/quickstart.yaml)"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of fields at the top level; found {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, raw, str(path))) from None
