"""The evaluate stage's stability audit (Antun et al. 2020) of every method on one test scan.

On the middle ``slices`` slices of the first scored test scan, each learned model gets a worst-case
search (:func:`operators.stability.worst_case_perturbation`: projected gradient ascent for an image
perturbation ``‖r‖ <= ε‖x̂‖`` that changes its reconstruction most) and the random control of the
same norm. Classical methods are not differentiated through hundreds of solver iterations: each is
measured under the random perturbations and under every learned model's worst case, as Antun et
al. measure classical methods, and the largest amplification is reported. Per method it returns
``amplification`` (``‖f(y + A r) − f(y)‖ / ‖A r‖``, worst over slices) and
``amplification_random`` (the random control).
"""

from __future__ import annotations

from typing import Any

import torch

from pipelines.methods import MethodRef, ResolvedMethod
from pipelines.physics import Acquisition
from pipelines.spec import StabilitySpec
from pipelines.store import Archive

__all__ = ["audit_methods"]


def _learned(model: torch.nn.Module, op: Any) -> Any:
    return lambda y: model(y, op)


def _classical(method: ResolvedMethod, op: Any) -> Any:
    from operators.recon import reconstruct

    options = method.identity["options"]
    return lambda y: reconstruct(method.identity["method"], y, op, **options).image


def audit_methods(
    archive: Archive,
    scan_id: str,
    methods: list[dict[str, Any]],
    spec: StabilitySpec,
    tracking_uri: str,
) -> dict[str, dict[str, float]]:
    """``{key: {"amplification": …, "amplification_random": …}}`` for ``methods`` (ResolvedMethod dicts)."""
    from operators.stability import evaluate_perturbation, random_perturbation, worst_case_perturbation
    from pipelines.methods import load_model_uri

    resolved = [
        ResolvedMethod(MethodRef(**m["ref"]), m["key"], m["model_uri"], m["identity"]) for m in methods
    ]
    acq = Acquisition.from_archive(archive, scan_id)
    depth = archive.open_array(scan_id, acq.measurement).shape[0]
    z0 = max(0, depth // 2 - spec.slices // 2)
    z1 = min(depth, z0 + spec.slices)
    y = acq.read(archive, scan_id, z0, z1)  # (s, *op.out_shape)
    op = acq.slab_op(z0, z1)
    maps = {}
    for m in resolved:
        if m.model_uri is not None:
            model = load_model_uri(m.model_uri, tracking_uri)[0].eval()
            for p in model.parameters():
                p.requires_grad_(False)
            maps[m.key] = (_learned(model, op), True)
        else:
            maps[m.key] = (_classical(m, op), False)
    out: dict[str, dict[str, float]] = {}
    worst_cases = []
    for key, (f, learned) in maps.items():
        if learned:
            worst = worst_case_perturbation(f, y, op, None, eps=spec.eps, steps=spec.steps, seed=0)
            worst_cases.append(worst.perturbation)
            amplification = float(worst.amplification.max())
        else:
            amplification = 0.0
        control = random_perturbation(f, y, op, None, eps=spec.eps, trials=spec.trials, seed=1)
        out[key] = {"amplification_random": float(control.amplification.max())}
        out[key]["amplification"] = max(amplification, out[key]["amplification_random"])
    for key, (f, learned) in maps.items():
        if not learned:  # the learned models' worst cases, applied to the classical method
            for r in worst_cases:
                given = evaluate_perturbation(f, y, op, None, r)
                out[key]["amplification"] = max(out[key]["amplification"], float(given.amplification.max()))
    return out
