"""Reconstruction stage: Ray Data batch reconstruction of an archive, resumable per method.

Each method of a stage (:mod:`pipelines.methods`) writes its own array ``recon/<key>`` and commits
it as its own unit with its own fingerprint: the method's identity (classical name and solver
options, or the model's name, version and source run), the fingerprint of the measurements, and
the code version of this module. So adding a method to a stage reconstructs only that method, and
``medrecon reprocess`` with the same method reuses what a pipeline wrote.

:class:`Reconstructor` is a callable class for ``Dataset.map_batches``: it loads each model once
in ``__init__`` (per actor); for each scan ID in a batch it reads the measurements slab by slab
(each slab once, for every pending method), writes the outputs with their lineage (method, model
URI and version, code version, input checksum, parameters, time) and each method's cost (wall
seconds, solver iterations, worst final residual, convergence), and commits them. A method that
fails on a scan is quarantined with its error and the batch goes on; a re-run does only what is
missing. The class works without Ray on one in-memory batch, which is how it is unit-tested.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import asdict
from typing import Any, NamedTuple

import numpy as np
import torch

from models.inference import SliceOperator, apply_slices
from operators.linear import LinearOperator
from operators.recon import METHODS, reconstruct
from pipelines.context import StageContext, StageResult
from pipelines.errors import StageError
from pipelines.fanout import ScanOutcome, process_units, progress_bar, summarise
from pipelines.fingerprint import MODEL_LEAVES, code_version
from pipelines.methods import MethodRef, ResolvedMethod, resolve_model_uri
from pipelines.physics import Acquisition
from pipelines.spec import ReconStage, SolverOptions, UncertaintySpec
from pipelines.store import MEASUREMENTS, STD_SUFFIX, Archive, record_digest
from pipelines.tuning import tune_methods

__all__ = [
    "Reconstructor",
    "SlabResult",
    "SolverLog",
    "classical_slab",
    "resolve_methods",
    "recon_code_version",
    "run",
]


#: The latent search of a ``gan_prior`` method (:func:`models.gan.gan_prior_reconstruct`).
GAN_PRIOR_SETTINGS = {"steps": 300, "lr": 0.05, "restarts": 2, "z_penalty": 1e-3, "seed": 0}
#: What a ``gan_prior+adapt`` method adds: the image-adaptive steps after the search (the
#: validation peak at 4x on 64² brain slices, ``benchmarks/gan_prior.py``).
GAN_PRIOR_ADAPT_SETTINGS = {"adapt_steps": 50, "adapt_lr": 3e-4}


def method_module(name: str) -> Any:
    """A module that only some methods run (the GAN prior's search, MC dropout), imported by name.

    So it stays out of :func:`recon_code_version`, which every method's fingerprint carries; the
    methods that run it carry its own code version in their identity instead, and editing it
    re-runs only them.
    """
    return importlib.import_module(name)


def recon_code_version() -> str:
    """The code version every reconstruction's fingerprint carries (no model's code: see ``MODEL_LEAVES``)."""
    return code_version(__name__, leaves=MODEL_LEAVES)


class SlabResult(NamedTuple):
    """One method on one slab: the reconstruction, its magnitude ``(s, H, W)``, and how the solver went."""

    raw: torch.Tensor  # the method's own output, complex (MRI) or real (CT), (s, H, W)
    iterations: int = 0
    residual: float | None = None  # final relative residual; None for direct methods
    converged: bool = True  # met the tolerance before the iteration cap

    @property
    def image(self) -> np.ndarray:
        """The magnitude, float32, as it is stored."""
        return self.raw.abs().numpy().astype(np.float32)


def classical_slab(method: str, y: torch.Tensor, op: LinearOperator, options: dict[str, Any]) -> SlabResult:
    """A classical reconstruction of a slab with :func:`operators.recon.reconstruct`.

    ``options`` are its keyword arguments (a :class:`~pipelines.spec.SolverOptions` dump). Direct
    methods report 0 iterations and no residual; iterative ones their solver's step count, final
    relative residual and whether it met ``tol``.
    """
    result = reconstruct(method, y, op, **options)
    iterative = result.iterations > 0 or METHODS[method].lam is not None
    return SlabResult(
        result.image,
        int(result.iterations),
        float(result.residual) if iterative else None,
        bool(result.converged),
    )


class SolverLog:
    """Per method of one scan: wall seconds, iterations per slab, the worst final residual, convergence,
    and the data-consistency residual ``‖A x̂ − y‖ / ‖y‖`` over the whole scan."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.slices = 0
        self.iterations: list[int] = []
        self.residual: float | None = None
        self.unconverged = 0
        self.misfit = 0.0  # Σ ‖A x̂ − y‖² over slabs
        self.signal = 0.0  # Σ ‖y‖²

    def add(self, seconds: float, slab: SlabResult, y: torch.Tensor, op: LinearOperator) -> None:
        self.seconds += seconds
        self.slices += int(y.shape[0])
        self.iterations.append(slab.iterations)
        self.unconverged += not slab.converged
        fitted = op.forward(slab.raw if op.complex_in else slab.raw.real)  # (s, *op.out_shape)
        self.misfit += float(torch.linalg.vector_norm(fitted - y) ** 2)
        self.signal += float(torch.linalg.vector_norm(y) ** 2)
        if slab.residual is not None and np.isfinite(slab.residual):
            r = slab.residual
            self.residual = r if self.residual is None else max(self.residual, r)

    def summary(self) -> dict[str, Any]:
        """JSON-safe: ``recon_s``, ``iterations`` (mean over slabs), ``iterations_max``, ``residual_max``,
        ``converged`` (every slab met its tolerance), ``slabs_at_cap``, ``s_per_slice`` and
        ``dc_residual``."""
        return {
            "recon_s": self.seconds,
            "s_per_slice": self.seconds / max(self.slices, 1),
            "dc_residual": float(np.sqrt(self.misfit / self.signal)) if self.signal > 0 else None,
            "iterations": float(np.mean(self.iterations)) if self.iterations else 0.0,
            "iterations_max": max(self.iterations, default=0),
            "residual_max": self.residual,
            "converged": self.unconverged == 0,
            "slabs_at_cap": self.unconverged,
        }


