"""Typed, frozen, closed pydantic models of a pipeline file, and the registry of stage kinds.

A pipeline file is YAML::

    name: quickstart
    seed: 0
    archive: {path: runs/quickstart/archive}
    tracking: {uri: sqlite:///runs/quickstart/mlflow.db, experiment: medrecon-quickstart}
    stages:
      - {kind: phantoms, n_scans: 16, shape: [16, 96, 96], split: {train: 10, val: 2, test: 4}}
      - {kind: simulate, modality: mri, mask: {kind: random_1d, acceleration: 4, center_fraction: 0.08}}
      - {kind: train, name: model, model: {name: unrolled_gd, kwargs: {n_iter: 5}}, workers: 2, epochs: 6}
      - {kind: recon, methods: [zero_filled, cs_tv, "learned:model", "models:/other-model/3"]}
      - {kind: evaluate}

Every model inherits :class:`Spec` (frozen, unknown fields forbidden). Stages run in list order;
each has a ``name`` (default: its kind), unique in the pipeline, so a kind may repeat (two train
stages ``neumann`` and ``modl``). :data:`STAGE_KINDS` is the one ordered registry of kinds: the
discriminated union of stage specs, the runner, the CLI and ``medrecon show`` all read it. Names
that ``operators`` defines (mask kinds, wavelets, FBP filters, classical methods and the
modalities each serves) are imported from there.

Environment facts (Ray address, MLflow URI) come from :class:`Settings` (``MEDRECON_*``
variables) when the file leaves them out. Reading a file, ``--set`` overrides and readable errors
are in :mod:`pipelines.specfile`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from operators.ct import FilterName
from operators.masks import MaskKind
from operators.recon import METHODS
from operators.regularizers import WaveletName
from pipelines.methods import parse_method

__all__ = [
    "Spec",
    "Settings",
    "ArchiveSpec",
    "TrackingSpec",
    "RaySpec",
    "SplitSpec",
    "StageSpec",
    "PhantomStage",
    "IngestStage",
    "PreprocessStage",
    "SplitFractions",
    "MaskSpec",
    "SimulateStage",
    "CTSpec",
    "LowresSpec",
    "MODALITIES",
    "ModelSpec",
    "TrainMasks",
    "Augment",
    "TrainStage",
    "SolverOptions",
    "ReconStage",
    "UncertaintySpec",
    "StabilitySpec",
    "EvaluateStage",
    "GateStage",
    "LesionSpec",
    "VolumeAugment",
    "TaskTrainStage",
    "SegmentStage",
    "ClassifyStage",
    "METRICS",
    "StageKind",
    "STAGE_KINDS",
    "Stage",
    "PipelineSpec",
]

_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_STAGE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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
    """MLflow settings; ``uri`` defaults to ``$MEDRECON_TRACKING_URI``, else SQLite beside the archive."""

    uri: str | None = None
    experiment: str = "medrecon"


class RaySpec(Spec):
    """How to reach Ray. With no address, an embedded local instance is started."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)


class SplitSpec(Spec):
    """Number of scans in each split; they must add up to the number of scans."""

    train: int = Field(ge=1)
    val: int = Field(default=0, ge=0)
    test: int = Field(ge=1)


class StageSpec(Spec):
    """Fields every stage has: its ``kind`` and its ``name`` (default: the kind)."""

    kind: str
    name: str = Field(default="", description="unique in the pipeline; default: the kind")

    @model_validator(mode="before")
    @classmethod
    def _name_defaults_to_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("name") and isinstance(data.get("kind"), str):
            return {**data, "name": data["kind"]}
        return data

    @field_validator("name")
    @classmethod
    def _name_is_id(cls, v: str) -> str:
        if not _STAGE_NAME.match(v):
            raise ValueError(f"a stage name is 1-64 characters of [A-Za-z0-9_-]; found {v!r}")
        return v