def resolve_methods(
    refs: list[MethodRef],
    options: dict[str, SolverOptions],
    tracking_uri: str,
    trained: dict[str, str] | None = None,
    uncertainty: UncertaintySpec | None = None,
) -> list[ResolvedMethod]:
    """Output keys, exact model URIs and identities of a stage's methods (on the driver, before Ray).

    Args:
        refs: the methods as written.
        options: solver options per classical name (unset: the method's defaults).
        tracking_uri: where model URIs resolve.
        trained: ``{train stage name: model URI}`` for ``learned:<name>`` methods.
        uncertainty: MC-dropout settings; a model's identity then carries them (it writes a std map).

    Raises:
        StageError: a ``learned:`` method names a train stage that recorded no model.
        TrackingError: a model URI does not resolve.
    """
    out = []
    for ref in refs:
        if ref.kind == "classical":
            opts = (options.get(ref.target) or SolverOptions()).model_dump()
            out.append(ResolvedMethod(ref, ref.target, None, {"method": ref.target, "options": opts}))
            continue
        uri = ref.target
        if ref.kind in ("learned", "gan_prior"):
            uri = (trained or {}).get(ref.target, "")
            if not uri:
                raise StageError(f"method {ref.text!r}: train stage {ref.target!r} recorded no model")
        key, exact, identity = resolve_model_uri(uri, tracking_uri)
        if ref.kind == "gan_prior":
            key = f"{ref.form.replace('+', '_')}.{key}"  # gan_prior+adapt+dc -> gan_prior_adapt_dc.<key>
            settings = {
                **GAN_PRIOR_SETTINGS,
                "data_consistency": ref.data_consistency,
                **(GAN_PRIOR_ADAPT_SETTINGS if ref.adapt else {}),
            }
            identity = identity | {"gan_prior": settings, "code": code_version("models.gan")}
        elif uncertainty is not None:
            identity = identity | {
                "uncertainty": uncertainty.model_dump(),
                "code": code_version("models.uncertainty"),
            }
        out.append(ResolvedMethod(ref, key, exact, identity))
    keys = [m.key for m in out]
    if len(set(keys)) != len(keys):
        raise StageError(f"two methods write the same output: {[m.ref.text for m in out]} give keys {keys}")
    return out