class SplitFractions(Spec):
    """Fractions of ingested scans per split, assigned by a seeded hash of each scan ID (sum 1)."""

    train: float = Field(default=0.8, ge=0, le=1)
    val: float = Field(default=0.1, ge=0, le=1)
    test: float = Field(default=0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitFractions:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions train+val+test must add up to 1; found {total:g}")
        return self


class IngestStage(StageSpec):
    """Bring real scans into the archive (:mod:`pipelines.ingest`): NIfTI, DICOM series, fastMRI HDF5.

    Every file or series under ``sources`` becomes a scan, or is quarantined with a named reason
    while the others are committed. Ingesting into an existing archive appends to its catalog.
    """

    kind: Literal["ingest"]
    sources: list[str] = Field(min_length=1, description="directories to ingest (local paths)")
    format: Literal["auto", "nifti", "dicom", "fastmri"] = Field(
        default="auto",
        description="auto: by file (.nii/.nii.gz NIfTI, .h5 fastMRI k-space, anything else DICOM)",
    )
    manifest: str | None = Field(
        default=None,
        description="CSV with columns path (relative to the CSV's folder) and optionally scan_id, "
        "split, labels, modality; only the listed files are ingested",
    )
    split: SplitFractions = Field(default_factory=SplitFractions)
    modality: Literal["mri", "ct"] | None = Field(
        default=None, description="for files that do not say (NIfTI); DICOM's Modality tag wins"
    )
    slab: int = Field(default=16, ge=1, description="slices written at a time (a worker holds one slab)")


class PreprocessStage(StageSpec):
    """Derive a new image from each scan's ``image`` with Dask arrays on Ray (:mod:`pipelines.preprocess`).

    Steps run in this order, each optional: resample to ``spacing``, clip to the volume's
    ``clip_percentiles``, normalise, then centre-crop or zero-pad to ``shape``. The result is
    ``scans/<id>/<output>`` (``derived/<name>``); a simulate stage reads it with ``image: <output>``.
    """

    kind: Literal["preprocess"]
    output: str = Field(default="derived/preprocessed", pattern=r"^derived/[A-Za-z0-9_.-]+$")
    spacing: tuple[float, float, float] | None = Field(
        default=None, description="target voxel size (mm) along (D, H, W); linear interpolation"
    )
    clip_percentiles: tuple[float, float] | None = Field(
        default=None, description="(low, high) percentiles of the whole volume to clip to, e.g. [0.5, 99.5]"
    )
    normalize: Literal["zscore", "minmax"] | None = None
    shape: tuple[int, int, int] | None = Field(
        default=None, description="centre-crop or zero-pad to (D, H, W), e.g. even sizes for a U-Net"
    )
    slab: int = Field(default=16, ge=1, description="slices per Dask chunk and per written shard")

    @field_validator("clip_percentiles")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (0 <= v[0] < v[1] <= 100):
            raise ValueError(f"expected 0 <= low < high <= 100; found {list(v)}")
        return v

    @field_validator("spacing")
    @classmethod
    def _spacing_positive(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and min(v) <= 0:
            raise ValueError(f"every spacing must be > 0; found {list(v)}")
        return v

    @field_validator("shape")
    @classmethod
    def _shape_positive(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and min(v) < 1:
            raise ValueError(f"every size must be >= 1; found {list(v)}")
        return v


class LesionSpec(Spec):
    """How many brain phantoms carry lesions, and how many and how large: a per-scan label to classify.

    A seeded coin per scan (from the pipeline seed and the scan ID) decides, with probability
    ``prevalence``, whether the scan has lesions; a scan with lesions gets a seeded number in
    ``count``. The anatomy of a subject is the same with or without them.
    """

    prevalence: float = Field(default=0.5, ge=0, le=1, description="fraction of scans with lesions")
    count: tuple[int, int] = Field(default=(1, 3), description="lesions in a scan that has them: [min, max]")
    scale: float = Field(
        default=1.0, gt=0, le=10, description="lesion size: 1 is 1.3-3.9 mm semi-axes; 3 is 4-12 mm"
    )

    @field_validator("count")
    @classmethod
    def _count(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not (1 <= v[0] <= v[1] <= 20):
            raise ValueError(f"expected 1 <= min <= max <= 20 lesions; found {list(v)}")
        return v


class PhantomStage(StageSpec):
    """Create seeded phantoms in the archive (the embedded data source).

    ``ellipsoids``: random ellipsoids, nearly piecewise constant (what total variation assumes);
    ``brain``: procedural brain-like heads with tissue texture, folding and partial volume
    (:mod:`operators.brain`), whose reconstruction behaves much more like real brain MRI.
    """

    kind: Literal["phantoms"]
    phantom: Literal["ellipsoids", "brain"] = "ellipsoids"
    n_scans: int = Field(ge=2)
    shape: tuple[int, int, int] = Field(description="(D, H, W) of each volume")
    split: SplitSpec
    prefix: str = "phantom"
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    lesions: LesionSpec | None = Field(
        default=None, description="brain: which scans carry lesions; null: each subject's own 0-3"
    )

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
    def _lesions_need_brains(self) -> PhantomStage:
        if self.lesions is not None and self.phantom != "brain":
            raise ValueError("lesions apply to brain phantoms; set phantom: brain or remove lesions")
        return self

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

    kind: MaskKind = "random_1d"
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


class LowresSpec(Spec):
    """Low-resolution acquisition (super-resolution): each ``factor x factor`` block of a slice is
    averaged into one voxel (:class:`operators.resolution.Downsample`), optionally with Gaussian noise."""

    factor: Literal[2, 4] = Field(
        default=2, description="in-plane down-sampling factor; it must divide the image's H and W"
    )
    snr_db: float | None = Field(
        default=None,
        description="real Gaussian noise, SNR in dB against the RMS of the image; null: noiseless",
    )


#: The modalities a simulate stage measures: Cartesian MRI k-space, CT sinograms, low-resolution images.
Modality = Literal["mri", "ct", "lowres"]
MODALITIES: tuple[str, ...] = Modality.__args__  # type: ignore[attr-defined]


class SimulateStage(StageSpec):
    """Simulate measurements from each scan's image, one Ray task per scan, slab by slab."""

    kind: Literal["simulate"]
    modality: Modality = "mri"
    mask: MaskSpec = Field(default_factory=MaskSpec)
    coils: int = Field(default=1, ge=1, description="MRI coils; > 1 simulates SENSE with birdcage maps")
    snr_db: float | None = Field(default=40.0, description="MRI k-space SNR in dB; null for no noise")
    ct: CTSpec | None = None
    lowres: LowresSpec | None = Field(
        default=None, description="modality lowres: {factor: 2 or 4, snr_db}; default factor 2, noiseless"
    )
    slab: int | None = Field(default=None, ge=1, description="slices per slab; bounds a task's memory")
    num_cpus: float = Field(default=1.0, gt=0)
    image: str = Field(
        default="image",
        pattern=r"^(image|derived/[A-Za-z0-9_.-]+)$",
        description="the image to measure: image, or derived/<name> written by a preprocess stage; "
        "it is the reference training and evaluation compare against",
    )

    @model_validator(mode="after")
    def _modality_fields(self) -> SimulateStage:
        for name in ("ct", "lowres"):
            if getattr(self, name) is not None and self.modality != name:
                raise ValueError(
                    f"'{name}' settings given for modality '{self.modality}'; remove them or set "
                    f"modality: {name}"
                )
        if self.modality == "lowres":  # MRI settings other than their defaults (a dumped spec keeps those)
            fields = type(self).model_fields
            values = {name: getattr(self, name) for name in ("mask", "coils", "snr_db")}
            mri_only = [
                f"{name}: {v.model_dump() if isinstance(v, BaseModel) else v!r}"
                for name, v in values.items()
                if v != fields[name].get_default(call_default_factory=True)
            ]
            if mri_only:
                raise ValueError(
                    f"{', '.join(mri_only)} apply to modality 'mri'; found with modality 'lowres'. Remove "
                    "them (noise of a low-resolution acquisition is lowres: {snr_db: ...})"
                )
        return self

    @property
    def ct_spec(self) -> CTSpec:
        """The CT settings, with defaults when the file gives none."""
        return self.ct or CTSpec()

    @property
    def lowres_spec(self) -> LowresSpec:
        """The low-resolution settings, with defaults when the file gives none."""
        return self.lowres or LowresSpec()


class ModelSpec(Spec):
    """A model from the registry in ``models/``: its name and keyword arguments (checked by building it)."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _builds(self) -> ModelSpec:
        from models.registry import MODELS, ModelError, build_model

        if self.name not in MODELS:
            raise ValueError(f"unknown model {self.name!r}; expected one of {sorted(MODELS)}")
        try:
            build_model(self.name, self.kwargs)
        except (ModelError, ValueError, TypeError) as exc:
            raise ValueError(str(exc)) from None
        return self


class TrainMasks(Spec):
    """Undersampling masks drawn afresh for every training sample (MRI), from the scan's image.

    Each sample is measured again with a new seeded mask (at one of ``accelerations``) and the
    scan's noise level, so a model sees many sampling patterns instead of one per scan.
    Validation keeps each scan's stored mask.
    """

    kind: MaskKind = "random_1d"
    accelerations: list[float] = Field(default_factory=lambda: [4.0], min_length=1)
    center_fraction: float = Field(default=0.08, ge=0.0, lt=1.0)

    @field_validator("accelerations")
    @classmethod
    def _at_least_one(cls, v: list[float]) -> list[float]:
        if any(a < 1 for a in v):
            raise ValueError(f"every acceleration must be >= 1; found {v}")
        return v


class Augment(Spec):
    """Augmentation on the data path: each training image is transformed, then measured anew through
    its scan's acquisition (with its noise level), so the model sees consistent ``(y, x)`` pairs.

    Seeded per epoch and sample, so a resumed run draws the same augmentations.
    """

    flip: bool = Field(default=True, description="random flips along H and W")
    rotate_degrees: float = Field(default=10.0, ge=0, le=180, description="random in-plane rotation range")
    elastic: float = Field(
        default=0.0, ge=0, le=1, description="probability of MONAI's 2D elastic deformation per sample"
    )
    prob: float = Field(default=0.5, ge=0, le=1, description="probability of each flip and the rotation")


class TrainStage(StageSpec):
    """Train a model with Ray Train on 2D slices streamed from the archive; register it in MLflow."""

    kind: Literal["train"]
    model: ModelSpec
    workers: int = Field(default=2, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs Ray reserves for each worker")
    gpus_per_worker: float = Field(default=0.0, ge=0)
    max_failures: int = Field(
        default=1,
        ge=0,
        description="worker-group restarts (from the latest checkpoint) before the stage fails",
    )
    accumulate: int = Field(default=1, ge=1, description="gradient accumulation: micro-batches per step")
    augment: Augment | None = Field(default=None, description="flips, rotations, elastic; null: none")
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    loss: Literal["l1", "mse", "ssim", "l1+ssim"] = "l1"
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = Field(default=0.0, ge=0)
    schedule: Literal["constant", "cosine", "onecycle"] = "constant"
    grad_clip: float | None = Field(default=None, gt=0, description="clip the gradient norm to this")
    early_stopping: int | None = Field(
        default=None, ge=1, description="stop after this many epochs without a better validation PSNR"
    )
    masks: TrainMasks | None = Field(
        default=None, description="fresh masks per sample (MRI); null: the stored measurements"
    )
    init_from: str | None = Field(
        default=None, description="fine-tune a registered model of this architecture: models:/NAME/VERSION"
    )
    init_from_missing: Literal["error", "scratch"] = Field(
        default="error",
        description="when init_from names an alias or version that does not exist: fail, or train from "
        "scratch (a nightly job's first night has no champion)",
    )
    amp: Literal["bf16", "fp16"] | None = Field(
        default=None,
        description="autocast on GPU workers: bf16, or fp16 with a gradient scaler (ignored on CPU)",
    )
    threads_per_worker: int | None = Field(
        default=None, ge=1, description="torch threads per worker; default: cpus_per_worker"
    )
    register_as: str | None = Field(
        default=None, description="MLflow registered model name; default '<pipeline name>-<stage name>'"
    )
    keep_checkpoints: int = Field(
        default=2, ge=1, description="best checkpoints kept (by validation PSNR), besides the latest"
    )

    alias: str | None = Field(
        default=None, description="MLflow alias set on the registered version, e.g. challenger"
    )
    dropout: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="train with channel dropout on the convolutions' outputs (MC dropout; the recon "
        "stage's uncertainty samples it); null: none",
    )

    @field_validator("model")
    @classmethod
    def _reconstructs(cls, v: ModelSpec) -> ModelSpec:
        from models.registry import ANALYSIS_MODELS

        if v.name in ANALYSIS_MODELS:
            raise ValueError(
                f"model {v.name!r} analyses images and does not reconstruct; train it in a train_task stage"
            )
        return v

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_bool(cls, v: Any) -> Any:  # amp: true (the older spelling) is bf16
        return "bf16" if v is True else None if v is False else v

    @property
    def threads(self) -> int:
        """torch threads per worker."""
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))

    @field_validator("register_as", "alias")
    @classmethod
    def _register_as_is_id(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.match(v):
            raise ValueError(f"must match [A-Za-z0-9._-]+, found {v!r}")
        return v

    @field_validator("init_from")
    @classmethod
    def _init_from_is_a_model(cls, v: str | None) -> str | None:
        if v is not None and parse_method(v).kind != "model":
            raise ValueError(f"expected a model URI (models:/NAME/VERSION, models:/NAME@ALIAS); found {v!r}")
        return v


class SolverOptions(Spec):
    """Options of one classical method (``operators.recon.reconstruct``); unset ones keep its defaults."""

    lam: float | list[float] | None = Field(
        default=None,
        description="regularisation weight, relative to the data's scale; a list is a grid, and the "
        "recon stage picks the weight with the best mean PSNR on the validation split",
    )
    max_iter: int | None = Field(default=None, ge=1, description="iteration cap")
    tol: float | None = Field(default=None, ge=0, description="tolerance on the relative residual")
    wavelet: WaveletName = "haar"
    wavelet_levels: int | None = Field(default=None, ge=1)
    wavelet_shifts: int = Field(default=2, ge=1, description="cycle spinning: shifts per axis")
    fbp_filter: FilterName = "ramp"

    @field_validator("lam")
    @classmethod
    def _lam(cls, v: float | list[float] | None) -> float | list[float] | None:
        values = v if isinstance(v, list) else [] if v is None else [v]
        if isinstance(v, list) and not v:
            raise ValueError("a grid of weights needs at least one value")
        if any(not (x >= 0 and x < float("inf")) for x in values):
            raise ValueError(f"weights must be finite and >= 0; found {v}")
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError(f"grid values must be unique; found {v}")
        return v

    @property
    def grid(self) -> list[float] | None:
        """The grid of weights to choose from, or None when ``lam`` is one value (or unset)."""
        return list(self.lam) if isinstance(self.lam, list) else None


class UncertaintySpec(Spec):
    """Per-voxel uncertainty of learned methods by MC dropout (:mod:`models.uncertainty`).

    Every learned method of the stage also runs ``samples`` times with channel dropout at rate
    ``dropout`` on its convolutions' outputs, and writes the standard deviation of the magnitudes
    as ``recon/<key>.std`` beside its (deterministic) reconstruction. Evaluate then reports how well
    it predicts the error (Pearson r per scan) with a figure. Best with a model trained under the
    same dropout (train stage ``dropout``).
    """

    samples: int = Field(default=8, ge=2, description="dropout samples per slice")
    dropout: float = Field(default=0.1, gt=0, lt=1, description="channel dropout rate")


class ReconStage(StageSpec):
    """Reconstruct a split with Ray Data; each method writes ``recon/<key>`` (:mod:`pipelines.methods`)."""

    kind: Literal["recon"]
    methods: list[str] = Field(
        min_length=1,
        description="classical names, learned:<train stage name>, or model URIs (models:/NAME/VERSION)",
    )
    split: Literal["train", "val", "test", "all"] = "test"
    scans: list[str] | None = Field(default=None, description="only these scan IDs (within the split)")
    new_scans: bool = Field(
        default=False,
        description="only the scans ingested since this pipeline's last successful run with another "
        "run_key (every scan when there was none)",
    )
    actors: int = Field(default=2, ge=1)
    cpus_per_actor: float = Field(default=0.5, gt=0)
    gpus_per_actor: float = Field(default=0.0, ge=0)
    tune_slices: int = Field(
        default=4, ge=1, description="middle slices per validation scan on which a lam grid is scored"
    )
    options: dict[str, SolverOptions] = Field(
        default_factory=dict,
        description="per classical method, e.g. {cs_tv: {lam: 0.02, max_iter: 200}}",
    )
    uncertainty: UncertaintySpec | None = Field(
        default=None, description="MC-dropout std maps of the learned methods, recon/<key>.std"
    )

    @field_validator("methods")
    @classmethod
    def _parsed(cls, v: list[str]) -> list[str]:
        problems = []
        for text in v:
            try:
                parse_method(text)
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        if len(set(v)) != len(v):
            raise ValueError(f"methods must be unique, found {v}")
        return v

    @field_validator("scans")
    @classmethod
    def _scan_ids(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            from pipelines.store import validate_scan_id

            for scan_id in v:
                validate_scan_id(scan_id)
        return v

    @model_validator(mode="after")
    def _options_name_classical_methods(self) -> ReconStage:
        classical = [m for m in self.methods if m in METHODS]
        stray = sorted(set(self.options) - set(classical))
        if stray:
            raise ValueError(
                f"options given for {stray}, which are not classical methods of this stage; "
                f"expected keys among {classical}"
            )
        return self

    def refs(self) -> list[Any]:
        """The methods, parsed (:class:`pipelines.methods.MethodRef`)."""
        return [parse_method(m) for m in self.methods]


class StabilitySpec(Spec):
    """The stability audit (Antun et al.): the worst image perturbation of relative norm ``eps``."""

    eps: float = Field(default=0.01, gt=0, le=1, description="perturbation norm relative to the image's")
    steps: int = Field(default=10, ge=1, description="projected gradient-ascent steps per learned model")
    trials: int = Field(default=5, ge=1, description="random perturbations of the same norm (the control)")
    slices: int = Field(default=1, ge=1, description="middle slices of the first test scan audited")


METRICS: Mapping[str, str] = MappingProxyType({"psnr": "max", "ssim": "max", "nmse": "min"})
"""The metrics evaluate produces, and which way is better."""

MetricName = Literal["psnr", "ssim", "nmse"]


class EvaluateStage(StageSpec):
    """Score the reconstructions of the recon stages before it against the reference images."""

    kind: Literal["evaluate"]
    metrics: list[MetricName] = Field(default_factory=lambda: ["psnr", "ssim", "nmse"])
    figure_slice: int | None = Field(
        default=None, description="slice index for the figure; default the middle"
    )
    stability: StabilitySpec | None = Field(
        default=None, description="run the stability audit of every method (pipelines.audit)"
    )


class GateStage(StageSpec):
    """Champion/challenger gate: promote a train stage's model to ``champion`` only if it is better.

    The challenger (the version the train stage ``challenger`` registered) and the current champion
    (``models:/NAME@champion``) reconstruct the same hold-out scans and are scored with evaluate's
    metrics. The challenger is promoted if it beats the champion by ``margin`` on ``metric`` and
    loses no more than ``guard_tolerance`` on any ``guard`` metric; otherwise it is tagged rejected
    with the reason. Promotion is a compare-and-set on the alias (:mod:`pipelines.champion`).
    """

    kind: Literal["gate"]
    challenger: str = Field(description="the train stage whose registered model is the challenger")
    metric: str = Field(default="psnr", description="the metric that must improve (one evaluate produces)")
    margin: float = Field(default=0.0, ge=0, description="by how much the challenger must beat the champion")
    guard: list[str] = Field(
        default_factory=lambda: ["ssim"], description="metrics on which the challenger may not regress"
    )
    guard_tolerance: float = Field(default=0.0, ge=0, description="regression allowed on a guard metric")
    split: Literal["train", "val", "test", "all"] = Field(
        default="test", description="the hold-out both models are scored on"
    )
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs of the Ray task that scores both models")

    @field_validator("metric")
    @classmethod
    def _metric_is_evaluated(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"evaluate does not produce metric {v!r}; expected one of {list(METRICS)}")
        return v

    @field_validator("guard")
    @classmethod
    def _guards_are_evaluated(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METRICS]
        if unknown:
            raise ValueError(
                f"evaluate does not produce metric(s) {unknown}; expected any of {list(METRICS)}"
            )
        return v


_INPUT = r"^(image|measurements|derived/[A-Za-z0-9_.-]+|recon/[A-Za-z0-9_.-]+)$"


class VolumeAugment(Spec):
    """Augmentation of 3D training volumes (MONAI), seeded per epoch and sample; labels follow the image."""

    flip: bool = Field(default=True, description="random left-right flips")
    elastic: float = Field(
        default=0.0, ge=0, le=1, description="probability of MONAI's Rand3DElastic deformation per sample"
    )
    elastic_sigma: tuple[float, float] = Field(
        default=(5.0, 7.0), description="smoothness of the field (voxels)"
    )
    elastic_magnitude: tuple[float, float] = Field(default=(50.0, 150.0), description="strength of the field")
    intensity: float = Field(
        default=0.0, ge=0, le=1, description="probability of a random intensity scale/shift"
    )


class TaskTrainStage(StageSpec):
    """Train an analysis model with Ray Train on volumes from the archive; register it in MLflow.

    ``task: segment`` learns the label volume (``classes`` groups its values) with a Dice loss on
    random patches; ``task: classify`` learns a per-scan label: whether the scan's label volume
    contains ``target`` (e.g. lesions); ``task: generate`` trains a DCGAN on the training images'
    axial slices (one worker, ``epochs * steps_per_epoch`` adversarial steps), whose generator is
    the prior of the recon method ``gan_prior:<stage>``. The input is the scan's ``image``, a reconstruction
    (``recon/<key>``) or the ``measurements`` themselves (k-space as log-magnitude and phase
    channels, or the sinogram or low-res image). Like the recon models, the model is saved as
    architecture JSON plus safetensors and registered as ``<pipeline>-<stage>``.
    """

    kind: Literal["train_task"]
    task: Literal["segment", "classify", "generate"]
    model: ModelSpec
    input: str = Field(default="image", pattern=_INPUT, description="image, measurements or recon/<key>")
    classes: dict[str, list[str | int]] | None = Field(
        default=None,
        description="segment: output class -> label names or values it groups (the rest is background); "
        "default: every named label of the label volume",
    )
    target: str = Field(
        default="lesions", description="classify: a scan is positive when its labels hold this"
    )
    patch: tuple[int, int, int] | None = Field(
        default=None, description="segment: random (D, H, W) crops to train on; inference slides a window"
    )
    oversample: dict[str, float] = Field(
        default_factory=dict,
        description="segment: class -> fraction of patches centred on a voxel of that class (rare "
        "classes such as lesions are otherwise in few patches); the rest are uniform",
    )
    augment: VolumeAugment | None = None
    loss: Literal["dice", "dicece", "ce", "bce"] | None = Field(
        default=None, description="default: dicece (segment), bce (classify)"
    )
    batch_dice: bool = Field(
        default=False,
        description="segment: Dice over the whole batch, not per patch (nnU-Net's batch Dice): a class "
        "absent from a patch no longer pulls its prediction toward empty",
    )
    init_encoder: str | None = Field(
        default=None,
        description="classify: start the encoder from a segmentation model: a train_task stage name "
        "before this one, or models:/NAME/VERSION",
    )
    freeze: bool = Field(default=False, description="classify: train only the head on the initial encoder")
    workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    threads_per_worker: int | None = Field(default=None, ge=1)
    max_failures: int = Field(default=1, ge=0)
    epochs: int = Field(default=20, ge=1)
    steps_per_epoch: int = Field(
        default=50, ge=1, description="optimiser steps per epoch (patches are random)"
    )
    batch_size: int = Field(default=2, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    optimizer: Literal["adam", "adamw"] = "adamw"
    weight_decay: float = Field(default=1e-4, ge=0)
    schedule: Literal["constant", "cosine", "onecycle"] = "onecycle"
    early_stopping: int | None = Field(default=None, ge=1)
    register_as: str | None = None
    keep_checkpoints: int = Field(default=2, ge=1)

    @property
    def threads(self) -> int:
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))

    @property
    def loss_name(self) -> str:
        return self.loss or {"segment": "dicece", "classify": "bce", "generate": "gan"}[self.task]

    @model_validator(mode="after")
    def _task_fields(self) -> TaskTrainStage:
        from models.registry import ANALYSIS_MODELS, GENERATIVE_MODELS, SEGMENTATION_MODELS

        if self.model.name not in ANALYSIS_MODELS:
            raise ValueError(
                f"model {self.model.name!r} is a reconstruction network (train it in a train stage); "
                f"a train_task trains one of {sorted(ANALYSIS_MODELS)}"
            )
        tasks = {"segment": SEGMENTATION_MODELS, "generate": GENERATIVE_MODELS}
        tasks["classify"] = ANALYSIS_MODELS - SEGMENTATION_MODELS - GENERATIVE_MODELS
        does = next(t for t, names in tasks.items() if self.model.name in names)
        if does != self.task:
            raise ValueError(
                f"model {self.model.name!r} is for task {does}; task {self.task!r} takes one of "
                f"{sorted(tasks[self.task])}"
            )
        if self.task == "generate":
            if self.loss is not None or self.workers != 1 or self.input != "image":
                raise ValueError(
                    "task generate trains on the images with its adversarial loss on one worker: "
                    "remove loss and input, and set workers: 1"
                )
            return self
        if self.init_encoder and self.model.name not in ("unet_classifier", "seg_classifier"):
            raise ValueError(
                "init_encoder starts a unet_classifier from a unet3d's encoder, or a seg_classifier from "
                f"the whole unet3d; model {self.model.name!r} cannot start from one"
            )
        if self.model.name == "seg_classifier" and not self.init_encoder:
            raise ValueError("model seg_classifier reads a trained segmentation: set init_encoder")
        if self.task == "segment":
            if self.loss_name == "bce":
                raise ValueError("loss bce is for task classify; a segmentation takes dice, dicece or ce")
            if self.init_encoder or self.freeze:
                raise ValueError("init_encoder and freeze apply to task classify")
        else:
            if self.loss_name != "bce":
                raise ValueError(f"task classify trains with loss bce; found {self.loss_name!r}")
            if self.freeze and not self.init_encoder:
                raise ValueError("freeze trains only the head of a pre-trained encoder: set init_encoder")
            if self.patch is not None or self.classes is not None or self.oversample or self.batch_dice:
                raise ValueError("patch, classes, oversample and batch_dice apply to task segment")
        if self.oversample:
            if self.patch is None:
                raise ValueError("oversample centres patches on a class: give patch as well")
            bad = {k: v for k, v in self.oversample.items() if not 0 < v <= 1}
            if bad or sum(self.oversample.values()) > 1:
                raise ValueError(
                    "oversample: each fraction in (0, 1] and their sum at most 1; "
                    f"found {dict(self.oversample)}"
                )
        if self.register_as is not None and not _NAME.match(self.register_as):
            raise ValueError(f"register_as must match [A-Za-z0-9._-]+, found {self.register_as!r}")
        return self


class SegmentStage(StageSpec):
    """Segment a split with a trained segmentation model, and score it against the label volumes.

    Each input (the ``image``, or each reconstruction) is segmented with the same fixed model
    (sliding-window inference), written as ``seg/<stage name>.<input key>``, and scored per class
    with Dice and the 95th-percentile Hausdorff distance (mm). With reconstructions among the
    inputs the table shows, per reconstruction method, its PSNR beside its Dice: whether a better
    image is a better segmentation.
    """

    kind: Literal["segment"]
    model: str = Field(description="a train_task stage name before this one, or models:/NAME/VERSION")
    inputs: list[str] = Field(
        default_factory=lambda: ["image"],
        description="image, recon/<key>, or recon/* (every reconstruction of the recon stages before)",
    )
    split: Literal["train", "val", "test", "all"] = "test"
    overlap: float = Field(default=0.25, ge=0, lt=1, description="sliding-window overlap")
    num_cpus: float = Field(default=1.0, gt=0)
    figures: int = Field(default=2, ge=0, description="scans with an overlay figure in MLflow")

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, v: list[str]) -> list[str]:
        bad = [i for i in v if i != "recon/*" and not re.match(_INPUT, i) or i == "measurements"]
        if bad:
            raise ValueError(f"inputs {bad}: expected image, recon/<key> or recon/*")
        return v


class ClassifyStage(StageSpec):
    """Classify a split with trained classifiers; report each one's AUC with a ROC figure."""

    kind: Literal["classify"]
    models: list[str] = Field(
        min_length=1, description="train_task stage names (task classify) before this one, or models:/ URIs"
    )
    split: Literal["train", "val", "test", "all"] = "test"
    num_cpus: float = Field(default=1.0, gt=0)


# -- the registry of stage kinds -----------------------------------------------------------------
Role = Literal["data", "train", "recon", "evaluate", "gate", "analysis"]


@dataclass(frozen=True)
class StageKind:
    """One stage kind.

    Attributes:
        spec: its pydantic model.
        module: the module whose ``run(ctx, stage, fingerprint) -> StageResult`` runs it; the source
            of this module and of everything it imports from ``operators``, ``models`` and
            ``pipelines`` is the stage's code version (:func:`pipelines.fingerprint.code_version`).
        role: ``data`` stages write images or measurements (each at most once per pipeline: a scan
            has one image and one measurement); ``train`` registers a model; ``recon`` writes
            reconstructions; ``evaluate`` scores them.
        per_scan: it commits per scan (``medrecon show`` has a column for it).
    """

    spec: type[StageSpec]
    module: str
    role: Role
    per_scan: bool = True

    @property
    def kind(self) -> str:
        return self.spec.model_fields["kind"].annotation.__args__[0]  # type: ignore[union-attr]

    def runner(self) -> Callable[..., Any]:
        """The stage function, imported on first use (the spec loads without Ray or MLflow)."""
        return importlib.import_module(self.module).run  # type: ignore[no-any-return]


STAGE_KINDS: Mapping[str, StageKind] = MappingProxyType(
    {
        k.kind: k
        for k in (
            StageKind(PhantomStage, "pipelines.phantoms", "data"),
            StageKind(IngestStage, "pipelines.ingest", "data"),
            StageKind(PreprocessStage, "pipelines.preprocess", "data"),
            StageKind(SimulateStage, "pipelines.simulate", "data"),
            StageKind(TrainStage, "pipelines.train", "train", per_scan=False),
            StageKind(TaskTrainStage, "pipelines.train_task", "train", per_scan=False),
            StageKind(GateStage, "pipelines.gate", "gate", per_scan=False),
            StageKind(ReconStage, "pipelines.recon", "recon"),
            StageKind(EvaluateStage, "pipelines.evaluate", "evaluate"),
            StageKind(SegmentStage, "pipelines.segment", "analysis"),
            StageKind(ClassifyStage, "pipelines.classify", "analysis"),
        )
    }
)
"""Kind -> :class:`StageKind`, in the order data flows (read-only)."""

Stage = Annotated[Union[tuple(k.spec for k in STAGE_KINDS.values())], Field(discriminator="kind")]  # noqa: UP007


class PipelineSpec(Spec):
    """A whole pipeline: where data and tracking live, and the stages, run in list order."""

    name: str
    seed: int = 0
    run_key: str | None = Field(
        default=None,
        description="a key of this run, e.g. a night (--set run_key=2026-11-30): it enters every stage's "
        "fingerprint, so the same key resumes and a new key runs afresh (per-scan work is still reused)",
    )
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

    @field_validator("run_key", mode="before")
    @classmethod
    def _run_key(cls, v: Any) -> Any:
        if hasattr(v, "isoformat"):  # --set run_key=2026-11-30 reads as a YAML date
            v = v.isoformat()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if v is not None and (not isinstance(v, str) or not _NAME.match(v)):
            raise ValueError(f"must match [A-Za-z0-9._-]+ (e.g. a date, 2026-11-30), found {v!r}")
        return v

    @model_validator(mode="after")
    def _stages_fit_together(self) -> PipelineSpec:
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"stage names must be unique; {dupes} appear more than once in {names}. "
                "Give repeated kinds a name each, e.g. name: neumann"
            )
        first_use = None  # the first stage that reads data; data stages may not come after it
        for stage in self.stages:
            if STAGE_KINDS[stage.kind].role != "data":
                first_use = first_use or stage
                continue
            if any(s.kind == stage.kind for s in self.stages if s is not stage):
                raise ValueError(
                    f"a pipeline has at most one {stage.kind!r} stage: the archive holds one "
                    f"{'measurement' if stage.kind == 'simulate' else 'image'} per scan"
                )
            if first_use is not None:
                raise ValueError(
                    f"data stage {stage.name!r} ({stage.kind}) comes after stage {first_use.name!r} "
                    f"({first_use.kind}); put the data stages (phantoms or ingest, then simulate) first"
                )
        kinds = [s.kind for s in self.stages]
        if "preprocess" in kinds and any(
            k in kinds and kinds.index(k) > kinds.index("preprocess") for k in ("phantoms", "ingest")
        ):
            raise ValueError("preprocess reads the images phantoms or ingest write: put it after them")
        if (
            "simulate" in kinds
            and "preprocess" in kinds
            and kinds.index("simulate") < kinds.index("preprocess")
        ):
            raise ValueError("put preprocess before simulate, and simulate it with image: <output>")
        if "phantoms" in kinds and "ingest" in kinds:
            raise ValueError("a pipeline has phantoms or ingest, not both: each writes the archive's images")
        if "ingest" in kinds and "simulate" in kinds and kinds.index("simulate") < kinds.index("ingest"):
            raise ValueError("simulate reads the images ingest writes: put ingest before simulate")
        if "phantoms" in kinds and "simulate" in kinds and kinds.index("simulate") < kinds.index("phantoms"):
            raise ValueError("simulate reads the images phantoms writes: put phantoms before simulate")
        self._check_lowres_factor()
        self._check_methods()
        return self

    def _check_lowres_factor(self) -> None:
        """A low-resolution factor must divide the slices' H and W, where the spec says what they are."""
        sim = next(iter(self.of_kind("simulate")), None)
        if sim is None or sim.modality != "lowres":
            return
        plane, source = None, ""
        if sim.image == "image":
            phantoms = next(iter(self.of_kind("phantoms")), None)
            if phantoms is not None:
                plane, source = tuple(phantoms.shape[1:]), f"phantoms stage {phantoms.name!r} shape"
        else:
            pre = next((s for s in self.of_kind("preprocess") if s.output == sim.image), None)
            if pre is not None and pre.shape is not None:
                plane, source = tuple(pre.shape[1:]), f"preprocess stage {pre.name!r} shape"
        f = sim.lowres_spec.factor
        if plane is not None and (plane[0] % f or plane[1] % f):
            raise ValueError(
                f"simulate stage {sim.name!r}: lowres.factor must divide the slices' H and W; found factor "
                f"{f} for (H, W) = {plane} from the {source} (remainders {plane[0] % f} and "
                f"{plane[1] % f}). Use H and W that are multiples of {f}, or another factor"
            )

    def _check_train_model(self, stage: TrainStage, modality: str | None) -> None:
        """A train stage's network must apply to the simulated modality (and an up-sampler to its factor)."""
        from models.registry import RECON_MODALITIES, build_model, recon_models_for

        if modality is None:  # ingested measurements: the operator is only known per scan
            return
        serves = RECON_MODALITIES.get(stage.model.name, MODALITIES)
        if modality not in serves:
            raise ValueError(
                f"train stage {stage.name!r}: model {stage.model.name!r} reconstructs modality "
                f"{' or '.join(repr(m) for m in serves)}; this pipeline simulates {modality!r}. Train one of "
                f"{recon_models_for(modality)}, or simulate modality: {serves[0]}"
            )
        if modality == "lowres":
            config = getattr(build_model(stage.model.name, stage.model.kwargs), "config", None)
            factor = getattr(config, "factor", None)
            sim = self.of_kind("simulate")[0]
            want = sim.lowres_spec.factor
            if factor is not None and factor != want:
                raise ValueError(
                    f"train stage {stage.name!r}: model {stage.model.name!r} up-samples by "
                    f"model.kwargs.factor = {factor}, but the simulate stage measures lowres.factor = "
                    f"{want}; set the model's factor to {want}"
                )

    def _check_methods(self) -> None:
        modality = self.modality
        earlier_train: set[str] = set()
        tasks: dict[str, str] = {}  # train_task stage name -> its task
        task_inputs: dict[str, str] = {}  # train_task stage name -> its input
        recon_before = False
        for stage in self.stages:
            if stage.kind == "train":
                earlier_train.add(stage.name)
                self._check_train_model(stage, modality)
            elif stage.kind == "recon":
                recon_before = True
                for ref in stage.refs():
                    if ref.kind == "gan_prior" and tasks.get(ref.target) != "generate":
                        raise ValueError(
                            f"recon stage {stage.name!r}: method {ref.text!r} names no train_task stage with "
                            f"task generate before it; those before it: "
                            f"{sorted(n for n, t in tasks.items() if t == 'generate') or 'none'}"
                        )
                    if ref.kind == "learned" and ref.target not in earlier_train:
                        raise ValueError(
                            f"recon stage {stage.name!r}: method {ref.text!r} names no train stage before "
                            f"it; train stages before it: {sorted(earlier_train) or 'none'}"
                        )
                    if (
                        ref.kind == "classical"
                        and modality
                        and modality not in METHODS[ref.target].modalities
                    ):
                        serving = [m for m, meth in METHODS.items() if modality in meth.modalities]
                        raise ValueError(
                            f"recon stage {stage.name!r}: method {ref.target!r} does not apply to modality "
                            f"{modality!r}; expected any of {serving}"
                        )
            elif stage.kind == "evaluate" and not recon_before:
                raise ValueError(f"evaluate stage {stage.name!r} needs a recon stage before it")
            elif stage.kind == "train_task":
                if stage.input.startswith("recon/") and not recon_before:
                    raise ValueError(
                        f"train_task stage {stage.name!r}: input {stage.input!r} needs a recon stage "
                        "before it"
                    )
                if stage.init_encoder and not stage.init_encoder.startswith("models:/"):
                    if tasks.get(stage.init_encoder) != "segment":
                        raise ValueError(
                            f"train_task stage {stage.name!r}: init_encoder {stage.init_encoder!r} names no "
                            f"segmentation train_task stage before it; those before it: "
                            f"{sorted(n for n, t in tasks.items() if t == 'segment') or 'none'}"
                        )
                    seen = task_inputs[stage.init_encoder]
                    if stage.model.name == "seg_classifier" and stage.input != seen:
                        raise ValueError(
                            f"train_task stage {stage.name!r}: a seg_classifier reads its segmentation "
                            f"{stage.init_encoder!r} whole, which was trained on input {seen!r}; found "
                            f"input {stage.input!r}. Set input: {seen}"
                        )
                tasks[stage.name] = stage.task
                task_inputs[stage.name] = stage.input
            elif stage.kind in ("segment", "classify"):
                task = "segment" if stage.kind == "segment" else "classify"
                for model in [stage.model] if stage.kind == "segment" else stage.models:
                    if not model.startswith("models:/") and tasks.get(model) != task:
                        raise ValueError(
                            f"{stage.kind} stage {stage.name!r}: {model!r} names no train_task stage "
                            f"with task {task} before it; those before it: "
                            f"{sorted(n for n, t in tasks.items() if t == task) or 'none'}"
                        )
                if stage.kind == "segment" and any(i.startswith("recon/") for i in stage.inputs):
                    if not recon_before:
                        raise ValueError(
                            f"segment stage {stage.name!r}: recon inputs need a recon stage before it"
                        )
            elif stage.kind == "gate" and stage.challenger not in earlier_train:
                raise ValueError(
                    f"gate stage {stage.name!r}: challenger {stage.challenger!r} names no train stage before "
                    f"it; train stages before it: {sorted(earlier_train) or 'none'}"
                )

    @property
    def modality(self) -> str | None:
        """The simulated modality, or None when the pipeline simulates nothing (it is then read per scan)."""
        sim = next((s for s in self.stages if s.kind == "simulate"), None)
        return sim.modality if sim is not None else None

    def stage(self, name: str) -> Any:
        """The stage named ``name`` (names default to kinds), or None."""
        return next((s for s in self.stages if s.name == name), None)

    def model_name(self, train_stage: str) -> str:
        """The registered MLflow model a train stage writes: ``register_as``, else ``<pipeline>-<stage>``."""
        stage = self.stage(train_stage)
        return (stage.register_as if stage is not None else None) or f"{self.name}-{train_stage}"

    def of_kind(self, kind: str) -> list[Any]:
        """The stages of ``kind``, in order."""
        return [s for s in self.stages if s.kind == kind]