class Reconstructor:
    """Reconstruct the scans named in a batch; see the module docstring.

    Args:
        archive_uri, storage_options: where the archive is.
        methods: the :class:`ResolvedMethod` s, as dicts (``dataclasses.asdict``) for Ray.
        fingerprints: ``{key: {scan_id: fingerprint}}`` of each method's unit ``recon/<key>``: the
            method's identity over that scan's measurements (:meth:`ResolvedMethod.fingerprint`).
        tracking_uri: where the models are (needed only if a method has one).
        stage: the stage's name, for quarantine records and lineage.
        device: where models run (``cuda`` when the actor has a GPU).
    """

    def __init__(
        self,
        archive_uri: str,
        storage_options: dict[str, Any],
        methods: list[dict[str, Any]],
        fingerprints: dict[str, dict[str, str]],
        tracking_uri: str | None = None,
        stage: str = "recon",
        device: str = "cpu",
    ) -> None:
        torch.set_num_threads(1)
        self.archive = Archive(archive_uri, storage_options)
        self.methods = [
            ResolvedMethod(MethodRef(**m["ref"]), m["key"], m["model_uri"], m["identity"]) for m in methods
        ]
        self.fingerprints = dict(fingerprints)
        self.stage = stage
        self.device = device
        self.code = recon_code_version()
        self.models: dict[str, torch.nn.Module] = {}
        for m in self.methods:
            if m.model_uri is not None and m.model_uri not in self.models:
                if tracking_uri is None:
                    raise StageError(f"method {m.ref.text!r} needs a tracking URI to load {m.model_uri}")
                from pipelines.methods import load_model_uri

                self.models[m.model_uri] = load_model_uri(m.model_uri, tracking_uri, device)[0]

    def _slab(
        self, method: ResolvedMethod, y: torch.Tensor, op: LinearOperator, slices: SliceOperator
    ) -> SlabResult:
        """One method on one slab; ``op`` is the slab's operator, ``slices`` gives its sub-slabs'
        (a network runs a few slices at a time, each with their own operator)."""
        if "gan_prior" in method.identity:
            search = method_module("models.gan").gan_prior_reconstruct
            x, _ = search(self.models[str(method.model_uri)], op, y, **method.identity["gan_prior"])
            return SlabResult(x.detach())
        if method.model_uri is not None:
            return SlabResult(apply_slices(self.models[method.model_uri], y, slices, device=self.device))
        return classical_slab(method.identity["method"], y, op, method.identity["options"])

    def _std(self, method: ResolvedMethod, y: torch.Tensor, slices: SliceOperator, z0: int) -> np.ndarray:
        """The per-voxel std of the magnitude over MC-dropout samples of a model on one slab."""
        mc_dropout = method_module("models.uncertainty").mc_dropout
        settings = method.identity["uncertainty"]
        model = self.models[str(method.model_uri)]
        samples = []
        for k in range(int(settings["samples"])):
            with torch.no_grad(), mc_dropout(model, float(settings["dropout"]), seed=1_000_003 * z0 + k):
                samples.append(apply_slices(model, y, slices, device=self.device).abs())
        return torch.stack(samples).std(dim=0).numpy().astype(np.float32)

    def reconstruct_scan(self, archive: Archive, scan_id: str, units: list[str]) -> dict[str, Any]:
        """Reconstruct ``scan_id`` with the methods of ``units``: ``{unit: commit info or exception}``."""
        acq = Acquisition.from_archive(archive, scan_id)
        measured = archive.open_array(scan_id, acq.measurement)
        depth = measured.shape[0]
        slab = int(measured.attrs.get("slab") or depth)
        input_checksum = record_digest(acq.records)
        h, w = acq.image_shape
        results: dict[str, Any] = {}
        active = {}
        std_writers: dict[str, Any] = {}
        for method in (m for m in self.methods if f"recon/{m.key}" in units):
            unit = f"recon/{method.key}"
            if method.model_uri is None and acq.modality not in METHODS[method.key].modalities:
                results[unit] = StageError(
                    f"method {method.key!r} does not apply to {acq.modality.upper()} scan {scan_id!r}; "
                    f"it serves {list(METHODS[method.key].modalities)}"
                )
                continue
            lineage = method.lineage | {
                "producer": self.stage,
                "fingerprint": self.fingerprints[method.key][scan_id],
                "code_version": self.code,
                "input_checksum": input_checksum,
                "time": time.time(),
            }
            writer = archive.create_array(scan_id, unit, (depth, h, w), np.float32, slab=slab, attrs=lineage)
            if "uncertainty" in method.identity:
                std_attrs = lineage | {"what": "MC-dropout standard deviation of the magnitude"}
                std_writers[unit] = archive.create_array(
                    scan_id, unit + STD_SUFFIX, (depth, h, w), np.float32, slab=slab, attrs=std_attrs
                )
            active[unit] = (method, writer, SolverLog())
        for z0 in range(0, depth, slab):
            if not active:
                break
            y = acq.read(archive, scan_id, z0, z0 + slab)  # read once for every method
            for unit, (method, writer, log) in list(active.items()):
                t0 = time.perf_counter()
                try:
                    op = acq.slab_op(z0, z0 + y.shape[0])
                    slices = (lambda a, b, z0=z0: acq.slab_op(z0 + a, z0 + b)) if acq.per_slice else op
                    out = self._slab(method, y, op, slices)
                    log.add(time.perf_counter() - t0, out, y, op)
                    writer.write(z0, out.image)
                    if unit in std_writers:
                        std_writers[unit].write(z0, self._std(method, y, slices, z0))
                except Exception as exc:  # this method fails on this scan; the others go on
                    results[unit] = exc
                    del active[unit]
        for unit, (method, writer, log) in active.items():
            solver = log.summary()
            if method.model_uri is None and METHODS[method.key].lam is not None:  # the weight it used
                lam = method.identity["options"].get("lam")
                solver["lam"] = METHODS[method.key].lam if lam is None else lam
            writer.attrs.update({"solver": solver})
            arrays = {unit: writer.record()}
            if unit in std_writers:
                arrays[unit + STD_SUFFIX] = std_writers[unit].record()
            results[unit] = {"arrays": arrays, "solver": solver, "method": method.ref.text}
        return results

    def process(self, scan_id: str) -> ScanOutcome:
        units = {f"recon/{m.key}": self.fingerprints[m.key][scan_id] for m in self.methods}
        return process_units(self.archive, scan_id, units, self.reconstruct_scan, stage=self.stage)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outcomes = [self.process(str(s)) for s in batch["scan_id"]]
        return {
            "scan_id": np.array([o.scan_id for o in outcomes]),
            "status": np.array([o.status for o in outcomes]),
            "seconds": np.array([o.seconds for o in outcomes]),
            "error": np.array([o.error or "" for o in outcomes]),
        }


def run(ctx: StageContext, stage: ReconStage, fingerprint: str) -> StageResult:
    """Reconstruct the stage's split with every method; one Ray Data actor pool for the archive."""
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # ray.data sets its own levels on import
    trained = {
        name: out["model_uri"]
        for name, out in ctx.upstream.items()
        if isinstance(out, dict) and "model_uri" in out
    }
    methods = resolve_methods(stage.refs(), stage.options, ctx.tracking_uri, trained, stage.uncertainty)
    methods, tunings = tune_methods(ctx, methods, stage.tune_slices)
    code = recon_code_version()
    measured = ctx.archive.committed(MEASUREMENTS)  # scans whose simulation failed have nothing to read
    wanted = set(stage.scans) if stage.scans is not None else None
    if stage.new_scans:
        new = set(ctx.archive.scans_since(ctx.archive.last_success(ctx.spec.name, ctx.spec.run_key)))
        wanted = new if wanted is None else wanted & new
    ids = [s for s in ctx.archive.scans(stage.split) if s in measured and (wanted is None or s in wanted)]
    # Each scan's output chains the method and that scan's measurements, so new scans (or a new
    # night) redo nothing already reconstructed from the same measurements with the same method.
    fingerprints = {m.key: {s: m.fingerprint(measured[s], code) for s in ids} for m in methods}
    outcomes: list[ScanOutcome] = []
    if ids:
        data_ctx = ray.data.DataContext.get_current()
        data_ctx.enable_progress_bars = False  # one rich bar on the terminal instead
        ds = ray.data.from_items([{"scan_id": s} for s in ids]).map_batches(
            Reconstructor,
            fn_constructor_kwargs={
                "archive_uri": ctx.archive.uri,
                "storage_options": ctx.archive.storage_options,
                "methods": [asdict(m) for m in methods],
                "fingerprints": fingerprints,
                "tracking_uri": ctx.tracking_uri,
                "stage": stage.name,
                "device": "cuda" if stage.gpus_per_actor > 0 else "cpu",
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(stage.actors, len(ids))),
            num_cpus=stage.cpus_per_actor,
            num_gpus=stage.gpus_per_actor or None,
        )
        with progress_bar(ctx.console) as progress:
            bar = progress.add_task(f"reconstruct ({', '.join(m.key for m in methods)})", total=len(ids))
            for row in ds.iter_rows():
                outcomes.append(
                    ScanOutcome(
                        str(row["scan_id"]),
                        str(row["status"]),
                        float(row["seconds"]),
                        str(row["error"]) or None,
                    )
                )
                progress.advance(bar)
    outputs = {
        "methods": [m.key for m in methods],
        "labels": {m.key: m.ref.text for m in methods},
        "scans": ids,
        "tuning": [asdict(t) for t in tunings],
        "resolved": {m.key: asdict(m) for m in methods},
    }
    return summarise(outcomes, outputs, {f"recon/{key}": fp for key, fp in fingerprints.items()})
